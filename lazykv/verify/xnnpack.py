"""XNNPACK delegate blobs: the checks ExecuTorch's XNNPACK backend leaves to luck.

A blob is an optional ``XH00`` header (flatbuffer offset and size, constant data offset
and size) followed by an XNNPACK graph flatbuffer (``XN00``/``XN01``,
``backends/xnnpack/serialization/runtime_schema.fbs``). :func:`xnnpack_io` reads it
with lazykv's one flatbuffer reader and refuses what the backend would crash on: a
header whose ranges leave the blob, a wrong identifier (logged raw by the backend), a
constant key that is not UTF-8 (logged raw: ExecuTorch's Python bindings route the log
through ``sys.stderr``, and a line that is not UTF-8 ends the process), a constant
shorter than its tensor, an internal value flagged external (no buffer is bound to it:
SIGSEGV).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from lazykv.format.flatbuffer import FlatbufferError, Reader
from lazykv.format.schema import TableSlots

#: ``runtime_schema.fbs`` tables, fields in declaration order (checked against the
#: installed wheel's schema by ``tests/test_format_layer.py``).
XNN_GRAPH = TableSlots("XNNGraph", ("version", "xnodes", "xvalues", "num_externs", "input_ids",
                                    "output_ids", "constant_buffer", "mem_buffer_sizes",
                                    "constant_data"))
XVALUE = TableSlots("XValue", ("xvalue_union_type", "xvalue_union"))
XNN_TENSOR_VALUE = TableSlots("XNNTensorValue", ("datatype", "num_dims", "dims",
                                                 "constant_buffer_idx", "external_id", "flags",
                                                 "id_out"))
XNN_QUANTIZED_TENSOR_VALUE = TableSlots("XNNQuantizedTensorValue", ("tensor_value",))
CONSTANT_DATA_OFFSET = TableSlots("ConstantDataOffset", ("offset", "size", "named_key"))
BUFFER = TableSlots("Buffer", ("storage",))
#: ``XValueUnion`` members (type code = index + 1).
XVALUE_UNION = ("XNNTensorValue", "XNNQuantizedTensorValue")
_TENSOR_VALUE, _QUANTIZED_TENSOR_VALUE = 1, 2

#: Bytes per element of XNNPACK datatypes (``XNNDatatype``); the 4-bit types
#: (``qcint4`` 8, ``qbint4`` 10) pack two elements per byte.
XNN_BYTES = {1: 4, 2: 2, 3: 1, 4: 1, 5: 4, 6: 1, 7: 4, 9: 1, 11: 1, 12: 4, 13: 4, 14: 2}
_FOUR_BIT = (8, 10)
#: ``XNN_VALUE_FLAG_EXTERNAL_INPUT`` / ``_OUTPUT``.
_EXTERNAL_INPUT, _EXTERNAL_OUTPUT = 1, 2

DelegateIO = Tuple[int, int, List[Optional[List[int]]], List[Optional[List[int]]]]


def xnnpack_io(blob, what: str, named_sizes: Dict[str, int]) -> DelegateIO:
    """``(inputs, outputs, input dims, output dims)`` of an XNNPACK delegate blob, after
    the checks in the module docstring. ``named_sizes``: bytes of each named-data blob by
    key (constants the graph names). Raises :class:`FlatbufferError` naming ``what``."""
    size = len(blob)
    if size >= 30 and bytes(blob[4:8]) == b"XH00":
        fo, fs, co = (int.from_bytes(blob[10 + 4 * k : 14 + 4 * k], "little") for k in range(3))
        cs = int.from_bytes(blob[22:30], "little")
        if fs < 8 or fo > size or fs > size - fo or co > size or cs > size - co or (
            co < fo or co - fo < fs
        ):
            raise FlatbufferError(f"{what} has an inconsistent header")
        graph = blob[fo : fo + fs]
    else:
        graph = blob
    if len(graph) < 8 or bytes(graph[4:8]) not in (b"XN00", b"XN01"):
        raise FlatbufferError(
            f"{what} is not an XNNPACK graph (identifier {bytes(graph[4:8])!r})")
    try:
        return _graph_io(Reader(graph), named_sizes)
    except FlatbufferError as e:
        raise FlatbufferError(f"{what}: {e}") from None


def _graph_io(fb: Reader, named_sizes: Dict[str, int]) -> DelegateIO:
    root = fb.root()
    in_ids = fb.ints(root, XNN_GRAPH.input_ids, "I")
    out_ids = fb.ints(root, XNN_GRAPH.output_ids, "I")
    if in_ids is None:
        raise FlatbufferError("its input list is missing")
    if out_ids is None:
        raise FlatbufferError("its output list is missing")
    constants = []  # (size available, named key) per constant_data entry
    for c in fb.tables(root, XNN_GRAPH.constant_data) or []:
        key = fb.string(c, CONSTANT_DATA_OFFSET.named_key)  # logged raw when missing
        constants.append((fb.scalar(c, CONSTANT_DATA_OFFSET.size, "Q"), key))
    if not constants:  # older blobs: constant_buffer [Buffer]
        for b in fb.tables(root, XNN_GRAPH.constant_buffer) or []:
            v = fb.vector(b, BUFFER.storage, 1)
            constants.append((0 if v is None else v[1], None))
    num_externs = fb.scalar(root, XNN_GRAPH.num_externs, "I")
    flagged = {_EXTERNAL_INPUT: set(), _EXTERNAL_OUTPUT: set()}
    dims_of = {}
    externals = set()
    T = XNN_TENSOR_VALUE
    for i, xv in enumerate(fb.tables(root, XNN_GRAPH.xvalues) or []):
        kind = fb.scalar(xv, XVALUE.xvalue_union_type, "B")
        t = fb.ref(xv, XVALUE.xvalue_union)
        if kind == _QUANTIZED_TENSOR_VALUE and t:
            t = fb.ref(t, XNN_QUANTIZED_TENSOR_VALUE.tensor_value)
        if kind not in (_TENSOR_VALUE, _QUANTIZED_TENSOR_VALUE) or not t:
            continue
        flags = fb.scalar(t, T.flags, "I")
        vid = fb.scalar(t, T.id_out, "I")
        dims = fb.ints(t, T.dims, "I") or []
        dims_of[vid] = dims
        for bit in flagged:
            if flags & bit:
                flagged[bit].add(vid)
        if flags & (_EXTERNAL_INPUT | _EXTERNAL_OUTPUT):
            ext = fb.scalar(t, T.external_id, "I")
            if ext >= num_externs or ext in externals:
                raise FlatbufferError(f"value {i} has external id {ext} ({num_externs} externals)")
            externals.add(ext)
        idx = fb.scalar(t, T.constant_buffer_idx, "I")
        if idx == 0:
            continue
        if idx >= len(constants):
            raise FlatbufferError(f"value {i} uses constant {idx} of {len(constants)}")
        numel = 1
        for d in dims:
            numel *= d
        dt = fb.scalar(t, T.datatype, "h")
        need = (numel + 1) // 2 if dt in _FOUR_BIT else numel * XNN_BYTES.get(dt, 0)
        available, key = constants[idx]
        if key:
            if key not in named_sizes:
                continue  # XNNPACK reports a missing key cleanly
            available = named_sizes[key]
        if available < need:
            raise FlatbufferError(
                f"value {i} is a {dims} tensor of {need} bytes but its constant data "
                f"({'named ' + repr(key) if key else 'inline'}) has {available}"
            )
    # An internal value flagged external gets no buffer from the executor: XNNPACK then
    # reads or writes through a null pointer (SIGSEGV).
    if flagged[_EXTERNAL_INPUT] != set(in_ids) or flagged[_EXTERNAL_OUTPUT] != set(out_ids):
        raise FlatbufferError(
            f"its external values (inputs {sorted(flagged[_EXTERNAL_INPUT])}, outputs "
            f"{sorted(flagged[_EXTERNAL_OUTPUT])}) are not its declared inputs {in_ids} and "
            f"outputs {out_ids}"
        )
    return (len(in_ids), len(out_ids), [dims_of.get(v) for v in in_ids],
            [dims_of.get(v) for v in out_ids])
