"""lazykv's disk cache: where it is, what it holds, and how it stays bounded.

One folder, :func:`cache_dir`: ``$LAZYKV_CACHE_DIR`` if set (``~`` expanded), else
``$XDG_CACHE_HOME/lazykv``, else ``~/.cache/lazykv``. What lives there:

``program``     what ``runtime_shim.load`` found when it verified a ``.pte`` (a few KB
                of JSON, keyed by the source's sha256: the next load of the same file
                verifies nothing). No copy of a program: the C++ loader reads the
                original file. (A ``<sha256>.*.pte`` left by an earlier lazykv, which
                wrote rebound copies, is listed and evicted as a ``program`` too.)
``checkpoint``  a random-weight Llama checkpoint written by ``lazykv export``
``native``      the native helper when compiled on first use
``hashes``      memoized sha256 digests of source files (a few bytes each)
``partial``     a file being written right now (or left by a killed process)
``other``       anything else

**Bound.** After each new ``checkpoint`` entry, entries of the kinds ``program`` and
``checkpoint`` are evicted least recently used first until the folder holds at most
:func:`max_bytes`: ``$LAZYKV_CACHE_MAX_BYTES`` (a size as
:func:`lazykv.units.parse_size` reads it), default :data:`DEFAULT_MAX_BYTES`. The entry
just written is never evicted, so one entry larger than the cap stays until the next one
is written. ``LAZYKV_CACHE_MAX_BYTES=0`` (or ``off``) turns the cache off:
``runtime_shim.load`` then keeps nothing (every load verifies the program again).

``lazykv cache`` lists the entries (``list``), prints the total (``size``) and empties
the folder (``clear``). Standard library only.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterable, List, Optional, Tuple, Union

from lazykv.errors import LazyKVError
from lazykv.output_path import OutputPathError
from lazykv.units import SizeError, parse_size

ENV_DIR = "LAZYKV_CACHE_DIR"
ENV_MAX_BYTES = "LAZYKV_CACHE_MAX_BYTES"
#: Default cap: a few random checkpoints of a mid-size model.
DEFAULT_MAX_BYTES = 4 << 30
#: Kinds that :func:`evict` may remove (the model-sized ones).
EVICTABLE = ("program", "checkpoint")
#: A ``partial`` file older than this is a leftover of a killed process.
_PARTIAL_STALE_SECONDS = 3600

#: The fix every "cannot write to the cache" message gives.
FIX = f"set {ENV_DIR} to a writable folder, or {ENV_MAX_BYTES}=0 to keep nothing"

#: Folders whose every subfolder is one entry of this kind.
_GROUPED = {"checkpoints": "checkpoint", "native": "native"}

_DIGEST = re.compile(r"^([0-9a-f]{64})\.")


class CacheConfigError(LazyKVError):
    """``$LAZYKV_CACHE_MAX_BYTES`` cannot be read; the message names the fix."""

    exit_code = 2


def cache_dir() -> Path:
    """The cache folder (see the module doc); not created here."""
    explicit = os.environ.get(ENV_DIR)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "lazykv"


def max_bytes() -> int:
    """The cap from ``$LAZYKV_CACHE_MAX_BYTES`` (``0``/``off``: cache off), else
    :data:`DEFAULT_MAX_BYTES`. Raises :class:`CacheConfigError` for an unreadable value."""
    raw = os.environ.get(ENV_MAX_BYTES)
    if raw is None or not raw.strip():
        return DEFAULT_MAX_BYTES
    if raw.strip().lower() == "off":
        return 0
    try:
        return parse_size(raw, ENV_MAX_BYTES)
    except SizeError as e:
        raise CacheConfigError(f"{e}; or 0/off to turn the cache off") from None


def enabled() -> bool:
    """False when ``$LAZYKV_CACHE_MAX_BYTES`` is 0 (the cache is off)."""
    return max_bytes() > 0


@dataclasses.dataclass(frozen=True)
class Entry:
    """One thing in the cache: its ``kind`` (see the module doc), ``key`` (the digest or
    folder name), the ``paths`` that make it up, their total ``nbytes`` and when it was
    last used (``last_used``, seconds since the epoch: the newest mtime of its paths)."""

    kind: str
    key: str
    paths: Tuple[Path, ...]
    nbytes: int
    last_used: float

    def as_dict(self) -> dict:
        return {"kind": self.kind, "key": self.key, "nbytes": self.nbytes,
                "last_used": self.last_used, "paths": [str(p) for p in self.paths]}


def _tree(path: Path) -> Tuple[int, float]:
    """(bytes, newest mtime) of a file or a folder's files; (0, 0) if it vanished."""
    try:
        st = path.lstat()
    except OSError:
        return 0, 0.0
    if not path.is_dir() or path.is_symlink():
        return st.st_size, st.st_mtime
    total, newest = 0, st.st_mtime
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                s = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            total += s.st_size
            newest = max(newest, s.st_mtime)
    return total, newest


def _kind_of_file(name: str) -> Tuple[str, str]:
    if name.startswith("incoming-") or name.endswith((".tmp", ".probe")) or ".tmp" in name:
        return "partial", name
    m = _DIGEST.match(name)
    if m:
        return "program", m.group(1)
    return "other", name


def entries(root: Optional[Union[str, os.PathLike]] = None) -> List[Entry]:
    """Every entry under ``root`` (default :func:`cache_dir`), least recently used first.
    A missing folder has none."""
    root = Path(root) if root is not None else cache_dir()
    groups: dict = {}
    try:
        names = sorted(os.listdir(root))
    except (FileNotFoundError, NotADirectoryError):
        return []
    for name in names:
        p = root / name
        if p.is_dir() and not p.is_symlink():
            if name in _GROUPED:
                kind = _GROUPED[name]
                for sub in sorted(os.listdir(p)):
                    k = ("partial", sub) if ".tmp" in sub else (kind, sub)
                    groups.setdefault(k, []).append(p / sub)
                continue
            kind = "hashes" if name == "hashes" else "other"
            groups.setdefault((kind, name), []).append(p)
            continue
        groups.setdefault(_kind_of_file(name), []).append(p)
    out = []
    for (kind, key), paths in groups.items():
        sizes = [_tree(p) for p in paths]
        out.append(Entry(kind, key, tuple(paths), sum(s for s, _ in sizes),
                         max((t for _, t in sizes), default=0.0)))
    out.sort(key=lambda e: (e.last_used, e.key))
    return out


def total_bytes(root: Optional[Union[str, os.PathLike]] = None) -> int:
    """Bytes of every file under ``root`` (default :func:`cache_dir`)."""
    return sum(e.nbytes for e in entries(root))


def _remove(entry: Entry) -> int:
    freed = 0
    for p in entry.paths:
        size, _ = _tree(p)
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            freed += size
        except FileNotFoundError:
            pass
    return freed


def clear(root: Optional[Union[str, os.PathLike]] = None) -> Tuple[int, int]:
    """Remove every entry under ``root`` (default :func:`cache_dir`); returns (entries,
    bytes) removed. Loads running meanwhile keep working (their files stay open) and
    later ones rebuild what they need."""
    root = Path(root) if root is not None else cache_dir()
    gone = entries(root)
    freed = sum(_remove(e) for e in gone)
    for folder in _GROUPED:
        try:
            (root / folder).rmdir()  # only if empty
        except OSError:
            pass
    return len(gone), freed


def touch(path: Union[str, os.PathLike]) -> None:
    """Mark the entry holding ``path`` used now (its mtime), for least-recently-used
    eviction. A missing or read-only file is ignored."""
    try:
        os.utime(path)
    except OSError:
        pass


def evict(root: Optional[Union[str, os.PathLike]] = None, keep: Iterable[str] = (),
          cap: Optional[int] = None) -> List[Entry]:
    """Remove ``program``/``checkpoint`` entries, least recently used first, until the
    folder holds at most ``cap`` bytes (default :func:`max_bytes`). Entries whose key is
    in ``keep`` stay. Returns the entries removed."""
    root = Path(root) if root is not None else cache_dir()
    cap = max_bytes() if cap is None else cap
    keep = set(keep)
    now = time.time()
    current = entries(root)
    total = sum(e.nbytes for e in current)
    removed = []
    for e in current:
        if total <= cap:
            break
        stale_partial = e.kind == "partial" and now - e.last_used > _PARTIAL_STALE_SECONDS
        if (e.kind in EVICTABLE and e.key not in keep) or stale_partial:
            total -= _remove(e)
            removed.append(e)
    return removed


def ensure_writable(root: Union[str, os.PathLike]) -> Path:
    """Create ``root`` if needed and check a file can be created in it; returns it.
    Raises :class:`OutputPathError` naming the folder and the fix (``$LAZYKV_CACHE_DIR``
    or turning the cache off)."""
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".probe.", suffix=".tmp", dir=root)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputPathError(
            f"cannot write to lazykv's cache folder {root}: {e.strerror or e}; {FIX}"
        ) from None
    return root


def metadata_dir() -> Optional[Path]:
    """The folder ``runtime_shim.load`` keeps verified metadata in by default:
    :func:`cache_dir`, or None when the cache is off (``max_bytes() == 0``)."""
    return cache_dir() if enabled() else None
