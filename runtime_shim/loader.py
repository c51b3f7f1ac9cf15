"""The shim's load, from a source ``.pte`` to a file the stock runtime can load.

:func:`load_prepared` returns the :class:`PreparedProgram` and the path to hand to
``executorch.runtime``, using the disk cache (:mod:`.program_cache`) when it can:

* **cached** (the source's sha256 is memoized and its prepared metadata stored): no
  parsing, no verification, no copy; the cached rebound file is loaded;
* **first load**: the program is opened (:mod:`lazykv.format`), rebound
  (:func:`lazykv.format.rebind.rebind_region`) and verified
  (:func:`lazykv.verify.verify_pte`); the rebound copy is written in a thread meanwhile
  (the segment copy releases the GIL), and the source's sha256 is computed in another,
  so the three costs overlap. The copy enters the cache only once the program passed.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable, Optional, Union

from lazykv import disk_cache
from lazykv.format.pte import open_pte
from lazykv.output_path import write_bytes
from lazykv.format.rebind import rebind_region
from lazykv.runtime_shim import program_cache as cache
from lazykv.runtime_shim.prepared import PreparedProgram, describe
from lazykv.runtime_shim.rebound_file import write_rebound
from lazykv.verify import Verified, verify_pte


@dataclasses.dataclass(frozen=True)
class Loaded:
    """What :func:`load_prepared` found or made."""

    prepared: PreparedProgram
    #: The file to load on the runtime: the source, its rebound copy, or (for a source
    #: given as bytes) a copy in the cache.
    runtime_path: str
    #: sha256 of the source bytes.
    digest: str
    #: True: everything came from the cache; False: the rebound copy was written now;
    #: None: a first load of a program that needs no rebound copy.
    cache_hit: Optional[bool]


def load_prepared(source: Union[str, os.PathLike, bytes, bytearray, memoryview],
                  cache_dir: Path) -> Loaded:
    """Prepare ``source`` (a path or bytes) for the runtime (see the module docstring).
    Raises :class:`lazykv.errors.InvalidProgram` naming the file and the problem."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        src_path, data, name = None, bytes(source), "<bytes>"
    else:
        src_path, data = os.fspath(source), None
        name = src_path
        if not os.path.isfile(src_path):
            open_pte(src_path)  # raises InvalidProgram naming the problem
    digest = _Digest(src_path, data, cache_dir)
    prepared = None
    if digest.known is not None:
        prepared = cache.read_prepared(cache_dir, digest.known, name)
    cache_hit = True if prepared is not None else None
    if prepared is None:
        prepared, cache_hit = _first_load(src_path, data, name, cache_dir, digest)
    sha = digest.result()
    if prepared.lazy:
        runtime_path = cache.rebound_path(cache_dir, sha)
    elif src_path is None:
        runtime_path = cache.bytes_copy_path(cache_dir, sha)
        if not runtime_path.exists():
            write_bytes(runtime_path, data, "the program's file copy", fix=disk_cache.FIX)
    else:
        runtime_path = src_path
    return Loaded(prepared, str(runtime_path), sha, cache_hit)


class _Digest:
    """The source's sha256: memoized, or computed in a thread (started at once)."""

    def __init__(self, src_path: Optional[str], data, cache_dir: Path) -> None:
        self._future = None
        if src_path is None:
            self.known = cache.source_key(None, data, cache_dir)
            return
        self.known = cache.memoized_key(src_path, cache_dir)
        if self.known is None:
            pool = ThreadPoolExecutor(max_workers=1)
            self._future = pool.submit(cache.source_key, src_path, None, cache_dir)
            pool.shutdown(wait=False)

    def result(self) -> str:
        """The sha256 (waits for the thread if it is still hashing)."""
        if self._future is not None:
            self.known = self._future.result()
            self._future = None
        return self.known


def _first_load(src_path, data, name: str, cache_dir: Path, digest: _Digest):
    """Open, rebind, verify and describe the program; the rebound copy is written while
    it is verified and enters the cache only if it passes. Returns ``(prepared,
    cache_hit)``."""
    tmp = None
    cache_hit = None
    try:
        with open_pte(src_path if data is None else data) as pte:
            manifest = pte.manifest  # parsed only: verify_pte checks it against the program
            copy = None
            if manifest is not None and manifest.lazy_buffers:
                rebound = rebind_region(pte, manifest)
                known = digest.known is not None and cache.rebound_path(cache_dir, digest.known).exists()
                if not known:  # the digest may still be being computed: a temporary name
                    tmp = Path(cache_dir) / f"incoming-{os.getpid()}-{id(rebound)}.pte"
                    copy = functools.partial(write_rebound, tmp, rebound, src_path, data,
                                             pte.segment_base_offset)
            verified = _while(functools.partial(verify_pte, pte), copy)
            prepared = describe(pte, verified)
        sha = digest.result()
        if prepared.lazy:
            dest = cache.rebound_path(cache_dir, sha)
            cache_hit = dest.exists()
            if tmp is not None:
                if cache_hit:
                    tmp.unlink()
                else:
                    os.replace(tmp, dest)
                tmp = None
    finally:
        if tmp is not None:  # the program was refused, or the copy failed
            try:
                tmp.unlink()
            except OSError:
                pass
    cache.write_prepared(cache_dir, sha, prepared)
    return prepared, cache_hit


def _while(verify: Callable[[], Verified], copy: Optional[Callable[[], Any]]) -> Verified:
    """``verify()``, with ``copy()`` running in a thread meanwhile if given. Both finish
    before this returns; a refusal by ``verify`` wins over a failed copy."""
    if copy is None:
        return verify()
    with ThreadPoolExecutor(max_workers=1) as pool:
        copying = pool.submit(copy)
        try:
            verified = verify()
        finally:
            wait([copying])
        copying.result()
    return verified
