"""The session file format: a session's state saved to disk (mlx-lm's prompt cache).

A session file is ``LKVSESS\\0``, a little-endian u64 header length, a JSON header
(format, version, the program's sha256 and source, positions filled, per buffer its
FQN, dtype, shape, growth axis, offset and bytes, the payload's sha256, the caller's
metadata), then each lazy buffer's filled prefix, in header order. A file made for
another program, truncated or corrupt is refused (:class:`SessionFileError`) before any
of it is used. :meth:`lazykv.runtime_shim.Session.save` and
:meth:`lazykv.runtime_shim.LazyProgram.restore` use it; so does the prompt cache
(:func:`check_file_header` for its index).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
from typing import Dict, Optional, Sequence

from lazykv.errors import SessionFileError
from lazykv.output_path import atomic_write

SESSION_MAGIC = b"LKVSESS\x00"
SESSION_FORMAT = "lazykv-session"
SESSION_VERSION = 1


def check_file_header(path, h: dict, program, fmt: str, version: int, what: str) -> None:
    """Refuse (:class:`SessionFileError`) a saved header ``h`` read from ``path`` whose
    ``format`` is not ``fmt``, whose ``version`` is newer than ``version``, or that was
    saved from another program than ``program`` (by sha256). ``what`` names the file kind."""
    if h.get("format") != fmt:
        raise SessionFileError(f"{path}: not a lazykv {what} (format {h.get('format')!r})")
    if not isinstance(h.get("version"), int) or h["version"] > version:
        raise SessionFileError(
            f"{path}: {what} version {h.get('version')!r} is newer than this lazykv reads "
            f"({version}); upgrade lazykv"
        )
    if h.get("program_sha256") != program.digest:
        raise SessionFileError(
            f"{path}: this {what} was saved from a different program "
            f"({h.get('program_source')!r}, sha256 {str(h.get('program_sha256'))[:12]}…) "
            f"than {program.source!r} (sha256 {program.digest[:12]}…); load that "
            f"program to read it"
        )


def write_session(path, program, filled: int, prefixes: Sequence[memoryview],
                  metadata: Optional[Dict[str, str]] = None) -> int:
    """Write a session file for ``program`` holding ``filled`` positions: ``prefixes``
    are the bytes of each lazy buffer's filled prefix, in ``program.buffers`` order.
    Atomic (a temporary file renamed into place); returns the bytes written."""
    entries, offset = [], 0
    for b in program.buffers:
        nb = b.bytes_per_position * filled
        entries.append(
            {"fqn": b.fqn, "dtype": b.dtype, "shape": list(b.shape_at(filled)),
             "growth_axis": b.growth_axis, "offset": offset, "nbytes": nb}
        )
        offset += nb
    # The payload's sha256 goes in the header, which comes first: hash before writing.
    digest = hashlib.sha256()
    for view in prefixes:
        digest.update(view)
    header = json.dumps(
        {
            "format": SESSION_FORMAT,
            "version": SESSION_VERSION,
            "program_sha256": program.digest,
            "program_source": program.source,
            "positions_filled": filled,
            "buffers": entries,
            "payload_sha256": digest.hexdigest(),
            "metadata": dict(metadata or {}),
        },
        sort_keys=True,
    ).encode()
    # Checked before anything is written; atomic; nothing left behind on failure.
    with atomic_write(path, "the session file") as f:
        f.write(SESSION_MAGIC + struct.pack("<Q", len(header)) + header)
        for view in prefixes:
            f.write(view)
        size = f.tell()
    return size


@dataclasses.dataclass(frozen=True)
class SessionHeader:
    """A session file's header, checked against the program it is read for."""

    #: Positions filled when it was saved.
    filled: int
    #: FQN -> its header entry (``offset`` from :attr:`payload_at`, ``nbytes``...).
    buffers: Dict[str, dict]
    #: Where the payload starts in the file.
    payload_at: int
    #: The payload's sha256, or None in files from before the checksum.
    payload_sha256: Optional[str]


def read_header(f, path, program) -> SessionHeader:
    """The header of the session file open as ``f`` (binary), after every check that
    does not need the payload: magic, header length, JSON, format, version, program,
    positions, buffers (FQN, dtype, shape, bytes, offsets) and the file's size. Raises
    :class:`SessionFileError` naming ``path`` and the problem."""
    size = os.fstat(f.fileno()).st_size
    head = f.read(16)
    if len(head) < 16 or head[:8] != SESSION_MAGIC:
        raise SessionFileError(f"{path}: not a lazykv session file")
    (hlen,) = struct.unpack("<Q", head[8:])
    if hlen > size - 16:
        raise SessionFileError(
            f"{path}: session header is corrupt or truncated (it claims {hlen} bytes, "
            f"the file has {size - 16} after the magic)"
        )
    raw = f.read(hlen)
    try:
        h = json.loads(raw)
        assert isinstance(h, dict)
    except Exception:
        raise SessionFileError(f"{path}: session header is corrupt or truncated") from None
    try:
        return _checked(path, h, hlen, size, program)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise SessionFileError(
            f"{path}: session header is malformed ({type(e).__name__}: {e})"
        ) from None


def _checked(path, h: dict, hlen: int, size: int, program) -> SessionHeader:
    check_file_header(path, h, program, SESSION_FORMAT, SESSION_VERSION, "session file")
    filled = int(h.get("positions_filled", -1))
    if not 0 <= filled <= program.max_positions:
        raise SessionFileError(f"{path}: positions_filled {filled} is out of range")
    by_fqn = {e.get("fqn"): e for e in h.get("buffers", [])}
    if set(by_fqn) != {b.fqn for b in program.buffers}:
        raise SessionFileError(f"{path}: its buffers do not match the program's")
    total = 0
    for b in program.buffers:
        e = by_fqn[b.fqn]
        if (e.get("dtype") != b.dtype or tuple(e.get("shape", ())) != b.shape_at(filled)
                or e.get("nbytes") != b.bytes_per_position * filled):
            raise SessionFileError(f"{path}: buffer {b.fqn!r} does not match the program")
        if int(e.get("offset", -1)) != total:
            raise SessionFileError(f"{path}: buffer {b.fqn!r} is at a corrupt offset")
        total += int(e["nbytes"])
    if size != 16 + hlen + total:
        raise SessionFileError(
            f"{path}: truncated session file ({size} bytes; its header describes "
            f"{16 + hlen + total})"
            if size < 16 + hlen + total
            else f"{path}: session file is corrupt ({size - 16 - hlen - total} bytes "
            f"after the data its header describes)"
        )
    return SessionHeader(filled, by_fqn, 16 + hlen, h.get("payload_sha256"))
