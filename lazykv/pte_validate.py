"""Check a ``.pte`` program's *meaning* before ExecuTorch's C++ runtime sees it.

:mod:`lazykv.pte_file` reads the layout (header, flatbuffer, segments); this module
checks what the runtime trusts without checking and crashes on when it is wrong: every
value, instruction and kernel argument, tensor shapes, memory offsets, constant ranges,
XNNPACK delegate blobs and the lazykv manifest against the program. It works on the raw
flatbuffer (:class:`_Fb`), not the parsed objects. :func:`validate_pte` and
:func:`preflight` check a file; :func:`preflight` and :func:`method_limits` also report
what each method's inputs must respect (:class:`MethodLimits`: token ids, start
positions) for the runtime shim. Everything here is also importable from
:mod:`lazykv.pte_file`, which runs the same checks on open.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Tuple, Union

from lazykv.errors import InvalidProgram
from lazykv.manifest import DTYPE_BYTES, MANIFEST_KEY, Manifest

# lazykv.pte_file imports this module (PteFile validates on open, and it re-exports the
# names below), so the reader names used here (_check_header, PteFile) are imported
# when called, not at the top.
if TYPE_CHECKING:
    from lazykv.pte_file import PteFile

# -- validation ----------------------------------------------------------------------------
#
# ExecuTorch's runtime verifies the flatbuffer's structure (``Verification.
# InternalConsistency``, the default of ``executorch.runtime.Runtime.load_program``) and
# checks many indices itself, but it trusts the program's *meaning*: a kernel argument
# that points at a value of the wrong type aborts the process (``EValue::toTensor``:
# ``ET_CHECK``), a kernel that writes into a constant writes into read-only ``mmap``
# pages (SIGSEGV), a tensor that is neither planned nor an input has a null data
# pointer (DESIGN fact 4), a union whose type is set but whose table is absent is
# dereferenced as null. Everything below is checked in Python, from the raw flatbuffer
# (no object parse: tens of milliseconds even for a large program), before any C++ sees
# the program, and refused with :class:`InvalidProgram` naming the method, the value and
# what is wrong. The rules were found by ``tests/test_fuzz_pte.py``; each has a
# regression case in ``tests/test_fuzz_regressions.py``.

#: Bytes per element of every ExecuTorch ScalarType the runtime knows.
_ELEMENT_BYTES = {
    0: 1, 1: 1, 2: 2, 3: 4, 4: 8, 5: 2, 6: 4, 7: 8, 8: 4, 9: 8, 10: 16, 11: 1, 12: 1,
    13: 1, 14: 4, 15: 2, 16: 1, 17: 1, 22: 2, 23: 1, 24: 1, 25: 1, 26: 1, 27: 2, 28: 4,
    29: 8,
}
_INTEGER_SCALAR_TYPES = {0, 1, 2, 3, 4, 27, 28, 29}
_MAX_NUMEL = 2**48

# EValue union types (program.fbs ``KernelTypes``), by name.
_KINDS = {
    1: "Null", 2: "Int", 3: "Bool", 4: "Double", 5: "Tensor", 6: "String", 7: "IntList",
    8: "DoubleList", 9: "BoolList", 10: "TensorList", 11: "OptionalTensorList",
}
_TENSOR, _INT, _DOUBLE, _BOOL, _NULL = "Tensor", "Int", "Double", "Bool", "Null"
# TensorShapeDynamism, TensorDataLocation, DataLocation.
_STATIC, _BOUND, _UNBOUND = 0, 1, 2
_EXTERNAL = 1
_INLINE, _SEGMENT = 0, 1

#: Stack layouts of ExecuTorch-only operators that torch has no schema for
#: (``kernels/prim_ops/et_view.cpp``, ``et_copy_index.cpp``): kinds per stack slot and
#: the slots written.
_PRIM_LAYOUTS = {
    ("executorch_prim::et_view", "default"): (((_TENSOR,), ("IntList",), (_TENSOR,)), ()),
    ("executorch_prim::et_copy_index", "tensor"): (((_TENSOR,), (_TENSOR,), (_INT,)), (0,)),
}
_SCHEMA_CACHE: dict = {}


class _Corrupt(Exception):
    """Raised by the raw reader; turned into InvalidProgram with the file's name."""


class _Fb:
    """Bounds-checked reads of a flatbuffer (slots as in ExecuTorch's ``program.fbs``)."""

    __slots__ = ("buf", "size")

    def __init__(self, buf: bytes) -> None:
        self.buf, self.size = buf, len(buf)

    def u(self, fmt: str, at: int):
        n = struct.calcsize(fmt)
        if at < 0 or at + n > self.size:
            raise _Corrupt(f"read of {n} bytes at {at} is outside the {self.size}-byte program")
        return struct.unpack_from("<" + fmt, self.buf, at)[0]

    def field(self, table: int, slot: int) -> int:
        """Absolute position of a table field, 0 if absent."""
        vt = table - self.u("i", table)
        vt_len = self.u("H", vt)
        if slot + 2 > vt_len:
            return 0
        o = self.u("H", vt + slot)
        return table + o if o else 0

    def scalar(self, table: int, slot: int, fmt: str, default=0):
        at = self.field(table, slot)
        return self.u(fmt, at) if at else default

    def ref(self, table: int, slot: int) -> int:
        at = self.field(table, slot)
        return at + self.u("I", at) if at else 0

    def vector(self, table: int, slot: int, elem: int) -> Optional[Tuple[int, int]]:
        """``(start, length)`` of a vector field, None if absent."""
        r = self.ref(table, slot)
        if not r:
            return None
        n = self.u("I", r)
        if r + 4 + n * elem > self.size:
            raise _Corrupt(f"a vector of {n} elements at {r} runs past the program's end")
        return r + 4, n

    def ints(self, table: int, slot: int, fmt: str = "i") -> Optional[list]:
        v = self.vector(table, slot, struct.calcsize(fmt))
        if v is None:
            return None
        start, n = v
        return list(struct.unpack_from(f"<{n}{fmt}", self.buf, start)) if n else []

    def tables(self, table: int, slot: int) -> Optional[list]:
        v = self.vector(table, slot, 4)
        if v is None:
            return None
        start, n = v
        return [start + 4 * i + self.u("I", start + 4 * i) for i in range(n)]

    def string(self, table: int, slot: int) -> Optional[str]:
        v = self.vector(table, slot, 1)
        if v is None:
            return None
        start, n = v
        try:
            return bytes(self.buf[start : start + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise _Corrupt(f"a string at {start} is not UTF-8") from None


class _Tensor:
    __slots__ = ("scalar_type", "storage_offset", "sizes", "dim_order", "data_buffer_idx",
                 "alloc", "dynamism", "fqn", "location")


class _Plan:
    __slots__ = ("name", "kinds", "tensors", "ints", "lists", "scalars", "inputs", "outputs",
                 "chains", "operators", "delegates", "arenas")


class _Model:
    """What validation needs from a program, read straight from its flatbuffer."""

    __slots__ = ("plans", "segments", "constant_segment", "constant_buffers",
                 "inline_delegates", "named_data", "mutable_segments")


def _read_model(buf: bytes) -> _Model:
    fb = _Fb(buf)
    root = fb.u("I", 0)
    m = _Model()
    plans = fb.tables(root, 6)
    if plans is None:
        raise _Corrupt("the program has no execution plans")
    segs = fb.tables(root, 12) or []
    m.segments = [(fb.scalar(s, 4, "Q"), fb.scalar(s, 6, "Q")) for s in segs]
    cs = fb.ref(root, 14)
    m.constant_segment = None
    if cs:
        m.constant_segment = (fb.scalar(cs, 4, "I"), fb.ints(cs, 6, "Q") or [])
    m.constant_buffers = []
    for b in fb.tables(root, 8) or []:
        v = fb.vector(b, 4, 1)
        m.constant_buffers.append(0 if v is None else v[1])
    m.inline_delegates = []
    for b in fb.tables(root, 10) or []:
        v = fb.vector(b, 4, 1)
        m.inline_delegates.append((0, 0) if v is None else v)
    m.named_data = [
        (_required(fb.string(nd, 4), f"the key of named data {i}"), fb.scalar(nd, 6, "I"))
        for i, nd in enumerate(fb.tables(root, 18) or [])
    ]
    m.mutable_segments = [fb.scalar(s, 4, "I") for s in fb.tables(root, 16) or []]
    m.plans = [_read_plan(fb, p, i) for i, p in enumerate(plans)]
    return m


def _required(x, what: str):
    if x is None:
        raise _Corrupt(f"{what} is missing")
    return x


def _read_plan(fb: _Fb, p: int, pi: int) -> _Plan:
    plan = _Plan()
    plan.name = _required(fb.string(p, 4), f"the name of method {pi}")
    where = f"method {plan.name!r}"
    values = _required(fb.tables(p, 8), f"the values of {where}")
    plan.kinds, plan.tensors, plan.ints, plan.lists, plan.scalars = [], {}, {}, {}, {}
    for i, ev in enumerate(values):
        vt = fb.scalar(ev, 4, "B")
        kind = _KINDS.get(vt)
        if kind is None:
            raise _Corrupt(f"{where}: value {i} has unknown type {vt}")
        val = fb.ref(ev, 6)
        if not val and kind != _NULL:
            raise _Corrupt(f"{where}: value {i} is a {kind} with no data")
        plan.kinds.append(kind)
        if kind == _TENSOR:
            t = _Tensor()
            t.scalar_type = fb.scalar(val, 4, "b")
            t.storage_offset = fb.scalar(val, 6, "i")
            t.sizes = _required(fb.ints(val, 8, "i"), f"{where}: the sizes of tensor value {i}")
            t.dim_order = _required(fb.ints(val, 10, "B"), f"{where}: the dim order of tensor value {i}")
            t.data_buffer_idx = fb.scalar(val, 14, "I")
            a = fb.ref(val, 16)
            t.alloc = (fb.scalar(a, 4, "I"), fb.scalar(a, 6, "I"), fb.scalar(a, 8, "I")) if a else None
            t.dynamism = fb.scalar(val, 20, "b")
            x = fb.ref(val, 22)
            t.fqn = fb.string(x, 6) if x else None
            t.location = fb.scalar(x, 8, "b") if x else 0
            plan.tensors[i] = t
        elif kind == _INT:
            plan.ints[i] = fb.scalar(val, 4, "q")
        elif kind == "IntList":
            plan.lists[i] = _required(fb.ints(val, 4, "q"), f"{where}: the items of int list value {i}")
        elif kind in ("TensorList", "OptionalTensorList"):
            plan.lists[i] = _required(fb.ints(val, 4, "i"), f"{where}: the items of {kind} value {i}")
        elif kind == _DOUBLE:
            plan.scalars[i] = fb.scalar(val, 4, "d")
        elif kind == _BOOL:
            plan.scalars[i] = bool(fb.scalar(val, 4, "B"))
        elif kind in ("DoubleList", "BoolList"):
            _required(fb.vector(val, 4, 8 if kind == "DoubleList" else 1), f"{where}: the items of value {i}")
        elif kind == "String":
            _required(fb.string(val, 4), f"{where}: string value {i}")
    plan.inputs = _required(fb.ints(p, 10, "i"), f"the inputs of {where}")
    plan.outputs = _required(fb.ints(p, 12, "i"), f"the outputs of {where}")
    plan.chains = []
    for ci, c in enumerate(_required(fb.tables(p, 14), f"the chains of {where}")):
        instrs = []
        for ii, ins in enumerate(_required(fb.tables(c, 8), f"{where}: the instructions of chain {ci}")):
            it = fb.scalar(ins, 4, "B")
            a = fb.ref(ins, 6)
            if not a:
                raise _Corrupt(f"{where}: instruction {ii} of chain {ci} has no arguments")
            if it in (1, 2):  # KernelCall, DelegateCall
                args = _required(fb.ints(a, 6, "i"), f"{where}: the arguments of instruction {ii}")
                instrs.append(("kernel" if it == 1 else "delegate", fb.scalar(a, 4, "i"), args))
            elif it == 3:
                instrs.append(("move", fb.scalar(a, 4, "i"), fb.scalar(a, 6, "i")))
            elif it == 4:
                instrs.append(("jump", fb.scalar(a, 4, "i"), fb.scalar(a, 6, "i")))
            elif it == 5:
                instrs.append(("free", fb.scalar(a, 4, "i"), None))
            else:
                raise _Corrupt(f"{where}: instruction {ii} of chain {ci} has unknown type {it}")
        plan.chains.append((fb.ints(c, 4, "i") or [], fb.ints(c, 6, "i") or [], instrs))
    plan.operators = []
    for oi, op in enumerate(_required(fb.tables(p, 16), f"the operators of {where}")):
        name = fb.string(op, 4)
        if not name:
            raise _Corrupt(f"{where}: operator {oi} has no name")
        plan.operators.append((name, fb.string(op, 6) or ""))
    plan.delegates = []
    for di, d in enumerate(fb.tables(p, 18) or []):
        ref = fb.ref(d, 6)
        bid = fb.string(d, 4)
        if not ref or not bid:
            raise _Corrupt(f"{where}: delegate {di} has no backend id or no data reference")
        for cs in fb.tables(d, 8) or []:  # the runtime copies key and value unchecked
            _required(fb.string(cs, 4), f"{where}: a compile spec key of delegate {di}")
            _required(fb.vector(cs, 6, 1), f"{where}: a compile spec value of delegate {di}")
        plan.delegates.append((bid, fb.scalar(ref, 4, "b"), fb.scalar(ref, 6, "I")))
    plan.arenas = _required(fb.ints(p, 20, "q"), f"the memory plan of {where}")
    return plan


def _kinds_for(t) -> Optional[tuple]:
    """EValue kinds a torch schema type accepts (None: not checked)."""
    import torch

    if isinstance(t, torch.OptionalType):
        inner = _kinds_for(t.getElementType())
        return None if inner is None else inner + (_NULL,)
    if isinstance(t, torch.TensorType):
        return (_TENSOR,)
    if isinstance(t, (torch.IntType, torch.SymIntType)):
        return (_INT,)
    if isinstance(t, torch.FloatType):
        return (_DOUBLE,)
    if isinstance(t, (torch.BoolType, torch.SymBoolType)):
        return (_BOOL,)
    if isinstance(t, torch.NumberType):
        return (_INT, _DOUBLE, _BOOL)
    if isinstance(t, torch.StringType):
        return ("String",)
    if isinstance(t, torch.ListType):
        e = t.getElementType()
        if isinstance(e, (torch.IntType, torch.SymIntType)):
            return ("IntList",)
        if isinstance(e, torch.TensorType):
            return ("TensorList",)
        if isinstance(e, torch.OptionalType) and isinstance(e.getElementType(), torch.TensorType):
            return ("OptionalTensorList",)
        if isinstance(e, torch.FloatType):
            return ("DoubleList",)
        if isinstance(e, torch.BoolType):
            return ("BoolList",)
    return None  # ScalarType, Layout, Device, MemoryFormat...: encoded variously


def _operator_layout(name: str, overload: str) -> Optional[tuple]:
    """``(kinds per stack slot, written slots)`` of an operator, or None if unknown.

    The stack of a kernel call is every schema argument, then one slot for the return
    (ExecuTorch's codegen checks ``stack.size() == len(arguments) + 1``).
    """
    key = (name, overload)
    if key not in _SCHEMA_CACHE:
        _SCHEMA_CACHE[key] = _PRIM_LAYOUTS.get(key) or _layout_from_torch(name, overload)
    return _SCHEMA_CACHE[key]


#: Schemas of ExecuTorch's own operator libraries, as their registrations state them
#: (``executorch_prim_ops_registry.py``, ``extension/llm/custom_ops``). Parsed here rather
#: than looked up: registering them imports the runtime and torch's compiler stack, which
#: ``lazykv check`` and ``inspect`` must not pay for.
_ET_SCHEMAS = (
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


def _schema(name: str, overload: str):
    import torch

    if name.startswith("aten::"):
        try:
            return torch._C._get_schema(name, overload)
        except Exception:
            return None
    full = f"{name}.{overload}" if overload else name
    for text in _ET_SCHEMAS:
        if text.startswith(full + "("):
            return torch._C.parse_schema(text)
    return None


def _layout_from_torch(name: str, overload: str) -> Optional[tuple]:
    schema = _schema(name, overload)
    if schema is None:
        return None
    kinds, written = [], []
    for i, a in enumerate(schema.arguments):
        kinds.append(_kinds_for(a.type))
        if a.alias_info is not None and a.alias_info.is_write:
            written.append(i)
    ret = None
    if len(schema.returns) == 1:
        ret = _kinds_for(schema.returns[0].type)
        if any(a.is_out for a in schema.arguments) and ret == (_TENSOR,):
            written.append(len(schema.arguments))  # the out tensor again
    kinds.append(ret)
    return tuple(kinds), tuple(written)


def _rule_sym_size(plan: _Plan, args: list) -> Optional[str]:
    # register_prim_ops.cpp: ``self.size(dim)`` aborts for a dim outside the tensor.
    rank = len(plan.tensors[args[0]].sizes)
    dim = plan.ints[args[1]]
    return None if 0 <= dim < rank else f"asks for size {dim} of a {rank}-d tensor"


def _rule_update_cache(plan: _Plan, args: list) -> Optional[str]:
    # op_update_cache.cpp: ``value.size(1)`` before any check, then ET_CHECK_MSG (abort)
    # on batch, heads, head dim, element size and dim order of value against cache.
    value, cache = plan.tensors[args[0]], plan.tensors[args[1]]
    if len(value.sizes) != 4 or len(cache.sizes) != 4:
        return f"needs 4-d value and cache, got {value.sizes} and {cache.sizes}"
    for d in (0, 2, 3):
        if value.sizes[d] != cache.sizes[d]:
            return f"writes a {value.sizes} value into a {cache.sizes} cache (dim {d} differs)"
    if _ELEMENT_BYTES[value.scalar_type] != _ELEMENT_BYTES[cache.scalar_type]:
        return (f"writes scalar type {value.scalar_type} into a cache of scalar type "
                f"{cache.scalar_type}")
    if value.dim_order != [0, 1, 2, 3] or cache.dim_order != [0, 1, 2, 3]:
        return "needs contiguous value and cache (dim order 0, 1, 2, 3)"
    return None


def _rule_local_scalar_dense(plan: _Plan, args: list) -> Optional[str]:
    # register_prim_ops.cpp: the result is an Int, Double or Bool after the tensor's
    # dtype; a consumer reading another kind aborts (EValue::toInt: ET_CHECK).
    st = plan.tensors[args[0]].scalar_type
    want = _BOOL if st == 11 else _INT if st in _INTEGER_SCALAR_TYPES else _DOUBLE
    got = plan.kinds[args[1]]
    return None if got == want else (
        f"reads a scalar of scalar type {st} (a {want}) into value {args[1]}, a {got}"
    )


def _rule_prim_scalar(name: str):
    """register_prim_ops.cpp writes ``EValue(a op b)``: an Int for two Ints, a Double as
    soon as one is a Double. A consumer of the other kind aborts (``toInt``/``toDouble``)."""

    def rule(plan: _Plan, args: list) -> Optional[str]:
        ins = [plan.kinds[v] for v in args[:-1]]
        if name in ("executorch_prim::truediv", "executorch_prim::sym_float"):
            want = _DOUBLE
        elif name in ("executorch_prim::sym_int", "executorch_prim::ceil",
                      "executorch_prim::round", "executorch_prim::trunc"):
            want = _INT
        elif name == "executorch_prim::sym_ite":
            want = ins[1] if ins[1] == ins[2] else None
        elif all(k == _BOOL for k in ins) and name in ("executorch_prim::sym_max", "executorch_prim::sym_min"):
            want = None
        else:
            want = _DOUBLE if _DOUBLE in ins else _INT
        got = plan.kinds[args[-1]]
        if want is None or got == want:
            return None
        return f"computes a {want} from {', '.join(ins)} into value {args[-1]}, a {got}"

    return rule


#: Operators whose kernels abort (``ET_CHECK``) instead of failing cleanly on arguments
#: a program can get wrong; each rule returns what is wrong, or None.
_KERNEL_RULES = {
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


# -- shapes ------------------------------------------------------------------------------------
#
# A DYNAMIC_BOUND tensor may be resized to any shape with no more elements than its
# bound, so a corrupt scalar or list upstream (an unsqueeze dim, view sizes, a permuted
# split) reaches the LLM kernels as a wrong *shape* at run time, and those kernels abort
# on it (``update_cache``: "batch size (16) should be equal to ... (1)"; ``custom_sdpa``:
# "num kv heads > num query heads"). So the shapes are propagated through the method in
# Python, every input at its upper bound and every start position 0: ATen operators by
# their own meta kernels (never the ExecuTorch kernels: custom ops run their real code
# on meta tensors), ExecuTorch's prim ops and the LLM ops by hand, delegates by the
# shapes their XNNPACK graph declares. A shape that leaves its tensor's declared bound,
# or that an aborting kernel would reject, refuses the program.

_TORCH_DTYPES: dict = {}


def _torch_dtype(st: int):
    import torch

    if not _TORCH_DTYPES:
        _TORCH_DTYPES.update({
            0: torch.uint8, 1: torch.int8, 2: torch.int16, 3: torch.int32, 4: torch.int64,
            5: torch.float16, 6: torch.float32, 7: torch.float64, 11: torch.bool,
            15: torch.bfloat16,
        })
    return _TORCH_DTYPES.get(st)


def _aten_op(name: str, overload: str):
    if not name.startswith("aten::"):
        return None  # only ATen has meta kernels for every operator it registers
    import torch

    try:
        packet = getattr(torch.ops.aten, name[len("aten::"):])
        return getattr(packet, overload or "default")
    except (AttributeError, RuntimeError):
        return None


_PRIM_INT_OPS = {
    "executorch_prim::add": lambda a, b: a + b,
    "executorch_prim::sub": lambda a, b: a - b,
    "executorch_prim::mul": lambda a, b: a * b,
    "executorch_prim::floordiv": lambda a, b: a // b if b else None,
    "executorch_prim::mod": lambda a, b: a % b if b else None,
    "executorch_prim::sym_max": max,
    "executorch_prim::sym_min": min,
}


def _propagate_shapes(plan: _Plan, where: str, delegate_io) -> None:
    instrs = [(ci, ii, x) for ci, (_, _, ins) in enumerate(plan.chains) for ii, x in enumerate(ins)]
    if any(x[0] in ("move", "jump") for _, _, x in instrs):
        return  # control flow: shapes depend on the path taken
    shapes = {i: list(t.sizes) for i, t in plan.tensors.items()}
    ints = dict(plan.ints)

    def fits(v: int, shape) -> bool:
        bound = plan.tensors[v].sizes
        return len(shape) == len(bound) and all(0 <= a <= b for a, b in zip(shape, bound))

    def set_shape(v: int, shape, at: str) -> None:
        shape = [int(d) for d in shape]
        if not fits(v, shape):
            raise _Corrupt(
                f"{where}: {at} makes value {v} a {shape} tensor, outside its declared "
                f"shape {plan.tensors[v].sizes}"
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
            n_in, n_out, dims_in, dims_out = io
            for j in range(n_in):
                v, d = b[j], dims_in[j]
                if d is None or v not in shapes:
                    continue
                shp = shapes[v]
                n, cap = 1, 1
                for x in shp:
                    n *= x
                for x in d:
                    cap *= x
                # XNNPACK keeps scalars as [1] and may regroup dims: compare sizes only.
                if n > cap:
                    raise _Corrupt(
                        f"{where}: {at} passes a {shp} tensor (value {v}) as input {j} of "
                        f"delegate {a}, whose graph takes at most {list(d)}"
                    )
            continue
        name, overload = plan.operators[a]
        full = f"{name}.{overload}" if overload else name
        op_at = f"{at} ({full})"
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
            numel = 1
            for d in shapes[b[0]]:
                numel *= d
            if size.count(-1) == 1:
                rest = 1
                for d in size:
                    rest *= d if d != -1 else 1
                size[size.index(-1)] = numel // rest if rest else 0
            n = 1
            for d in size:
                n *= d
            if n != numel or any(d < 0 for d in size):
                raise _Corrupt(f"{where}: {op_at} views a {shapes[b[0]]} tensor as {size}")
            set_shape(b[2], size, op_at)
        elif name in ("llama::update_cache", "llama::update_cache_with_indices"):
            value, cache = shapes[b[0]], shapes[b[1]]
            if len(value) < 2:
                raise _Corrupt(f"{where}: {op_at} gets a {value} value (update_cache reads its dim 1)")
            if len(value) == 4 and len(cache) == 4 and any(value[d] != cache[d] for d in (0, 2, 3)):
                raise _Corrupt(f"{where}: {op_at} would write a {value} value into a {cache} cache")
        elif (name, overload) == ("llama::custom_sdpa", "out"):
            q, k, v = shapes[b[0]], shapes[b[1]], shapes[b[2]]
            if len(q) == len(k) == len(v) == 4:
                if not (0 < k[2] <= q[2] and q[2] % k[2] == 0 and k[2] == v[2]):
                    raise _Corrupt(
                        f"{where}: {op_at} gets query {q}, key {k}, value {v}: the kernel "
                        f"needs key heads = value heads dividing query heads"
                    )
                mask = b[4]
                if mask in shapes and (len(shapes[mask]) != 2 or shapes[mask][0] != q[1]
                                       or shapes[mask][1] != v[1]):
                    raise _Corrupt(f"{where}: {op_at} gets a {shapes[mask]} mask for query {q}")
                set_shape(b[-1], q, op_at)
        else:
            op = _aten_op(name, overload)
            if op is None:
                continue
            try:
                spec, out_values = [], []
                for j, arg in enumerate(op._schema.arguments):
                    v = b[j]
                    k = plan.kinds[v]
                    write = arg.alias_info is not None and arg.alias_info.is_write
                    if k == _TENSOR:
                        x = tensor_spec(v, write)
                        if write:
                            out_values.append(v)
                    elif k == _INT:
                        x = ints.get(v, 0)
                    elif k == "IntList":
                        x = tuple(ints.get(i, 0) for i in plan.lists[v])
                    elif k == "TensorList":
                        x = tuple(tensor_spec(i, write) for i in plan.lists[v])
                        if write:
                            out_values.extend(plan.lists[v])
                    elif k == "OptionalTensorList":
                        x = tuple(None if i == -1 or plan.kinds[i] == _NULL else tensor_spec(i, False)
                                  for i in plan.lists[v])
                    elif k in (_DOUBLE, _BOOL):
                        x = plan.scalars[v]
                    elif k == _NULL:
                        x = None
                    else:
                        raise LookupError(k)
                    spec.append((arg.name if arg.kwarg_only else None, k, x))
            except Exception:  # an argument the meta kernel cannot be given: skip the op
                continue
            out_shapes = _meta_output_shapes(op, tuple(spec))
            if out_shapes is None:
                continue  # the ExecuTorch kernel checks such arguments itself (cleanly)
            for v, shape in zip(out_values, out_shapes):
                set_shape(v, shape, op_at)


#: (operator, argument spec) -> output shapes; a model repeats the same calls layer
#: after layer, and running a meta kernel costs ~1-2 ms (torch's reference
#: implementations), so a 12-layer model needs a twelfth of the calls.
_META_MEMO: dict = {}
_META_MEMO_MAX = 4096


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
        if k == _TENSOR:
            x_ = build(x)
            if x[2]:
                outs.append(x_)
        elif k == "IntList":
            x_ = list(x)
        elif k == "TensorList":
            x_ = [build(t) for t in x]
            outs.extend(t_ for t, t_ in zip(x, x_) if t[2])
        elif k == "OptionalTensorList":
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


def _numel_nbytes(t: _Tensor) -> Tuple[int, int]:
    n = 1
    for d in t.sizes:
        n *= d
    return n, n * _ELEMENT_BYTES[t.scalar_type]


def _check_model(m: _Model, data, region, file_size: int, segment_base: int) -> None:
    """Raise ``_Corrupt`` naming the first problem the runtime would trust and crash on.

    ``data`` is the whole file (delegate blobs are read from it), ``region`` the program
    flatbuffer."""
    nseg = len(m.segments)
    seen_io: dict = {}
    named_sizes = {k: m.segments[si][1] for k, si in m.named_data if si < nseg}

    def delegate_io(d) -> Optional[Tuple[int, int]]:
        bid, loc, ref = d
        if bid != "XnnpackBackend":
            return None  # other backends' blobs are not read here
        if (loc, ref) not in seen_io:
            if loc == _SEGMENT:
                off, size = m.segments[ref]
                start = segment_base + off
                blob = memoryview(data)[start : start + size]
            else:
                start, size = m.inline_delegates[ref]
                blob = memoryview(region)[start : start + size]
            try:
                seen_io[(loc, ref)] = _xnnpack_io(
                    blob, f"the XNNPACK blob of delegate data {ref}", named_sizes
                )
            finally:
                blob.release()
        return seen_io[(loc, ref)]

    for i, (off, size) in enumerate(m.segments):
        if segment_base + off + size > file_size:
            raise _Corrupt(f"segment {i} ends at byte {segment_base + off + size} but the file has {file_size}")
    const_offsets, const_size = None, 0
    if m.constant_segment is not None and m.constant_segment[1]:
        si, const_offsets = m.constant_segment
        if not si < nseg:
            raise _Corrupt(f"the constant segment is segment {si} of {nseg}")
        const_size = m.segments[si][1]
        for i, off in enumerate(const_offsets):
            if off > const_size:
                raise _Corrupt(f"constant {i} starts at byte {off} of a {const_size}-byte constant segment")
    for key, si in m.named_data:
        if not si < nseg:
            raise _Corrupt(f"named data {key!r} points at segment {si} of {nseg}")
    for si in m.mutable_segments:
        if not si < nseg:
            raise _Corrupt(f"mutable data points at segment {si} of {nseg}")
    # An arena bigger than every tensor planned in it (across methods: they share it)
    # is a corrupt size; honoured, a few bit flips make the runtime allocate and zero
    # gigabytes (a hang, then the OOM killer).
    extent: dict = {}
    for plan in m.plans:
        for t in plan.tensors.values():
            if t.alloc is not None and t.scalar_type in _ELEMENT_BYTES:
                mid, lo, hi = t.alloc
                end = (hi << 32) + lo + max(0, _numel_nbytes(t)[1])
                extent[mid] = max(extent.get(mid, 0), end)
    for plan in m.plans:
        for mid, size in enumerate(plan.arenas[1:], start=1):
            if size > 2 * extent.get(mid, 0) + 4096:
                raise _Corrupt(
                    f"method {plan.name!r}: memory arena {mid} is {size} bytes but the tensors "
                    f"planned in it end at byte {extent.get(mid, 0)}"
                )
    names = set()
    total = 0
    for plan in m.plans:
        if plan.name in names:
            raise _Corrupt(f"method {plan.name!r} is defined twice")
        names.add(plan.name)
        total += _check_plan(m, plan, const_offsets, const_size, delegate_io)
    limit = _physical_memory()
    if limit and total > limit:
        raise _Corrupt(
            f"its memory plan asks for {total} bytes of arenas, more than this machine's "
            f"{limit} bytes of RAM"
        )


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 0


def _check_plan(m: _Model, plan: _Plan, const_offsets, const_size, delegate_io) -> int:
    name = plan.name
    where = f"method {name!r}"
    kinds = plan.kinds
    n = len(kinds)
    arenas = plan.arenas
    for i, size in enumerate(arenas):
        if size < 0:
            raise _Corrupt(f"{where}: memory arena {i} has size {size}")

    def index(what: str, idx, allowed=None) -> None:
        if not 0 <= idx < n:
            raise _Corrupt(f"{where}: {what} refers to value {idx} but the method has {n}")
        if allowed is not None and kinds[idx] not in allowed:
            raise _Corrupt(
                f"{where}: {what} refers to value {idx}, a {kinds[idx]}, where "
                f"{' or '.join(allowed)} is required"
            )

    constant = set()
    for i, t in plan.tensors.items():
        _check_tensor(m, where, i, t, arenas, const_offsets, const_size)
        # A tensor with data and a planned allocation is a mutable buffer with an initial
        # value (InitializedMutableBufferPass, e.g. export_llm's attention-sink
        # cache_positions): the runtime copies the data into planned, writable memory.
        if t.data_buffer_idx > 0 and t.alloc is None:
            constant.add(i)
    for i, items in plan.lists.items():
        k = kinds[i]
        for j in items:
            if k == "IntList":
                index(f"int list value {i}", j, (_INT,))
            elif k == "TensorList":
                index(f"tensor list value {i}", j, (_TENSOR,))
            elif j != -1:
                index(f"optional tensor list value {i}", j, (_TENSOR, _NULL))
    inputs = set()
    for j, idx in enumerate(plan.inputs):
        index(f"input {j}", idx, (_TENSOR, _INT, _DOUBLE, _BOOL, _NULL))
        if idx in constant:
            raise _Corrupt(
                f"{where}: input {j} is value {idx}, a constant (the runtime would copy the "
                f"caller's data into read-only memory)"
            )
        inputs.add(idx)
    for j, idx in enumerate(plan.outputs):
        index(f"output {j}", idx)

    def writable(what: str, idx: int) -> None:
        if idx in constant:
            raise _Corrupt(f"{where}: {what} writes into value {idx}, a constant")

    nseg = len(m.segments)
    for di, (bid, loc, ref) in enumerate(plan.delegates):
        if loc == _SEGMENT:
            if not ref < nseg:
                raise _Corrupt(f"{where}: delegate {di} ({bid}) data is segment {ref} of {nseg}")
        elif loc == _INLINE:
            if not ref < len(m.inline_delegates):
                raise _Corrupt(
                    f"{where}: delegate {di} ({bid}) data is inline blob {ref} of "
                    f"{len(m.inline_delegates)}"
                )
        else:
            raise _Corrupt(f"{where}: delegate {di} ({bid}) has unknown data location {loc}")
    used = set(plan.outputs)
    ops = plan.operators
    for ci, (cin, cout, instrs) in enumerate(plan.chains):
        for idx in cin:
            index(f"chain {ci} input", idx)
        for idx in cout:
            index(f"chain {ci} output", idx)
        for ii, (kind, a, b) in enumerate(instrs):
            at = f"instruction {ii} of chain {ci}"
            if kind == "kernel":
                if not 0 <= a < len(ops):
                    raise _Corrupt(f"{where}: {at} calls operator {a} of {len(ops)}")
                opname, overload = ops[a]
                full = f"{opname}.{overload}" if overload else opname
                for j, idx in enumerate(b):
                    index(f"{at} ({full}) argument {j}", idx)
                    used.add(idx)
                layout = _operator_layout(opname, overload)
                if layout is None:
                    continue
                slots, written = layout
                if len(b) != len(slots):
                    raise _Corrupt(
                        f"{where}: {at} calls {full} with {len(b)} arguments; its schema takes "
                        f"{len(slots)}"
                    )
                for j, (idx, allowed) in enumerate(zip(b, slots)):
                    if allowed is not None:
                        index(f"{at} ({full}) argument {j}", idx, allowed)
                for j in written:
                    writable(f"{at} ({full}) argument {j}", b[j])
                rule = _KERNEL_RULES.get((opname, overload))
                if rule is not None:
                    problem = rule(plan, b)
                    if problem:
                        raise _Corrupt(f"{where}: {at} ({full}) {problem}")
            elif kind == "delegate":
                if not 0 <= a < len(plan.delegates):
                    raise _Corrupt(f"{where}: {at} calls delegate {a} of {len(plan.delegates)}")
                for j, idx in enumerate(b):
                    index(f"{at} (delegate {a}) argument {j}", idx)
                    used.add(idx)
                io = delegate_io(plan.delegates[a])
                if io is not None:
                    n_in, n_out = io[:2]
                    bid = plan.delegates[a][0]
                    if len(b) != n_in + n_out:
                        raise _Corrupt(
                            f"{where}: {at} passes {len(b)} arguments to delegate {a} ({bid}), "
                            f"whose graph has {n_in} inputs and {n_out} outputs"
                        )
                    for j, idx in enumerate(b):
                        index(f"{at} (delegate {a}) argument {j}", idx, (_TENSOR,))
                    for j in range(n_in, n_in + n_out):
                        writable(f"{at} (delegate {a}) output {j - n_in}", b[j])
            elif kind == "move":
                index(f"{at} (move from)", a)
                index(f"{at} (move to)", b)
                if kinds[a] != kinds[b]:
                    raise _Corrupt(f"{where}: {at} moves a {kinds[a]} into a {kinds[b]}")
                writable(f"{at} (move)", b)
            elif kind == "jump":
                index(f"{at} (jump condition)", a, (_BOOL,))
                if not 0 <= b <= len(instrs):
                    raise _Corrupt(f"{where}: {at} jumps to instruction {b} of {len(instrs)}")
            else:  # free
                index(f"{at} (free)", a, (_TENSOR,))
    _propagate_shapes(plan, where, delegate_io)
    # A tensor the method touches must have memory: planned, constant, external, an
    # input, or lazy (rebound as an input by the shim). Anything else has a null data
    # pointer and crashes the first kernel that writes it (DESIGN fact 4).
    for idx in sorted(used):
        t = plan.tensors.get(idx)
        if t is None or idx in inputs or idx in constant or t.alloc is not None:
            continue
        if t.dynamism == _UNBOUND or t.location == _EXTERNAL:
            continue
        raise _Corrupt(
            f"{where}: tensor value {idx} is used but has no memory (not planned, not a "
            f"constant, not an input)"
        )
    return sum(arenas[1:])


def _check_tensor(m: _Model, where, i, t: _Tensor, arenas, const_offsets, const_size) -> None:
    what = f"{where}: tensor value {i}"
    if t.scalar_type not in _ELEMENT_BYTES:
        raise _Corrupt(f"{what} has unknown scalar type {t.scalar_type}")
    for d in t.sizes:
        if d < 0:
            raise _Corrupt(f"{what} has a negative size in shape {t.sizes}")
    numel, nbytes = _numel_nbytes(t)
    if numel > _MAX_NUMEL:
        raise _Corrupt(f"{what} has {numel} elements (shape {t.sizes})")
    n = len(t.sizes)
    if t.dim_order != list(range(n)) and not (n in (4, 5) and t.dim_order == [0, *range(2, n), 1]):
        # ExecuTorch's kernels and delegates know two layouts, contiguous and channels
        # last; any other order makes XNNPACK infer wrong output shapes, which then
        # trip ET_CHECKs (abort) in kernels such as llama::update_cache.
        raise _Corrupt(
            f"{what} has dim order {t.dim_order}; ExecuTorch supports only contiguous "
            f"{list(range(n))}" + (f" or channels-last {[0, *range(2, n), 1]}" if n in (4, 5) else "")
        )
    if t.dynamism not in (_STATIC, _BOUND, _UNBOUND):
        raise _Corrupt(f"{what} has unknown shape dynamism {t.dynamism}")
    if t.storage_offset != 0:
        raise _Corrupt(f"{what} has storage offset {t.storage_offset}; ExecuTorch needs 0")
    k = t.data_buffer_idx
    if k > 0:
        if const_offsets is not None:
            if k >= len(const_offsets):
                raise _Corrupt(f"{what} is constant {k} but the program has {len(const_offsets)}")
            if const_offsets[k] + nbytes > const_size:
                raise _Corrupt(
                    f"{what} is constant {k}: {nbytes} bytes at byte {const_offsets[k]} of a "
                    f"{const_size}-byte constant segment"
                )
        else:
            if k >= len(m.constant_buffers):
                raise _Corrupt(f"{what} is constant {k} but the program has {len(m.constant_buffers)}")
            if nbytes > m.constant_buffers[k]:
                raise _Corrupt(f"{what} is constant {k}: needs {nbytes} bytes, {m.constant_buffers[k]} stored")
    if t.alloc is not None:
        mid, lo, hi = t.alloc
        if not 1 <= mid < len(arenas):
            raise _Corrupt(f"{what} is planned in arena {mid} but the method has {len(arenas) - 1}")
        offset = (hi << 32) + lo
        if offset + nbytes > arenas[mid]:
            raise _Corrupt(
                f"{what} ({nbytes} bytes) is planned at byte {offset} of arena {mid}, which has "
                f"{arenas[mid]} bytes"
            )


def _check_manifest(m: _Model, manifest: Manifest, source: str) -> None:
    """The lazykv manifest must describe this program: methods, inputs, lazy tensors."""
    from lazykv.errors import ManifestError

    plans = {p.name: p for p in m.plans}
    for r in manifest.fill_rules:
        plan = plans.get(r.method)
        if plan is None:
            raise ManifestError(
                f"{source}: the lazykv manifest has a fill rule for method {r.method!r}, which "
                f"the program does not have ({sorted(plans)}); re-export with lazykv"
            )
        for what, k in (("position", r.position_input), ("length", r.length_input)):
            if k >= len(plan.inputs) or plan.inputs[k] not in plan.tensors:
                raise ManifestError(
                    f"{source}: the fill rule of {r.method!r} reads its {what} from input {k}, "
                    f"but the method's input {k} is not a tensor (it takes {len(plan.inputs)} "
                    f"inputs); re-export with lazykv"
                )
        pos = plan.tensors[plan.inputs[r.position_input]]
        numel, _ = _numel_nbytes(pos)
        if pos.scalar_type not in _INTEGER_SCALAR_TYPES or r.position_index >= numel:
            raise ManifestError(
                f"{source}: the fill rule of {r.method!r} reads position element "
                f"{r.position_index} of input {r.position_input}, which has {numel} "
                f"elements of scalar type {pos.scalar_type}; re-export with lazykv"
            )
        derived = _limits_of(plan)
        if derived.position_input is not None and (
            (r.position_input, r.position_index) != (derived.position_input, derived.position_index)
            or (derived.length_input is not None and r.length_input != derived.length_input)
        ):
            raise ManifestError(
                f"{source}: the fill rule of {r.method!r} reads the start position from input "
                f"{r.position_input}[{r.position_index}] and the length from input "
                f"{r.length_input}, but the program's KV-cache writes take them from input "
                f"{derived.position_input}[{derived.position_index}] and input "
                f"{derived.length_input}; re-export with lazykv"
            )
        length = plan.tensors[plan.inputs[r.length_input]]
        if r.length_axis >= len(length.sizes):
            raise ManifestError(
                f"{source}: the fill rule of {r.method!r} counts positions along axis "
                f"{r.length_axis} of input {r.length_input}, which has {len(length.sizes)} "
                f"dims; re-export with lazykv"
            )
    for b in manifest.lazy_buffers:
        for meth in b.methods:
            plan = plans.get(meth)
            if plan is None:
                raise ManifestError(
                    f"{source}: lazy buffer {b.fqn!r} is used by method {meth!r}, which the "
                    f"program does not have; re-export with lazykv"
                )
            # As exported (DYNAMIC_UNBOUND), or as the shim rebinds it (a DYNAMIC_BOUND input).
            found = [
                t for i, t in plan.tensors.items()
                if t.fqn == b.fqn
                and (t.dynamism == _UNBOUND or (t.dynamism == _BOUND and i in plan.inputs))
            ]
            if len(found) != 1:
                raise ManifestError(
                    f"{source}: lazy buffer {b.fqn!r} should be one lazy (DYNAMIC_UNBOUND) "
                    f"tensor of {meth!r}; found {len(found)}; re-export with lazykv"
                )
            t = found[0]
            if tuple(t.sizes) != tuple(b.max_shape) or _ELEMENT_BYTES.get(t.scalar_type) != (
                DTYPE_BYTES[b.dtype]
            ):
                raise ManifestError(
                    f"{source}: lazy buffer {b.fqn!r} in {meth!r} is {list(t.sizes)} (scalar "
                    f"type {t.scalar_type}) but the manifest says {list(b.max_shape)} "
                    f"{b.dtype}; re-export with lazykv"
                )


def _xnnpack_io(blob, what: str, named_sizes: dict) -> tuple:
    """``(inputs, outputs, input dims, output dims)`` of an XNNPACK delegate blob, after
    the checks ExecuTorch's
    XNNPACK backend leaves to luck: its header's ranges, the flatbuffer identifier (logged
    raw when wrong), and every constant key (logged raw when missing). ExecuTorch's
    Python bindings route its log through ``sys.stderr``; a line that is not UTF-8 ends
    the process (``terminate ... UnicodeDecodeError``)."""
    size = len(blob)
    if size >= 30 and bytes(blob[4:8]) == b"XH00":
        fo, fs, co = struct.unpack_from("<III", blob, 10)
        cs = struct.unpack_from("<Q", blob, 22)[0]
        if fs < 8 or fo > size or fs > size - fo or co > size or cs > size - co or (
            co < fo or co - fo < fs
        ):
            raise _Corrupt(f"{what} has an inconsistent header")
        fb_bytes = blob[fo : fo + fs]
    else:
        fb_bytes = blob
    if len(fb_bytes) < 8 or bytes(fb_bytes[4:8]) not in (b"XN00", b"XN01"):
        raise _Corrupt(f"{what} is not an XNNPACK graph (identifier {bytes(fb_bytes[4:8])!r})")
    fb = _Fb(fb_bytes)
    try:
        root = fb.u("I", 0)
        n_in = len(_required(fb.ints(root, 12, "I"), "its input list"))
        n_out = len(_required(fb.ints(root, 14, "I"), "its output list"))
        constants = []  # (size available, named key) per constant_data entry
        for c in fb.tables(root, 20) or []:
            key = fb.string(c, 8)  # logged raw when missing: raises unless UTF-8
            constants.append((fb.scalar(c, 6, "Q"), key))
        if not constants:  # older blobs: constant_buffer [Buffer]
            for b in fb.tables(root, 16) or []:
                v = fb.vector(b, 4, 1)
                constants.append((0 if v is None else v[1], None))
        in_ids = fb.ints(root, 12, "I")
        out_ids = fb.ints(root, 14, "I")
        num_externs = fb.scalar(root, 10, "I")
        flagged = {1: set(), 2: set()}
        dims_of = {}
        externals = set()
        for i, xv in enumerate(fb.tables(root, 8) or []):
            kind = fb.scalar(xv, 4, "B")
            t = fb.ref(xv, 6)
            if kind == 2 and t:  # XNNQuantizedTensorValue: its tensor_value
                t = fb.ref(t, 4)
            if kind not in (1, 2) or not t:
                continue
            flags = fb.scalar(t, 14, "I")
            vid = fb.scalar(t, 16, "I")
            dims_of[vid] = fb.ints(t, 8, "I") or []
            for bit in (1, 2):  # XNN_VALUE_FLAG_EXTERNAL_INPUT / _OUTPUT
                if flags & bit:
                    flagged[bit].add(vid)
            if flags & 3:
                ext = fb.scalar(t, 12, "I")
                if ext >= num_externs or ext in externals:
                    raise _Corrupt(f"value {i} has external id {ext} ({num_externs} externals)")
                externals.add(ext)
            idx = fb.scalar(t, 10, "I")
            if idx == 0:
                continue
            if idx >= len(constants):
                raise _Corrupt(f"value {i} uses constant {idx} of {len(constants)}")
            dims = fb.ints(t, 8, "I") or []
            numel = 1
            for d in dims:
                numel *= d
            dt = fb.scalar(t, 4, "h")
            need = (numel + 1) // 2 if dt in (8, 10) else numel * _XNN_BYTES.get(dt, 0)
            size, key = constants[idx]
            if key:
                if key not in named_sizes:
                    continue  # XNNPACK reports a missing key cleanly
                size = named_sizes[key]
            if size < need:
                raise _Corrupt(
                    f"value {i} is a {dims} tensor of {need} bytes but its constant data "
                    f"({'named ' + repr(key) if key else 'inline'}) has {size}"
                )
        # An internal value flagged external gets no buffer from the executor: XNNPACK
        # then reads or writes through a null pointer (SIGSEGV).
        if flagged[1] != set(in_ids) or flagged[2] != set(out_ids):
            raise _Corrupt(
                f"its external values (inputs {sorted(flagged[1])}, outputs "
                f"{sorted(flagged[2])}) are not its declared inputs {in_ids} and outputs {out_ids}"
            )
        dims_in = [dims_of.get(v) for v in in_ids]
        dims_out = [dims_of.get(v) for v in out_ids]
    except _Corrupt as e:
        raise _Corrupt(f"{what}: {e}") from None
    return n_in, n_out, dims_in, dims_out


#: Bytes per element of XNNPACK datatypes (``runtime_schema.fbs`` ``XNNDatatype``);
#: 4-bit types (8, 10) are handled apart.
_XNN_BYTES = {1: 4, 2: 2, 3: 1, 4: 1, 5: 4, 6: 1, 7: 4, 9: 1, 11: 1, 12: 4, 13: 4, 14: 2}


def _validate_region(region: bytes, file_size: int, segment_base: int, source: str,
                     data=None) -> _Model:
    try:
        model = _read_model(region)
        _check_model(model, region if data is None else data, region, file_size, segment_base)
    except _Corrupt as e:
        raise InvalidProgram(
            f"{source}: {e}. The file is corrupt or was written by a broken exporter; "
            f"re-export it"
        ) from None
    except (struct.error, RecursionError, OverflowError, MemoryError, ValueError) as e:
        raise InvalidProgram(
            f"{source}: the program flatbuffer is corrupt ({type(e).__name__}: {str(e)[:160]}); "
            f"re-export it"
        ) from None
    return model


def validate_pte(path_or_bytes: Union[str, os.PathLike, bytes, bytearray, memoryview]) -> Optional[Manifest]:
    """Check a ``.pte`` without parsing it into Python objects; return its manifest.

    Everything :func:`lazykv.pte_file.open_pte` checks, read from the raw flatbuffer
    (header, sizes, segments, every value, instruction and kernel argument, XNNPACK
    blobs, the manifest against the program), for callers that never need the parsed
    :class:`Program`.
    Raises :class:`InvalidProgram` (:class:`ManifestError` for the manifest) naming the
    file and the problem.
    """
    return preflight(path_or_bytes).manifest


@dataclasses.dataclass(frozen=True)
class Preflight:
    """What a runtime needs to know about a ``.pte`` before loading it: its manifest
    (None if lazykv did not mark it) and the input limits of each method."""

    manifest: Optional[Manifest]
    limits: dict  # method -> MethodLimits


def preflight(path_or_bytes: Union[str, os.PathLike, bytes, bytearray, memoryview]) -> Preflight:
    """:func:`validate_pte` plus :func:`method_limits`, reading the file once."""
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        return _preflight_data(bytes(path_or_bytes), "<bytes>")
    path = Path(path_or_bytes)
    source = str(path)
    if not path.is_file():
        raise InvalidProgram(f"{source}: no such file" if not path.exists() else
                             f"{source}: not a regular file, expected a .pte")
    if path.stat().st_size == 0:
        raise InvalidProgram(f"{source}: file is empty")
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        return _preflight_data(mm, source)
    finally:
        try:
            mm.close()
        except BufferError:  # pragma: no cover
            pass


def _preflight_data(data, source: str) -> Preflight:
    model = _validated_model(data, source)
    manifest = _manifest_of(model, data, source)
    return Preflight(manifest, {p.name: _limits_of(p) for p in model.plans})


def _validated_model(data, source: str) -> "_Model":
    from lazykv.pte_file import _check_header

    program_size, segment_base = _check_header(data, source)
    return _validate_region(bytes(data[:program_size]), len(data), segment_base, source, data)


def _manifest_of(model: "_Model", data, source: str) -> Optional[Manifest]:
    from lazykv.pte_file import _check_header

    program_size, segment_base = _check_header(data, source)
    blob = None
    for key, si in model.named_data:
        if key == MANIFEST_KEY:
            off, n = model.segments[si]
            blob = bytes(data[segment_base + off : segment_base + off + n])
    if blob is None:
        return None
    manifest = Manifest.from_bytes(blob, source)
    _check_manifest(model, manifest, source)
    return manifest


# -- input limits ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MethodLimits:
    """What a method's inputs must respect that the runtime does not check (or checks
    only by aborting), read from the program's graph.

    ``token_inputs``: ``(input index, vocabulary size)`` of every input that indexes an
    embedding table: its ids must lie in ``[0, vocab)``. ``position_input`` /
    ``position_index``: the input element that is the start position of a KV-cache write
    (``llama::update_cache``), or None; ``length_input`` / ``length_axis``: the input
    whose size along that axis is the number of positions written. ``max_positions``:
    the cache capacity (positions ``start + length`` must not pass it), or None.
    A negative start position makes ``update_cache`` write before the cache and
    ``custom_sdpa`` divide by zero (SIGFPE), so callers must check these in Python.
    """

    method: str
    token_inputs: Tuple[Tuple[int, int], ...] = ()
    position_input: Optional[int] = None
    position_index: int = 0
    length_input: Optional[int] = None
    length_axis: int = 1
    max_positions: Optional[int] = None

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "token_inputs": [list(t) for t in self.token_inputs]}

    @staticmethod
    def from_dict(d: dict) -> "MethodLimits":
        return MethodLimits(**{**d, "token_inputs": tuple(tuple(t) for t in d.get("token_inputs", ()))})


def method_limits(source: Union[str, os.PathLike, bytes, "PteFile"]) -> dict:
    """``{method: MethodLimits}`` for every method of a ``.pte`` (validated first)."""
    from lazykv.pte_file import PteFile

    if isinstance(source, PteFile):
        model = source._model or _validate_region(
            bytes(source._data[: source.program_size]), len(source._data),
            source.segment_base_offset, source.source, source._data,
        )
        return {p.name: _limits_of(p) for p in model.plans}
    return preflight(source).limits


def _limits_of(plan: _Plan) -> MethodLimits:
    pos_of_input = {v: i for i, v in enumerate(plan.inputs)}
    writer = {}  # value index -> (operator, args) of the kernel whose result slot it is
    kernels = []
    for _, _, instrs in plan.chains:
        for kind, a, b in instrs:
            if kind == "kernel":
                op = plan.operators[a]
                kernels.append((op, b))
                if b:
                    writer[b[-1]] = (op, b)
    tokens = []
    position = None
    max_positions = None
    for (name, overload), args in kernels:
        if (name, overload) == ("aten::embedding", "out") and args[1] in pos_of_input:
            weight = plan.tensors.get(args[0])
            if weight is not None and weight.sizes:
                tokens.append((pos_of_input[args[1]], weight.sizes[0]))
        if name in ("llama::update_cache", "llama::update_cache_with_indices"):
            cache = plan.tensors[args[1]]
            cap = cache.sizes[1]
            max_positions = cap if max_positions is None else min(max_positions, cap)
            src = writer.get(args[2])
            if src and src[0] == ("aten::_local_scalar_dense", ""):
                sel = writer.get(src[1][0])
                if sel and sel[0] == ("aten::select_copy", "int_out"):
                    x, dim, idx = sel[1][0], sel[1][1], sel[1][2]
                    if x in pos_of_input and plan.ints.get(dim) == 0 and len(plan.tensors[x].sizes) == 1:
                        position = (pos_of_input[x], plan.ints.get(idx, 0))
    length_input = None
    if position is not None and len(tokens) == 1:
        t = plan.tensors[plan.inputs[tokens[0][0]]]
        if len(t.sizes) == 2:
            length_input = tokens[0][0]
    return MethodLimits(
        method=plan.name,
        token_inputs=tuple(sorted(set(tokens))),
        position_input=None if position is None else position[0],
        position_index=0 if position is None else position[1],
        length_input=length_input,
        length_axis=1,
        max_positions=max_positions,
    )
