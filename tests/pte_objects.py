"""ExecuTorch's own object reader and writer of the program flatbuffer: a test oracle.

lazykv reads and patches ``.pte`` bytes itself (:mod:`lazykv.format`); the tests use
ExecuTorch's object model to check that reading against an independent implementation
and to build edited programs (fuzzing, regression recipes). Nothing in lazykv imports
this module.
"""

from __future__ import annotations

from typing import Tuple


def program_objects(data: bytes):
    """The ``executorch.exir.schema.Program`` of a ``.pte``'s flatbuffer region (segments
    and named data as stored, not inlined)."""
    # Private: ExecuTorch's reader of the flatbuffer region alone (deserialize_pte_binary
    # also copies every segment).
    from executorch.exir._serialize._flatbuffer_program import _flatbuffer_to_program

    from lazykv.format.header import check_layout

    program_size, _, _ = check_layout(data, "<test>")
    return _flatbuffer_to_program(bytes(data[:program_size]))


def serialize_region(program, old_segment_base: int, min_alignment: int = 128) -> Tuple[bytes, int]:
    """``program`` serialized by ExecuTorch, with an extended header, padded to its new
    segment base offset (the old one when it fits, else the next multiple of the old
    base's alignment). Returns ``(region, segment_base_offset)``; the header's segment
    data size is left 0 (see :func:`with_segments`)."""
    # Private: ExecuTorch's flatbuffer writer and header helpers (its public writer,
    # serialize_pte_binary, re-lays out the segments too).
    from executorch.exir._serialize._flatbuffer_program import _program_to_flatbuffer
    from executorch.exir._serialize._program import _ExtendedHeader, _insert_flatbuffer_header
    from executorch.exir._serialize.padding import aligned_size, pad_to

    result = _program_to_flatbuffer(program)
    if old_segment_base == 0:
        return bytes(result.data), 0
    header_len = aligned_size(_ExtendedHeader.EXPECTED_LENGTH, result.max_alignment)
    program_size = header_len + len(result.data)
    base = old_segment_base
    if program_size > base:
        align = max(min_alignment, min(old_segment_base & -old_segment_base, 1 << 16))
        base = aligned_size(program_size, align)
    header = _ExtendedHeader(program_size=program_size, segment_base_offset=base,
                             segment_data_size=0).to_bytes()
    data = _insert_flatbuffer_header(result.data, r"ET[0-9a-zA-Z][0-9a-zA-Z]",
                                     pad_to(header, header_len))
    assert len(data) == program_size
    return data + b"\x00" * (base - program_size), base


def with_segments(program, data: bytes, segment_base: int) -> bytes:
    """``program`` re-serialized in front of ``data``'s untouched segment bytes."""
    from executorch.exir._serialize._program import _ExtendedHeader

    region, _ = serialize_region(program, segment_base)
    if not segment_base:
        return region
    seg = data[segment_base:]
    eh = _ExtendedHeader.from_bytes(region[8:64])
    eh.segment_data_size = len(seg)
    hb = eh.to_bytes()
    return region[:8] + hb + region[8 + len(hb):] + seg
