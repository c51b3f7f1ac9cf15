"""Save a session's state to a file and restore it (mlx-lm's prompt cache).

A session file is ``LKVSESS\\0``, a little-endian u64 header length, a JSON header
(format, version, the program's sha256 and source, positions filled, per buffer its
FQN, dtype, shape, growth axis, offset and bytes, the payload's sha256, the caller's
metadata), then each lazy buffer's filled prefix, in header order. A file made for
another program, truncated or corrupt is refused (:class:`SessionFileError`) before any
of it is used.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Dict, Optional, Union

import torch

from lazykv.errors import LazyKVError, SessionFileError

SESSION_MAGIC = b"LKVSESS\x00"
SESSION_FORMAT = "lazykv-session"
SESSION_VERSION = 1


def save_session(session, path: Union[str, os.PathLike],
                 metadata: Optional[Dict[str, str]] = None) -> int:
    """Write the filled prefix of every lazy buffer of ``session`` to ``path`` (atomic:
    a temporary file renamed into place); returns the bytes written. The caller holds
    the session's lock (:meth:`lazykv.runtime_shim.Session.save`)."""
    prog = session.program
    if not prog.lazy:
        raise LazyKVError(
            f"{prog.source} has no lazy KV buffers: its state lives inside the runtime "
            f"and cannot be saved; export it with lazykv to save sessions"
        )
    entries, offset = [], 0
    for b in prog.buffers:
        shape = b.shape_at(session._filled)
        nb = b.bytes_per_position * session._filled
        entries.append(
            {"fqn": b.fqn, "dtype": b.dtype, "shape": list(shape),
             "growth_axis": b.growth_axis, "offset": offset, "nbytes": nb}
        )
        offset += nb
    # The payload's sha256 goes in the header, which comes first: hash the prefixes
    # (views, no copies unless a prefix is not contiguous) before writing.
    prefixes = []
    digest = hashlib.sha256()
    for b in prog.buffers:
        if session._filled:
            prefix = session._kv[b.fqn].narrow(b.growth_axis, 0, session._filled).contiguous()
            view = memoryview(prefix.view(torch.uint8).reshape(-1).numpy())
            digest.update(view)
            prefixes.append(view)
    header = json.dumps(
        {
            "format": SESSION_FORMAT,
            "version": SESSION_VERSION,
            "program_sha256": prog.digest,
            "program_source": prog.source,
            "positions_filled": session._filled,
            "buffers": entries,
            "payload_sha256": digest.hexdigest(),
            "metadata": dict(metadata or {}),
        },
        sort_keys=True,
    ).encode()
    path = Path(path)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(SESSION_MAGIC + struct.pack("<Q", len(header)) + header)
        for view in prefixes:
            f.write(view)
        size = f.tell()
    os.replace(tmp, path)
    return size


def restore_session(program, path):
    """A session of ``program`` restored from ``path`` (written by :func:`save_session`).

    Raises :class:`SessionFileError` for a truncated, corrupt or foreign file; the
    program and its other sessions are untouched."""
    path = Path(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise SessionFileError(f"{path}: cannot open session file ({e.strerror})") from None
    with f:
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
            return _restore_from(program, path, f, h, hlen, size)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise SessionFileError(
                f"{path}: session header is malformed ({type(e).__name__}: {e})"
            ) from None

def _restore_from(program, path, f, h: dict, hlen: int, size: int):
    if h.get("format") != SESSION_FORMAT:
        raise SessionFileError(f"{path}: not a lazykv session file (format {h.get('format')!r})")
    if not isinstance(h.get("version"), int) or h["version"] > SESSION_VERSION:
        raise SessionFileError(
            f"{path}: session file version {h.get('version')!r} is newer than this "
            f"lazykv reads ({SESSION_VERSION}); upgrade lazykv"
        )
    if h.get("program_sha256") != program.digest:
        raise SessionFileError(
            f"{path}: this session was saved from a different program "
            f"({h.get('program_source')!r}, sha256 {str(h.get('program_sha256'))[:12]}…) "
            f"than {program.source!r} (sha256 {program.digest[:12]}…); load that "
            f"program to restore it"
        )
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
    want = h.get("payload_sha256")  # absent in files from before the checksum
    digest = hashlib.sha256()
    s = program.session()
    try:
        if filled:
            bound = program.max_positions
            target = program.policy.capacity(filled, bound, program.bytes_per_position)
            s._resize(s._check_budget(filled, max(min(target, bound), filled)))
            base = 16 + hlen
            for b in program.buffers:
                e = by_fqn[b.fqn]
                dst = s._kv[b.fqn].narrow(b.growth_axis, 0, filled)
                if not dst.is_contiguous():
                    tmp = torch.empty(dst.shape, dtype=dst.dtype)
                else:
                    tmp = dst
                f.seek(base + int(e["offset"]))
                buf = tmp.view(torch.uint8).reshape(-1).numpy()
                if f.readinto(memoryview(buf)) != e["nbytes"]:
                    raise SessionFileError(f"{path}: truncated session file")
                digest.update(memoryview(buf))
                if tmp is not dst:
                    dst.copy_(tmp)
        if want is not None and digest.hexdigest() != want:
            raise SessionFileError(
                f"{path}: session data is corrupt (its sha256 does not match the one "
                f"recorded when it was saved)"
            )
        s._filled = filled
    except BaseException:
        s.close()
        raise
    return s
