"""The shim's entries in lazykv's disk cache folder (:func:`lazykv.disk_cache.cache_dir`),
keyed by the sha256 of a source ``.pte``: metadata only.

Per source program it holds the :class:`lazykv.runtime_shim.prepared.PreparedProgram`
(``<sha256>.prepared.json``, a few KB): what verifying the program found, so a second
load verifies nothing. A source's sha256 is memoized by (size, mtime, inode), in memory
and under ``hashes/`` (a line per file), so a cached load reads neither the weights nor
the flatbuffer in Python. No copy of a program is ever written: the C++ loader reads
the original file and rebinds in memory.

Every entry is written to a temporary name and renamed into place; a cache that cannot
be written (read-only) costs speed, never correctness. ``cache_dir`` None (the cache is
off) keeps the memo in memory only.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Dict, Optional, Tuple

from lazykv import disk_cache
from lazykv.output_path import OutputPathError, write_bytes
from lazykv.runtime_shim.prepared import PreparedProgram

logger = logging.getLogger(__name__)

#: abspath -> ((size, mtime_ns, inode), sha256) of sources hashed in this process.
_HASH_MEMO: Dict[str, Tuple[tuple, str]] = {}


def _stamp(path: str) -> tuple:
    st = os.stat(path)
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def _memo_file(cache_dir: Path, path: str) -> Path:
    return Path(cache_dir) / "hashes" / hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:32]


def memoized_key(path: str, cache_dir: Optional[Path]) -> Optional[str]:
    """The memoized sha256 of ``path`` if its (size, mtime, inode) are unchanged, else None."""
    stamp = _stamp(path)
    memo = _HASH_MEMO.get(os.path.abspath(path))
    if memo and memo[0] == stamp:
        return memo[1]
    if cache_dir is None:
        return None
    try:
        parts = _memo_file(cache_dir, path).read_text().split()
        if len(parts) == 4 and tuple(int(x) for x in parts[:3]) == stamp:
            _HASH_MEMO[os.path.abspath(path)] = (stamp, parts[3])
            return parts[3]
    except (OSError, ValueError):
        pass
    return None


def source_key(path: Optional[str], data, cache_dir: Optional[Path]) -> str:
    """sha256 of the source ``.pte``'s bytes (``path``, or ``data`` when path is None),
    memoized by (size, mtime, inode) in memory and in ``cache_dir/hashes``."""
    if path is None:
        return hashlib.sha256(memoryview(data)).hexdigest()
    known = memoized_key(path, cache_dir)
    if known is not None:
        return known
    stamp = _stamp(path)
    # One reused buffer: a fresh 8 MiB bytes object per read costs a page fault per 4 KiB
    # (the first load of stories110m hashes 537 MB on its critical path).
    h = hashlib.sha256()
    buf = bytearray(8 << 20)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    digest = h.hexdigest()
    _HASH_MEMO[os.path.abspath(path)] = (stamp, digest)
    if cache_dir is not None:
        _write_atomic(_memo_file(cache_dir, path), " ".join(str(x) for x in stamp) + " " + digest)
    return digest


def _prepared_path(cache_dir: Path, digest: str) -> Path:
    return Path(cache_dir) / f"{digest}.prepared.json"


def read_prepared(cache_dir: Path, digest: str, source: str) -> Optional[PreparedProgram]:
    """The stored :class:`PreparedProgram` of ``digest``, or None (then prepare again)."""
    try:
        text = _prepared_path(cache_dir, digest).read_text()
    except OSError:
        return None
    return PreparedProgram.from_json(text, source)


def write_prepared(cache_dir: Path, digest: str, prepared: PreparedProgram) -> None:
    """Store ``prepared`` (write it only once the program passed verification)."""
    _write_atomic(_prepared_path(cache_dir, digest), prepared.to_json())


def _write_atomic(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes(path, text.encode(), "a cache entry", fix=disk_cache.FIX)
    except (OSError, OutputPathError) as e:  # a read-only cache only costs speed
        logger.info("cannot write %s: %s", path, e)
