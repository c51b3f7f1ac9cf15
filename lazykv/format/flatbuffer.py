"""The one flatbuffer table reader: bounds-checked reads of tables, vectors and strings.

Every ``.pte`` byte lazykv interprets goes through :class:`Reader`: the program
flatbuffer (:mod:`lazykv.format.program`), its in-place rebinding
(:mod:`lazykv.format.rebind`) and XNNPACK's delegate blobs (:mod:`lazykv.verify.xnnpack`).
Slot numbers come from :mod:`lazykv.format.schema`, never from literals in the callers.

A read outside the buffer, a vector running past its end or a string that is not UTF-8
raises :class:`FlatbufferError` (callers turn it into
:class:`lazykv.errors.InvalidProgram` naming the file): the bytes are untrusted, and
ExecuTorch's C++ runtime must never be the first to find out they are corrupt.
"""

from __future__ import annotations

import struct
from typing import List, Optional, Tuple

#: Little-endian scalar layouts by ``struct`` code (flatbuffers are little-endian).
_STRUCTS = {code: struct.Struct("<" + code) for code in "bBhHiIqQd"}


class FlatbufferError(Exception):
    """The bytes do not hold what the schema says (a read would leave the buffer)."""


class Reader:
    """Bounds-checked reads of a flatbuffer held in ``buf`` (bytes, bytearray, mmap).

    Positions are absolute byte offsets into ``buf``; a *table* is the position of a
    table, a *slot* the vtable offset of one of its fields (``4 + 2 * field id``, see
    :mod:`lazykv.format.schema`). Absent fields read as ``None`` (references) or the
    given default (scalars), as flatbuffers define them.
    """

    __slots__ = ("buf", "size")

    def __init__(self, buf) -> None:
        self.buf = buf
        self.size = len(buf)

    def u(self, code: str, at: int):
        """The scalar of ``struct`` code ``code`` at ``at``."""
        s = _STRUCTS[code]
        if at < 0 or at + s.size > self.size:
            raise FlatbufferError(
                f"read of {s.size} bytes at {at} is outside the {self.size}-byte buffer"
            )
        return s.unpack_from(self.buf, at)[0]

    def root(self) -> int:
        """Position of the root table."""
        return self.u("I", 0)

    def field(self, table: int, slot: int) -> int:
        """Absolute position of a table's field, 0 if the field is absent."""
        vtable = table - self.u("i", table)
        if slot + 2 > self.u("H", vtable):
            return 0
        offset = self.u("H", vtable + slot)
        return table + offset if offset else 0

    def scalar(self, table: int, slot: int, code: str, default=0):
        """A scalar field, ``default`` when absent."""
        at = self.field(table, slot)
        return self.u(code, at) if at else default

    def ref(self, table: int, slot: int) -> int:
        """Position of the table or vector a field refers to, 0 if absent."""
        at = self.field(table, slot)
        return at + self.u("I", at) if at else 0

    def vector(self, table: int, slot: int, element_size: int) -> Optional[Tuple[int, int]]:
        """``(start of the elements, length)`` of a vector field, None if absent."""
        r = self.ref(table, slot)
        if not r:
            return None
        n = self.u("I", r)
        if r + 4 + n * element_size > self.size:
            raise FlatbufferError(f"a vector of {n} elements at {r} runs past the buffer's end")
        return r + 4, n

    def ints(self, table: int, slot: int, code: str = "i") -> Optional[List[int]]:
        """A vector of scalars (``struct`` code ``code``), None if absent."""
        s = _STRUCTS[code]
        v = self.vector(table, slot, s.size)
        if v is None:
            return None
        start, n = v
        return list(struct.unpack_from(f"<{n}{code}", self.buf, start)) if n else []

    def tables(self, table: int, slot: int) -> Optional[List[int]]:
        """Positions of the tables of a vector of tables, None if absent."""
        v = self.vector(table, slot, 4)
        if v is None:
            return None
        start, n = v
        offsets = struct.unpack_from(f"<{n}I", self.buf, start) if n else ()
        return [start + 4 * i + o for i, o in enumerate(offsets)]

    def string(self, table: int, slot: int) -> Optional[str]:
        """A string field, None if absent."""
        v = self.vector(table, slot, 1)
        if v is None:
            return None
        start, n = v
        try:
            return bytes(self.buf[start : start + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise FlatbufferError(f"a string at {start} is not UTF-8") from None
