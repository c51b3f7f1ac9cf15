"""A prompt cache with a byte budget: prefixes of conversations kept for reuse.

``PromptCache(program, max_bytes)`` keeps sessions' filled prefixes keyed by the tokens
that filled them. ``fetch(tokens)`` forks a new session from the cached entry sharing
the longest prefix with ``tokens`` (mlx-lm's server prompt cache, llama.cpp's
``--cache-ram``), so only the rest of the prompt has to be computed.

Memory: each entry holds exactly its positions (``positions x bytes_per_position``,
no growth headroom). The KV bytes the cache holds never exceed ``max_bytes``, not
even for a moment: ``insert`` evicts least-recently-used entries *before* it copies,
and ``fetch`` copies into the caller's new session, which the cache does not hold
(mlx-lm #1395: a cache that deep-copies on fetch doubles its peak). ``save(dir)`` and
:meth:`PromptCache.load` keep a cache across processes as session files (each checked
like :meth:`LazyProgram.restore` checks one: program sha256, sizes, payload sha256).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple, Union

from lazykv.errors import InvalidInput, LazyKVError, MemoryBudgetExceeded, SessionFileError
from lazykv.runtime_shim.session import Session
from lazykv.runtime_shim.session_file import check_file_header

logger = logging.getLogger(__name__)

INDEX_NAME = "index.json"
INDEX_FORMAT = "lazykv-prompt-cache"
INDEX_VERSION = 1

Tokens = Tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class PromptCacheStats:
    """A snapshot of a :class:`PromptCache`.

    ``bytes`` is the KV storage its entries hold (never above ``max_bytes``);
    ``hits``/``misses`` count fetches that reused at least one position / none;
    ``positions_reused`` sums the positions hits reused; ``evictions`` counts entries
    dropped to make room (least recently used first); ``replaced`` counts entries
    dropped because a newer entry extends them (it serves every fetch they would)."""

    entries: int
    bytes: int
    max_bytes: int
    hits: int
    misses: int
    positions_reused: int
    inserts: int
    evictions: int
    replaced: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _tokens(tokens, what: str = "tokens") -> Tokens:
    """``tokens`` (a sequence of ints, or a 1-D / ``[1, S]`` integer tensor) as a tuple."""
    if hasattr(tokens, "reshape") and hasattr(tokens, "tolist"):  # torch / numpy
        dt = str(getattr(tokens, "dtype", ""))
        if "float" in dt or "bool" in dt or "complex" in dt:
            raise InvalidInput(f"{what} must be integer token ids, got dtype {dt}")
        tokens = tokens.reshape(-1).tolist()
    if isinstance(tokens, (str, bytes)) or not isinstance(tokens, Iterable):
        raise InvalidInput(f"{what} must be a sequence of int token ids, got {type(tokens).__name__}")
    out = tuple(tokens)
    for t in out:
        if isinstance(t, bool) or not isinstance(t, int):
            raise InvalidInput(f"{what} must hold int token ids, found {type(t).__name__} {t!r}")
    return out


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token tuples (slice comparisons run
    in C: a binary search over the prefix length)."""
    m = min(len(a), len(b))
    if a[:m] == b[:m]:
        return m
    lo, hi = 0, m  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class PromptCache:
    """Prefixes of sessions, keyed by their tokens, within ``max_bytes`` of KV storage.

    Thread-safe (one operation at a time). Entries are sessions of ``program`` holding
    exactly their positions; they are never run, only forked from.
    """

    def __init__(self, program, max_bytes: int) -> None:
        if not getattr(program, "lazy", False):
            raise LazyKVError(
                f"{program.source} has no lazy KV buffers: a prompt cache needs sessions it "
                f"can fork; export the program with lazykv (--lazy-kv-cache)"
            )
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise InvalidInput(f"max_bytes must be an int >= 0 bytes, got {max_bytes!r}")
        self.program = program
        self.max_bytes = max_bytes
        # tokens -> session, least recently used first.
        self._entries: "collections.OrderedDict[Tokens, object]" = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.RLock()
        self._hits = self._misses = self._reused = 0
        self._inserts = self._evictions = self._replaced = 0

    # -- queries -------------------------------------------------------------------------

    @property
    def bytes(self) -> int:
        """KV bytes the entries hold now (always <= ``max_bytes``)."""
        return self._bytes

    @property
    def stats(self) -> PromptCacheStats:
        """Entries, bytes held, hits, misses, evictions... now (:class:`PromptCacheStats`)."""
        with self._lock:
            return PromptCacheStats(
                entries=len(self._entries), bytes=self._bytes, max_bytes=self.max_bytes,
                hits=self._hits, misses=self._misses, positions_reused=self._reused,
                inserts=self._inserts, evictions=self._evictions, replaced=self._replaced,
            )

    def keys(self) -> List[Tokens]:
        """The cached token sequences, least recently used first."""
        with self._lock:
            return list(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, tokens) -> bool:
        return _tokens(tokens) in self._entries

    def entry_bytes(self, positions: int) -> int:
        """Bytes an entry of ``positions`` positions holds."""
        return positions * self.program.bytes_per_position

    # -- insert / fetch ------------------------------------------------------------------

    def insert(self, session, tokens) -> int:
        """Keep a copy of ``session``'s first ``len(tokens)`` positions, keyed by ``tokens``
        (the tokens that filled them, in order); returns the bytes the entry holds.

        Entries least recently used are evicted first until the copy fits, so the cache
        never holds more than ``max_bytes``. Inserting tokens already cached only marks
        that entry as used. Cached entries whose tokens are a prefix of ``tokens`` are
        dropped (the new entry serves every fetch they would). ``session`` is unchanged.
        Raises :class:`InvalidInput` for a session of another program or more tokens than
        it has filled, :class:`MemoryBudgetExceeded` if one entry alone exceeds
        ``max_bytes`` (nothing is evicted then), :class:`AllocationFailed` if storage
        cannot be had (the evictions made for it stand).
        """
        key = _tokens(tokens)
        if session.program is not self.program:
            raise InvalidInput(
                f"insert: the session belongs to {session.program.source!r}, this cache to "
                f"{self.program.source!r}; use one cache per program"
            )
        if not key:
            raise InvalidInput("insert: tokens is empty; cache at least one position")
        need = self.entry_bytes(len(key))
        if need > self.max_bytes:
            raise MemoryBudgetExceeded(
                f"insert: {len(key)} positions need {need} bytes of KV storage but the "
                f"cache's max_bytes is {self.max_bytes}; raise max_bytes or cache a shorter "
                f"prefix (insert(session, tokens[:n]))"
            )
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return need
            with session._lock:  # its offset cannot move while we check and copy
                if len(key) > session.offset:
                    raise InvalidInput(
                        f"insert: {len(key)} tokens but the session has filled only "
                        f"{session.offset} positions; pass the tokens that filled them"
                    )
                for k in [k for k in self._entries if len(k) < len(key) and key[: len(k)] == k]:
                    self._drop(k)
                    self._replaced += 1
                while self._bytes + need > self.max_bytes:
                    self._drop(next(iter(self._entries)))
                    self._evictions += 1
                entry = session._fork(len(key), exact=True)
            self._entries[key] = entry
            self._bytes += entry.kv_bytes
            self._inserts += 1
            return entry.kv_bytes

    def fetch(self, tokens, *, leave: int = 1) -> Tuple[Session, int]:
        """``(session, reused)``: a new session forked from the cached entry that shares
        the longest prefix with ``tokens``, holding its first ``reused`` positions; feed
        it ``tokens[reused:]`` from position ``reused``.

        ``reused`` is at most ``len(tokens) - leave`` so that at least ``leave`` tokens
        remain to compute (the last one's logits pick the next token); on a miss (no
        entry shares a position, or ``leave`` >= ``len(tokens)``) it is 0 and the session
        is fresh. The session is the caller's (close it); its storage is not the cache's
        and does not count against ``max_bytes``. The entry becomes the most recently
        used. Raises :class:`InvalidInput` for bad tokens, :class:`AllocationFailed` /
        :class:`MemoryBudgetExceeded` as :meth:`Session.fork` does.
        """
        key = _tokens(tokens)
        if isinstance(leave, bool) or not isinstance(leave, int) or leave < 0:
            raise InvalidInput(f"fetch: leave must be an int >= 0, got {leave!r}")
        with self._lock:
            best, best_n = None, 0
            for k in reversed(self._entries):  # most recent first: ties go to it
                n = common_prefix(k, key)
                if n > best_n:
                    best, best_n = k, n
            reused = min(best_n, max(len(key) - leave, 0))
            if reused == 0:
                self._misses += 1
                return self.program.session(), 0
            entry = self._entries[best]
            session = entry.fork(reused)
            self._entries.move_to_end(best)
            self._hits += 1
            self._reused += reused
            return session, reused

    # -- removal -------------------------------------------------------------------------

    def _drop(self, key: Tokens) -> None:
        entry = self._entries.pop(key)
        self._bytes -= entry.kv_bytes
        entry.close()

    def clear(self) -> None:
        """Drop every entry (their storage is released)."""
        with self._lock:
            for k in list(self._entries):
                self._drop(k)

    close = clear

    def __enter__(self) -> "PromptCache":
        return self

    def __exit__(self, *exc) -> None:
        self.clear()

    # -- disk ----------------------------------------------------------------------------

    def save(self, directory: Union[str, os.PathLike]) -> int:
        """Write every entry to ``directory`` (a session file each, plus ``index.json``
        with their tokens in least-recently-used order); returns bytes written. Files of
        an earlier save there that the new index does not name are removed."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        with self._lock:
            entries, total = [], 0
            for i, (key, s) in enumerate(self._entries.items()):
                name = f"entry-{i:05d}.kv"
                total += s.save(d / name)
                entries.append({"file": name, "tokens": list(key)})
            index = {
                "format": INDEX_FORMAT,
                "version": INDEX_VERSION,
                "program_sha256": self.program.digest,
                "program_source": self.program.source,
                "max_bytes": self.max_bytes,
                "entries": entries,
                "entries_sha256": _digest(entries),
            }
            raw = json.dumps(index, sort_keys=True).encode()
            tmp = d / f"{INDEX_NAME}.{os.getpid()}.tmp"
            tmp.write_bytes(raw)
            os.replace(tmp, d / INDEX_NAME)
            keep = {e["file"] for e in entries}
            for old in d.glob("entry-*.kv"):
                if old.name not in keep:
                    old.unlink()
            return total + len(raw)

    @classmethod
    def load(cls, program, directory: Union[str, os.PathLike],
             max_bytes: Optional[int] = None) -> "PromptCache":
        """A cache read from ``directory`` (written by :meth:`save`) for ``program``.

        ``max_bytes`` defaults to the saved cache's. The most recently used entries that
        fit in it are read, each straight into storage of its exact size (never above
        the budget); the rest are left out (logged). Raises :class:`SessionFileError` for
        a missing, corrupt or foreign index or entry (a cache saved from another program
        is refused by name), as :meth:`LazyProgram.restore` does.
        """
        d = Path(directory)
        path = d / INDEX_NAME
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise SessionFileError(f"{path}: cannot read the prompt cache index ({e.strerror})") from None
        try:
            h = json.loads(raw)
            assert isinstance(h, dict)
        except Exception:
            raise SessionFileError(f"{path}: prompt cache index is corrupt or truncated") from None
        check_file_header(path, h, program, INDEX_FORMAT, INDEX_VERSION, "prompt cache index")
        entries = h.get("entries")
        if not isinstance(entries, list) or h.get("entries_sha256") != _digest(entries):
            raise SessionFileError(f"{path}: prompt cache index is corrupt (its entries do not match their sha256)")
        if max_bytes is None:
            max_bytes = h.get("max_bytes")
        cache = cls(program, max_bytes)
        # Most recent last in the file: keep the most recent that fit.
        chosen, room = [], cache.max_bytes
        for e in reversed(entries):
            try:
                key = _tokens(e["tokens"], f"{path}: entry {e.get('file')!r} tokens")
                nb = cache.entry_bytes(len(key))
                name = str(e["file"])
            except (KeyError, TypeError, InvalidInput) as err:
                raise SessionFileError(f"{path}: malformed entry ({err})") from None
            if Path(name).name != name or not key:
                raise SessionFileError(f"{path}: malformed entry file name {name!r}")
            if nb <= room:
                chosen.append((key, name))
                room -= nb
        if len(chosen) < len(entries):
            logger.info("%s: %d of %d entries do not fit in max_bytes=%d and were left out",
                        path, len(entries) - len(chosen), len(entries), cache.max_bytes)
        try:
            for key, name in reversed(chosen):
                s = Session._restore(program, d / name, exact=True)
                if s.offset != len(key):
                    s.close()
                    raise SessionFileError(
                        f"{d / name}: holds {s.offset} positions but the index gives it "
                        f"{len(key)} tokens"
                    )
                cache._entries[key] = s
                cache._bytes += s.kv_bytes
        except BaseException:
            cache.clear()
            raise
        return cache

    def __repr__(self) -> str:
        return (f"PromptCache({len(self._entries)} entries, {self._bytes}/{self.max_bytes} bytes, "
                f"{self._hits} hits, {self._misses} misses)")


def _digest(entries) -> str:
    return hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()
