"""Sessions: one conversation's KV storage over a loaded program.

A session owns one tensor per lazy buffer, all at the same capacity (positions along
the growth axis), and passes them to the runtime after the user's inputs on every call
(DESIGN fact 5). It checks every input in Python first: a KV tensor of the wrong shape
aborts the process in C++, so the shim builds those itself and refuses anything odd
in the user's inputs before the runtime sees it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import struct
import threading
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Union

import torch

from lazykv.errors import (
    AllocationFailed,
    ContextOverflow,
    InvalidInput,
    LazyKVError,
    MemoryBudgetExceeded,
    SessionClosed,
    SessionFileError,
)
from lazykv.output_path import atomic_write, check_output_path
from lazykv.runtime_shim.allocator import TrackingAllocator
from lazykv.runtime_shim.fast_call import FastCall

logger = logging.getLogger(__name__)

SESSION_MAGIC = b"LKVSESS\x00"
SESSION_FORMAT = "lazykv-session"
SESSION_VERSION = 1


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
                    # execute shows in a small model's decode step (fast_call.py).
                    prog = self.program
                    try:
                        with prog._lock:
                            out = fast.execute([*inputs, *fast.kv])
                    except RuntimeError as e:
                        raise prog._execution_error(e, method) from None
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
        rule, bound = prog.fill_plan(method)
        kv = [self._kv[fqn] for fqn in info.lazy_fqns]
        if any(t is None for t in kv):
            return None
        m = prog._method(method)
        # executorch.runtime.Method.execute is one line, ``return self._method(inputs)``
        # (executorch 1.5.1); calling the pybind method it wraps saves a Python frame per
        # call, worth ~3 % of a tiny model's decode step (benchmarks, decode case).
        execute = getattr(m, "_method", None)
        if not callable(execute):
            execute = m.execute
        return FastCall.build(info, rule, bound, prog.limits.get(method), kv, self._capacity, execute)

    def _run(self, method: str, inputs: Sequence) -> List[torch.Tensor]:
        self._check_open()
        prog = self.program
        info = prog.method_info(method)
        if isinstance(inputs, torch.Tensor) or not isinstance(inputs, (list, tuple)):
            raise InvalidInput(
                f"{method}: inputs must be a list of the method's inputs "
                f"({_describe(info)}), got {type(inputs).__name__}"
            )
        inputs = list(inputs)
        _validate(method, info, inputs)
        limits = prog.limits.get(method)
        if limits is not None:
            _check_tokens(method, limits, inputs)
        if not info.uses_lazy:
            # A program without lazy buffers keeps its KV cache inside the runtime; the
            # graph still says which input is the start position (pte_file.method_limits).
            span = None
            if limits is not None and limits.position_input is not None and limits.length_input is not None:
                bound = limits.max_positions
                span = self._check_positions(
                    method, inputs, limits.position_input, limits.position_index,
                    limits.length_input, limits.length_axis, bound,
                )
            out = prog._execute(method, inputs)
            if span is not None:
                self._filled = span
            return out

        rule, bound = prog.fill_plan(method)
        need = self._check_positions(
            method, inputs, rule.position_input, rule.position_index, rule.length_input,
            rule.length_axis, bound,
        )
        self._ensure(need, bound)
        # Every tensor in _kv was checked by _resize when it was installed (shape, dtype,
        # contiguity: a wrong KV shape aborts the process in C++, DESIGN fact 5), and
        # _ensure made every one hold `need` positions; this per-call path stays cheap.
        if self._capacity < need:
            raise RuntimeError(f"lazykv bug: KV storage holds {self._capacity} < {need} positions")
        kv = self._kv
        out = prog._execute(method, inputs + [kv[fqn] for fqn in info.lazy_fqns])
        self._filled = need
        return out

    def _check_positions(self, method, inputs, pos_i, pos_k, len_i, len_axis, bound) -> int:
        """The positions a call fills, after checking they continue this session and
        stay inside ``bound``; returns the positions filled after the call."""
        pos_t = inputs[pos_i]
        length_t = inputs[len_i]
        if not isinstance(pos_t, torch.Tensor) or pos_t.numel() <= pos_k:
            raise InvalidInput(
                f"{method}: input {pos_i} (the start position) must be a tensor "
                f"with at least {pos_k + 1} element(s)"
            )
        if pos_t.dtype.is_floating_point or pos_t.dtype == torch.bool:
            raise InvalidInput(f"{method}: input {pos_i} (positions) must be integer")
        pos = int(pos_t) if pos_t.numel() == 1 else int(pos_t.reshape(-1)[pos_k])
        length = int(length_t.shape[len_axis])
        if length < 1:
            raise InvalidInput(f"{method}: input {len_i} holds no positions (length 0)")
        if pos != self._filled:
            raise InvalidInput(f"{method}: {_position_advice(pos, self._filled)}")
        need = pos + length
        if bound is not None and need > bound:
            raise ContextOverflow(
                f"{method}: positions {pos}..{need - 1} go past the exported bound of {bound} "
                f"positions ({self._filled} filled, {bound - self._filled} left). Trim or reset "
                f"the session, or export with a larger max context"
            )
        return need

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

    # -- save / restore ----------------------------------------------------------------

    @_locked
    def save(self, path: Union[str, os.PathLike], metadata: Optional[Dict[str, str]] = None) -> int:
        """Write the filled prefix of every lazy buffer to ``path``; returns bytes written.

        The file records the program's sha256; :meth:`LazyProgram.restore` refuses it
        for any other program. ``path`` must be a new or regular file in a writable
        folder, else :class:`~lazykv.output_path.OutputPathError` (checked before any
        work); it is replaced atomically.
        """
        self._check_open()
        check_output_path(path, "the session file")
        prog = self.program
        if not prog.lazy:
            raise LazyKVError(
                f"{prog.source} has no lazy KV buffers: its state lives inside the runtime "
                f"and cannot be saved; export it with lazykv to save sessions"
            )
        entries, offset = [], 0
        for b in prog.buffers:
            shape = b.shape_at(self._filled)
            nb = b.bytes_per_position * self._filled
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
            if self._filled:
                prefix = self._kv[b.fqn].narrow(b.growth_axis, 0, self._filled).contiguous()
                view = memoryview(prefix.view(torch.uint8).reshape(-1).numpy())
                digest.update(view)
                prefixes.append(view)
        header = json.dumps(
            {
                "format": SESSION_FORMAT,
                "version": SESSION_VERSION,
                "program_sha256": prog.digest,
                "program_source": prog.source,
                "positions_filled": self._filled,
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
                return cls._restore_from(program, path, f, h, hlen, size, exact)
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise SessionFileError(
                    f"{path}: session header is malformed ({type(e).__name__}: {e})"
                ) from None

    @classmethod
    def _restore_from(cls, program, path, f, h: dict, hlen: int, size: int, exact: bool = False) -> "Session":
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
        want = h.get("payload_sha256")  # absent in files from before the checksum
        digest = hashlib.sha256()
        s = cls(program, _allocate=not exact)
        try:
            if filled:
                bound = program.max_positions
                target = filled if exact else program.policy.capacity(filled, bound, program.bytes_per_position)
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

    def __repr__(self) -> str:
        st = "closed" if self._closed else f"{self._filled}/{self.capacity} positions, {self.kv_bytes} bytes"
        return f"Session({st})"


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


def _position_advice(pos: int, filled: int) -> str:
    """Why a call starting at ``pos`` cannot run in a session with ``filled`` positions,
    and what to do instead."""
    if pos < 0:
        return f"call starts at position {pos}; positions are >= 0 (this session has filled {filled})"
    if pos > filled:
        where = "nothing yet" if filled == 0 else f"positions 0..{filled - 1}"
        return (f"call starts at position {pos} but this session has filled {where}; "
                f"positions must continue at {filled} (no gaps): start this call at {filled}")
    return (f"call starts at position {pos} but this session has filled {filled}; positions "
            f"must continue at {filled}: to redo from position {pos}, call trim({filled - pos}) "
            f"first (or reset() to start over)")


def _describe(info) -> str:
    return ", ".join(s.describe() for s in info.inputs) or "no inputs"


def _validate(method: str, info, inputs: list) -> None:
    if len(inputs) != len(info.inputs):
        raise InvalidInput(
            f"{method} takes {len(info.inputs)} input(s) ({_describe(info)}), got {len(inputs)}"
            + ("; pass the user inputs only, the session supplies the KV cache" if info.uses_lazy else "")
        )
    for spec, x in zip(info.inputs, inputs):
        where = f"{method}: input {spec.index}"
        if spec.kind == "tensor":
            if not isinstance(x, torch.Tensor):
                raise InvalidInput(f"{where} must be a tensor {spec.describe()}, got {type(x).__name__}")
            if spec.dtype is not None and x.dtype != spec.dtype:
                raise InvalidInput(f"{where} must be {spec.describe()}, got dtype {x.dtype}")
            if x.dim() != len(spec.sizes):
                raise InvalidInput(
                    f"{where} must have {len(spec.sizes)} dims ({spec.describe()}), got shape {list(x.shape)}"
                )
            if spec.dynamic:
                if any(d > m for d, m in zip(x.shape, spec.sizes)):
                    raise InvalidInput(f"{where} must be {spec.describe()}, got shape {list(x.shape)}")
            elif tuple(x.shape) != spec.sizes:
                raise InvalidInput(f"{where} must be {spec.describe()}, got shape {list(x.shape)}")
            if x.device.type != "cpu":
                raise InvalidInput(f"{where} must be on the CPU, got {x.device}")
            if not x.is_contiguous():
                raise InvalidInput(f"{where} must be contiguous; call .contiguous() first")
            if x.requires_grad:
                raise InvalidInput(f"{where} requires grad; pass x.detach()")
        elif spec.kind == "int":
            if isinstance(x, bool) or not isinstance(x, int):
                raise InvalidInput(f"{where} must be an int, got {type(x).__name__}")
        elif spec.kind == "float":
            if not isinstance(x, (int, float)) or isinstance(x, bool):
                raise InvalidInput(f"{where} must be a float, got {type(x).__name__}")
        elif spec.kind == "bool":
            if not isinstance(x, bool):
                raise InvalidInput(f"{where} must be a bool, got {type(x).__name__}")


def _check_tokens(method: str, limits, inputs: list) -> None:
    """Token ids must index the embedding table: the runtime refuses others only after
    a kernel fails mid-call."""
    for i, vocab in limits.token_inputs:
        if i >= len(inputs) or not isinstance(inputs[i], torch.Tensor):
            continue
        t = inputs[i]
        if t.numel() == 0 or t.dtype.is_floating_point or t.dtype == torch.bool:
            continue
        if t.numel() == 1:  # a decode step: one token, one read
            lo = hi = int(t)
        else:
            lo, hi = (int(v) for v in torch.aminmax(t))
        if lo < 0 or hi >= vocab:
            bad = lo if lo < 0 else hi
            raise InvalidInput(
                f"{method}: input {i} holds token id {bad}, outside the vocabulary "
                f"[0, {vocab}) of the program's embedding table"
            )
