"""Sessions: one conversation's KV storage over a loaded program.

A session owns one tensor per lazy buffer, all at the same capacity (positions along
the growth axis), and passes them to the runtime after the user's inputs on every call
(DESIGN fact 5). It checks every input in Python first
(:meth:`lazykv.runtime_shim.inputs.MethodInfo.check`, or its precomputed form
:class:`~lazykv.runtime_shim.inputs.FastCall` for repeated calls): a KV tensor of the
wrong shape aborts the process in C++, so the shim builds those itself and refuses
anything odd in the user's inputs before the runtime sees it. The session file format
(:meth:`Session.save`, :meth:`LazyProgram.restore`) is in
:mod:`lazykv.runtime_shim.session_file`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import threading
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Union

import torch

from lazykv.errors import (
    AllocationFailed,
    InvalidInput,
    LazyKVError,
    MemoryBudgetExceeded,
    SessionClosed,
    SessionFileError,
)
from lazykv.output_path import check_output_path
from lazykv.runtime_shim import session_file
from lazykv.runtime_shim.allocator import TrackingAllocator
from lazykv.runtime_shim.inputs import FastCall

logger = logging.getLogger(__name__)


class Freed(NamedTuple):
    """What ``trim``/``reset`` gave back: positions dropped and bytes of storage released."""

    positions: int
    bytes: int


@dataclasses.dataclass(frozen=True)
class SessionStats:
    """A snapshot of a session's KV storage (bytes are of the lazy buffers only).

    ``grow_events`` counts buffer allocations and enlargements (one per buffer: a
    session of 8 buffers growing once adds 8); ``grows`` counts enlargements of the
    session's storage (all its buffers at once count once); ``peak_bytes`` includes the
    transient of a grow (old and new storage of one buffer alive together);
    ``bytes_copied`` is the prefix data moved by grows and shrinks, and copied in by
    :meth:`Session.fork`.
    """

    current_bytes: int
    peak_bytes: int
    grow_events: int
    shrink_events: int
    bytes_copied: int
    positions_filled: int
    capacity_positions: int
    max_positions: int
    bytes_per_position: int
    allocations: int
    frees: int
    grows: int = 0

    @property
    def ideal_bytes(self) -> int:
        """Bytes the filled positions alone need (the floor any policy can reach)."""
        return self.positions_filled * self.bytes_per_position

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["ideal_bytes"] = self.ideal_bytes
        return d


def _locked(fn):
    """Run the method under the session's lock."""

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            return fn(self, *args, **kwargs)

    return wrapper


class Session:
    """One conversation. Use as a context manager, or call :meth:`close`."""

    def __init__(self, program, *, _allocate: bool = True) -> None:
        # _allocate=False: no initial storage even under ``preallocate`` (a fork or a
        # prompt-cache entry sizes its storage itself).
        self.program = program
        self._alloc = TrackingAllocator(program.allocator)
        self._kv: Dict[str, Optional[torch.Tensor]] = {b.fqn: None for b in program.buffers}
        self._filled = 0
        self._capacity = 0  # min positions over the lazy buffers; kept by _resize
        self._grows = 0  # storage enlargements (all buffers together count once)
        # method -> FastCall (or None: not eligible); dropped whenever the storage changes.
        self._fast: Dict[str, Optional[FastCall]] = {}
        self._closed = False
        # One call at a time per session (run, trim, reset, save, close).
        self._lock = threading.RLock()
        if not program.lazy:
            program._sessions_open += 1
            if program._sessions_open > 1:
                logger.warning(
                    "%s has no lazy KV buffers: its sessions share the program's state",
                    program.source,
                )
        initial = program.policy.initial(program.max_positions, program.bytes_per_position)
        if program.lazy and initial and _allocate:
            self._check_budget(initial, initial)
            self._resize(initial)
            self._grows += 1

    # -- mlx-lm style surface ----------------------------------------------------------

    @property
    def offset(self) -> int:
        """Positions filled so far (the next call must start here)."""
        return self._filled

    @property
    def kv_bytes(self) -> int:
        """Bytes of KV storage this session holds now."""
        return sum(t.numel() * t.element_size() for t in self._kv.values() if t is not None)

    nbytes = kv_bytes

    @property
    def capacity(self) -> int:
        """Positions the storage holds now (without growing)."""
        return self._capacity

    def _measure_capacity(self) -> int:
        if not self.program.lazy:
            return 0
        return min(
            0 if self._kv[b.fqn] is None else self._kv[b.fqn].shape[b.growth_axis]
            for b in self.program.buffers
        )

    @property
    def state(self) -> Dict[str, torch.Tensor]:
        """The filled prefix of each lazy buffer (views, no copies)."""
        out = {}
        for b in self.program.buffers:
            t = self._kv[b.fqn]
            if t is not None:
                out[b.fqn] = t.narrow(b.growth_axis, 0, self._filled)
        return out

    @property
    def stats(self) -> SessionStats:
        a = self._alloc
        return SessionStats(
            current_bytes=self.kv_bytes,
            peak_bytes=a.peak_bytes,
            grow_events=a.grow_events + a.allocations,
            shrink_events=a.shrink_events,
            bytes_copied=a.bytes_copied,
            positions_filled=self._filled,
            capacity_positions=self.capacity,
            max_positions=self.program.max_positions,
            bytes_per_position=self.program.bytes_per_position,
            allocations=a.allocations,
            frees=a.frees,
            grows=self._grows,
        )

    @property
    def allocator(self) -> TrackingAllocator:
        """The tracking allocator that owns this session's KV storage (its counters:
        ``current_bytes``, ``peak_bytes``, ``grow_events``, ``bytes_copied``...)."""
        return self._alloc

    @property
    def closed(self) -> bool:
        return self._closed

    # -- running -----------------------------------------------------------------------

    def run(self, method: str, inputs: Sequence) -> List[torch.Tensor]:
        """Run ``method`` on the user's ``inputs`` (KV storage is supplied by the session).

        Raises :class:`InvalidInput`/:class:`UnknownMethod` for inputs the runtime would
        mishandle (shapes, dtypes, token ids outside the vocabulary, positions that skip),
        :class:`ContextOverflow` past the exported bound and :class:`MemoryBudgetExceeded`
        past ``max_bytes``; all before the runtime is called, leaving the session as it
        was. :class:`ExecutionFailed` if the runtime itself reports an error (the session
        is unchanged then too). Safe to call from several threads: one call at a time per
        session, one execute at a time per program.
        """
        with self._lock:
            fast = self._fast.get(method)
            if fast is not None:
                need = fast.positions_after(inputs, self._filled)
                if need:
                    # program._execute inlined: each Python frame before the runtime's
                    # execute shows in a small model's decode step (inputs.py). The KV
                    # storage is bound to fast.execute (and stays bound in C++).
                    with self.program._lock:
                        out = fast.execute(inputs)
                    self._filled = need
                    return out
                # Drop it before the full path: a grow there must free the old storage
                # that fast.kv still references (else the whole old cache stays alive).
                fast = None
            out = self._run(method, inputs)
            if method not in self._fast and not self._closed:
                self._fast[method] = self._build_fast(method)
            return out

    def _build_fast(self, method: str) -> Optional[FastCall]:
        prog = self.program
        info = prog.method_info(method)
        if not info.uses_lazy:
            return None
        kv = [self._kv[fqn] for fqn in info.lazy_fqns]
        if any(t is None for t in kv):
            return None
        return FastCall.build(info, kv, self._capacity, prog._method(method).bind(kv))

    def _run(self, method: str, inputs: Sequence) -> List[torch.Tensor]:
        self._check_open()
        prog = self.program
        info = prog.method_info(method)
        inputs, need = info.check(inputs, self._filled)
        if not info.uses_lazy:
            # A program without lazy buffers keeps its KV cache inside the runtime; the
            # graph still says which input is the start position (MethodInfo.positions).
            out = prog._execute(method, inputs)
            if need is not None:
                self._filled = need
            return out
        self._ensure(need, info.bound)
        # Every tensor in _kv was checked by _resize when it was installed (shape, dtype,
        # contiguity: a wrong KV shape aborts the process in C++, DESIGN fact 5), and
        # _ensure made every one hold `need` positions; this per-call path stays cheap.
        if self._capacity < need:
            raise RuntimeError(f"lazykv bug: KV storage holds {self._capacity} < {need} positions")
        kv = self._kv
        out = prog._execute(method, inputs + [kv[fqn] for fqn in info.lazy_fqns])
        self._filled = need
        return out

    __call__ = run

    # -- growth ------------------------------------------------------------------------

    def _check_budget(self, need: int, target: int) -> int:
        mb = self.program.max_bytes
        bpp = self.program.bytes_per_position
        if mb is None or bpp == 0:
            return target
        afford = mb // bpp
        if need > afford:
            raise MemoryBudgetExceeded(
                f"holding {need} positions needs {need * bpp} bytes of KV storage "
                f"({bpp} per position) but max_bytes is {mb} ({afford} positions); "
                f"trim or reset the session, or raise max_bytes"
            )
        return min(target, afford)

    def _ensure(self, need: int, bound: int) -> None:
        cap = self.capacity
        if need <= cap:
            return
        prog = self.program
        target = prog.policy.capacity(need, bound, prog.bytes_per_position)
        target = max(min(max(target, cap), bound), need)
        target = self._check_budget(need, target)
        self._resize(target)
        self._grows += 1

    def _resize(self, positions: int) -> None:
        """Every lazy buffer to ``positions`` (clamped to its bound), one at a time."""
        self._fast.clear()  # their storage lists and capacities are about to change
        try:
            self._resize_each(positions)
        finally:  # also after a failure part-way: some buffers may have grown
            self._capacity = self._measure_capacity()

    def _resize_each(self, positions: int) -> None:
        for b in self.program.buffers:
            old = self._kv[b.fqn]
            p = min(positions, b.max_positions)
            if old is not None and old.shape[b.growth_axis] == p:
                continue
            if p == 0:
                if old is not None:
                    self._kv[b.fqn] = None
                    self._alloc.free(old, name=b.fqn)
                    del old
                continue
            shape = b.shape_at(p)
            dtype = self.program._dtypes[b.fqn]
            # Drop our reference first so the old storage dies inside reallocate; put it
            # back if the allocator fails, so the session keeps its state.
            self._kv[b.fqn] = None
            try:
                if old is None:
                    new = self._alloc.allocate(shape, dtype, name=b.fqn)
                else:
                    new = self._alloc.reallocate(
                        old, shape, keep=min(self._filled, p), axis=b.growth_axis, name=b.fqn
                    )
            except LazyKVError:
                self._kv[b.fqn] = old
                raise
            except Exception as e:  # MemoryError, torch's RuntimeError, mmap's OSError
                self._kv[b.fqn] = old
                raise AllocationFailed(
                    f"growing KV buffer {b.fqn!r} to {p} positions "
                    f"({b.bytes_per_position * p} bytes) failed ({type(e).__name__}: {e}); "
                    f"the session is unchanged. Free memory (trim, reset or close sessions) "
                    f"or set max_bytes"
                ) from None
            # A KV tensor of the wrong shape aborts the process in C++ (DESIGN fact 5).
            if (not isinstance(new, torch.Tensor) or tuple(new.shape) != tuple(shape)
                    or new.dtype != dtype or not new.is_contiguous() or new.device.type != "cpu"):
                self._kv[b.fqn] = old
                if isinstance(new, torch.Tensor):
                    self._alloc.free(new, name=b.fqn)
                got = (f"{tuple(new.shape)} {new.dtype} on {new.device}"
                       f"{'' if new.is_contiguous() else ', not contiguous'}"
                       if isinstance(new, torch.Tensor) else type(new).__name__)
                raise AllocationFailed(
                    f"the allocator {type(self.program.allocator).__name__} returned {got} "
                    f"for KV buffer {b.fqn!r}; it must return a contiguous CPU tensor "
                    f"{tuple(shape)} {dtype}. The session is unchanged"
                )
            self._kv[b.fqn] = new
            del old

    @_locked
    def reset(self) -> Freed:
        """Forget every position and give the storage back (``preallocate`` keeps its
        bound). Returns what was freed."""
        self._check_open()
        before, n = self.kv_bytes, self._filled
        self._filled = 0
        if self.program.lazy:
            self._resize(self.program.policy.initial(self.program.max_positions, self.program.bytes_per_position))
        return Freed(n, before - self.kv_bytes)

    @_locked
    def trim(self, n: int) -> Freed:
        """Drop the last ``n`` positions and shrink the storage to what the policy holds
        for the rest (new, smaller tensors). Returns what was freed.

        ``n`` larger than the positions filled drops them all, with a ``UserWarning``
        saying so; a negative or non-integer ``n`` raises :class:`InvalidInput`."""
        self._check_open()
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise InvalidInput(
                f"trim(n): n is the number of positions to drop, an int >= 0; got {n!r} "
                f"({self._filled} filled)"
            )
        if n > self._filled:
            import warnings

            warnings.warn(
                f"trim({n}): only {self._filled} positions are filled; dropped them all",
                UserWarning, stacklevel=3,
            )
            n = self._filled
        before = self.kv_bytes
        self._filled -= n
        if self.program.lazy:
            prog = self.program
            target = prog.policy.capacity(self._filled, prog.max_positions, prog.bytes_per_position)
            target = max(target, self._filled)
            if target < self.capacity:
                self._resize(target)
        return Freed(n, before - self.kv_bytes)

    @_locked
    def close(self) -> None:
        """Release this session's storage. Idempotent; later use raises SessionClosed."""
        if self._closed:
            return
        for fqn, t in list(self._kv.items()):
            if t is not None:
                self._kv[fqn] = None
                self._alloc.free(t, name=fqn)
                del t
        self._capacity = 0
        self._fast.clear()
        self._closed = True
        if not self.program.lazy:
            self.program._sessions_open -= 1

    # -- fork --------------------------------------------------------------------------

    @_locked
    def fork(self, positions: Optional[int] = None) -> "Session":
        """A new session holding a copy of this one's first ``positions`` filled positions
        (default: all of them), independent of this one from then on.

        Its storage is what the policy holds for ``positions`` (clamped to the exported
        bound and to ``max_bytes``), from the program's allocator; only the filled prefix
        is copied (counted in the new session's ``stats.bytes_copied``). Any method of
        the program can continue it at position ``positions``. Raises
        :class:`InvalidInput` for ``positions`` outside ``0..offset``,
        :class:`MemoryBudgetExceeded` past ``max_bytes``, :class:`AllocationFailed` when
        storage cannot be had, :class:`SessionClosed`, and :class:`LazyKVError` for a
        program without lazy KV buffers (its state lives inside the runtime). This session
        is unchanged whatever happens, and a failed fork leaves nothing allocated.
        """
        return self._fork(positions, exact=False)

    def _fork(self, positions: Optional[int], *, exact: bool) -> "Session":
        """:meth:`fork` under the caller's lock; ``exact`` holds exactly ``positions``
        positions instead of the policy's capacity (a prompt-cache entry)."""
        self._check_open()
        prog = self.program
        if not prog.lazy:
            raise LazyKVError(
                f"{prog.source} has no lazy KV buffers: its state lives inside the runtime "
                f"and cannot be forked; export it with lazykv to fork sessions"
            )
        n = self._filled if positions is None else positions
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= self._filled:
            raise InvalidInput(
                f"fork(positions={positions!r}): positions must be an int from 0 to the "
                f"{self._filled} this session has filled"
            )
        child = Session(prog, _allocate=not exact)
        try:
            if n:
                bound = prog.max_positions
                target = n if exact else max(min(prog.policy.capacity(n, bound, prog.bytes_per_position), bound), n)
                target = child._check_budget(n, target)
                if target != child._capacity:
                    child._resize(target)
                for b in prog.buffers:
                    src = self._kv[b.fqn].narrow(b.growth_axis, 0, n)
                    child._kv[b.fqn].narrow(b.growth_axis, 0, n).copy_(src)
                    child._alloc.record_copy(b.bytes_per_position * n, name=b.fqn)
                child._filled = n
        except AllocationFailed as e:
            child.close()
            raise AllocationFailed(f"fork of {n} positions: {e}") from None
        except BaseException:
            child.close()
            raise
        return child

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise SessionClosed("this session was closed; open a new one with program.session()")

    # -- save / restore (the file format: session_file.py) ------------------------------

    @_locked
    def save(self, path: Union[str, os.PathLike], metadata: Optional[Dict[str, str]] = None) -> int:
        """Write the filled prefix of every lazy buffer to ``path``; returns bytes written.

        The file records the program's sha256; :meth:`LazyProgram.restore` refuses it
        for any other program (:mod:`lazykv.runtime_shim.session_file`). ``path`` must be
        a new or regular file in a writable folder, else
        :class:`~lazykv.output_path.OutputPathError` (checked before any work); it is
        replaced atomically.
        """
        self._check_open()
        check_output_path(path, "the session file")
        prog = self.program
        if not prog.lazy:
            raise LazyKVError(
                f"{prog.source} has no lazy KV buffers: its state lives inside the runtime "
                f"and cannot be saved; export it with lazykv to save sessions"
            )
        # Views, no copies unless a prefix is not contiguous.
        prefixes = [
            memoryview(self._kv[b.fqn].narrow(b.growth_axis, 0, self._filled).contiguous()
                       .view(torch.uint8).reshape(-1).numpy())
            for b in prog.buffers
        ] if self._filled else []
        return session_file.write_session(path, prog, self._filled, prefixes, metadata)

    @classmethod
    def _restore(cls, program, path, *, exact: bool = False) -> "Session":
        """A session read from ``path``; ``exact`` holds exactly its positions instead of
        the policy's capacity (a prompt-cache entry)."""
        path = Path(path)
        try:
            f = open(path, "rb")
        except OSError as e:
            raise SessionFileError(f"{path}: cannot open session file ({e.strerror})") from None
        with f:
            header = session_file.read_header(f, path, program)
            return cls._restore_from(program, path, f, header, exact)

    @classmethod
    def _restore_from(cls, program, path, f, header, exact: bool) -> "Session":
        filled = header.filled
        digest = hashlib.sha256()
        s = cls(program, _allocate=not exact)
        try:
            if filled:
                bound = program.max_positions
                target = filled if exact else program.policy.capacity(filled, bound, program.bytes_per_position)
                s._resize(s._check_budget(filled, max(min(target, bound), filled)))
                for b in program.buffers:
                    e = header.buffers[b.fqn]
                    dst = s._kv[b.fqn].narrow(b.growth_axis, 0, filled)
                    tmp = dst if dst.is_contiguous() else torch.empty(dst.shape, dtype=dst.dtype)
                    f.seek(header.payload_at + int(e["offset"]))
                    buf = tmp.view(torch.uint8).reshape(-1).numpy()
                    if f.readinto(memoryview(buf)) != e["nbytes"]:
                        raise SessionFileError(f"{path}: truncated session file")
                    digest.update(memoryview(buf))
                    if tmp is not dst:
                        dst.copy_(tmp)
            if header.payload_sha256 is not None and digest.hexdigest() != header.payload_sha256:
                raise SessionFileError(
                    f"{path}: session data is corrupt (its sha256 does not match the one "
                    f"recorded when it was saved)"
                )
            s._filled = filled
        except BaseException:
            s.close()
            raise
        return s

    def __repr__(self) -> str:
        st = "closed" if self._closed else f"{self._filled}/{self.capacity} positions, {self.kv_bytes} bytes"
        return f"Session({st})"

