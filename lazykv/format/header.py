"""The first bytes of a ``.pte``: the file identifier and the extended header.

Layout (ExecuTorch ``schema/extended_header.h``; little-endian):

====== ===== ===============================================================
offset bytes field
====== ===== ===============================================================
0      4     offset of the flatbuffer root table
4      4     file identifier ``ET`` + two digits (``ET12`` in ExecuTorch 1.5)
8      4     extended header magic ``eh00``
12     4     header length (24; 32 when the segment data size is present)
16     8     program size: bytes of the flatbuffer region, header included
24     8     segment base offset: where the segments start (0: none)
32     8     segment data size (only when the length is 32)
====== ===== ===============================================================

Written here rather than with ExecuTorch's ``exir._serialize._program._ExtendedHeader``:
that module imports torch and sympy (about 2 s) to read 32 bytes, and it is private.
``tests/test_format_layer.py`` checks both agree byte for byte.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Optional, Tuple

from lazykv.errors import InvalidProgram

#: The file identifier's prefix, at bytes 4..6 (then two digits).
IDENTIFIER_PREFIX = b"ET"
#: Where the extended header starts, its magic and its lengths.
EXTENDED_HEADER_AT = 8
MAGIC = b"eh00"
MIN_LENGTH = 24
LENGTH = 32
_LAYOUT = struct.Struct("<4sIQQQ")


@dataclasses.dataclass(frozen=True)
class ExtendedHeader:
    """Where the program flatbuffer ends and the segments are."""

    program_size: int
    segment_base_offset: int
    segment_data_size: int = 0
    length: int = LENGTH

    def to_bytes(self) -> bytes:
        """The 32 header bytes (always the full length, with the segment data size)."""
        return _LAYOUT.pack(
            MAGIC, LENGTH, self.program_size, self.segment_base_offset, self.segment_data_size
        )


def read_extended_header(data) -> Optional[ExtendedHeader]:
    """The extended header of ``data`` (bytes-like), or None if it has none."""
    head = bytes(data[EXTENDED_HEADER_AT : EXTENDED_HEADER_AT + LENGTH])
    if len(head) < LENGTH:
        return None
    magic, length, program_size, segment_base, segment_data = _LAYOUT.unpack(head)
    if magic != MAGIC or length < MIN_LENGTH:
        return None
    if length == MIN_LENGTH:  # an older header, without the segment data size
        segment_data = 0
    return ExtendedHeader(program_size, segment_base, segment_data, length)


def check_layout(data, source: str) -> Tuple[int, int, Optional[ExtendedHeader]]:
    """``(program size, segment base offset, header)`` of ``data``, after refusing a file
    whose identifier or header does not fit it (:class:`InvalidProgram` naming
    ``source``). A file without an extended header is all flatbuffer, with no segments."""
    size = len(data)
    if size < 16:
        raise InvalidProgram(f"{source}: {size} bytes is too short to be a .pte (truncated file?)")
    ident = bytes(data[4:8])
    if not ident.startswith(IDENTIFIER_PREFIX) or not ident[2:].isdigit():
        raise InvalidProgram(
            f"{source}: not an ExecuTorch program (file identifier {ident!r}, expected "
            f"'ETnn'). Export it with `lazykv export` or ExecuTorch's to_executorch()."
        )
    header = read_extended_header(data)
    if header is None:
        return size, 0, None
    if not (16 <= header.program_size <= size):
        raise InvalidProgram(
            f"{source}: header says the program is {header.program_size} bytes but the file "
            f"has {size} (truncated or corrupt .pte)"
        )
    if header.segment_base_offset and not (
        header.program_size <= header.segment_base_offset <= size
    ):
        raise InvalidProgram(
            f"{source}: segment base offset {header.segment_base_offset} is outside the file "
            f"({size} bytes; truncated or corrupt .pte)"
        )
    if header.segment_base_offset and header.segment_data_size and (
        header.segment_base_offset + header.segment_data_size > size
    ):
        raise InvalidProgram(
            f"{source}: segments need {header.segment_base_offset + header.segment_data_size} "
            f"bytes but the file has {size} (truncated .pte)"
        )
    return header.program_size, header.segment_base_offset, header


def aligned(n: int, alignment: int) -> int:
    """``n`` rounded up to a multiple of ``alignment``."""
    return -(-n // alignment) * alignment
