"""Read a ``.pte`` without touching its weights.

A ``.pte`` is a program flatbuffer (small: ~156 KB for stories110m) followed by segments
(weights, delegate blobs, named data: hundreds of MB). ``deserialize_pte_binary`` copies
every segment (1.6 s and ~1 GB for stories110m, DESIGN fact 11), so this module parses
only the flatbuffer region, with ExecuTorch's own deserializer, and reads a segment only
when asked (``mmap``: untouched weight pages are never loaded).

Everything here validates sizes and offsets before use and raises
:class:`lazykv.errors.InvalidProgram` naming the file and the problem.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path
from typing import Optional, Union

# ExecuTorch has no public reader for the flatbuffer region alone; these private
# helpers are what ``deserialize_pte_binary`` itself uses, minus the segment copies.
from executorch.exir._serialize._flatbuffer_program import _flatbuffer_to_program
from executorch.exir._serialize._program import _ExtendedHeader
from executorch.exir.schema import Program

from lazykv.errors import InvalidProgram
from lazykv.manifest import MANIFEST_KEY, Manifest

#: Bytes 4..8 of every ``.pte`` (the flatbuffer file identifier): "ET" + 2 digits.
_IDENT_PREFIX = b"ET"
_HEAD_BYTES = 64


class PteFile:
    """A parsed ``.pte``: its :class:`executorch.exir.schema.Program` and lazy segment access.

    ``program`` keeps ``segments`` and ``named_data`` as stored (offsets into the segment
    region), unlike ``deserialize_pte_binary``. Use :func:`open_pte` to build one.
    """

    def __init__(self, data: Union[bytes, memoryview, mmap.mmap], source: str) -> None:
        self.source = source
        self._data = data
        size = len(data)
        if size < 16:
            raise InvalidProgram(
                f"{source}: {size} bytes is too short to be a .pte (truncated file?)"
            )
        ident = bytes(data[4:8])
        if not ident.startswith(_IDENT_PREFIX) or not ident[2:].isdigit():
            raise InvalidProgram(
                f"{source}: not an ExecuTorch program (file identifier {ident!r}, expected "
                f"'ETnn'). Export it with `lazykv export` or ExecuTorch's to_executorch()."
            )
        header = None
        try:
            eh = _ExtendedHeader.from_bytes(bytes(data[8:_HEAD_BYTES]))
            if eh.is_valid():
                header = eh
        except ValueError:
            header = None
        self.header = header
        if header is not None:
            if not (16 <= header.program_size <= size):
                raise InvalidProgram(
                    f"{source}: header says the program is {header.program_size} bytes but "
                    f"the file has {size} (truncated or corrupt .pte)"
                )
            if header.segment_base_offset and not (
                header.program_size <= header.segment_base_offset <= size
            ):
                raise InvalidProgram(
                    f"{source}: segment base offset {header.segment_base_offset} is outside "
                    f"the file ({size} bytes; truncated or corrupt .pte)"
                )
            if header.segment_base_offset and header.segment_data_size and (
                header.segment_base_offset + header.segment_data_size > size
            ):
                raise InvalidProgram(
                    f"{source}: segments need {header.segment_base_offset + header.segment_data_size}"
                    f" bytes but the file has {size} (truncated .pte)"
                )
            self.program_size = header.program_size
            self.segment_base_offset = header.segment_base_offset
        else:
            self.program_size = size
            self.segment_base_offset = 0
        try:
            self.program: Program = _flatbuffer_to_program(bytes(data[: self.program_size]))
        except Exception as e:  # the flatbuffer reader raises many kinds on bad bytes
            raise InvalidProgram(
                f"{source}: the program flatbuffer cannot be parsed ({type(e).__name__}: "
                f"{str(e)[:200]}); the file is corrupt or not a .pte"
            ) from None
        self._check_segments()
        self._manifest: Optional[Manifest] = None
        self._manifest_read = False

    # -- segments ----------------------------------------------------------------------

    def _check_segments(self) -> None:
        size = len(self._data)
        for i, seg in enumerate(self.program.segments or []):
            end = self.segment_base_offset + seg.offset + seg.size
            if seg.offset < 0 or seg.size < 0 or end > size:
                raise InvalidProgram(
                    f"{self.source}: segment {i} ends at byte {end} but the file has {size} "
                    f"(truncated or corrupt .pte)"
                )
            if self.segment_base_offset == 0 and seg.size:
                raise InvalidProgram(
                    f"{self.source}: segment {i} exists but the file has no segment base "
                    f"offset (corrupt extended header)"
                )
        n = len(self.program.segments or [])
        for nd in self.program.named_data or []:
            if not 0 <= nd.segment_index < n:
                raise InvalidProgram(
                    f"{self.source}: named data {nd.key!r} points at segment "
                    f"{nd.segment_index} of {n}"
                )

    @property
    def file_size(self) -> int:
        return len(self._data)

    def segment(self, index: int) -> memoryview:
        """Bytes of segment ``index`` (a view: no copy)."""
        segs = self.program.segments or []
        if not 0 <= index < len(segs):
            raise InvalidProgram(f"{self.source}: no segment {index} (it has {len(segs)})")
        seg = segs[index]
        start = self.segment_base_offset + seg.offset
        return memoryview(self._data)[start : start + seg.size]

    def named_data(self, key: str) -> Optional[bytes]:
        """The named-data blob ``key``, or None if the program has none by that name."""
        for nd in self.program.named_data or []:
            if nd.key == key:
                return bytes(self.segment(nd.segment_index))
        return None

    def named_data_keys(self) -> list:
        return [nd.key for nd in self.program.named_data or []]

    # -- manifest ----------------------------------------------------------------------

    @property
    def manifest(self) -> Optional[Manifest]:
        """The lazykv manifest, or None for a program lazykv did not mark."""
        if not self._manifest_read:
            blob = self.named_data(MANIFEST_KEY)
            self._manifest = None if blob is None else Manifest.from_bytes(blob, self.source)
            self._manifest_read = True
        return self._manifest

    @property
    def method_names(self) -> list:
        return [p.name for p in self.program.execution_plan]

    def plan(self, method: str):
        """The execution plan named ``method``."""
        for p in self.program.execution_plan:
            if p.name == method:
                return p
        raise KeyError(method)

    def close(self) -> None:
        if isinstance(self._data, mmap.mmap):
            try:
                self._data.close()
            except BufferError:
                pass  # a view is still alive; the mapping closes when it is collected


def open_pte(path_or_bytes: Union[str, os.PathLike, bytes, bytearray, memoryview]) -> PteFile:
    """Open a ``.pte`` from a path (memory-mapped) or from bytes.

    Raises :class:`InvalidProgram` if the file is missing, empty, truncated or corrupt.
    """
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        return PteFile(bytes(path_or_bytes), "<bytes>")
    path = Path(path_or_bytes)
    source = str(path)
    if not path.exists():
        raise InvalidProgram(f"{source}: no such file")
    if path.is_dir():
        raise InvalidProgram(f"{source}: is a directory, expected a .pte file")
    size = path.stat().st_size
    if size == 0:
        raise InvalidProgram(f"{source}: file is empty")
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return PteFile(mm, source)
