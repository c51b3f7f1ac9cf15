"""Memory a program will take, known from its file before it is loaded.

A loaded program costs, once, its weights (the constant segment and the delegates'
named data: XNNPACK packs the latter into memory of its own, the former is read in
place), its planned arenas, and the runtime's own working memory; then each session
costs its KV storage: the policy's capacity for the positions it holds, times the bytes
one position takes. ``footprint_of(path).estimate(positions, sessions, policy)`` is that
sum; ``LazyProgram.estimate`` and ``lazykv inspect`` give the same figures.

The runtime's own memory (:data:`RUNTIME_BYTES`) is a constant measured on this
project's machine (x86-64, ExecuTorch 1.5.1, XNNPACK, 2 threads): resident growth after
the first calls, less weights, arenas and KV. Nearly all of it is file pages of the
shared libraries' code: the kernels' pages mapped as they first run, plus whatever
neighbouring pages of those files the page cache holds (the kernel maps them along with
each fault). Since loading a program stopped importing ExecuTorch's export stack (no
torchao, no exir passes) it is 8-12 MiB for the tiny Llama (before: 14-24 MiB, most of
the difference the export stack's own libraries), but ~25 MiB right after the libraries
were installed, while the page cache still holds all of their pages (the kernel then maps
more neighbours per fault). The constant is 12 MiB, an app installed a while ago; XNNPACK's
workspace is under 2 MiB of it. So the estimate is good to a few MiB whatever the
program: about 5-10 % of the tiny Llama's ~33-37 MiB, 1 % of stories110m's ~600 MiB.

Weights are counted once: a program with several methods is loaded with XNNPACK's
weight cache on (:mod:`lazykv.runtime_shim.weight_cache`), else each method would pack
its own copy.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Union

from lazykv.errors import ContextOverflow, InvalidInput, MemoryBudgetExceeded

#: The runtime's resident memory beyond weights, arenas and KV (see the module doc).
RUNTIME_BYTES = 12 << 20


@dataclasses.dataclass(frozen=True)
class Footprint:
    """What a program's memory is made of, from its file.

    ``weights_bytes``: constant segment + delegates' named data; ``planned_bytes``: the
    planned arenas (for a static program they include its KV cache); ``runtime_bytes``:
    :data:`RUNTIME_BYTES`; ``bytes_per_position``: KV bytes one position takes in one
    session (0 for a program without lazy KV buffers); ``max_positions``: the exported
    bound (0 without lazy buffers).
    """

    weights_bytes: int
    planned_bytes: int
    bytes_per_position: int
    max_positions: int
    runtime_bytes: int = RUNTIME_BYTES

    @property
    def lazy(self) -> bool:
        """Whether sessions own KV storage (else they share the program's planned state)."""
        return self.bytes_per_position > 0

    @property
    def fixed_bytes(self) -> int:
        """Bytes paid once, whatever the sessions: weights, arenas, runtime."""
        return self.weights_bytes + self.planned_bytes + self.runtime_bytes

    def session_bytes(self, positions: int, policy=None, max_bytes: Optional[int] = None) -> int:
        """KV bytes one session holding ``positions`` positions takes: the capacity
        ``policy`` (a :class:`lazykv.runtime_shim.GrowthPolicy`; None = exactly
        ``positions``) holds for them, clamped to the bound and to ``max_bytes``.
        Raises :class:`ContextOverflow` past the exported bound and
        :class:`MemoryBudgetExceeded` past ``max_bytes``, as a session would."""
        _count("positions", positions)
        if not self.lazy:
            return 0
        if positions > self.max_positions:
            raise ContextOverflow(
                f"{positions} positions are past the exported bound of {self.max_positions}; "
                f"estimate at most {self.max_positions}, or export with a larger max context"
            )
        bpp = self.bytes_per_position
        cap = positions if policy is None else policy.capacity(positions, self.max_positions, bpp)
        cap = max(min(cap, self.max_positions), positions)
        if max_bytes is not None:
            if positions * bpp > max_bytes:
                raise MemoryBudgetExceeded(
                    f"{positions} positions need {positions * bpp} bytes of KV storage "
                    f"({bpp} per position) but max_bytes is {max_bytes}"
                )
            cap = min(cap, max_bytes // bpp)
        return cap * bpp

    def estimate(self, positions: int, sessions: int = 1, policy=None,
                 max_bytes: Optional[int] = None) -> int:
        """Resident bytes of the loaded program with ``sessions`` sessions of
        ``positions`` positions each: :attr:`fixed_bytes` once, :meth:`session_bytes`
        per session (sessions of a program without lazy KV buffers share its state)."""
        _count("sessions", sessions)
        return self.fixed_bytes + sessions * self.session_bytes(positions, policy, max_bytes)

    def capacity(self, budget: int, positions: int, policy=None,
                 max_bytes: Optional[int] = None) -> int:
        """How many sessions of ``positions`` positions fit in ``budget`` bytes with the
        program loaded (0 if the program alone does not fit). A program without lazy
        KV buffers holds one conversation at a time: 1 if it fits."""
        _count("budget", budget)
        per = self.session_bytes(positions, policy, max_bytes)
        room = budget - self.fixed_bytes
        if room < 0:
            return 0
        if per == 0:
            return 1
        return room // per

    def as_json(self) -> dict:
        """The figures ``lazykv inspect`` reports (bytes)."""
        at_max = self.session_bytes(self.max_positions)
        return {
            "weights_bytes": self.weights_bytes,
            "planned_bytes": self.planned_bytes,
            "runtime_bytes": self.runtime_bytes,
            "fixed_bytes": self.fixed_bytes,
            "kv_bytes_per_position": self.bytes_per_position,
            "kv_bytes_per_session_at_max_context": at_max,
            "one_session_at_max_context": self.fixed_bytes + at_max,
        }


def _count(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise InvalidInput(f"{name} must be an int >= 0, got {v!r}")


def footprint(info: dict) -> Footprint:
    """The :class:`Footprint` of a program from its :func:`lazykv.inspect.inspect_pte`
    report."""
    lazy = [b for b in info["kv_buffers"] if b["lazy"] and b.get("bytes_per_position")]
    bpp = sum(int(b["bytes_per_position"]) for b in lazy)
    bound = min((int(b["shape"][b["growth_axis"]]) for b in lazy), default=0)
    c = info["constants"]
    return Footprint(
        weights_bytes=int(c["bytes"]) + int(c["named_data_bytes"]),
        planned_bytes=int(info["planned_bytes"]),
        bytes_per_position=bpp,
        max_positions=bound,
    )


def footprint_of(path: Union[str, os.PathLike]) -> Footprint:
    """The :class:`Footprint` of the ``.pte`` at ``path`` (reads its flatbuffer, not its
    weights; nothing is loaded). The same figures as :func:`footprint` of its
    ``inspect`` report: both come from the program model (:mod:`lazykv.format.program`)."""
    from lazykv.format.pte import open_pte

    with open_pte(path) as pte:
        program, manifest = pte.program, pte.manifest
        lazy = manifest.lazy_buffers if manifest is not None else ()
        return Footprint(
            weights_bytes=program.constant_tensor_bytes()[1] + program.named_data_bytes(),
            planned_bytes=sum(program.arena_bytes()),
            bytes_per_position=sum(b.bytes_per_position for b in lazy),
            max_positions=min((b.max_positions for b in lazy), default=0),
        )
