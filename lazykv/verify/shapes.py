"""Shape propagation: a corrupt scalar upstream must not reach a kernel as a wrong shape.

A ``DYNAMIC_BOUND`` tensor may be resized to any shape with no more elements than its
bound, so a corrupt scalar or list upstream (an unsqueeze dim, view sizes, a permuted
split) reaches the LLM kernels as a wrong *shape* at run time, and those kernels abort
on it (``update_cache``: "batch size (16) should be equal to ... (1)"; ``custom_sdpa``:
"num kv heads > num query heads"). So :func:`propagate_shapes` runs each method in
Python, every input at its upper bound and every start position 0: ATen operators by
their own meta kernels (never the ExecuTorch kernels: custom ops run their real code on
meta tensors), ExecuTorch's prim ops and the LLM ops by hand, delegates by the shapes
their XNNPACK graph declares. A shape that leaves its tensor's declared bound, or that
an aborting kernel would reject, refuses the program.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional

from lazykv.format.program import (BOOL, DOUBLE, INT, INT_LIST, NULL, OPTIONAL_TENSOR_LIST,
                                   TENSOR, TENSOR_LIST, Plan)
from lazykv.format.scalar_type import BY_CODE
from lazykv.verify.structure import Corrupt

_PRIM_INT_OPS: Dict[str, Callable] = {
    "executorch_prim::add": lambda a, b: a + b,
    "executorch_prim::sub": lambda a, b: a - b,
    "executorch_prim::mul": lambda a, b: a * b,
    "executorch_prim::floordiv": lambda a, b: a // b if b else None,
    "executorch_prim::mod": lambda a, b: a % b if b else None,
    "executorch_prim::sym_max": max,
    "executorch_prim::sym_min": min,
}

#: (operator, argument spec) -> output shapes; a model repeats the same calls layer
#: after layer, and running a meta kernel costs ~1-2 ms (torch's reference
#: implementations), so a 12-layer model needs a twelfth of the calls.
_META_MEMO: dict = {}
_META_MEMO_MAX = 4096


def _torch_dtype(scalar_type: int):
    import torch

    t = BY_CODE.get(scalar_type)
    return None if t is None else getattr(torch, t.dtype, None)


def _aten_op(name: str, overload: str):
    if not name.startswith("aten::"):
        return None  # only ATen has meta kernels for every operator it registers
    import torch

    try:
        packet = getattr(torch.ops.aten, name[len("aten::"):])
        return getattr(packet, overload or "default")
    except (AttributeError, RuntimeError):
        return None


def propagate_shapes(plan: Plan, delegate_io) -> None:
    """Raise :class:`Corrupt` if running ``plan`` with every input at its bound would
    give a tensor a shape outside its declared one, or a shape an aborting kernel
    rejects. ``delegate_io(delegate)``: its graph's I/O
    (:meth:`lazykv.verify.structure.DelegateBlobs.io`)."""
    where = f"method {plan.name!r}"
    instrs = [(ci, ii, x) for ci, chain in enumerate(plan.chains)
              for ii, x in enumerate(chain.instructions)]
    if any(x.kind in ("move", "jump") for _, _, x in instrs):
        return  # control flow: shapes depend on the path taken
    shapes = {i: list(t.sizes) for i, t in plan.tensors.items()}
    ints = dict(plan.ints)

    def set_shape(v: int, shape, at: str) -> None:
        shape = [int(d) for d in shape]
        bound = plan.tensors[v].sizes
        if len(shape) != len(bound) or not all(0 <= a <= b for a, b in zip(shape, bound)):
            raise Corrupt(
                f"{where}: {at} makes value {v} a {shape} tensor, outside its declared "
                f"shape {bound}"
            )
        shapes[v] = shape

    def tensor_spec(v: int, write: bool) -> tuple:
        dt = _torch_dtype(plan.tensors[v].scalar_type)
        if dt is None:
            raise LookupError(v)
        return (dt, () if write else tuple(shapes[v]), write)

    for ci, ii, (kind, a, b) in instrs:
        at = f"instruction {ii} of chain {ci}"
        if kind == "free":
            continue
        if kind == "delegate":
            io = delegate_io(plan.delegates[a])
            if io is None:
                continue
            n_in, _, dims_in, _ = io
            for j in range(n_in):
                v, d = b[j], dims_in[j]
                if d is None or v not in shapes:
                    continue
                # XNNPACK keeps scalars as [1] and may regroup dims: compare sizes only.
                if math.prod(shapes[v]) > math.prod(d):
                    raise Corrupt(
                        f"{where}: {at} passes a {shapes[v]} tensor (value {v}) as input {j} of "
                        f"delegate {a}, whose graph takes at most {list(d)}"
                    )
            continue
        op = plan.operators[a]
        name, overload = op
        op_at = f"{at} ({op.full_name})"
        if (name, overload) == ("aten::sym_size", "int"):
            ints[b[2]] = shapes[b[0]][ints[b[1]]]
        elif (name, overload) == ("aten::_local_scalar_dense", ""):
            ints[b[1]] = 0  # a start position: the smallest
        elif name in _PRIM_INT_OPS and len(b) == 3:
            x, y = ints.get(b[0]), ints.get(b[1])
            r = _PRIM_INT_OPS[name](x, y) if x is not None and y is not None else None
            if r is None:
                ints.pop(b[2], None)
            else:
                ints[b[2]] = r
        elif (name, overload) == ("executorch_prim::et_view", "default"):
            size = [ints.get(k) for k in plan.lists[b[1]]]
            if None in size:
                continue
            n = math.prod(shapes[b[0]])
            if size.count(-1) == 1:
                rest = math.prod(d if d != -1 else 1 for d in size)
                size[size.index(-1)] = n // rest if rest else 0
            if math.prod(size) != n or any(d < 0 for d in size):
                raise Corrupt(f"{where}: {op_at} views a {shapes[b[0]]} tensor as {size}")
            set_shape(b[2], size, op_at)
        elif name in ("llama::update_cache", "llama::update_cache_with_indices"):
            value, cache = shapes[b[0]], shapes[b[1]]
            if len(value) < 2:
                raise Corrupt(f"{where}: {op_at} gets a {value} value (update_cache reads its dim 1)")
            if len(value) == 4 and len(cache) == 4 and any(value[d] != cache[d] for d in (0, 2, 3)):
                raise Corrupt(f"{where}: {op_at} would write a {value} value into a {cache} cache")
        elif (name, overload) == ("llama::custom_sdpa", "out"):
            q, k, v = shapes[b[0]], shapes[b[1]], shapes[b[2]]
            if len(q) == len(k) == len(v) == 4:
                if not (0 < k[2] <= q[2] and q[2] % k[2] == 0 and k[2] == v[2]):
                    raise Corrupt(
                        f"{where}: {op_at} gets query {q}, key {k}, value {v}: the kernel "
                        f"needs key heads = value heads dividing query heads"
                    )
                mask = b[4]
                if mask in shapes and (len(shapes[mask]) != 2 or shapes[mask][0] != q[1]
                                       or shapes[mask][1] != v[1]):
                    raise Corrupt(f"{where}: {op_at} gets a {shapes[mask]} mask for query {q}")
                set_shape(b[-1], q, op_at)
        else:
            aten = _aten_op(name, overload)
            if aten is None:
                continue
            try:
                spec, out_values = [], []
                for j, arg in enumerate(aten._schema.arguments):
                    v = b[j]
                    k = plan.kinds[v]
                    write = arg.alias_info is not None and arg.alias_info.is_write
                    if k == TENSOR:
                        x = tensor_spec(v, write)
                        if write:
                            out_values.append(v)
                    elif k == INT:
                        x = ints.get(v, 0)
                    elif k == INT_LIST:
                        x = tuple(ints.get(i, 0) for i in plan.lists[v])
                    elif k == TENSOR_LIST:
                        x = tuple(tensor_spec(i, write) for i in plan.lists[v])
                        if write:
                            out_values.extend(plan.lists[v])
                    elif k == OPTIONAL_TENSOR_LIST:
                        x = tuple(None if i == -1 or plan.kinds[i] == NULL else tensor_spec(i, False)
                                  for i in plan.lists[v])
                    elif k in (DOUBLE, BOOL):
                        x = plan.scalars[v]
                    elif k == NULL:
                        x = None
                    else:
                        raise LookupError(k)
                    spec.append((arg.name if arg.kwarg_only else None, k, x))
            except Exception:  # an argument the meta kernel cannot be given: skip the op
                continue
            out_shapes = _meta_output_shapes(aten, tuple(spec))
            if out_shapes is None:
                continue  # the ExecuTorch kernel checks such arguments itself (cleanly)
            for v, shape in zip(out_values, out_shapes):
                set_shape(v, shape, op_at)


def _meta_output_shapes(op, spec: tuple) -> Optional[list]:
    """Shapes of the tensors ``op`` writes when run on meta tensors described by ``spec``
    (``(kwarg name or None, kind, value)`` per schema argument; a tensor's value is
    ``(dtype, shape, written)``), in argument order; None if the meta kernel refuses the
    arguments. Memoized."""
    key = (op, spec)
    try:
        return _META_MEMO[key]
    except KeyError:
        pass
    except TypeError:  # an unhashable scalar: compute without the memo
        key = None
    import warnings

    import torch

    def build(t):
        dt, shape, write = t
        return torch.empty([0] if write else list(shape), dtype=dt, device="meta")

    args, kwargs, outs = [], {}, []
    for kw, k, x in spec:
        if k == TENSOR:
            x_ = build(x)
            if x[2]:
                outs.append(x_)
        elif k == INT_LIST:
            x_ = list(x)
        elif k == TENSOR_LIST:
            x_ = [build(t) for t in x]
            outs.extend(t_ for t, t_ in zip(x, x_) if t[2])
        elif k == OPTIONAL_TENSOR_LIST:
            x_ = [None if t is None else build(t) for t in x]
        else:
            x_ = x
        if kw is None:
            args.append(x_)
        else:
            kwargs[kw] = x_
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            op(*args, **kwargs)
        result = [tuple(t.shape) for t in outs]
    except Exception:
        result = None
    if key is not None:
        if len(_META_MEMO) >= _META_MEMO_MAX:
            _META_MEMO.clear()
        _META_MEMO[key] = result
    return result
