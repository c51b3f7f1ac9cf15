"""Open a ``.pte``: its header, its program model, its segments on demand.

A ``.pte`` is a program flatbuffer (small: ~156 KB for stories110m) followed by
segments (weights, delegate blobs, named data: hundreds of MB). :func:`open_pte`
memory-maps the file, reads the header and the program flatbuffer into a
:class:`lazykv.format.program.Program`, and checks that every segment and named-data
entry lies inside the file; a segment's bytes are read only when asked for (untouched
weight pages are never loaded). What the program *means* (kernel arguments, shapes,
memory plans, the manifest against the program) is checked by :mod:`lazykv.verify`.
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path
from typing import List, Optional, Union

from lazykv.errors import InvalidProgram
from lazykv.format.flatbuffer import FlatbufferError
from lazykv.format.header import check_layout
from lazykv.format.program import Plan, Program, read_program
from lazykv.manifest import MANIFEST_KEY, Manifest

#: What a corrupt flatbuffer can raise besides FlatbufferError (a huge vector length, a
#: cycle of offsets...): all mean the same to the user.
CORRUPT_ERRORS = (FlatbufferError, struct.error, RecursionError, OverflowError, MemoryError, ValueError)


def corrupt(source: str, e: BaseException) -> InvalidProgram:
    """The :class:`InvalidProgram` for an unreadable program flatbuffer in ``source``."""
    if isinstance(e, FlatbufferError):
        what = str(e)
    else:
        what = f"the program flatbuffer is corrupt ({type(e).__name__}: {str(e)[:160]})"
    return InvalidProgram(
        f"{source}: {what}. The file is corrupt or was written by a broken exporter; re-export it"
    )


class PteFile:
    """A ``.pte``: header figures, :attr:`program` (the model) and lazy segment access.

    ``data`` is the whole file (an ``mmap`` when opened from a path), ``region`` a copy
    of the program flatbuffer (``program_size`` bytes). Build one with :func:`open_pte`;
    close it (or use it as a context manager) to unmap the file.
    """

    def __init__(self, data, source: str) -> None:
        self.source = source
        self.data = data
        self.file_size = len(data)
        self.program_size, self.segment_base_offset, self.header = check_layout(data, source)
        self.region = bytes(data[: self.program_size])
        try:
            self.program: Program = read_program(self.region)
        except CORRUPT_ERRORS as e:
            raise corrupt(source, e) from None
        self._check_segments()
        self._manifest: Optional[Manifest] = None
        self._manifest_read = False

    def _check_segments(self) -> None:
        size = self.file_size
        segments = self.program.segments
        for i, seg in enumerate(segments):
            end = self.segment_base_offset + seg.offset + seg.size
            if end > size:
                raise InvalidProgram(
                    f"{self.source}: segment {i} ends at byte {end} but the file has {size} "
                    f"(truncated or corrupt .pte)"
                )
            if self.segment_base_offset == 0 and seg.size:
                raise InvalidProgram(
                    f"{self.source}: segment {i} exists but the file has no segment base "
                    f"offset (corrupt extended header)"
                )
        for nd in self.program.named_data:
            if not 0 <= nd.segment_index < len(segments):
                raise InvalidProgram(
                    f"{self.source}: named data {nd.key!r} points at segment "
                    f"{nd.segment_index} of {len(segments)}"
                )

    def segment(self, index: int) -> memoryview:
        """Bytes of segment ``index`` (a view into the file: no copy)."""
        segs = self.program.segments
        if not 0 <= index < len(segs):
            raise InvalidProgram(f"{self.source}: no segment {index} (it has {len(segs)})")
        start = self.segment_base_offset + segs[index].offset
        return memoryview(self.data)[start : start + segs[index].size]

    def named_data(self, key: str) -> Optional[bytes]:
        """The named-data blob ``key``, or None if the program has none by that name."""
        for nd in self.program.named_data:
            if nd.key == key:
                return bytes(self.segment(nd.segment_index))
        return None

    def named_data_keys(self) -> List[str]:
        """The keys of every named-data entry, in program order."""
        return [nd.key for nd in self.program.named_data]

    @property
    def manifest(self) -> Optional[Manifest]:
        """The lazykv manifest (parsed and checked by itself), or None for a program
        lazykv did not mark. :func:`lazykv.verify.verify_pte` checks it against the
        program."""
        if not self._manifest_read:
            blob = self.named_data(MANIFEST_KEY)
            self._manifest = None if blob is None else Manifest.from_bytes(blob, self.source)
            self._manifest_read = True
        return self._manifest

    @property
    def method_names(self) -> List[str]:
        """Every method name, in program order."""
        return self.program.method_names

    def plan(self, method: str) -> Plan:
        """The method named ``method`` (``KeyError`` if none)."""
        return self.program.plan(method)

    def close(self) -> None:
        """Unmap the file (a no-op for bytes)."""
        if isinstance(self.data, mmap.mmap):
            try:
                self.data.close()
            except BufferError:
                pass  # a view is still alive; the mapping closes when it is collected

    def __enter__(self) -> "PteFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_pte(path_or_bytes: Union[str, os.PathLike, bytes, bytearray, memoryview]) -> PteFile:
    """Open a ``.pte`` from a path (memory-mapped) or from bytes.

    Raises :class:`InvalidProgram` naming the file if it is missing, empty, not a
    ``.pte``, truncated, or its program flatbuffer cannot be read.
    """
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        return PteFile(bytes(path_or_bytes), "<bytes>")
    path = Path(path_or_bytes)
    source = str(path)
    if not path.exists():
        raise InvalidProgram(f"{source}: no such file")
    if path.is_dir():
        raise InvalidProgram(f"{source}: is a directory, expected a .pte file")
    if not path.is_file():
        raise InvalidProgram(f"{source}: not a regular file, expected a .pte file")
    if path.stat().st_size == 0:
        raise InvalidProgram(f"{source}: file is empty")
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        return PteFile(mm, source)
    except BaseException:
        try:
            mm.close()
        except BufferError:
            pass
        raise
