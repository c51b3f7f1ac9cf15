"""Slot numbers of the ExecuTorch ``program.fbs`` tables lazykv reads, and its enums.

A flatbuffer field's slot is ``4 + 2 * its id``, and ids count the fields of a table
in declaration order (a union field takes two ids: its ``_type``, then its value). So
each table below is declared by its field names in ``program.fbs`` order, and the slots
are derived from that order: ``tests/test_format_layer.py`` parses the installed
wheel's ``executorch/schema/program.fbs`` and checks every table and enum here against
it, so a schema change in a new ExecuTorch release fails a test instead of misreading
files.
"""

from __future__ import annotations

from typing import Dict, Tuple


class TableSlots:
    """The slots of one flatbuffer table: ``Tensor.sizes`` is the slot of ``sizes``."""

    def __init__(self, name: str, fields: Tuple[str, ...]) -> None:
        self.__name__ = name
        self.fields = fields
        for i, field in enumerate(fields):
            setattr(self, field, 4 + 2 * i)

    def __repr__(self) -> str:
        return f"TableSlots({self.__name__!r}, {self.fields!r})"


def _tables(spec: Dict[str, Tuple[str, ...]]) -> Dict[str, TableSlots]:
    return {name: TableSlots(name, fields) for name, fields in spec.items()}


#: Field names in declaration order, as in ``program.fbs`` (ExecuTorch 1.5).
PROGRAM_FBS: Dict[str, TableSlots] = _tables({
    "Program": ("version", "execution_plan", "constant_buffer", "backend_delegate_data",
                "segments", "constant_segment", "mutable_data_segments", "named_data"),
    "ExecutionPlan": ("name", "container_meta_type", "values", "inputs", "outputs", "chains",
                      "operators", "delegates", "non_const_buffer_sizes"),
    "EValue": ("val_type", "val"),
    "Tensor": ("scalar_type", "storage_offset", "sizes", "dim_order", "requires_grad",
               "data_buffer_idx", "allocation_info", "layout", "shape_dynamism",
               "extra_tensor_info"),
    "AllocationDetails": ("memory_id", "memory_offset_low", "memory_offset_high"),
    "ExtraTensorInfo": ("mutable_data_segments_idx", "fully_qualified_name", "location"),
    "Int": ("int_val",),
    "Bool": ("bool_val",),
    "Double": ("double_val",),
    "String": ("string_val",),
    "IntList": ("items",),
    "DoubleList": ("items",),
    "BoolList": ("items",),
    "TensorList": ("items",),
    "OptionalTensorList": ("items",),
    "Operator": ("name", "overload"),
    "KernelCall": ("op_index", "args"),
    "DelegateCall": ("delegate_index", "args"),
    "MoveCall": ("move_from", "move_to"),
    "JumpFalseCall": ("cond_value_index", "destination_instruction"),
    "FreeCall": ("value_index",),
    "Instruction": ("instr_args_type", "instr_args"),
    "Chain": ("inputs", "outputs", "instructions"),
    "BackendDelegateDataReference": ("location", "index"),
    "CompileSpec": ("key", "value"),
    "BackendDelegate": ("id", "processed", "compile_specs"),
    "Buffer": ("storage",),
    "BackendDelegateInlineData": ("data",),
    "DataSegment": ("offset", "size"),
    "SubsegmentOffsets": ("segment_index", "offsets"),
    "NamedData": ("key", "segment_index"),
})

Program = PROGRAM_FBS["Program"]
ExecutionPlan = PROGRAM_FBS["ExecutionPlan"]
EValue = PROGRAM_FBS["EValue"]
Tensor = PROGRAM_FBS["Tensor"]
AllocationDetails = PROGRAM_FBS["AllocationDetails"]
ExtraTensorInfo = PROGRAM_FBS["ExtraTensorInfo"]
Operator = PROGRAM_FBS["Operator"]
Instruction = PROGRAM_FBS["Instruction"]
Chain = PROGRAM_FBS["Chain"]
BackendDelegate = PROGRAM_FBS["BackendDelegate"]
BackendDelegateDataReference = PROGRAM_FBS["BackendDelegateDataReference"]
CompileSpec = PROGRAM_FBS["CompileSpec"]
DataSegment = PROGRAM_FBS["DataSegment"]
SubsegmentOffsets = PROGRAM_FBS["SubsegmentOffsets"]
NamedData = PROGRAM_FBS["NamedData"]
#: The one field of each scalar / list table (``Int.int_val``, ``IntList.items``...) is
#: its first: slot 4.
VALUE_SLOT = 4

#: Union members in declaration order; a member's type code is its index + 1 (0: none).
UNIONS: Dict[str, Tuple[str, ...]] = {
    "KernelTypes": ("Null", "Int", "Bool", "Double", "Tensor", "String", "IntList",
                    "DoubleList", "BoolList", "TensorList", "OptionalTensorList"),
    "InstructionArguments": ("KernelCall", "DelegateCall", "MoveCall", "JumpFalseCall",
                             "FreeCall"),
}
#: ``EValue.val_type`` code -> the value's kind (``"Tensor"``, ``"Int"``...).
KERNEL_TYPES: Dict[int, str] = {i + 1: k for i, k in enumerate(UNIONS["KernelTypes"])}
#: ``Instruction.instr_args_type`` code -> the instruction's table name.
INSTRUCTION_ARGUMENTS: Dict[int, str] = {
    i + 1: k for i, k in enumerate(UNIONS["InstructionArguments"])
}

#: Enums: name -> value, as in ``program.fbs``.
ENUMS: Dict[str, Dict[str, int]] = {
    "TensorShapeDynamism": {"STATIC": 0, "DYNAMIC_BOUND": 1, "DYNAMIC_UNBOUND": 2},
    "TensorDataLocation": {"SEGMENT": 0, "EXTERNAL": 1},
    "DataLocation": {"INLINE": 0, "SEGMENT": 1},
}
STATIC, DYNAMIC_BOUND, DYNAMIC_UNBOUND = 0, 1, 2
#: ``ExtraTensorInfo.location``: the tensor's data lives in an external file.
EXTERNAL = 1
#: ``BackendDelegateDataReference.location``.
INLINE, SEGMENT = 0, 1
#: Names of ``TensorShapeDynamism`` values, by value.
DYNAMISM_NAMES = {v: k for k, v in ENUMS["TensorShapeDynamism"].items()}
