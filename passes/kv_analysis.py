"""Find the KV caches of one method's graph and prove that a lazy cache is safe.

This module is the analysis behind :class:`lazykv.passes.MarkLazyKVPass`; it changes
nothing. It works on the graph that ExecuTorch's memory planning sees (after
``to_executorch``'s passes: out-variant ops, ``alloc`` nodes, write-back ``copy_``) and
also on an edge-dialect graph.

**What is a KV cache** (by graph structure, never by name): a mutable buffer that is
written at a position along one axis: ``llama::update_cache`` (in place, rows
``[start_pos, start_pos + value.shape[1])``), ``llama::sdpa_with_kv_cache``,
``aten::index_put``/``index_copy``/``slice_scatter`` (functional, followed by a
write-back). Buffers written only as a whole (recurrent state, step counters, ...) are
not caches and are never marked.

Buffers written only at a fixed offset (a slice at a constant start, the batch rows of a
state) are state too: a cache is written at a position that a method input gives.

**The contract** (``docs/format.md``): a cache may be lazy only if every reader touches a
prefix bounded by the current position, so memory past ``start_pos + seq_len`` is never
read. Proven readers: ``llama::custom_sdpa``, ``llama::custom_quantized_sdpa`` (the int8
cache and its scales and zero points) and ``llama::sdpa_with_kv_cache`` with
``attn_mask=None`` whose ``start_pos`` is the same method input element as the cache
update's and whose query length is the update's length. A cache with any other reader
(SDPA with a mask, a cast, a dequantize, a matmul, a delegate, returning it) or written as
a ring buffer stays planned: :class:`Unmarked` records the cause, the reading node and the
fix that matches the cause (partial marking); ``strict=True`` raises
:class:`lazykv.errors.ExportRefused` with that text instead. Buffers read by the same
node are lazy together or not at all.

**The fill rule**: the update's position argument is traced back through
``_local_scalar_dense``/``select``/views to one element of a user input, and its length
along the growth axis is matched, as a symbol, to a dimension of a user input. Input
indices count user inputs only, in the method's order; names are never looked at.

One module of about 850 lines on purpose: the proof is one argument (what writes a
cache, what reads it, where the position comes from), and its invariants hold across
those three parts; split, they would be checked in one file and relied on in another.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import torch
from torch.export.graph_signature import ExportGraphSignature, InputKind, OutputKind
from torch.fx import GraphModule, Node

from lazykv.errors import ExportRefused
from lazykv.manifest import LAZY_DTYPES, FillRule

#: What the refusal messages suggest when attention reads the whole cache.
FULL_READ_FIX = (
    "read the cache with llama::custom_sdpa without an attention mask (ExecuTorch Llama: "
    "use_sdpa_with_kv_cache=True, i.e. model.use_sdpa_with_kv_cache=True in export_llm), "
    "or export it static (plain `to_executorch`; on the command line, without "
    "--lazy-kv-cache) / leave this buffer out of `buffers=`"
)


def op_name(target: Any) -> str:
    """``"aten::index_put"``, ``"llama::update_cache"``... for any graph target.

    Works for ATen ``OpOverload``s, edge-dialect ops (``EdgeOpOverload`` keeps the ATen
    op in ``_op``) and plain functions (``executorch.exir.memory.view`` -> ``"view"``).
    The ``_copy`` suffix of functional view variants is dropped (``select_copy`` ->
    ``select``) so both dialects compare equal.
    """
    schema = getattr(target, "_schema", None)
    if schema is None:
        schema = getattr(getattr(target, "_op", None), "_schema", None)
    if schema is not None:
        name = schema.name
    else:
        name = getattr(target, "__name__", str(target))
    if name.endswith("_copy") and name.startswith("aten::"):
        name = name[: -len("_copy")]
    return name


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, Node) else None


def _dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).replace("torch.", "")
    return name


def _same_size(a: Any, b: Any) -> bool:
    """Two sizes are the same if they are the same symbol or the same static int."""
    a_sym, b_sym = isinstance(a, torch.SymInt), isinstance(b, torch.SymInt)
    if a_sym and b_sym:
        return a.node.expr == b.node.expr
    if not a_sym and not b_sym:
        return int(a) == int(b)
    return False


def _static(x: Any) -> Optional[int]:
    if isinstance(x, torch.SymInt):
        try:
            return int(x.node.expr) if x.node.expr.is_number else None
        except Exception:
            return None
    return int(x)


@dataclasses.dataclass(frozen=True)
class PositionSource:
    """One element of a user input: ``inputs[input_index].reshape(-1)[flat_index]``."""

    input_index: int
    flat_index: int


@dataclasses.dataclass(frozen=True)
class LengthSource:
    """A dimension of a user input: ``inputs[input_index].shape[axis]``."""

    input_index: int
    axis: int


@dataclasses.dataclass
class KVCache:
    """A mutable buffer of one method found to be a position-indexed cache."""

    fqn: str
    placeholder: Node
    dtype: str
    max_shape: Tuple[int, ...]
    growth_axis: int
    writers: List[Node]
    readers: List[Node]
    position: PositionSource
    length: LengthSource


@dataclasses.dataclass(frozen=True)
class Unmarked:
    """A position-indexed cache that stays planned, and why.

    ``cause`` is one of: ``ring`` (a ring buffer written at computed indices),
    ``mask`` (read by custom SDPA with an attention mask), ``cast`` (converted to another
    dtype as a whole), ``dequantize`` (a quantized cache dequantized as a whole),
    ``delegate``, ``returned``, ``full_read`` (any other whole read), ``position`` (read
    up to another position), ``together`` (read by the same node as a cache that stays
    planned), ``fill_rule``, ``out_of_place``, ``axes``, ``dtype``, ``shape``.
    """

    fqn: str
    method: str
    cause: str
    reason: str
    fix: str
    readers: Tuple[Node, ...] = ()

    def message(self) -> str:
        """The refusal text: buffer, node, cause and the fix that matches it."""
        return f"method {self.method!r}, buffer {self.fqn!r} {self.reason}. Fix: {self.fix}."


@dataclasses.dataclass
class MethodAnalysis:
    """Result of :func:`analyze_method`."""

    method: str
    #: FQNs of every mutable buffer of the method, in placeholder order.
    mutable_fqns: List[str]
    #: Caches proven safe to make lazy (the selected ones, or all found).
    caches: List[KVCache]
    #: Mutable buffers that are not caches (state), left planned, with the reason.
    kept: Dict[str, str]
    #: How many positions a call fills; None if the method has no lazy cache.
    fill_rule: Optional[FillRule]
    #: Position-indexed caches left planned (partial marking), by FQN.
    unmarked: Dict[str, Unmarked] = dataclasses.field(default_factory=dict)


class _Untraceable(Exception):
    pass


# -- ops ---------------------------------------------------------------------------------

_PASS_THROUGH = {
    "aten::_local_scalar_dense",
    "aten::clone",
    "aten::_to_copy",
    "aten::alias",
    "aten::detach",
    "aten::lift_fresh",
    "dim_order_ops::_to_dim_order_copy",
    "dim_order_ops::_clone_dim_order",
}
_VIEWS = {"aten::view", "aten::reshape", "aten::squeeze", "aten::unsqueeze", "aten::flatten", "view", "aten::_unsafe_view"}
_BOUNDED_SDPA = {"llama::custom_sdpa"}


def _arg(node: Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _trace_position(node: Any) -> Tuple[Node, int]:
    """Trace a scalar position back to one element of a placeholder: (placeholder, flat index)."""
    idx: List[int] = []  # multi-index into ``cur``'s value (0-d at the start)
    cur = node
    for _ in range(64):
        if not isinstance(cur, Node):
            raise _Untraceable(f"the position is the constant {cur!r}, not a method input")
        val = _val(cur)
        shape = tuple(val.shape) if isinstance(val, torch.Tensor) else ()
        if isinstance(val, torch.Tensor) and len(idx) != len(shape):
            if all(_static(d) == 1 for d in shape):
                idx = [0] * len(shape)
            else:
                raise _Untraceable(f"cannot tell which element of {cur.name} is read")
        if cur.op == "placeholder":
            return cur, _ravel(idx, shape, cur.name)
        if cur.op != "call_function":
            raise _Untraceable(f"the position comes from {cur.op} {cur.name}")
        name = op_name(cur.target)
        src = cur.args[0] if cur.args else None
        if name in _PASS_THROUGH:
            cur = src
        elif name == "aten::select":
            sshape = tuple(_val(src).shape)
            d = int(_arg(cur, 1, "dim")) % len(sshape)
            i = int(_arg(cur, 2, "index"))
            if i < 0:
                n = _static(sshape[d])
                if n is None:
                    raise _Untraceable(f"{cur.name} selects a negative index of a dynamic dim")
                i += n
            idx.insert(d, i)
            cur = src
        elif name == "aten::slice":
            sshape = tuple(_val(src).shape)
            d = int(_arg(cur, 1, "dim", 0)) % len(sshape)
            start = _arg(cur, 2, "start", 0) or 0
            step = _arg(cur, 4, "step", 1) or 1
            if not isinstance(start, int) or start < 0:
                raise _Untraceable(f"{cur.name} slices from a non-constant start")
            idx[d] = start + idx[d] * int(step)
            cur = src
        elif name in _VIEWS:
            flat = _ravel(idx, shape, cur.name)
            idx = _unravel(flat, tuple(_val(src).shape), cur.name)
            cur = src
        else:
            raise _Untraceable(f"the position is computed by {name} ({cur.name})")
    raise _Untraceable("the position's chain of ops is too long")


def _ravel(idx: Sequence[int], shape: Sequence[Any], where: str) -> int:
    flat, stride = 0, 1
    dims = list(zip(idx, shape))
    for k in range(len(dims) - 1, -1, -1):
        i, d = dims[k]
        flat += i * stride
        sd = _static(d)
        if sd is None:
            if any(j != 0 for j, _ in dims[:k]):
                raise _Untraceable(f"{where}: the index needs the stride of a dynamic dim")
            sd = 1  # only multiplies indices that are all 0
        stride *= sd
    return flat


def _unravel(flat: int, shape: Sequence[Any], where: str) -> List[int]:
    out: List[int] = []
    for d in reversed(shape):
        sd = _static(d)
        if sd is None:
            if flat != 0 and d is not shape[0]:
                raise _Untraceable(f"{where}: index needs the stride of a dynamic dim")
            out.append(flat)
            flat = 0
            continue
        out.append(flat % sd if sd else 0)
        flat = flat // sd if sd else 0
    return list(reversed(out))


# -- the analysis ------------------------------------------------------------------------


@dataclasses.dataclass
class _Write:
    node: Node
    kind: str  # op name
    growth_axis: Optional[int]
    position: Any  # node/int giving the scalar start position, or a tensor of indices
    position_is_tensor: bool
    length: Any  # size (int/SymInt) along the growth axis
    in_place: bool
    why_not: Optional[str] = None  # set when the write cannot be a growing prefix


def _positional_write(node: Node, version: Node) -> Optional[_Write]:
    """If ``node`` writes ``version`` at a position along one axis, describe the write."""
    if node.op != "call_function":
        return None
    name = op_name(node.target)
    if name == "llama::update_cache" and _arg(node, 1, "cache") is version:
        value = _arg(node, 0, "value")
        return _Write(node, name, 1, _arg(node, 2, "start_pos"), False, _val(value).shape[1], True)
    if name == "llama::update_cache_with_indices" and _arg(node, 1, "cache") is version:
        value = _arg(node, 0, "value")
        return _Write(
            node, name, 1, None, False, _val(value).shape[1], True,
            why_not="it writes at computed indices (a ring buffer: attention sink or a "
            "sliding window), not a growing prefix",
        )
    if name == "llama::sdpa_with_kv_cache" and version in (
        _arg(node, 3, "key_cache"), _arg(node, 4, "value_cache")
    ):
        length = _arg(node, 6, "seq_len")
        if isinstance(length, Node):
            length = _val(length)
        return _Write(node, name, 1, _arg(node, 5, "start_pos"), False, length, True)
    if name in ("aten::index_put", "aten::index_put_") and _arg(node, 0, "self") is version:
        indices = list(_arg(node, 1, "indices") or [])
        axes = [i for i, t in enumerate(indices) if t is not None]
        if len(axes) != 1:
            return _Write(node, name, None, None, True, None, name.endswith("_"),
                          why_not="it indexes more than one axis")
        ax = axes[0]
        index = indices[ax]
        ival = _val(index)
        length = ival.shape[0] if isinstance(ival, torch.Tensor) and ival.dim() else 1
        return _Write(node, name, ax, index, True, length, name.endswith("_"))
    if name in ("aten::index_copy", "aten::index_copy_") and _arg(node, 0, "self") is version:
        ax = int(_arg(node, 1, "dim"))
        index = _arg(node, 2, "index")
        return _Write(node, name, ax % len(_val(version).shape), index, True,
                      _val(index).shape[0], name.endswith("_"))
    if name == "aten::slice_scatter" and _arg(node, 0, "self") is version:
        ax = int(_arg(node, 2, "dim", 0)) % len(_val(version).shape)
        src = _arg(node, 1, "src")
        return _Write(node, name, ax, _arg(node, 3, "start", 0) or 0, False, _val(src).shape[ax], False)
    return None


_VIEW_LIKE = _VIEWS | {
    "aten::expand", "aten::permute", "aten::transpose", "aten::t", "aten::slice",
    "aten::select", "aten::contiguous", "aten::repeat", "aten::repeat_interleave",
} | _PASS_THROUGH


def _describe_read(node: Node) -> str:
    """The reader, followed through view-like ops to the op that actually reads."""
    chain = [node]
    cur = node
    while (
        cur.op == "call_function"
        and op_name(cur.target) in _VIEW_LIKE
        and len(cur.users) == 1
        and len(chain) < 16
    ):
        cur = next(iter(cur.users))
        chain.append(cur)
    if len(chain) == 1:
        return _describe(node)
    path = " -> ".join(op_name(n.target) if n.op == "call_function" else n.op for n in chain)
    return f"{_describe(cur)}, through {path},"


def _describe(node: Node) -> str:
    if node.op == "output":
        return "the method's outputs"
    if node.op == "call_function":
        return f"node {node.name!r} ({op_name(node.target)})"
    return f"node {node.name!r} ({node.op})"


class _Method:
    def __init__(self, gm: GraphModule, sig: ExportGraphSignature, method: str) -> None:
        self.gm, self.sig, self.method = gm, sig, method
        self.placeholders = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
        self.user_inputs: List[str] = [
            s.arg.name for s in sig.input_specs if s.kind == InputKind.USER_INPUT
            and hasattr(s.arg, "name")
        ]
        mutated = set(sig.buffers_to_mutate.values())
        self.buffers: Dict[str, Node] = {}  # fqn -> placeholder
        for s in sig.input_specs:
            if s.kind == InputKind.BUFFER and s.target in mutated:
                node = self.placeholders.get(s.arg.name)
                if node is not None:
                    self.buffers[s.target] = node
        self.n_mutation_outputs = sum(
            1 for s in sig.output_specs if s.kind == OutputKind.BUFFER_MUTATION
        )
        out = [n for n in gm.graph.nodes if n.op == "output"]
        self.output = out[0] if out else None

    def user_index(self, placeholder: Node) -> Optional[int]:
        try:
            return self.user_inputs.index(placeholder.name)
        except ValueError:
            return None

    def position_source(self, pos: Any, is_tensor: bool) -> PositionSource:
        if is_tensor:
            # A tensor of indices: the write starts at its first element.
            if not isinstance(pos, Node):
                raise _Untraceable("the index tensor is not a graph value")
            ph, flat = pos, 0
            for _ in range(64):
                if ph.op == "placeholder":
                    break
                name = op_name(ph.target) if ph.op == "call_function" else ""
                if name not in _PASS_THROUGH and name not in _VIEWS:
                    raise _Untraceable(
                        f"the write index is computed by {name or ph.op} ({ph.name})"
                    )
                ph = ph.args[0]
        else:
            ph, flat = _trace_position(pos)
        ui = self.user_index(ph)
        if ui is None:
            raise _Untraceable(f"the position comes from {ph.name!r}, which is not a user input")
        return PositionSource(ui, flat)

    def length_source(self, length: Any) -> LengthSource:
        candidates: List[LengthSource] = []
        for ui, name in enumerate(self.user_inputs):
            val = _val(self.placeholders.get(name))
            if not isinstance(val, torch.Tensor):
                continue
            for ax, d in enumerate(val.shape):
                if length is not None and _same_size(d, length):
                    candidates.append(LengthSource(ui, ax))
        if not candidates:
            raise _Untraceable(
                f"the update length {length} is not the size of any dimension of a user input"
            )
        return candidates[0]


def analyze_method(
    gm: GraphModule,
    graph_signature: ExportGraphSignature,
    method: str = "forward",
    selected: Optional[Set[str]] = None,
    strict: bool = False,
) -> MethodAnalysis:
    """Find and prove the lazy KV caches of one method.

    ``selected``: FQNs chosen by the user (already resolved from patterns); ``None``
    means every position-indexed cache found. A cache the proof does not accept stays
    planned and is listed in :attr:`MethodAnalysis.unmarked` with its cause and fix
    (partial marking); with ``strict=True``, or when the user selected it by name,
    :class:`ExportRefused` is raised instead, naming the buffer, node and fix. Buffers
    read by the same attention node (a quantized cache, its scales and zero points)
    are lazy together or not at all.
    """
    m = _Method(gm, graph_signature, method)
    caches: Dict[str, KVCache] = {}
    kept: Dict[str, str] = {}
    unmarked: Dict[str, Unmarked] = {}
    for fqn, ph in m.buffers.items():
        if selected is not None and fqn not in selected:
            kept[fqn] = "not selected by buffers="
            continue
        result = _analyze_buffer(m, fqn, ph, explicit=selected is not None)
        if isinstance(result, KVCache):
            caches[fqn] = result
        elif isinstance(result, Unmarked):
            if selected is not None:
                raise ExportRefused(result.message())
            unmarked[fqn] = result
        else:
            kept[fqn] = result
    _unmark_groups(m, caches, unmarked)
    if strict and unmarked:
        first = next(iter(unmarked.values()))
        others = [u.fqn for u in unmarked.values()][1:]
        more = f" ({len(others)} more buffers left planned: {others})" if others else ""
        raise ExportRefused(f"--strict: {first.message()}{more}")
    fill_rule = None
    ordered = [caches[f] for f in m.buffers if f in caches]
    if ordered:
        first = ordered[0]
        for c in ordered[1:]:
            if (c.position, c.length) != (first.position, first.length):
                raise ExportRefused(
                    f"method {method!r}: KV buffers {first.fqn!r} and {c.fqn!r} are filled "
                    f"from different inputs ({_fmt_rule(first)} vs {_fmt_rule(c)}); lazykv "
                    f"records one fill rule per method. Select one group with `buffers=`."
                )
        fill_rule = FillRule(
            method=method,
            position_input=first.position.input_index,
            position_index=first.position.flat_index,
            length_input=first.length.input_index,
            length_axis=first.length.axis,
        )
    return MethodAnalysis(method, list(m.buffers), ordered, kept, fill_rule, unmarked)


def _unmark_groups(m: _Method, caches: Dict[str, KVCache], unmarked: Dict[str, Unmarked]) -> None:
    """Buffers read by one node (k, v, their scales and zero points) are lazy together:
    when one of them stays planned, so do the others (one fill rule, grown together)."""
    readers_of: Dict[Node, List[str]] = {}

    def attention(r: Node) -> bool:  # not the output node: it lists every mutated buffer
        return r.op == "call_function" and op_name(r.target) in _BOUNDED_READERS

    for fqn, c in caches.items():
        for r in filter(attention, c.readers):
            readers_of.setdefault(r, []).append(fqn)
    for fqn, u in unmarked.items():
        for r in filter(attention, u.readers):
            readers_of.setdefault(r, []).append(fqn)
    changed = True
    while changed:
        changed = False
        for reader, fqns in readers_of.items():
            planned = [f for f in fqns if f in unmarked]
            if not planned:
                continue
            why = unmarked[planned[0]]
            for f in fqns:
                if f in caches:
                    c = caches.pop(f)
                    unmarked[f] = Unmarked(
                        f, m.method, "together",
                        f"is read together with {why.fqn!r} by {_describe(reader)}, and "
                        f"{why.fqn!r} stays planned ({why.cause}: {why.reason})",
                        why.fix, tuple(c.readers),
                    )
                    changed = True


def _fmt_rule(c: KVCache) -> str:
    return (
        f"position = input[{c.position.input_index}].flat[{c.position.flat_index}], "
        f"length = input[{c.length.input_index}].shape[{c.length.axis}]"
    )


def _is_constant_position(m: _Method, w: _Write) -> bool:
    """Whether a write starts at a fixed offset (a literal, or a constant tensor), not at
    a position that a method input gives."""
    pos = w.position
    if pos is None or isinstance(pos, torch.SymInt):
        return False
    if isinstance(pos, (int, float)):
        return True
    cur = pos
    for _ in range(16):
        if not isinstance(cur, Node):
            return isinstance(cur, (int, float))
        if cur.op == "get_attr":
            return True
        if cur.op == "placeholder":
            buffers = {n.name for n in m.buffers.values()}
            return m.user_index(cur) is None and cur.name not in buffers
        if cur.op != "call_function" or not cur.args:
            return False
        name = op_name(cur.target)
        if name not in _PASS_THROUGH and name not in _VIEWS and name != "aten::select":
            return False
        cur = cur.args[0]
    return False


def _analyze_buffer(m: _Method, fqn: str, ph: Node, explicit: bool):
    """A :class:`KVCache`, an :class:`Unmarked` cache, or a string saying why the buffer
    is not a cache (state: kept planned)."""
    where = f"method {m.method!r}, buffer {fqn!r}"
    val = _val(ph)
    if not isinstance(val, torch.Tensor):
        return "not a tensor"
    # Versions of the buffer: the placeholder and results of functional scatters into it.
    versions: List[Node] = [ph]
    writes: List[_Write] = []
    plain_writes: List[Node] = []
    readers: List[Tuple[Node, Node]] = []  # (reader, version read)
    seen: Set[Node] = set()
    i = 0
    while i < len(versions):
        v = versions[i]
        i += 1
        for user in list(v.users):
            if (user, v) in seen:
                continue
            seen.add((user, v))
            w = _positional_write(user, v)
            if w is not None:
                writes.append(w)
                if not w.in_place:
                    versions.append(user)  # functional: the result is the new cache
                if op_name(user.target) == "llama::sdpa_with_kv_cache":
                    readers.append((user, v))
                continue
            if user.op == "call_function" and op_name(user.target) in ("aten::copy_", "aten::copy"):
                if _arg(user, 0, "self") is ph or _arg(user, 0, "self") is v:
                    plain_writes.append(user)  # write-back of a new version into the buffer
                    continue
            readers.append((user, v))
    state = (
        "state: written as a whole or at a fixed offset, never at a position taken from "
        "a method input (e.g. recurrent or convolution state); not a KV cache, stays planned"
    )
    if not writes or all(_is_constant_position(m, w) for w in writes):
        if explicit:
            raise ExportRefused(
                f"{where} was selected for a lazy KV cache but is not a position-indexed "
                f"cache: nothing writes it at a position along one axis taken from a method "
                f"input (it is written as a whole or at a fixed offset"
                f"{' by ' + ', '.join(repr(n.name) for n in (plain_writes or [w.node for w in writes]))}"
                f", like a recurrent state or a step counter). Remove it from `buffers=`; it "
                f"stays memory planned."
            )
        return state
    reader_nodes = tuple(r for r, _ in readers)

    def unmarked(cause: str, reason: str, fix: str) -> Unmarked:
        return Unmarked(fqn, m.method, cause, reason, fix, reader_nodes)

    for w in writes:
        if w.why_not:
            return unmarked(
                "ring",
                f"is written by {_describe(w.node)} but {w.why_not}; its "
                f"{_static(val.shape[w.growth_axis or 0])} positions are bounded by the window, "
                f"not the max context, and every slot is read once the window wraps",
                "to make it lazy, export without model.use_attention_sink and "
                "model.local_global_attention; otherwise it simply stays planned (without "
                "--strict the other caches are still lazy)",
            )
    axes = {w.growth_axis for w in writes}
    if len(axes) != 1:
        return unmarked(
            "axes", f"is written along several axes {sorted(axes, key=str)}",
            "a lazy cache grows along one axis; leave it out of `buffers=`",
        )
    axis = axes.pop()
    # Fill rule (position + length), the same for every write.
    try:
        sources = set()
        for w in writes:
            sources.add((m.position_source(w.position, w.position_is_tensor), m.length_source(w.length)))
    except _Untraceable as e:
        pos_src = None
        fill_error = str(e)
        if writes[0].position_is_tensor and "computed by" in fill_error:
            return unmarked(
                "ring",
                f"is written by {_describe(writes[0].node)} at indices that are computed "
                f"({fill_error}), a ring buffer or scatter, not a growing prefix",
                "to make it lazy, write it at a position taken from a method input "
                "(llama::update_cache, ExecuTorch Llama: model.use_sdpa_with_kv_cache=True); "
                "otherwise it simply stays planned",
            )
    else:
        fill_error = None
        if len(sources) != 1:
            fill_error = "its writes start at different inputs"
        pos_src = next(iter(sources)) if len(sources) == 1 else None
    # The safety proof: every reader reads a prefix bounded by the current position.
    for reader, v in readers:
        problem = _bounded_read(m, reader, v, pos_src, axis)
        if problem is not None:
            cause, why, fix = problem
            return unmarked(
                cause,
                f"{_describe_read(reader)} {why}, so memory past the current position would "
                f"be read and a lazy cache is not safe",
                fix,
            )
    if fill_error is not None or pos_src is None:
        return unmarked(
            "fill_rule",
            f"lazykv cannot derive how many positions a call fills ({fill_error})",
            "the cache update's position must be an element of a method input and its "
            "length a dimension of a method input; leave this buffer out of `buffers=`",
        )
    out_of_place = [w for w in writes if not w.in_place]
    if out_of_place:
        return unmarked(
            "out_of_place",
            f"is written out of place by {_describe(out_of_place[0].node)}: each call "
            f"builds a full-size copy of the cache",
            "update the cache in place with llama::update_cache (ExecuTorch Llama: "
            "model.use_sdpa_with_kv_cache=True)",
        )
    if str(val.dtype).replace("torch.", "") not in LAZY_DTYPES:
        return unmarked("dtype", f"has dtype {val.dtype}, which lazykv does not support",
                        "export the cache as float32, bfloat16 or int8")
    max_shape = tuple(_static(d) for d in val.shape)
    if any(d is None for d in max_shape):
        return unmarked("shape", f"has a dynamic shape {tuple(val.shape)}",
                        "export the cache with a static upper-bound shape")
    position, length = pos_src
    return KVCache(
        fqn=fqn,
        placeholder=ph,
        dtype=_dtype_name(val.dtype),
        max_shape=max_shape,
        growth_axis=axis,
        writers=[w.node for w in writes] + plain_writes,
        readers=list(reader_nodes),
        position=position,
        length=length,
    )


#: Readers that touch only rows ``< start_pos + seq_len`` when given no mask (DESIGN
#: fact 2; ExecuTorch ``extension/llm/custom_ops/op_sdpa.cpp``: ``custom_sdpa_out_impl``
#: sets ``num_keys_for_causal_attention = start_pos + seq_len`` without a mask and
#: ``cpu_flash_attention`` reads keys, values and, for the quantized op, their scales and
#: zero points only for ``n < num_keys``). Value: argument positions of
#: (query, start_pos, attn_mask) and of every cache-like argument.
_BOUNDED_READERS = {
    "llama::custom_sdpa": (0, 3, 4, (1, 2)),
    "llama::custom_quantized_sdpa": (0, 3, 4, (1, 2, 10, 11, 12, 13)),
    "llama::sdpa_with_kv_cache": (0, 5, 7, (3, 4)),
}
_ARG_NAMES = {
    "llama::custom_sdpa": ("query", "start_pos", "attn_mask"),
    "llama::custom_quantized_sdpa": ("query", "start_pos", "attn_mask"),
    "llama::sdpa_with_kv_cache": ("query", "start_pos", "attn_mask"),
}
_CASTS = {"aten::_to", "aten::to", "dim_order_ops::_to_dim_order_copy", "dim_order_ops::_to_dim_order"}
_READ_VIEWS = _VIEWS | {
    "aten::expand", "aten::permute", "aten::transpose", "aten::t", "aten::contiguous",
    "aten::alias", "aten::detach", "view",
}

MASK_FIX = (
    "custom SDPA reads only the filled prefix when it is given no mask: export with "
    "llama::custom_sdpa without an attention mask (ExecuTorch Llama: "
    "model.use_sdpa_with_kv_cache=True, and neither model.use_attention_sink nor "
    "use_custom_sdpa_with_attention_mask)"
)
FP16_FIX = (
    "export with model.dtype_override=fp32 or bf16: ExecuTorch's custom SDPA has no "
    "float16 kernel, so its SDPACustom converts float16 caches to float32 as a whole on "
    "every call, while float32 and bfloat16 caches are read in place"
)
DEQUANT_FIX = (
    "export with model.use_sdpa_with_kv_cache=True (and model.quantize_kv_cache=True): "
    "llama::custom_quantized_sdpa then reads the int8 cache, its scales and zero points "
    "in place, only up to the current position"
)


def _bounded_read(
    m: _Method,
    reader: Node,
    version: Node,
    src: Optional[Tuple[PositionSource, LengthSource]],
    axis: int,
) -> Optional[Tuple[str, str, str]]:
    """None if ``reader`` reads only ``[0, position + length)`` of the cache, else
    ``(cause, why, fix)``."""
    if reader.op == "output":
        args = reader.args[0] if reader.args else ()
        flat = list(args) if isinstance(args, (list, tuple)) else [args]
        for i, a in enumerate(flat):
            if a is version and i >= m.n_mutation_outputs:
                return ("returned", "returns the whole cache to the caller",
                        "do not return the cache from the method")
        return None
    if reader.op != "call_function":
        return ("full_read", "reads the whole cache", FULL_READ_FIX)
    name = op_name(reader.target)
    spec = _BOUNDED_READERS.get(name)
    if spec is not None:
        qi, pi, mi, cache_args = spec
        qname, pname, mname = _ARG_NAMES[name]
        mask, pos, q = _arg(reader, mi, mname), _arg(reader, pi, pname), _arg(reader, qi, qname)
        if mask is not None:
            return (
                "mask",
                f"is given an attention mask ({getattr(mask, 'name', mask)!r}): with a mask "
                f"custom SDPA reads the whole cache, not the prefix up to start_pos + seq_len",
                MASK_FIX,
            )
        if name != "llama::sdpa_with_kv_cache" and _arg(reader, 14 if name.endswith(
                "quantized_sdpa") else 8, "is_seq_at_dim_2", False):
            return ("full_read", "reads the cache with the sequence on axis 2", FULL_READ_FIX)
        if axis != 1:
            return ("full_read", f"reads along axis 1 but the cache grows along axis {axis}",
                    FULL_READ_FIX)
        if src is None:
            return None  # reported by the fill-rule check
        try:
            p = m.position_source(pos, False)
        except _Untraceable as e:
            return ("position", f"reads up to a start_pos that cannot be traced to a method "
                    f"input ({e})", FULL_READ_FIX)
        if p != src[0]:
            return ("position", f"reads up to start_pos = input[{p.input_index}].flat["
                    f"{p.flat_index}], not the position the cache is written at", FULL_READ_FIX)
        qlen = _val(q).shape[1] if isinstance(_val(q), torch.Tensor) else None
        try:
            ql = m.length_source(qlen)
        except _Untraceable:
            ql = None
        if ql is None or not _same_size(
            _val(m.placeholders[m.user_inputs[ql.input_index]]).shape[ql.axis],
            _val(m.placeholders[m.user_inputs[src[1].input_index]]).shape[src[1].axis],
        ):
            return ("position", "reads a query longer than the cache update", FULL_READ_FIX)
        return None
    final = _through_views(reader)
    fname = op_name(final.target) if final.op == "call_function" else final.op
    if fname == "executorch_call_delegate" or "call_delegate" in fname:
        return ("delegate", "passes the cache to a backend delegate, which may read all of it",
                "keep the cache out of delegated ops: read it with llama::custom_sdpa "
                "(ExecuTorch Llama: model.use_sdpa_with_kv_cache=True keeps attention out of "
                "XNNPACK)")
    if fname in _CASTS:
        src_dt = _val(version).dtype if isinstance(_val(version), torch.Tensor) else None
        dst = _val(final)
        dst_dt = dst.dtype if isinstance(dst, torch.Tensor) else None
        fix = FP16_FIX if src_dt == torch.float16 else (
            "read the cache in its own dtype (custom SDPA reads float32 and bfloat16 caches "
            "in place)"
        )
        return ("cast", f"converts the whole cache from {src_dt} to {dst_dt} on every call",
                fix)
    if fname.startswith("quantized_decomposed::dequantize"):
        return ("dequantize", "dequantizes the whole cache on every call (a quantized KV "
                "cache returning float values)", DEQUANT_FIX)
    if fname == "output":
        return ("returned", "returns the whole cache to the caller",
                "do not return the cache from the method")
    return ("full_read", "reads the whole cache", FULL_READ_FIX)


def _through_views(node: Node) -> Node:
    """Follow single-user view and permute ops from ``node`` to the op that reads."""
    cur = node
    for _ in range(16):
        if cur.op != "call_function" or op_name(cur.target) not in _READ_VIEWS or len(cur.users) != 1:
            return cur
        cur = next(iter(cur.users))
    return cur
