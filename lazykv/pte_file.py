"""Read a ``.pte`` without touching its weights.

A ``.pte`` is a program flatbuffer (small: ~156 KB for stories110m) followed by segments
(weights, delegate blobs, named data: hundreds of MB). ``deserialize_pte_binary`` copies
every segment (1.6 s and ~1 GB for stories110m, DESIGN fact 11), so this module parses
only the flatbuffer region, with ExecuTorch's own deserializer, and reads a segment only
when asked (``mmap``: untouched weight pages are never loaded).

:func:`open_pte` returns a :class:`PteFile`. Everything here validates sizes and offsets
before use and raises :class:`lazykv.errors.InvalidProgram` naming the file and the
problem. The program's *meaning*, which ExecuTorch's runtime trusts and crashes on when
it is wrong, is checked by :mod:`lazykv.pte_validate` (on open unless
``validate=False``); its public names (:func:`validate_pte`, :func:`preflight`,
:class:`Preflight`, :func:`method_limits`, :class:`MethodLimits`) are re-exported here.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import struct
from pathlib import Path
from typing import Optional, Tuple, Union

# ExecuTorch has no public reader for the flatbuffer region alone; this private helper
# is what ``deserialize_pte_binary`` itself uses, minus the segment copies. Both modules
# are torch-free (their packages' __init__ are not: see lazykv._light_imports).
from executorch.exir._serialize._flatbuffer_program import _flatbuffer_to_program
from executorch.exir.schema import Program

from lazykv.errors import InvalidProgram
from lazykv.manifest import MANIFEST_KEY, Manifest
from lazykv.pte_validate import _check_manifest, _Model, _validate_region

# The validator's names, importable from here as before it had its own module
# (runtime_shim, tests).
from lazykv.pte_validate import (  # noqa: F401  (re-exported)
    MethodLimits,
    Preflight,
    _Fb,
    method_limits,
    preflight,
    validate_pte,
)

#: Bytes 4..8 of every ``.pte`` (the flatbuffer file identifier): "ET" + 2 digits.
_IDENT_PREFIX = b"ET"
#: The extended header at bytes 8..40 (``schema/extended_header.h``), little-endian:
#: magic "eh00", u32 header length, u64 program size, u64 segment base offset, u64
#: segment data size (zero unless the header length has room for it).
_EH_FORMAT = "<4sIQQQ"
_EH_AT, _EH_BYTES = 8, 32
_EH_MAGIC, _EH_MIN_LENGTH = b"eh00", 24


class PteFile:
    """A parsed ``.pte``: its :class:`executorch.exir.schema.Program` and lazy segment access.

    ``program`` keeps ``segments`` and ``named_data`` as stored (offsets into the segment
    region), unlike ``deserialize_pte_binary``. Use :func:`open_pte` to build one.
    """

    def __init__(
        self, data: Union[bytes, memoryview, mmap.mmap], source: str, validate: bool = True
    ) -> None:
        self.source = source
        self._data = data
        size = len(data)
        self.program_size, self.segment_base_offset = _check_header(data, source)
        self.header = _extended_header(data)
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
        self._model: Optional[_Model] = None
        self._validate = validate
        if validate:
            self._model = _validate_region(
                bytes(data[: self.program_size]), size, self.segment_base_offset, source, data
            )

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
            manifest = None if blob is None else Manifest.from_bytes(blob, self.source)
            # Opened with validate=False (inspect/check read metadata only): the manifest
            # is parsed and checked by itself, but not cross-checked against every kernel
            # schema, which would import ExecuTorch's runtime and custom ops.
            if manifest is not None and self._validate:
                if self._model is None:
                    self._model = _validate_region(
                        bytes(self._data[: self.program_size]), len(self._data),
                        self.segment_base_offset, self.source, self._data,
                    )
                _check_manifest(self._model, manifest, self.source)
            self._manifest = manifest
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


@dataclasses.dataclass(frozen=True)
class _ExtendedHeader:
    """Where the program flatbuffer ends and the segments are (see ``_EH_FORMAT``)."""

    program_size: int
    segment_base_offset: int
    segment_data_size: int


def _extended_header(data) -> Optional[_ExtendedHeader]:
    """The extended header, or None if the file has none.

    Read here rather than with ExecuTorch's ``_ExtendedHeader`` (same rules: 32 bytes,
    the magic, a length of at least 24) because that class lives in
    ``exir._serialize._program``, which imports torch and sympy: ~2 s that reading 32
    bytes does not need.
    """
    head = bytes(data[_EH_AT : _EH_AT + _EH_BYTES])
    if len(head) < _EH_BYTES:
        return None
    magic, length, program_size, segment_base, segment_data = struct.unpack(_EH_FORMAT, head)
    if magic != _EH_MAGIC or length < _EH_MIN_LENGTH:
        return None
    if length == _EH_MIN_LENGTH:  # an older header, without the segment data size
        segment_data = 0
    return _ExtendedHeader(program_size, segment_base, segment_data)


def _check_header(data, source: str) -> Tuple[int, int]:
    """``(program size, segment base offset)`` from the file identifier and the extended
    header, refusing a file whose header does not fit it."""
    size = len(data)
    if size < 16:
        raise InvalidProgram(f"{source}: {size} bytes is too short to be a .pte (truncated file?)")
    ident = bytes(data[4:8])
    if not ident.startswith(_IDENT_PREFIX) or not ident[2:].isdigit():
        raise InvalidProgram(
            f"{source}: not an ExecuTorch program (file identifier {ident!r}, expected "
            f"'ETnn'). Export it with `lazykv export` or ExecuTorch's to_executorch()."
        )
    header = _extended_header(data)
    if header is None:
        return size, 0
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
    return header.program_size, header.segment_base_offset


def open_pte(
    path_or_bytes: Union[str, os.PathLike, bytes, bytearray, memoryview],
    *,
    validate: bool = True,
) -> PteFile:
    """Open a ``.pte`` from a path (memory-mapped) or from bytes.

    Raises :class:`InvalidProgram` if the file is missing, empty, truncated or corrupt.
    With ``validate`` (the default) the program is also checked for everything the
    ExecuTorch runtime would trust without checking (value indices and types of every
    kernel argument, tensor shapes, memory offsets, constant data ranges; see
    :mod:`lazykv.pte_validate`): a file that passes cannot crash the runtime at load.
    """
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        return PteFile(bytes(path_or_bytes), "<bytes>", validate)
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
    try:
        return PteFile(mm, source, validate)
    except BaseException:
        try:
            mm.close()
        except BufferError:
            pass
        raise
