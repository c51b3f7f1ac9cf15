"""Sessions: one conversation's KV storage over a loaded program.

A session owns one tensor per lazy buffer, all at the same capacity (positions along
the growth axis), and passes them to the runtime after the user's inputs on every call
(DESIGN fact 5). It checks every input in Python first: a KV tensor of the wrong shape
aborts the process in C++, so the shim builds those itself and refuses anything odd
in the user's inputs before the runtime sees it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import struct
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Union

import torch

from lazykv.errors import (
    ContextOverflow,
    InvalidInput,
    LazyKVError,
    MemoryBudgetExceeded,
    SessionClosed,
    SessionFileError,
)
from lazykv.runtime_shim.allocator import TrackingAllocator

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
    session of 8 buffers growing once adds 8); ``peak_bytes`` includes the transient of
    a grow (old and new storage of one buffer alive together); ``bytes_copied`` is the
    prefix data moved by grows and shrinks.
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

    @property
    def ideal_bytes(self) -> int:
        """Bytes the filled positions alone need (the floor any policy can reach)."""
        return self.positions_filled * self.bytes_per_position

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["ideal_bytes"] = self.ideal_bytes
        return d


class Session:
    """One conversation. Use as a context manager, or call :meth:`close`."""

    def __init__(self, program) -> None:
        self.program = program
        self._alloc = TrackingAllocator(program.allocator)
        self._kv: Dict[str, Optional[torch.Tensor]] = {b.fqn: None for b in program.buffers}
        self._filled = 0
        self._closed = False
        if not program.lazy:
            program._sessions_open += 1
            if program._sessions_open > 1:
                logger.warning(
                    "%s has no lazy KV buffers: its sessions share the program's state",
                    program.source,
                )
        initial = program.policy.initial(program.max_positions, program.bytes_per_position)
        if program.lazy and initial:
            self._check_budget(initial, initial)
            self._resize(initial)

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
        if not self.program.lazy:
            return 0
        caps = []
        for b in self.program.buffers:
            t = self._kv[b.fqn]
            caps.append(0 if t is None else t.shape[b.growth_axis])
        return min(caps)

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
        )

    @property
    def closed(self) -> bool:
        return self._closed

    # -- running -----------------------------------------------------------------------

    def run(self, method: str, inputs: Sequence) -> List[torch.Tensor]:
        """Run ``method`` on the user's ``inputs`` (KV storage is supplied by the session).

        Raises :class:`InvalidInput`/:class:`UnknownMethod` for inputs the runtime would
        mishandle, :class:`ContextOverflow` past the exported bound and
        :class:`MemoryBudgetExceeded` past ``max_bytes``; all before the runtime is
        called, leaving the session as it was.
        """
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
        if not info.uses_lazy:
            return list(prog._method(method).execute(inputs))

        rule = prog.manifest.fill_rule(method)
        pos_t = inputs[rule.position_input]
        length_t = inputs[rule.length_input]
        if not isinstance(pos_t, torch.Tensor) or pos_t.numel() <= rule.position_index:
            raise InvalidInput(
                f"{method}: input {rule.position_input} (the start position) must be a tensor "
                f"with at least {rule.position_index + 1} element(s)"
            )
        if pos_t.dtype.is_floating_point or pos_t.dtype == torch.bool:
            raise InvalidInput(f"{method}: input {rule.position_input} (positions) must be integer")
        pos = int(pos_t.reshape(-1)[rule.position_index])
        length = int(length_t.shape[rule.length_axis])
        bound = min(b.max_positions for b in prog.buffers if b.fqn in info.lazy_fqns)
        if length < 1:
            raise InvalidInput(f"{method}: input {rule.length_input} holds no positions (length 0)")
        if pos != self._filled:
            raise InvalidInput(
                f"{method}: call starts at position {pos} but this session has filled "
                f"{self._filled}; positions must continue at {self._filled} (no gaps). To go "
                f"back, trim({self._filled - pos if pos < self._filled else 0}) or reset() first"
            )
        need = pos + length
        if need > bound:
            raise ContextOverflow(
                f"{method}: positions {pos}..{need - 1} go past the exported bound of {bound} "
                f"positions ({self._filled} filled, {bound - self._filled} left). Trim or reset "
                f"the session, or export with a larger max context"
            )
        self._ensure(need, bound)
        kv = []
        for fqn in info.lazy_fqns:
            t = self._kv[fqn]
            b = prog.manifest.buffer(fqn)
            # Our own invariant (a wrong KV shape aborts the process in C++).
            if (
                t is None
                or t.dtype != prog._dtypes[fqn]
                or tuple(t.shape) != b.shape_at(t.shape[b.growth_axis])
                or t.shape[b.growth_axis] < need
                or not t.is_contiguous()
            ):
                raise RuntimeError(f"lazykv bug: KV storage of {fqn!r} is not as planned")
            kv.append(t)
        out = prog._method(method).execute(inputs + kv)
        self._filled = need
        return list(out)

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

    def _resize(self, positions: int) -> None:
        """Every lazy buffer to ``positions`` (clamped to its bound), one at a time."""
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
            if old is None:
                self._kv[b.fqn] = self._alloc.allocate(shape, self.program._dtypes[b.fqn], name=b.fqn)
            else:
                keep = min(self._filled, p)
                # Drop our reference first so the old storage dies inside reallocate.
                self._kv[b.fqn] = None
                self._kv[b.fqn] = self._alloc.reallocate(
                    old, shape, keep=keep, axis=b.growth_axis, name=b.fqn
                )
                del old

    def reset(self) -> Freed:
        """Forget every position and give the storage back (``preallocate`` keeps its
        bound). Returns what was freed."""
        self._check_open()
        before, n = self.kv_bytes, self._filled
        self._filled = 0
        if self.program.lazy:
            self._resize(self.program.policy.initial(self.program.max_positions, self.program.bytes_per_position))
        return Freed(n, before - self.kv_bytes)

    def trim(self, n: int) -> Freed:
        """Drop the last ``n`` positions (clamped to those filled) and shrink the storage
        to what the policy holds for the rest (new, smaller tensors). Returns what was freed."""
        self._check_open()
        n = max(0, min(self._filled, int(n)))
        before = self.kv_bytes
        self._filled -= n
        if self.program.lazy:
            prog = self.program
            target = prog.policy.capacity(self._filled, prog.max_positions, prog.bytes_per_position)
            target = max(target, self._filled)
            if target < self.capacity:
                self._resize(target)
        return Freed(n, before - self.kv_bytes)

    def close(self) -> None:
        """Release this session's storage. Idempotent; later use raises SessionClosed."""
        if self._closed:
            return
        for fqn, t in list(self._kv.items()):
            if t is not None:
                self._kv[fqn] = None
                self._alloc.free(t, name=fqn)
                del t
        self._closed = True
        if not self.program.lazy:
            self.program._sessions_open -= 1

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise SessionClosed("this session was closed; open a new one with program.session()")

    # -- save / restore ----------------------------------------------------------------

    def save(self, path: Union[str, os.PathLike], metadata: Optional[Dict[str, str]] = None) -> int:
        """Write the filled prefix of every lazy buffer to ``path``; returns bytes written.

        The file records the program's sha256; :meth:`LazyProgram.restore` refuses it
        for any other program.
        """
        self._check_open()
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
        header = json.dumps(
            {
                "format": SESSION_FORMAT,
                "version": SESSION_VERSION,
                "program_sha256": prog.digest,
                "program_source": prog.source,
                "positions_filled": self._filled,
                "buffers": entries,
                "metadata": dict(metadata or {}),
            },
            sort_keys=True,
        ).encode()
        path = Path(path)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            f.write(SESSION_MAGIC + struct.pack("<Q", len(header)) + header)
            for b in prog.buffers:
                t = self._kv[b.fqn]
                if self._filled:
                    prefix = t.narrow(b.growth_axis, 0, self._filled).contiguous()
                    f.write(memoryview(prefix.view(torch.uint8).reshape(-1).numpy()))
            size = f.tell()
        os.replace(tmp, path)
        return size

    @classmethod
    def _restore(cls, program, path) -> "Session":
        path = Path(path)
        try:
            f = open(path, "rb")
        except OSError as e:
            raise SessionFileError(f"{path}: cannot open session file ({e.strerror})") from None
        with f:
            head = f.read(16)
            if len(head) < 16 or head[:8] != SESSION_MAGIC:
                raise SessionFileError(f"{path}: not a lazykv session file")
            (hlen,) = struct.unpack("<Q", head[8:])
            raw = f.read(hlen)
            try:
                h = json.loads(raw)
                assert isinstance(h, dict)
            except Exception:
                raise SessionFileError(f"{path}: session header is corrupt or truncated") from None
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
            for b in program.buffers:
                e = by_fqn[b.fqn]
                if (e.get("dtype") != b.dtype or tuple(e.get("shape", ())) != b.shape_at(filled)
                        or e.get("nbytes") != b.bytes_per_position * filled):
                    raise SessionFileError(f"{path}: buffer {b.fqn!r} does not match the program")
            s = cls(program)
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
                        if tmp is not dst:
                            dst.copy_(tmp)
                s._filled = filled
            except BaseException:
                s.close()
                raise
            return s

    def __repr__(self) -> str:
        st = "closed" if self._closed else f"{self._filled}/{self.capacity} positions, {self.kv_bytes} bytes"
        return f"Session({st})"


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
