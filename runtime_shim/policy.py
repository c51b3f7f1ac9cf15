"""Growth policies: how many positions of KV storage to hold for ``n`` filled positions.

Every policy is a frozen dataclass whose parameters are visible constants (mlx-lm's
``KVCache.step = 256``) and a pure function ``capacity(needed, bound, bytes_per_position)``:
the capacity a session holds is ``max(current, capacity(needed))`` when growing and
``capacity(filled)`` after ``trim``/``reset``. The shim clamps every result to the
exported bound and to the session's ``max_bytes``.

From strings (CLI and ``load(policy=...)``)::

    doubling                 doubling:initial_positions=16
    step                     step:256   step:512
    hybrid                   hybrid:start=256,linear_after=64MiB,increment=32MiB
    preallocate

Units: ``initial_positions``, ``step`` and ``start`` count positions (tokens of KV
cache); ``linear_after`` and ``increment`` are bytes of the whole KV cache, written as
sizes (``64MiB`` = 2^26 bytes, ``64MB`` = 64,000,000: :mod:`lazykv.units`).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Union

from lazykv.errors import LazyKVError
from lazykv.units import parse_size


class PolicyError(LazyKVError, ValueError):
    """A growth policy string or parameter that cannot be used; the message names the fix."""

    exit_code = 2


@dataclasses.dataclass(frozen=True)
class GrowthPolicy:
    """Base class. ``name`` is the string form's head."""

    name = "base"

    def capacity(self, needed: int, bound: int, bytes_per_position: int) -> int:
        raise NotImplementedError

    def initial(self, bound: int, bytes_per_position: int) -> int:
        """Positions a new session holds before its first call (0 = nothing allocated)."""
        return 0

    def spec(self) -> str:
        """The string that :func:`parse_policy` turns back into this policy."""
        fields = dataclasses.fields(self)
        if len(fields) == 1:
            return f"{self.name}:{getattr(self, fields[0].name)}"
        changed = [f for f in fields if getattr(self, f.name) != f.default]
        if not changed:
            return self.name
        return self.name + ":" + ",".join(f"{f.name}={getattr(self, f.name)}" for f in changed)


@dataclasses.dataclass(frozen=True)
class Doubling(GrowthPolicy):
    """``initial * 2**k`` positions, the smallest that holds ``needed`` (ExecuTorch PR 18350).

    Holds at most ``max(initial, 2 * needed)`` positions.
    """

    initial_positions: int = 16
    name = "doubling"

    def __post_init__(self) -> None:
        if self.initial_positions < 1:
            raise PolicyError(f"doubling: initial_positions must be >= 1, got {self.initial_positions}")

    def capacity(self, needed, bound, bytes_per_position):
        if needed <= 0:
            return 0
        cap = self.initial_positions
        while cap < needed:
            cap *= 2
        return min(cap, bound)


@dataclasses.dataclass(frozen=True)
class Step(GrowthPolicy):
    """Multiples of ``step`` positions (mlx-lm ``KVCache.step = 256``): at most needed + step - 1."""

    step: int = 256
    name = "step"

    def __post_init__(self) -> None:
        if self.step < 1:
            raise PolicyError(f"step: the step must be >= 1 position, got {self.step} (e.g. step:256)")

    def capacity(self, needed, bound, bytes_per_position):
        if needed <= 0:
            return 0
        return min(-(-needed // self.step) * self.step, bound)


@dataclasses.dataclass(frozen=True)
class Hybrid(GrowthPolicy):
    """llama.cpp ``--kv-dynamic``: start at ``start`` positions, double while the whole
    KV cache is under ``linear_after`` bytes, then grow by ``increment`` bytes at a time."""

    start: int = 256
    linear_after: int = 64 << 20
    increment: int = 32 << 20
    name = "hybrid"

    def __post_init__(self) -> None:
        if self.start < 1 or self.linear_after < 0 or self.increment < 1:
            raise PolicyError(
                f"hybrid: need start >= 1, linear_after >= 0, increment >= 1 byte; got "
                f"start={self.start}, linear_after={self.linear_after}, increment={self.increment}"
            )

    def capacity(self, needed, bound, bytes_per_position):
        if needed <= 0:
            return 0
        bpp = max(1, bytes_per_position)
        step = max(1, -(-self.increment // bpp))
        cap = self.start
        while cap < needed:
            if cap * bpp < self.linear_after:
                cap *= 2
            else:
                cap += step
        return min(cap, bound)


@dataclasses.dataclass(frozen=True)
class Preallocate(GrowthPolicy):
    """The exported bound, allocated when the session opens (mlx-lm PR 1038 ``max_size``)."""

    name = "preallocate"

    def capacity(self, needed, bound, bytes_per_position):
        return bound

    def initial(self, bound, bytes_per_position):
        return bound


POLICIES: Dict[str, type] = {c.name: c for c in (Doubling, Step, Hybrid, Preallocate)}
#: Parameters given in bytes (sizes as :func:`lazykv.units.parse_size` reads them); every
#: other parameter counts positions (tokens).
_BYTE_FIELDS = ("linear_after", "increment")

def parse_policy(policy: Union[str, GrowthPolicy, None]) -> GrowthPolicy:
    """A policy object from a :class:`GrowthPolicy` or its string form (see module doc)."""
    if policy is None:
        return Doubling()
    if isinstance(policy, GrowthPolicy):
        return policy
    if not isinstance(policy, str):
        raise PolicyError(f"policy must be a string or a GrowthPolicy, got {type(policy).__name__}")
    head, _, rest = policy.strip().partition(":")
    cls = POLICIES.get(head.lower())
    if cls is None:
        raise PolicyError(
            f"unknown growth policy {head!r}; choose one of {sorted(POLICIES)} "
            f"(e.g. 'step:256')"
        )
    kwargs = {}
    fields = [f.name for f in dataclasses.fields(cls)]
    if rest:
        for i, part in enumerate(p for p in rest.split(",") if p.strip()):
            key, eq, val = part.partition("=")
            if not eq:
                if i >= len(fields):
                    raise PolicyError(f"{head}: too many values in {policy!r}; it takes {fields}")
                key, val = fields[i], key
            key = key.strip()
            if key not in fields:
                raise PolicyError(f"{head}: unknown parameter {key!r}; it takes {fields}")
            if key in _BYTE_FIELDS:
                kwargs[key] = parse_size(val, f"{head}: {key} (bytes)")
            else:
                kwargs[key] = _int(head, key, val)
    return cls(**kwargs)


def _int(head: str, key: str, val: str) -> int:
    try:
        return int(val.strip())
    except ValueError:
        raise PolicyError(f"{head}: {key} must be an integer, got {val!r}") from None
