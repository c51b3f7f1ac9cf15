"""``load()``: a ``.pte`` on the stock runtime, its lazy KV buffers rebound as inputs.

The load is two steps: :func:`lazykv.runtime_shim.loader.load_prepared` (prepare and
verify the program in Python; its metadata cached by the source's sha256), then this
module's :class:`LazyProgram`, a thin object over the C++ runtime engine
(:mod:`lazykv.runtime_shim.native_engine`: the original file read and rebound in
memory, methods run on inputs Python owns) that makes sessions.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from lazykv.errors import InvalidInput, ProgramRejected, UnknownMethod
from lazykv.units import parse_size
from lazykv.manifest import LazyBuffer, Manifest
from lazykv.runtime_shim.allocator import DynamicAllocator, TorchAllocator
from lazykv.runtime_shim.inputs import MethodInfo
from lazykv.runtime_shim.kernels import runtime
from lazykv.runtime_shim.loader import load_prepared
from lazykv.runtime_shim.policy import GrowthPolicy, parse_policy
from lazykv.runtime_shim.prepared import PreparedProgram
from lazykv import disk_cache
from lazykv.runtime_shim.native_engine import RawProgram
from lazykv.verify import MethodLimits

logger = logging.getLogger(__name__)

# ExecuTorch's Python runtime with the installed kernel libraries registered (the C++
# engine runs inside it); tests and benchmarks use it as the stock reference.
_runtime = runtime


class LazyProgram:
    """A loaded program. Make sessions with :meth:`session`; restore one with :meth:`restore`.

    Weights and the runtime's method state are loaded once per program; each session
    owns only its KV storage. Use :func:`load` to build one.
    """

    def __init__(
        self,
        source: Union[str, os.PathLike, bytes, bytearray, memoryview],
        policy: Union[str, GrowthPolicy, None] = "doubling",
        max_bytes: Optional[int] = None,
        *,
        allocator: Optional[DynamicAllocator] = None,
        cache_dir: Optional[Union[str, os.PathLike]] = None,
        weight_cache: Optional[bool] = None,
    ) -> None:
        t0 = time.perf_counter()
        self.policy: GrowthPolicy = parse_policy(policy)
        # Bytes, or a size string ("64MiB", "64MB"): lazykv.units, like every size.
        self.max_bytes: Optional[int] = None if max_bytes is None else parse_size(max_bytes, "max_bytes")
        self.allocator: DynamicAllocator = allocator or TorchAllocator()
        # lazykv's cache folder keeps the verified metadata (a few KB); nothing when off.
        if cache_dir is None:
            cache_dir = disk_cache.metadata_dir()
        self.source = "<bytes>" if isinstance(source, (bytes, bytearray, memoryview)) else os.fspath(source)
        loaded = load_prepared(source, None if cache_dir is None else Path(cache_dir))
        prepared: PreparedProgram = loaded.prepared
        self.prepared = prepared
        self._digest = loaded.digest  # may still be computing: see the digest property
        #: The verified metadata came from the disk cache (nothing parsed or verified).
        self.cache_hit: bool = loaded.cache_hit
        #: The file the runtime reads (the source itself; None for a program given as bytes).
        self.runtime_path: Optional[str] = loaded.source if isinstance(loaded.source, str) else None
        self._data_source = loaded.source
        self.manifest: Optional[Manifest] = prepared.manifest
        self.method_names: List[str] = list(prepared.method_names)
        self.limits: Dict[str, MethodLimits] = dict(prepared.limits)
        self.lazy: bool = prepared.lazy
        self.buffers: Tuple[LazyBuffer, ...] = self.manifest.lazy_buffers if self.lazy else ()
        self._dtypes: Dict[str, torch.dtype] = {b.fqn: getattr(torch, b.dtype) for b in self.buffers}
        if self.lazy and self.max_bytes is not None and self.max_bytes < self.bytes_per_position:
            raise InvalidInput(
                f"max_bytes={self.max_bytes:,} cannot hold one position of KV storage "
                f"({self.bytes_per_position:,} bytes each in {self.source}); raise it to at "
                f"least {self.bytes_per_position:,} or leave it unset"
            )
        # Verified above: only now do the bytes reach C++ (read and rebound in memory).
        self._engine = RawProgram(loaded.source, self.source)
        self._loaded: Dict[str, Any] = {}
        # One lock per program: loading a method and every execute (the runtime's
        # planned arenas are shared by all methods of a program, DESIGN fact 6).
        self._lock = threading.RLock()
        self.weight_cache: Optional[bool] = None
        runnable = [n for n in self.method_names if prepared.methods[n].inputs]
        if weight_cache is None and len(runnable) > 1:
            # Several methods over the same weights: without XNNPACK's weight cache each
            # method's delegate packs its own copy (1.96x resident, DESIGN fact 7).
            weight_cache = True
        if weight_cache is not None:
            # Process-wide and read by each XNNPACK delegate at load_method: switch it for
            # the duration of loading every method now, then restore the previous value
            # (methods keep the setting they were loaded with).
            from lazykv.runtime_shim import weight_cache as _wc

            with _wc.enabled(bool(weight_cache)) as took:
                self.weight_cache = took if weight_cache else False
                for name in runnable:
                    self._method(name)
        self.load_seconds = time.perf_counter() - t0
        self._sessions_open = 0

    # -- introspection ---------------------------------------------------------------

    @property
    def digest(self) -> str:
        """sha256 (hex) of the program's bytes (what session files record). A first load
        computes it in a thread, off the load's critical path: this waits for it."""
        return self._digest.result()

    @property
    def bytes_per_position(self) -> int:
        """KV bytes one filled position costs (all lazy buffers together)."""
        return sum(b.bytes_per_position for b in self.buffers)

    @property
    def max_positions(self) -> int:
        """The exported bound along the growth axis (smallest over the lazy buffers)."""
        return min((b.max_positions for b in self.buffers), default=0)

    def method_info(self, method: str) -> MethodInfo:
        """What ``method`` takes and must respect (:class:`MethodInfo`); raises
        :class:`UnknownMethod` naming the methods the program has."""
        info = self.prepared.methods.get(method)
        if info is None:
            raise UnknownMethod(
                f"{self.source}: no method {method!r}; it has {sorted(self.method_names)}"
            )
        return info

    def load_method(self, name: str) -> None:
        """Load method ``name`` into the runtime now instead of on its first run (sessions
        load methods on first use). Raises :class:`UnknownMethod` for a name the program
        lacks and :class:`ProgramRejected` if the runtime refuses the method."""
        self._method(name)

    def _method(self, name: str):
        m = self._loaded.get(name)
        if m is None:
            self.method_info(name)
            with self._lock:
                m = self._loaded.get(name)
                if m is None:
                    try:
                        m = self._engine.method(name)
                    except ProgramRejected as e:
                        from lazykv.runtime_shim.kernels import missing_kernels_error

                        context = f"{self.source}: loading method {name!r}"
                        raise (missing_kernels_error(self._data_source, context) or e) from None
                    info = self.method_info(name)
                    if m.n_inputs != len(info.inputs) + len(info.lazy_fqns):
                        # Sessions pass exactly these; another count would misplace KV tensors.
                        raise ProgramRejected(
                            f"{self.source}: method {name!r} takes {m.n_inputs} inputs after "
                            f"rebinding, but its verified description has {len(info.inputs)} "
                            f"inputs and {len(info.lazy_fqns)} lazy buffers; the file changed "
                            f"while loading, or `lazykv cache clear` and load it again"
                        )
                    self._loaded[name] = m
        return m

    def _execute(self, name: str, inputs: list) -> list:
        """Run method ``name`` on all its inputs (the user's, then the KV storage), under
        the program's lock; :class:`ExecutionFailed` if the runtime reports an error."""
        m = self._method(name)
        with self._lock:
            return m.execute(inputs)

    def constant(self, method: str) -> Any:
        """Run a method that takes no inputs (e.g. ``get_vocab_size``) and return its value."""
        info = self.method_info(method)
        if info.inputs:
            raise InvalidInput(f"{method!r} takes {len(info.inputs)} inputs; not a constant")
        out = self._execute(method, [])
        return out[0] if len(out) == 1 else list(out)

    # -- memory estimate (lazykv.estimate) --------------------------------------------

    def footprint(self):
        """The :class:`lazykv.estimate.Footprint` of this program, read from its file
        (weights, arenas, runtime, KV bytes per position); computed once."""
        fp = getattr(self, "_footprint", None)
        if fp is None:
            from lazykv.estimate import footprint_of

            fp = self._footprint = footprint_of(self._data_source)
        return fp

    def estimate(self, positions: int, sessions: int = 1) -> int:
        """Resident bytes of this program with ``sessions`` sessions of ``positions``
        positions: weights, arenas and runtime once, KV per session at this program's
        policy capacity (and ``max_bytes``). See :mod:`lazykv.estimate`."""
        return self.footprint().estimate(positions, sessions, self.policy, self.max_bytes)

    def capacity(self, budget: int, positions: int) -> int:
        """How many sessions of ``positions`` positions fit in ``budget`` bytes with this
        program loaded (by :meth:`estimate`'s figures)."""
        return self.footprint().capacity(budget, positions, self.policy, self.max_bytes)

    # -- sessions --------------------------------------------------------------------

    def session(self):
        """A new conversation with its own KV storage (none allocated until needed,
        except under ``preallocate``)."""
        from lazykv.runtime_shim.session import Session

        return Session(self)

    def restore(self, path: Union[str, os.PathLike]):
        """A session restored from a file written by :meth:`Session.save`."""
        from lazykv.runtime_shim.session import Session

        return Session._restore(self, path)

    def __repr__(self) -> str:
        return (
            f"LazyProgram({self.source!r}, policy={self.policy.spec()!r}, "
            f"lazy_buffers={len(self.buffers)}, max_positions={self.max_positions})"
        )


def load(
    path_or_bytes: Union[str, os.PathLike, bytes, bytearray, memoryview],
    policy: Union[str, GrowthPolicy, None] = "doubling",
    max_bytes: Optional[int] = None,
    *,
    allocator: Optional[DynamicAllocator] = None,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    weight_cache: Optional[bool] = None,
) -> LazyProgram:
    """Load a ``.pte`` (lazy or not) on the stock ExecuTorch runtime.

    ``policy``: a :class:`GrowthPolicy` or its string (``doubling``, ``step:256``,
    ``hybrid``, ``preallocate``). ``max_bytes``: cap on each session's KV storage, in
    bytes or as a size string (``"64MiB"``, ``"64MB"``: :func:`lazykv.units.parse_size`);
    below one position's bytes it is refused (:class:`InvalidInput`).
    The program is verified in Python first, then read by lazykv's C++ runtime from the
    original file (or from ``path_or_bytes`` itself: a ``bytes`` object is kept, not
    copied), its lazy buffers rebound in memory: loading writes no copy of the program.
    Only the verified metadata (a few KB of JSON, keyed by the source's sha256) goes to
    ``cache_dir`` (default: lazykv's cache folder, :mod:`lazykv.disk_cache`:
    ``$LAZYKV_CACHE_DIR`` or ``~/.cache/lazykv``; nothing when
    ``$LAZYKV_CACHE_MAX_BYTES=0``), so the next load of the same file verifies nothing.
    Raises :class:`~lazykv.errors.NativeRuntimeMissing` (the fix: ``make venv``) when
    lazykv's native runtime was not built.
    ``weight_cache``: XNNPACK's weight cache (:mod:`lazykv.runtime_shim.weight_cache`)
    while this program's methods load. None (default): on for programs with several
    methods (their weights are then resident once), untouched for one method. True/False
    force it. Whenever it is set, every method is loaded now, inside that setting.
    """
    return LazyProgram(
        path_or_bytes, policy, max_bytes, allocator=allocator, cache_dir=cache_dir,
        weight_cache=weight_cache,
    )
