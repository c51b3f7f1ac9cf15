"""Kernel calls against their operators' schemas, and the kernels that abort on bad input.

Every kernel call passes a stack of values: every schema argument, then one slot for
the return (ExecuTorch's codegen checks ``stack.size() == len(arguments) + 1``). A value
of the wrong kind where the kernel expects a tensor, an int or a list aborts the
process (``EValue::toTensor``: ``ET_CHECK``), and an argument the schema marks as
written (``Tensor(a!)``) must not be a constant (read-only pages). Schemas come from
torch for ATen operators and from the registrations of ExecuTorch's own libraries,
copied below (registering those would import ExecuTorch's runtime and torch's compiler
stack); both are tied to ExecuTorch 1.5 / torch 2.13 (:mod:`lazykv._et_compat` refuses
other versions at import).

Some kernels abort (``ET_CHECK``) instead of failing cleanly on arguments a program can
get wrong; :data:`KERNEL_RULES` checks those.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

from lazykv import _et_compat
from lazykv.format.program import (BOOL, DOUBLE, INT, INT_LIST, NULL, OPTIONAL_TENSOR_LIST,
                                   STRING, TENSOR, TENSOR_LIST, DOUBLE_LIST, BOOL_LIST, Plan)
from lazykv.format.scalar_type import BOOL as BOOL_SCALAR_TYPE
from lazykv.format.scalar_type import BY_CODE
from lazykv.verify.structure import Corrupt, constant_values

#: Stack layouts of ExecuTorch-only operators that torch has no schema for
#: (``kernels/prim_ops/et_view.cpp``, ``et_copy_index.cpp``): kinds per stack slot and
#: the slots written.
PRIM_LAYOUTS = {
    ("executorch_prim::et_view", "default"): (((TENSOR,), (INT_LIST,), (TENSOR,)), ()),
    ("executorch_prim::et_copy_index", "tensor"): (((TENSOR,), (TENSOR,), (INT,)), (0,)),
}

#: Schemas of ExecuTorch's own operator libraries, as their registrations state them
#: (``executorch_prim_ops_registry.py``, ``extension/llm/custom_ops``, ExecuTorch 1.5).
ET_SCHEMAS = (
    "executorch_prim::add.Scalar(Scalar a, Scalar b) -> Scalar",
    "executorch_prim::sub.Scalar(Scalar a, Scalar b) -> Scalar",
    "executorch_prim::mul.Scalar(Scalar a, Scalar b) -> Scalar",
    "executorch_prim::floordiv.Scalar(Scalar a, Scalar b) -> Scalar",
    "executorch_prim::truediv.Scalar(Scalar a, Scalar b) -> Scalar",
    "executorch_prim::mod.Scalar(SymInt a, SymInt b) -> SymInt",
    "executorch_prim::sym_float.Scalar(Scalar a) -> Scalar",
    "executorch_prim::sym_int.Scalar(Scalar a) -> Scalar",
    "executorch_prim::sym_max.Scalar(Scalar a, Scalar b) -> Scalar",
    "executorch_prim::sym_min.Scalar(Scalar a, Scalar b) -> Scalar",
    "executorch_prim::sym_ite.Scalar(Scalar b, Scalar t, Scalar f) -> Scalar",
    "executorch_prim::sym_not.Scalar(Scalar a) -> bool",
    "executorch_prim::neg.Scalar(Scalar a) -> Scalar",
    "executorch_prim::ceil.Scalar(Scalar a) -> Scalar",
    "executorch_prim::round.Scalar(Scalar a) -> Scalar",
    "executorch_prim::trunc.Scalar(Scalar a) -> Scalar",
    "executorch_prim::eq.Scalar(Scalar a, Scalar b) -> bool",
    "executorch_prim::gt.Scalar(Scalar a, Scalar b) -> bool",
    "executorch_prim::lt.Scalar(Scalar a, Scalar b) -> bool",
    "executorch_prim::ge.Scalar(Scalar a, Scalar b) -> bool",
    "executorch_prim::le.Scalar(Scalar a, Scalar b) -> bool",
    "llama::update_cache.out(Tensor value, Tensor(a!) cache, SymInt start_pos, *, "
    "Tensor(b!) out) -> Tensor(b!)",
    "llama::update_cache_with_indices.out(Tensor value, Tensor(a!) cache, SymInt start_pos, "
    "Tensor indices, *, Tensor(b!) out) -> Tensor(b!)",
    "llama::custom_sdpa.out(Tensor query, Tensor key, Tensor value, SymInt start_pos, "
    "Tensor? attn_mask=None, float drpout_p=0., bool is_causal=False, float? scale=None, *, "
    "Tensor(a!) out) -> Tensor(a!)",
    "llama::sdpa_with_kv_cache.out(Tensor query, Tensor key, Tensor value, "
    "Tensor(a!) key_cache, Tensor(b!) value_cache, SymInt start_pos, SymInt seq_len, "
    "Tensor? attn_mask=None, float drpout_p=0., bool is_causal=False, float? scale=None, *, "
    "Tensor(c!) out) -> Tensor(c!)",
    "llama::custom_quantized_sdpa.out(Tensor query, Tensor key, Tensor value, "
    "SymInt start_pos, Tensor? attn_mask=None, float drpout_p=0., bool is_causal=False, "
    "float? scale=None, Tensor? q_zero_points=None, Tensor? q_scales=None, "
    "Tensor? k_zero_points=None, Tensor? k_scales=None, Tensor? v_zero_points=None, "
    "Tensor? v_scales=None, bool is_seq_at_dim_2=False, *, Tensor(a!) out) -> Tensor(a!)",
    "llama::fast_hadamard_transform.out(Tensor mat, *, Tensor(a!) out) -> Tensor(a!)",
    "llama::fallback.out(Tensor input, *, Tensor(a!) output) -> Tensor(a!)",
)

Layout = Tuple[Tuple[Optional[tuple], ...], Tuple[int, ...]]
_LAYOUTS: Dict[Tuple[str, str], Optional[Layout]] = {}


def _kinds_for(t) -> Optional[tuple]:
    """Value kinds a torch schema type accepts (None: not checked)."""
    import torch

    if isinstance(t, torch.OptionalType):
        inner = _kinds_for(t.getElementType())
        return None if inner is None else inner + (NULL,)
    if isinstance(t, torch.TensorType):
        return (TENSOR,)
    if isinstance(t, (torch.IntType, torch.SymIntType)):
        return (INT,)
    if isinstance(t, torch.FloatType):
        return (DOUBLE,)
    if isinstance(t, (torch.BoolType, torch.SymBoolType)):
        return (BOOL,)
    if isinstance(t, torch.NumberType):
        return (INT, DOUBLE, BOOL)
    if isinstance(t, torch.StringType):
        return (STRING,)
    if isinstance(t, torch.ListType):
        e = t.getElementType()
        if isinstance(e, (torch.IntType, torch.SymIntType)):
            return (INT_LIST,)
        if isinstance(e, torch.TensorType):
            return (TENSOR_LIST,)
        if isinstance(e, torch.OptionalType) and isinstance(e.getElementType(), torch.TensorType):
            return (OPTIONAL_TENSOR_LIST,)
        if isinstance(e, torch.FloatType):
            return (DOUBLE_LIST,)
        if isinstance(e, torch.BoolType):
            return (BOOL_LIST,)
    return None  # ScalarType, Layout, Device, MemoryFormat...: encoded variously


def schema(name: str, overload: str):
    """The schema of operator ``name.overload`` (ATen from torch, ExecuTorch's own from
    :data:`ET_SCHEMAS`), or None if lazykv does not know it."""
    if name.startswith("aten::"):
        return _et_compat.aten_schema(name, overload)
    full = f"{name}.{overload}" if overload else name
    for text in ET_SCHEMAS:
        if text.startswith(full + "("):
            return _et_compat.parse_schema(text)
    return None


def operator_layout(name: str, overload: str) -> Optional[Layout]:
    """``(kinds per stack slot, written slots)`` of an operator, or None if unknown."""
    key = (name, overload)
    if key not in _LAYOUTS:
        _LAYOUTS[key] = PRIM_LAYOUTS.get(key) or _layout_from_schema(schema(name, overload))
    return _LAYOUTS[key]


def _layout_from_schema(s) -> Optional[Layout]:
    if s is None:
        return None
    kinds, written = [], []
    for i, a in enumerate(s.arguments):
        kinds.append(_kinds_for(a.type))
        if a.alias_info is not None and a.alias_info.is_write:
            written.append(i)
    ret = None
    if len(s.returns) == 1:
        ret = _kinds_for(s.returns[0].type)
        if any(a.is_out for a in s.arguments) and ret == (TENSOR,):
            written.append(len(s.arguments))  # the out tensor again
    kinds.append(ret)
    return tuple(kinds), tuple(written)


# -- kernels that abort -------------------------------------------------------------------


def _rule_sym_size(plan: Plan, args: list) -> Optional[str]:
    # register_prim_ops.cpp: ``self.size(dim)`` aborts for a dim outside the tensor.
    rank = len(plan.tensors[args[0]].sizes)
    dim = plan.ints[args[1]]
    return None if 0 <= dim < rank else f"asks for size {dim} of a {rank}-d tensor"


def _rule_update_cache(plan: Plan, args: list) -> Optional[str]:
    # op_update_cache.cpp: ``value.size(1)`` before any check, then ET_CHECK_MSG (abort)
    # on batch, heads, head dim, element size and dim order of value against cache.
    value, cache = plan.tensors[args[0]], plan.tensors[args[1]]
    if len(value.sizes) != 4 or len(cache.sizes) != 4:
        return f"needs 4-d value and cache, got {value.sizes} and {cache.sizes}"
    for d in (0, 2, 3):
        if value.sizes[d] != cache.sizes[d]:
            return f"writes a {value.sizes} value into a {cache.sizes} cache (dim {d} differs)"
    if BY_CODE[value.scalar_type].itemsize != BY_CODE[cache.scalar_type].itemsize:
        return (f"writes scalar type {value.scalar_type} into a cache of scalar type "
                f"{cache.scalar_type}")
    if value.dim_order != [0, 1, 2, 3] or cache.dim_order != [0, 1, 2, 3]:
        return "needs contiguous value and cache (dim order 0, 1, 2, 3)"
    return None


def _rule_local_scalar_dense(plan: Plan, args: list) -> Optional[str]:
    # register_prim_ops.cpp: the result is an Int, Double or Bool after the tensor's
    # dtype; a consumer reading another kind aborts (EValue::toInt: ET_CHECK).
    st = plan.tensors[args[0]].scalar_type
    want = BOOL if st == BOOL_SCALAR_TYPE else INT if BY_CODE[st].integer else DOUBLE
    got = plan.kinds[args[1]]
    return None if got == want else (
        f"reads a scalar of scalar type {st} (a {want}) into value {args[1]}, a {got}"
    )


def _rule_prim_scalar(name: str) -> Callable[[Plan, list], Optional[str]]:
    """register_prim_ops.cpp writes ``EValue(a op b)``: an Int for two Ints, a Double as
    soon as one is a Double. A consumer of the other kind aborts (``toInt``/``toDouble``)."""

    def rule(plan: Plan, args: list) -> Optional[str]:
        ins = [plan.kinds[v] for v in args[:-1]]
        if name in ("executorch_prim::truediv", "executorch_prim::sym_float"):
            want = DOUBLE
        elif name in ("executorch_prim::sym_int", "executorch_prim::ceil",
                      "executorch_prim::round", "executorch_prim::trunc"):
            want = INT
        elif name == "executorch_prim::sym_ite":
            want = ins[1] if ins[1] == ins[2] else None
        elif all(k == BOOL for k in ins) and name in ("executorch_prim::sym_max",
                                                      "executorch_prim::sym_min"):
            want = None
        else:
            want = DOUBLE if DOUBLE in ins else INT
        got = plan.kinds[args[-1]]
        if want is None or got == want:
            return None
        return f"computes a {want} from {', '.join(ins)} into value {args[-1]}, a {got}"

    return rule


#: Operators whose kernels abort (``ET_CHECK``) instead of failing cleanly on arguments
#: a program can get wrong; each rule returns what is wrong, or None.
KERNEL_RULES = {
    **{
        (f"executorch_prim::{op}", "Scalar"): _rule_prim_scalar(f"executorch_prim::{op}")
        for op in ("add", "sub", "mul", "floordiv", "truediv", "sym_float", "sym_int",
                   "sym_max", "sym_min", "sym_ite", "neg", "ceil", "round", "trunc")
    },
    ("aten::_local_scalar_dense", ""): _rule_local_scalar_dense,
    ("aten::sym_size", "int"): _rule_sym_size,
    ("llama::update_cache", "out"): _rule_update_cache,
    ("llama::update_cache_with_indices", "out"): _rule_update_cache,
}


def check_kernel_calls(plan: Plan) -> None:
    """Raise :class:`Corrupt` for a kernel call whose arguments do not fit its operator's
    schema, that writes into a constant, or that an aborting kernel would reject.
    Indices were checked by :func:`lazykv.verify.structure.check_structure`."""
    where = f"method {plan.name!r}"
    kinds = plan.kinds
    constant = constant_values(plan)
    for ci, chain in enumerate(plan.chains):
        for ii, (kind, a, args) in enumerate(chain.instructions):
            if kind != "kernel":
                continue
            op = plan.operators[a]
            layout = operator_layout(op.name, op.overload)
            if layout is None:
                continue
            instruction = f"instruction {ii} of chain {ci}"
            at = f"{instruction} ({op.full_name})"
            slots, written = layout
            if len(args) != len(slots):
                raise Corrupt(f"{where}: {instruction} calls {op.full_name} with {len(args)} "
                              f"arguments; its schema takes {len(slots)}")
            for j, (idx, allowed) in enumerate(zip(args, slots)):
                if allowed is not None and kinds[idx] not in allowed:
                    raise Corrupt(
                        f"{where}: {at} argument {j} refers to value {idx}, a {kinds[idx]}, "
                        f"where {' or '.join(allowed)} is required"
                    )
            for j in written:
                if args[j] in constant:
                    raise Corrupt(f"{where}: {at} argument {j} writes into value {args[j]}, "
                                  f"a constant")
            rule = KERNEL_RULES.get((op.name, op.overload))
            if rule is not None:
                problem = rule(plan, args)
                if problem:
                    raise Corrupt(f"{where}: {at} {problem}")
