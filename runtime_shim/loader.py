"""The shim's load, step one: the :class:`PreparedProgram` of a source ``.pte``, from the
disk cache when it can.

:func:`load_prepared` returns the program's metadata and the source's sha256:

* **cached** (the source's sha256 is memoized and its prepared metadata stored,
  :mod:`.program_cache`): nothing is parsed or verified;
* **first load**: the program is opened (:mod:`lazykv.format`), its rebinding checked
  (:func:`lazykv.format.rebind.rebind_region`: the edit the C++ loader then makes in
  memory) and verified (:func:`lazykv.verify.verify_pte`); the source's sha256 is
  computed in a thread meanwhile (hashing releases the GIL), and the metadata (a few
  KB of JSON) is stored once the program passed.

Nothing else is written: the C++ runtime (:mod:`.native_engine`) reads the original
file, or the caller's bytes, and rebinds in memory.
"""

from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Union

from lazykv.format.pte import open_pte
from lazykv.format.rebind import rebind_region
from lazykv.runtime_shim import program_cache as cache
from lazykv.runtime_shim.prepared import PreparedProgram, describe
from lazykv.verify import verify_pte


@dataclasses.dataclass(frozen=True)
class Loaded:
    """What :func:`load_prepared` found or made."""

    prepared: PreparedProgram
    #: sha256 of the source bytes.
    digest: str
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
        src_path, data, name = None, bytes(source), "<bytes>"
    else:
        src_path, data = os.fspath(source), None
        name = src_path
        if not os.path.isfile(src_path):
            open_pte(src_path)  # raises InvalidProgram naming the problem
    digest = _Digest(src_path, data, cache_dir)
    prepared = None
    if cache_dir is not None and digest.known is not None:
        prepared = cache.read_prepared(cache_dir, digest.known, name)
    cache_hit = prepared is not None
    if prepared is None:
        prepared = _verify(src_path if data is None else data)
    sha = digest.result()
    if not cache_hit and cache_dir is not None:
        cache.write_prepared(cache_dir, sha, prepared)
    return Loaded(prepared, sha, cache_hit, src_path if data is None else data)


class _Digest:
    """The source's sha256: memoized, or computed in a thread (started at once)."""

    def __init__(self, src_path: Optional[str], data, cache_dir: Optional[Path]) -> None:
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


def _verify(source) -> PreparedProgram:
    """Open, check the rebinding of, verify and describe the program."""
    with open_pte(source) as pte:
        manifest = pte.manifest  # parsed only: verify_pte checks it against the program
        if manifest is not None and manifest.lazy_buffers:
            rebind_region(pte, manifest)  # refuses what the in-memory rebinding cannot do
        return describe(pte, verify_pte(pte))
