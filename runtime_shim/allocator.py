"""Storage for lazy KV buffers: the ``DynamicAllocator`` interface, a default
implementation on ``torch.empty``, and a tracking wrapper (current/peak bytes, events).

The shim hands the tensors an allocator returns to the runtime as inputs; the runtime
writes them in place (DESIGN fact 5). Freeing means dropping the last reference, so
the pages go back to the OS (large ``torch.empty`` blocks are ``mmap``-backed).
"""

from __future__ import annotations

import abc
import dataclasses
import mmap
import warnings
from typing import List, Optional, Sequence

import torch


class DynamicAllocator(abc.ABC):
    """Where a session's KV storage comes from. Subclass to place it elsewhere.

    Contract: ``allocate`` returns a contiguous tensor of exactly ``shape``/``dtype``
    (contents undefined); ``reallocate`` returns a new tensor of ``shape`` whose first
    ``keep`` positions along ``axis`` equal ``old``'s, and releases ``old``; ``free``
    releases a tensor. The caller never uses a tensor after passing it to
    ``reallocate``/``free``, except when ``reallocate`` raises or returns a tensor that
    breaks this contract: the session then keeps ``old`` (so it must still be intact)
    and raises :class:`lazykv.errors.AllocationFailed`.
    """

    @abc.abstractmethod
    def allocate(self, shape: Sequence[int], dtype: torch.dtype, *, name: str = "") -> torch.Tensor:
        ...

    @abc.abstractmethod
    def reallocate(
        self,
        old: torch.Tensor,
        shape: Sequence[int],
        *,
        keep: int,
        axis: int,
        name: str = "",
    ) -> torch.Tensor:
        ...

    @abc.abstractmethod
    def free(self, tensor: torch.Tensor, *, name: str = "") -> None:
        ...


class TorchAllocator(DynamicAllocator):
    """The default: page-mapped storage, prefix copied on reallocation.

    Tensors of ``mmap_threshold`` bytes or more live in their own anonymous ``mmap``
    (``torch.frombuffer``): pages are committed only when the runtime writes them, and
    dropping the last reference unmaps them, so RSS falls on ``trim``/``reset``/``close``
    whatever the C allocator's heuristics (glibc raises its mmap threshold after frees
    and keeps later blocks on the heap). Smaller tensors use ``torch.empty``. Contents
    of new storage are undefined: positions past the filled prefix are never read (the
    lazy-buffer contract).
    """

    def __init__(self, mmap_threshold: int = 64 << 10) -> None:
        self.mmap_threshold = mmap_threshold

    def _empty(self, shape, dtype) -> torch.Tensor:
        shape = tuple(int(d) for d in shape)
        nbytes = torch.empty((), dtype=dtype).element_size()
        for d in shape:
            nbytes *= d
        if nbytes < self.mmap_threshold:
            return torch.empty(shape, dtype=dtype)
        buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.frombuffer(buf, dtype=dtype).view(shape)

    def allocate(self, shape, dtype, *, name=""):
        return self._empty(shape, dtype)

    def reallocate(self, old, shape, *, keep, axis, name=""):
        new = self._empty(shape, old.dtype)
        if keep:
            new.narrow(axis, 0, keep).copy_(old.narrow(axis, 0, keep))
        return new

    def free(self, tensor, *, name=""):
        # Dropping the caller's reference releases the storage; nothing else holds it.
        pass


@dataclasses.dataclass(frozen=True)
class AllocEvent:
    """One allocator call: ``kind`` is ``allocate``, ``grow``, ``shrink``, ``free`` or
    ``copy`` (a prefix copied into storage already given out, by a fork)."""

    kind: str
    name: str
    old_bytes: int
    new_bytes: int
    copied_bytes: int
    current_bytes: int


class TrackingAllocator(DynamicAllocator):
    """Wraps another allocator and counts: current and peak bytes, events, bytes copied.

    ``peak_bytes`` includes the transient of a reallocation (old and new storage both
    live while the prefix is copied).
    """

    def __init__(self, inner: Optional[DynamicAllocator] = None, keep_events: int = 10000) -> None:
        self.inner = inner if inner is not None else TorchAllocator()
        self.current_bytes = 0
        self.peak_bytes = 0
        self.grow_events = 0
        self.shrink_events = 0
        self.allocations = 0
        self.frees = 0
        self.bytes_copied = 0
        self._keep_events = keep_events
        self.events: List[AllocEvent] = []

    @staticmethod
    def _nbytes(shape, dtype) -> int:
        n = torch.empty((), dtype=dtype).element_size()
        for d in shape:
            n *= int(d)
        return n

    def _record(self, kind, name, old_b, new_b, copied) -> None:
        if len(self.events) < self._keep_events:
            self.events.append(AllocEvent(kind, name, old_b, new_b, copied, self.current_bytes))

    def allocate(self, shape, dtype, *, name=""):
        t = self.inner.allocate(shape, dtype, name=name)
        nb = t.numel() * t.element_size()
        self.current_bytes += nb
        self.peak_bytes = max(self.peak_bytes, self.current_bytes)
        self.allocations += 1
        self._record("allocate", name, 0, nb, 0)
        return t

    def reallocate(self, old, shape, *, keep, axis, name=""):
        old_b = old.numel() * old.element_size()
        new_b = self._nbytes(shape, old.dtype)
        # Both live during the copy: count the transient before it happens.
        self.peak_bytes = max(self.peak_bytes, self.current_bytes + new_b)
        t = self.inner.reallocate(old, shape, keep=keep, axis=axis, name=name)
        per_pos = old_b // old.shape[axis] if old.shape[axis] else 0
        copied = per_pos * keep
        self.current_bytes += new_b - old_b
        self.bytes_copied += copied
        if new_b >= old_b:
            self.grow_events += 1
            self._record("grow", name, old_b, new_b, copied)
        else:
            self.shrink_events += 1
            self._record("shrink", name, old_b, new_b, copied)
        return t

    def record_copy(self, nbytes: int, *, name: str = "") -> None:
        """Count ``nbytes`` copied into storage this allocator gave out (a fork's prefix)."""
        self.bytes_copied += nbytes
        self._record("copy", name, 0, 0, nbytes)

    def free(self, tensor, *, name=""):
        nb = tensor.numel() * tensor.element_size()
        self.inner.free(tensor, name=name)
        self.current_bytes -= nb
        self.frees += 1
        self._record("free", name, nb, 0, 0)
