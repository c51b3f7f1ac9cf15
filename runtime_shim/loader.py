"""The shim's load, step one: the :class:`PreparedProgram` of a source ``.pte``, from the
disk cache when it can.

:func:`load_prepared` returns the program's metadata and its sha256 (as a
:class:`Digest`, possibly still being computed):

* **cached** (the source's sha256 is memoized by path and (size, mtime, inode), and its
  prepared metadata stored, :mod:`.program_cache`): nothing is parsed or verified;
* **first load**: the program is opened (:mod:`lazykv.format`), its rebinding checked
  (:func:`lazykv.format.rebind.rebind_region`: the edit the C++ loader then makes in
  memory) and verified (:func:`lazykv.verify.verify_pte`). The source's sha256 is
  computed in a thread meanwhile (hashing releases the GIL), which then stores the
  metadata (a few KB of JSON) under it once the program passed: hashing a model-sized
  file is not on the load's critical path. A second load of the same file in this
  process waits for that store.

Nothing else is written: the C++ runtime (:mod:`.native_engine`) reads the original
file, or the caller's bytes, and rebinds in memory.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Dict, Optional, Union

from lazykv.format.pte import open_pte
from lazykv.format.rebind import rebind_region
from lazykv.runtime_shim import program_cache as cache
from lazykv.runtime_shim.prepared import PreparedProgram, describe
from lazykv.verify import verify_pte

#: abspath -> the hash-and-store of a first load in this process, until it is done.
_PENDING: Dict[str, Future] = {}
_PENDING_LOCK = threading.Lock()


class Digest:
    """The sha256 of a source: known now, or computed by a thread (:meth:`result` waits)."""

    def __init__(self, known: Optional[str] = None, future: Optional[Future] = None) -> None:
        self._known = known
        self._future = future

    def result(self) -> str:
        """The hex sha256 (waits for the thread if it is still hashing)."""
        if self._known is None:
            self._known = self._future.result()
            self._future = None
        return self._known


@dataclasses.dataclass(frozen=True)
class Loaded:
    """What :func:`load_prepared` found or made."""

    prepared: PreparedProgram
    #: sha256 of the source bytes (:meth:`Digest.result`).
    digest: Digest
    #: True: the metadata came from the disk cache; False: the program was verified now.
    cache_hit: bool
    #: The source as the runtime reads it: its path, or its bytes.
    source: Union[str, bytes]


def load_prepared(source: Union[str, os.PathLike, bytes, bytearray, memoryview],
                  cache_dir: Optional[Path]) -> Loaded:
    """Prepare ``source`` (a path or bytes) for the runtime (see the module docstring);
    ``cache_dir`` None: no disk cache (nothing read or written). Raises
    :class:`lazykv.errors.InvalidProgram` naming the file and the problem."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        digest = cache.source_key(None, data, cache_dir)
        prepared = None if cache_dir is None else cache.read_prepared(cache_dir, digest, "<bytes>")
        hit = prepared is not None
        if not hit:
            prepared = _verify(data)
            if cache_dir is not None:
                cache.write_prepared(cache_dir, digest, prepared)
        return Loaded(prepared, Digest(digest), hit, data)
    path = os.fspath(source)
    if not os.path.isfile(path):
        open_pte(path)  # raises InvalidProgram naming the problem
    with _PENDING_LOCK:
        pending = _PENDING.get(os.path.abspath(path))
    if pending is not None:
        pending.exception()  # an earlier load of this file is still storing: wait for it
    known = cache.memoized_key(path, cache_dir)
    if known is not None and cache_dir is not None:
        prepared = cache.read_prepared(cache_dir, known, path)
        if prepared is not None:
            return Loaded(prepared, Digest(known), True, path)
    verified: Future = Future()
    digest = Digest(known) if known is not None else _hash_then_store(path, cache_dir, verified)
    try:
        prepared = _verify(path)
    except BaseException:
        verified.set_result(None)  # refused: nothing is stored
        raise
    verified.set_result(prepared)
    if known is not None and cache_dir is not None:  # hashed before, not stored: store now
        cache.write_prepared(cache_dir, known, prepared)
    return Loaded(prepared, digest, False, path)


def _hash_then_store(path: str, cache_dir: Optional[Path], verified: Future) -> Digest:
    """A :class:`Digest` of ``path`` computed by a thread started now, which then stores
    the program's metadata under it once ``verified`` holds it (None: refused)."""
    key = os.path.abspath(path)
    done: Future = Future()

    def run() -> None:
        try:
            try:  # idle priority (Linux: per thread): the load's own work goes first
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
            except (AttributeError, OSError):
                pass
            sha = cache.source_key(path, None, cache_dir)
            prepared = verified.result()
            if prepared is not None and cache_dir is not None:
                cache.write_prepared(cache_dir, sha, prepared)
            done.set_result(sha)
        except BaseException as e:  # an unreadable file: the digest's reader sees it
            done.set_exception(e)
        finally:
            with _PENDING_LOCK:
                if _PENDING.get(key) is done:
                    del _PENDING[key]

    with _PENDING_LOCK:
        _PENDING[key] = done
    # Not a daemon: a process that ends right after loading still stores the metadata.
    threading.Thread(target=run, name="lazykv-hash", daemon=False).start()
    return Digest(future=done)


def _verify(source) -> PreparedProgram:
    """Open, check the rebinding of, verify and describe the program."""
    with open_pte(source) as pte:
        manifest = pte.manifest  # parsed only: verify_pte checks it against the program
        if manifest is not None and manifest.lazy_buffers:
            rebind_region(pte, manifest)  # refuses what the in-memory rebinding cannot do
        return describe(pte, verify_pte(pte))
