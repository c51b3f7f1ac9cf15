"""The program model: what a ``.pte``'s program flatbuffer holds, read in one pass.

:func:`read_program` turns the flatbuffer region into plain Python records (methods,
their values, tensors, instructions, operators and delegates; segments, constants and
named data) with :class:`lazykv.format.flatbuffer.Reader`, checking as it goes that
every field the model exposes is present and readable. Indices *between* records (an
argument naming value 7, a tensor in arena 2) are not checked here: that is what
:mod:`lazykv.verify` is for. No torch, no ExecuTorch import: ``lazykv inspect`` reads a
stories110m program in tens of milliseconds.

Each record keeps ``at``, the position of its table in the region, for in-place edits
(:mod:`lazykv.format.rebind`).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, NamedTuple, Optional, Tuple, Union

from lazykv.format import schema as S
from lazykv.format.flatbuffer import FlatbufferError, Reader
from lazykv.format.scalar_type import dtype_name, nbytes

# Value kinds (``EValue.val_type``), by name.
TENSOR, INT, DOUBLE, BOOL, NULL, STRING = "Tensor", "Int", "Double", "Bool", "Null", "String"
INT_LIST, TENSOR_LIST, OPTIONAL_TENSOR_LIST = "IntList", "TensorList", "OptionalTensorList"
DOUBLE_LIST, BOOL_LIST = "DoubleList", "BoolList"


class Allocation(NamedTuple):
    """Where a planned tensor lives: arena ``memory_id`` at byte ``offset``."""

    memory_id: int
    offset_low: int
    offset_high: int

    @property
    def offset(self) -> int:
        """Byte offset in the arena (the two 32-bit halves joined)."""
        return (self.offset_high << 32) + self.offset_low


@dataclasses.dataclass(frozen=True)
class Tensor:
    """A tensor value (``program.fbs`` ``Tensor``)."""

    scalar_type: int
    storage_offset: int
    sizes: List[int]
    dim_order: List[int]
    data_buffer_idx: int
    allocation: Optional[Allocation]
    dynamism: int
    fqn: Optional[str]
    location: int
    at: int

    @property
    def dtype(self) -> str:
        """torch's name of the tensor's scalar type (``float32``...)."""
        return dtype_name(self.scalar_type)

    @property
    def nbytes(self) -> int:
        """Bytes at the recorded (upper-bound) shape."""
        return nbytes(self.scalar_type, self.sizes)

    @property
    def constant(self) -> bool:
        """Its data is stored in the program (a weight)."""
        return self.data_buffer_idx > 0


class Instruction(NamedTuple):
    """One instruction: ``kind`` is ``kernel`` (``a`` operator index, ``b`` arguments),
    ``delegate`` (delegate index, arguments), ``move`` (from, to), ``jump`` (condition
    value, destination) or ``free`` (value, None)."""

    kind: str
    a: int
    b: Union[List[int], int, None]


class Chain(NamedTuple):
    """A chain of instructions with its input and output value indices."""

    inputs: List[int]
    outputs: List[int]
    instructions: List[Instruction]


class Operator(NamedTuple):
    """An operator a kernel call names (``aten::add``, overload ``out``)."""

    name: str
    overload: str

    @property
    def full_name(self) -> str:
        """``name.overload`` (just the name without an overload)."""
        return f"{self.name}.{self.overload}" if self.overload else self.name


class Delegate(NamedTuple):
    """A backend delegate: its backend ``id`` and where its blob is (``location``
    :data:`lazykv.format.schema.INLINE` or ``SEGMENT``, ``index``)."""

    id: str
    location: int
    index: int


@dataclasses.dataclass(frozen=True)
class Plan:
    """One method (``program.fbs`` ``ExecutionPlan``). Values are split by kind:
    ``kinds[i]`` names value ``i``'s kind; ``tensors``, ``ints``, ``lists`` (int, tensor
    and optional-tensor lists: value indices, or ints), ``scalars`` (doubles and bools)
    and ``strings`` hold the values of each kind by index."""

    name: str
    kinds: List[str]
    tensors: Dict[int, Tensor]
    ints: Dict[int, int]
    lists: Dict[int, List[int]]
    scalars: Dict[int, Union[float, bool]]
    strings: Dict[int, str]
    inputs: List[int]
    outputs: List[int]
    chains: List[Chain]
    operators: List[Operator]
    delegates: List[Delegate]
    arenas: List[int]
    at: int

    def value(self, i: int):
        """Value ``i`` as Python: a :class:`Tensor`, int, float, bool, str, list or None."""
        for table in (self.tensors, self.ints, self.scalars, self.strings, self.lists):
            if i in table:
                return table[i]
        return None

    @property
    def is_constant_method(self) -> bool:
        """A method without inputs or instructions (``get_max_context_len``...)."""
        return not self.inputs and all(not c.instructions for c in self.chains)

    def kernel_calls(self):
        """``(operator, arguments)`` of every kernel call, in program order."""
        for chain in self.chains:
            for ins in chain.instructions:
                if ins.kind == "kernel" and 0 <= ins.a < len(self.operators):
                    yield self.operators[ins.a], ins.b


class Segment(NamedTuple):
    """A data segment: ``offset`` from the segment base offset, ``size`` in bytes."""

    offset: int
    size: int


class NamedData(NamedTuple):
    """A named-data entry: its key and the segment holding its bytes."""

    key: str
    segment_index: int


class Span(NamedTuple):
    """Bytes ``[start, start + size)`` of the program region (inline data)."""

    start: int
    size: int


class ConstantSegment(NamedTuple):
    """Where constant tensors live: a segment and each constant's offset in it."""

    segment_index: int
    offsets: List[int]


@dataclasses.dataclass(frozen=True)
class Program:
    """The program flatbuffer (``program.fbs`` ``Program``)."""

    version: int
    plans: List[Plan]
    segments: List[Segment]
    constant_segment: Optional[ConstantSegment]
    constant_buffers: List[Span]
    inline_delegates: List[Span]
    named_data: List[NamedData]
    mutable_segments: List[int]

    @property
    def method_names(self) -> List[str]:
        """Every method name, in program order."""
        return [p.name for p in self.plans]

    def plan(self, name: str) -> Plan:
        """The method named ``name`` (``KeyError`` if none)."""
        for p in self.plans:
            if p.name == name:
                return p
        raise KeyError(name)

    # -- what it costs at load (``lazykv inspect``, :mod:`lazykv.estimate`) ----------------

    def arena_bytes(self) -> List[int]:
        """Bytes of each planned arena (memory id 1, 2, ...) the runtime allocates at
        load: per arena the maximum over the methods (``executorch.runtime`` sizes each
        arena to the max across methods and shares it); constant methods plan none."""
        out: List[int] = []
        for plan in self.plans:
            if plan.is_constant_method:
                continue
            for mem_id, size in enumerate(plan.arenas[1:]):
                if mem_id == len(out):
                    out.append(0)
                out[mem_id] = max(out[mem_id], size)
        return out

    def constant_tensor_bytes(self) -> Tuple[int, int]:
        """``(count, bytes)`` of the distinct constant tensors (by data buffer) the
        methods use, at their recorded shapes."""
        seen: Dict[int, int] = {}
        for plan in self.plans:
            if plan.is_constant_method:
                continue
            for t in plan.tensors.values():
                if t.data_buffer_idx > 0 and t.data_buffer_idx not in seen:
                    seen[t.data_buffer_idx] = t.nbytes
        return len(seen), sum(seen.values())

    def named_data_bytes(self, skip_prefix: str = "lazykv/") -> int:
        """Bytes of the named-data blobs (delegate weights), lazykv's own (the manifest)
        left out."""
        return sum(self.segments[nd.segment_index].size for nd in self.named_data
                   if not nd.key.startswith(skip_prefix))


def _required(x, what: str):
    if x is None:
        raise FlatbufferError(f"{what} is missing")
    return x


def read_program(region) -> Program:
    """The :class:`Program` in flatbuffer ``region`` (the file's first program-size bytes).

    Raises :class:`FlatbufferError` naming what is missing or unreadable."""
    fb = Reader(region)
    root = fb.root()
    plans = _required(fb.tables(root, S.Program.execution_plan), "the program's execution plans")
    segments = [
        Segment(fb.scalar(s, S.DataSegment.offset, "Q"), fb.scalar(s, S.DataSegment.size, "Q"))
        for s in fb.tables(root, S.Program.segments) or []
    ]
    cs = fb.ref(root, S.Program.constant_segment)
    constant_segment = None
    if cs:
        constant_segment = ConstantSegment(
            fb.scalar(cs, S.SubsegmentOffsets.segment_index, "I"),
            fb.ints(cs, S.SubsegmentOffsets.offsets, "Q") or [],
        )
    # Named data before the methods: flatbuffers share identical vtables between tables
    # (a NamedData and an Operator have the same layout), so one corrupt vtable breaks
    # both; the message names the named data, as lazykv's reader always has.
    named_data = [
        NamedData(
            _required(fb.string(nd, S.NamedData.key), f"the key of named data {i}"),
            fb.scalar(nd, S.NamedData.segment_index, "I"),
        )
        for i, nd in enumerate(fb.tables(root, S.Program.named_data) or [])
    ]
    return Program(
        version=fb.scalar(root, S.Program.version, "I"),
        plans=[_read_plan(fb, p, i) for i, p in enumerate(plans)],
        segments=segments,
        constant_segment=constant_segment,
        constant_buffers=[_span(fb, b) for b in fb.tables(root, S.Program.constant_buffer) or []],
        inline_delegates=[
            _span(fb, b) for b in fb.tables(root, S.Program.backend_delegate_data) or []
        ],
        named_data=named_data,
        mutable_segments=[
            fb.scalar(s, S.SubsegmentOffsets.segment_index, "I")
            for s in fb.tables(root, S.Program.mutable_data_segments) or []
        ],
    )


def _span(fb: Reader, table: int) -> Span:
    """The one ``[ubyte]`` field of ``Buffer`` / ``BackendDelegateInlineData``."""
    v = fb.vector(table, S.VALUE_SLOT, 1)
    return Span(0, 0) if v is None else Span(*v)


def _read_tensor(fb: Reader, t: int, where: str, i: int) -> Tensor:
    a = fb.ref(t, S.Tensor.allocation_info)
    x = fb.ref(t, S.Tensor.extra_tensor_info)
    A = S.AllocationDetails
    return Tensor(
        scalar_type=fb.scalar(t, S.Tensor.scalar_type, "b"),
        storage_offset=fb.scalar(t, S.Tensor.storage_offset, "i"),
        sizes=_required(fb.ints(t, S.Tensor.sizes, "i"), f"{where}: the sizes of tensor value {i}"),
        dim_order=_required(fb.ints(t, S.Tensor.dim_order, "B"),
                            f"{where}: the dim order of tensor value {i}"),
        data_buffer_idx=fb.scalar(t, S.Tensor.data_buffer_idx, "I"),
        allocation=Allocation(fb.scalar(a, A.memory_id, "I"), fb.scalar(a, A.memory_offset_low, "I"),
                              fb.scalar(a, A.memory_offset_high, "I")) if a else None,
        dynamism=fb.scalar(t, S.Tensor.shape_dynamism, "b"),
        fqn=fb.string(x, S.ExtraTensorInfo.fully_qualified_name) if x else None,
        location=fb.scalar(x, S.ExtraTensorInfo.location, "b") if x else 0,
        at=t,
    )


def _read_plan(fb: Reader, p: int, pi: int) -> Plan:
    name = _required(fb.string(p, S.ExecutionPlan.name), f"the name of method {pi}")
    where = f"method {name!r}"
    kinds: List[str] = []
    tensors: Dict[int, Tensor] = {}
    ints: Dict[int, int] = {}
    lists: Dict[int, List[int]] = {}
    scalars: Dict[int, Union[float, bool]] = {}
    strings: Dict[int, str] = {}
    item = S.VALUE_SLOT
    values = _required(fb.tables(p, S.ExecutionPlan.values), f"the values of {where}")
    for i, ev in enumerate(values):
        vt = fb.scalar(ev, S.EValue.val_type, "B")
        kind = S.KERNEL_TYPES.get(vt)
        if kind is None:
            raise FlatbufferError(f"{where}: value {i} has unknown type {vt}")
        val = fb.ref(ev, S.EValue.val)
        if not val and kind != NULL:
            raise FlatbufferError(f"{where}: value {i} is a {kind} with no data")
        kinds.append(kind)
        if kind == TENSOR:
            tensors[i] = _read_tensor(fb, val, where, i)
        elif kind == INT:
            ints[i] = fb.scalar(val, item, "q")
        elif kind == INT_LIST:
            lists[i] = _required(fb.ints(val, item, "q"), f"{where}: the items of int list value {i}")
        elif kind in (TENSOR_LIST, OPTIONAL_TENSOR_LIST):
            lists[i] = _required(fb.ints(val, item, "i"), f"{where}: the items of {kind} value {i}")
        elif kind == DOUBLE:
            scalars[i] = fb.scalar(val, item, "d")
        elif kind == BOOL:
            scalars[i] = bool(fb.scalar(val, item, "B"))
        elif kind in (DOUBLE_LIST, BOOL_LIST):
            _required(fb.vector(val, item, 8 if kind == DOUBLE_LIST else 1),
                      f"{where}: the items of value {i}")
        elif kind == STRING:
            strings[i] = _required(fb.string(val, item), f"{where}: string value {i}")
    chains = []
    for ci, c in enumerate(_required(fb.tables(p, S.ExecutionPlan.chains), f"the chains of {where}")):
        instructions = [
            _read_instruction(fb, ins, f"{where}: instruction {ii} of chain {ci}")
            for ii, ins in enumerate(_required(fb.tables(c, S.Chain.instructions),
                                               f"{where}: the instructions of chain {ci}"))
        ]
        chains.append(Chain(fb.ints(c, S.Chain.inputs, "i") or [],
                            fb.ints(c, S.Chain.outputs, "i") or [], instructions))
    operators = []
    for oi, op in enumerate(_required(fb.tables(p, S.ExecutionPlan.operators),
                                      f"the operators of {where}")):
        op_name = fb.string(op, S.Operator.name)
        if not op_name:
            raise FlatbufferError(f"{where}: operator {oi} has no name")
        operators.append(Operator(op_name, fb.string(op, S.Operator.overload) or ""))
    delegates = []
    for di, d in enumerate(fb.tables(p, S.ExecutionPlan.delegates) or []):
        ref = fb.ref(d, S.BackendDelegate.processed)
        backend = fb.string(d, S.BackendDelegate.id)
        if not ref or not backend:
            raise FlatbufferError(f"{where}: delegate {di} has no backend id or no data reference")
        for cs in fb.tables(d, S.BackendDelegate.compile_specs) or []:
            # The runtime copies each compile spec's key and value without checking them.
            _required(fb.string(cs, S.CompileSpec.key), f"{where}: a compile spec key of delegate {di}")
            _required(fb.vector(cs, S.CompileSpec.value, 1),
                      f"{where}: a compile spec value of delegate {di}")
        delegates.append(Delegate(backend, fb.scalar(ref, S.BackendDelegateDataReference.location, "b"),
                                  fb.scalar(ref, S.BackendDelegateDataReference.index, "I")))
    return Plan(
        name=name, kinds=kinds, tensors=tensors, ints=ints, lists=lists, scalars=scalars,
        strings=strings,
        inputs=_required(fb.ints(p, S.ExecutionPlan.inputs, "i"), f"the inputs of {where}"),
        outputs=_required(fb.ints(p, S.ExecutionPlan.outputs, "i"), f"the outputs of {where}"),
        chains=chains, operators=operators, delegates=delegates,
        arenas=_required(fb.ints(p, S.ExecutionPlan.non_const_buffer_sizes, "q"),
                         f"the memory plan of {where}"),
        at=p,
    )


#: ``InstructionArguments`` member -> (kind, slot of ``a``, slot of ``b``, ``b`` is a list).
_INSTRUCTIONS: Dict[str, Tuple[str, int, int, bool]] = {
    "KernelCall": ("kernel", S.PROGRAM_FBS["KernelCall"].op_index, S.PROGRAM_FBS["KernelCall"].args, True),
    "DelegateCall": ("delegate", S.PROGRAM_FBS["DelegateCall"].delegate_index,
                     S.PROGRAM_FBS["DelegateCall"].args, True),
    "MoveCall": ("move", S.PROGRAM_FBS["MoveCall"].move_from, S.PROGRAM_FBS["MoveCall"].move_to, False),
    "JumpFalseCall": ("jump", S.PROGRAM_FBS["JumpFalseCall"].cond_value_index,
                      S.PROGRAM_FBS["JumpFalseCall"].destination_instruction, False),
    "FreeCall": ("free", S.PROGRAM_FBS["FreeCall"].value_index, 0, False),
}


def _read_instruction(fb: Reader, ins: int, where: str) -> Instruction:
    it = fb.scalar(ins, S.Instruction.instr_args_type, "B")
    args = fb.ref(ins, S.Instruction.instr_args)
    if not args:
        raise FlatbufferError(f"{where} has no arguments")
    table = S.INSTRUCTION_ARGUMENTS.get(it)
    if table is None:
        raise FlatbufferError(f"{where} has unknown type {it}")
    kind, a_slot, b_slot, b_list = _INSTRUCTIONS[table]
    a = fb.scalar(args, a_slot, "i")
    if b_list:
        b = _required(fb.ints(args, b_slot, "i"), f"the arguments of {where}")
    else:
        b = fb.scalar(args, b_slot, "i") if b_slot else None
    return Instruction(kind, a, b)
