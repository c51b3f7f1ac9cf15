"""Torch-free checks of a program's structure: every reference resolves, every size fits.

ExecuTorch's runtime verifies the flatbuffer's layout (``Verification.
InternalConsistency``) and checks many indices itself, but it trusts the program's
*meaning*: a kernel argument that points at a value of the wrong kind aborts the
process (``EValue::toTensor``: ``ET_CHECK``), a kernel that writes into a constant
writes into read-only ``mmap`` pages (SIGSEGV), a tensor that is neither planned nor an
input has a null data pointer (DESIGN fact 4), an arena size a few bit flips inflated is
allocated and zeroed (gigabytes). :func:`check_structure` refuses all of that from the
program model alone, in pure Python (``lazykv inspect`` and ``check`` run it too);
:mod:`lazykv.verify.kernels` and :mod:`lazykv.verify.shapes` add the checks that need
operator schemas. The rules were found by ``tests/test_fuzz_pte.py``; each has a
regression case in ``tests/test_fuzz_regressions.py``.
"""

from __future__ import annotations

import os
from typing import Dict, Optional, Set, Tuple

from lazykv.format import schema as S
from lazykv.format.flatbuffer import FlatbufferError
from lazykv.format.program import (BOOL, DOUBLE, INT, INT_LIST, NULL, TENSOR, TENSOR_LIST,
                                   Delegate, Plan, Program, Tensor)
from lazykv.format.pte import PteFile
from lazykv.format.scalar_type import BY_CODE
from lazykv.verify.xnnpack import DelegateIO, xnnpack_io

#: More elements than this in one tensor is a corrupt shape (2^48: 256 TiB of bytes).
MAX_NUMEL = 2**48


class Corrupt(FlatbufferError):
    """What the program says cannot be run safely; turned into InvalidProgram with the
    file's name (:func:`lazykv.format.pte.corrupt`)."""


class DelegateBlobs:
    """The XNNPACK delegate blobs of a ``.pte``, read once each (other backends' blobs
    are not read: ``io`` returns None for them)."""

    def __init__(self, pte: PteFile) -> None:
        self._pte = pte
        program = pte.program
        n = len(program.segments)
        self._named_sizes = {nd.key: program.segments[nd.segment_index].size
                             for nd in program.named_data if nd.segment_index < n}
        self._seen: Dict[Tuple[int, int], DelegateIO] = {}

    def io(self, d: Delegate) -> Optional[DelegateIO]:
        """``(inputs, outputs, input dims, output dims)`` of delegate ``d``'s graph."""
        if d.id != "XnnpackBackend":
            return None
        key = (d.location, d.index)
        if key not in self._seen:
            pte = self._pte
            if d.location == S.SEGMENT:
                seg = pte.program.segments[d.index]
                start = pte.segment_base_offset + seg.offset
                blob = memoryview(pte.data)[start : start + seg.size]
            else:
                span = pte.program.inline_delegates[d.index]
                blob = memoryview(pte.region)[span.start : span.start + span.size]
            try:
                self._seen[key] = xnnpack_io(
                    blob, f"the XNNPACK blob of delegate data {d.index}", self._named_sizes)
            finally:
                blob.release()
        return self._seen[key]


def numel(t: Tensor) -> int:
    """Elements of ``t`` at its recorded (upper-bound) shape."""
    n = 1
    for d in t.sizes:
        n *= d
    return n


def constant_values(plan: Plan) -> Set[int]:
    """Value indices of the plan's constant tensors: data in the program, read-only.

    A tensor with data *and* a planned allocation is a mutable buffer with an initial
    value (``InitializedMutableBufferPass``, e.g. export_llm's attention-sink
    ``cache_positions``): the runtime copies the data into planned, writable memory."""
    return {i for i, t in plan.tensors.items() if t.data_buffer_idx > 0 and t.allocation is None}


def check_structure(pte: PteFile, blobs: DelegateBlobs) -> None:
    """Raise :class:`Corrupt` naming the first problem the runtime would trust and crash
    on (see the module docstring). Segment and named-data ranges were checked when the
    file was opened (:class:`lazykv.format.pte.PteFile`)."""
    m = pte.program
    nseg = len(m.segments)
    const_offsets, const_size = None, 0
    if m.constant_segment is not None and m.constant_segment.offsets:
        si, const_offsets = m.constant_segment
        if not si < nseg:
            raise Corrupt(f"the constant segment is segment {si} of {nseg}")
        const_size = m.segments[si].size
        for i, off in enumerate(const_offsets):
            if off > const_size:
                raise Corrupt(f"constant {i} starts at byte {off} of a {const_size}-byte constant segment")
    for si in m.mutable_segments:
        if not si < nseg:
            raise Corrupt(f"mutable data points at segment {si} of {nseg}")
    _check_arenas(m)
    names = set()
    total = 0
    for plan in m.plans:
        if plan.name in names:
            raise Corrupt(f"method {plan.name!r} is defined twice")
        names.add(plan.name)
        total += _check_plan(m, plan, const_offsets, const_size, blobs)
    limit = _physical_memory()
    if limit and total > limit:
        raise Corrupt(
            f"its memory plan asks for {total} bytes of arenas, more than this machine's "
            f"{limit} bytes of RAM"
        )


def _check_arenas(m: Program) -> None:
    """An arena bigger than every tensor planned in it (across methods: they share it)
    is a corrupt size; honoured, a few bit flips make the runtime allocate and zero
    gigabytes (a hang, then the OOM killer)."""
    extent: Dict[int, int] = {}
    for plan in m.plans:
        for t in plan.tensors.values():
            if t.allocation is not None and t.scalar_type in BY_CODE:
                end = t.allocation.offset + max(0, t.nbytes)
                extent[t.allocation.memory_id] = max(extent.get(t.allocation.memory_id, 0), end)
    for plan in m.plans:
        for mid, size in enumerate(plan.arenas[1:], start=1):
            if size > 2 * extent.get(mid, 0) + 4096:
                raise Corrupt(
                    f"method {plan.name!r}: memory arena {mid} is {size} bytes but the tensors "
                    f"planned in it end at byte {extent.get(mid, 0)}"
                )


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 0


def _check_plan(m: Program, plan: Plan, const_offsets, const_size, blobs: DelegateBlobs) -> int:
    where = f"method {plan.name!r}"
    kinds = plan.kinds
    n = len(kinds)
    arenas = plan.arenas
    for i, size in enumerate(arenas):
        if size < 0:
            raise Corrupt(f"{where}: memory arena {i} has size {size}")

    def index(what: str, idx, allowed=None) -> None:
        if not 0 <= idx < n:
            raise Corrupt(f"{where}: {what} refers to value {idx} but the method has {n}")
        if allowed is not None and kinds[idx] not in allowed:
            raise Corrupt(
                f"{where}: {what} refers to value {idx}, a {kinds[idx]}, where "
                f"{' or '.join(allowed)} is required"
            )

    for i, t in plan.tensors.items():
        _check_tensor(m, where, i, t, arenas, const_offsets, const_size)
    constant = constant_values(plan)
    for i, items in plan.lists.items():
        k = kinds[i]
        for j in items:
            if k == INT_LIST:
                index(f"int list value {i}", j, (INT,))
            elif k == TENSOR_LIST:
                index(f"tensor list value {i}", j, (TENSOR,))
            elif j != -1:
                index(f"optional tensor list value {i}", j, (TENSOR, NULL))
    for j, idx in enumerate(plan.inputs):
        index(f"input {j}", idx, (TENSOR, INT, DOUBLE, BOOL, NULL))
        if idx in constant:
            raise Corrupt(
                f"{where}: input {j} is value {idx}, a constant (the runtime would copy the "
                f"caller's data into read-only memory)"
            )
    for j, idx in enumerate(plan.outputs):
        index(f"output {j}", idx)

    def writable(what: str, idx: int) -> None:
        if idx in constant:
            raise Corrupt(f"{where}: {what} writes into value {idx}, a constant")

    nseg = len(m.segments)
    for di, d in enumerate(plan.delegates):
        if d.location == S.SEGMENT:
            if not d.index < nseg:
                raise Corrupt(f"{where}: delegate {di} ({d.id}) data is segment {d.index} of {nseg}")
        elif d.location == S.INLINE:
            if not d.index < len(m.inline_delegates):
                raise Corrupt(
                    f"{where}: delegate {di} ({d.id}) data is inline blob {d.index} of "
                    f"{len(m.inline_delegates)}"
                )
        else:
            raise Corrupt(f"{where}: delegate {di} ({d.id}) has unknown data location {d.location}")
    used = set(plan.outputs)
    ops = plan.operators
    for ci, chain in enumerate(plan.chains):
        for idx in chain.inputs:
            index(f"chain {ci} input", idx)
        for idx in chain.outputs:
            index(f"chain {ci} output", idx)
        for ii, (kind, a, b) in enumerate(chain.instructions):
            at = f"instruction {ii} of chain {ci}"
            if kind == "kernel":
                if not 0 <= a < len(ops):
                    raise Corrupt(f"{where}: {at} calls operator {a} of {len(ops)}")
                for j, idx in enumerate(b):
                    index(f"{at} ({ops[a].full_name}) argument {j}", idx)
                    used.add(idx)
            elif kind == "delegate":
                if not 0 <= a < len(plan.delegates):
                    raise Corrupt(f"{where}: {at} calls delegate {a} of {len(plan.delegates)}")
                for j, idx in enumerate(b):
                    index(f"{at} (delegate {a}) argument {j}", idx)
                    used.add(idx)
                io = blobs.io(plan.delegates[a])
                if io is not None:
                    n_in, n_out = io[:2]
                    if len(b) != n_in + n_out:
                        raise Corrupt(
                            f"{where}: {at} passes {len(b)} arguments to delegate {a} "
                            f"({plan.delegates[a].id}), whose graph has {n_in} inputs and "
                            f"{n_out} outputs"
                        )
                    for j, idx in enumerate(b):
                        index(f"{at} (delegate {a}) argument {j}", idx, (TENSOR,))
                    for j in range(n_in, n_in + n_out):
                        writable(f"{at} (delegate {a}) output {j - n_in}", b[j])
            elif kind == "move":
                index(f"{at} (move from)", a)
                index(f"{at} (move to)", b)
                if kinds[a] != kinds[b]:
                    raise Corrupt(f"{where}: {at} moves a {kinds[a]} into a {kinds[b]}")
                writable(f"{at} (move)", b)
            elif kind == "jump":
                index(f"{at} (jump condition)", a, (BOOL,))
                if not 0 <= b <= len(chain.instructions):
                    raise Corrupt(f"{where}: {at} jumps to instruction {b} of {len(chain.instructions)}")
            else:  # free
                index(f"{at} (free)", a, (TENSOR,))
    # A tensor the method touches must have memory: planned, constant, external, an
    # input, or lazy (rebound as an input by the shim). Anything else has a null data
    # pointer and crashes the first kernel that writes it (DESIGN fact 4).
    inputs = set(plan.inputs)
    for idx in sorted(used):
        t = plan.tensors.get(idx)
        if t is None or idx in inputs or idx in constant or t.allocation is not None:
            continue
        if t.dynamism == S.DYNAMIC_UNBOUND or t.location == S.EXTERNAL:
            continue
        raise Corrupt(
            f"{where}: tensor value {idx} is used but has no memory (not planned, not a "
            f"constant, not an input)"
        )
    return sum(arenas[1:])


def _check_tensor(m: Program, where: str, i: int, t: Tensor, arenas, const_offsets,
                  const_size: int) -> None:
    what = f"{where}: tensor value {i}"
    if t.scalar_type not in BY_CODE:
        raise Corrupt(f"{what} has unknown scalar type {t.scalar_type}")
    for d in t.sizes:
        if d < 0:
            raise Corrupt(f"{what} has a negative size in shape {t.sizes}")
    n_elements, nbytes = numel(t), t.nbytes
    if n_elements > MAX_NUMEL:
        raise Corrupt(f"{what} has {n_elements} elements (shape {t.sizes})")
    n = len(t.sizes)
    if t.dim_order != list(range(n)) and not (n in (4, 5) and t.dim_order == [0, *range(2, n), 1]):
        # ExecuTorch's kernels and delegates know two layouts, contiguous and channels
        # last; any other order makes XNNPACK infer wrong output shapes, which then
        # trip ET_CHECKs (abort) in kernels such as llama::update_cache.
        raise Corrupt(
            f"{what} has dim order {t.dim_order}; ExecuTorch supports only contiguous "
            f"{list(range(n))}" + (f" or channels-last {[0, *range(2, n), 1]}" if n in (4, 5) else "")
        )
    if t.dynamism not in S.DYNAMISM_NAMES:
        raise Corrupt(f"{what} has unknown shape dynamism {t.dynamism}")
    if t.storage_offset != 0:
        raise Corrupt(f"{what} has storage offset {t.storage_offset}; ExecuTorch needs 0")
    k = t.data_buffer_idx
    if k > 0:
        if const_offsets is not None:
            if k >= len(const_offsets):
                raise Corrupt(f"{what} is constant {k} but the program has {len(const_offsets)}")
            if const_offsets[k] + nbytes > const_size:
                raise Corrupt(
                    f"{what} is constant {k}: {nbytes} bytes at byte {const_offsets[k]} of a "
                    f"{const_size}-byte constant segment"
                )
        else:
            if k >= len(m.constant_buffers):
                raise Corrupt(f"{what} is constant {k} but the program has {len(m.constant_buffers)}")
            if nbytes > m.constant_buffers[k].size:
                raise Corrupt(f"{what} is constant {k}: needs {nbytes} bytes, "
                              f"{m.constant_buffers[k].size} stored")
    if t.allocation is not None:
        mid = t.allocation.memory_id
        if not 1 <= mid < len(arenas):
            raise Corrupt(f"{what} is planned in arena {mid} but the method has {len(arenas) - 1}")
        offset = t.allocation.offset
        if offset + nbytes > arenas[mid]:
            raise Corrupt(
                f"{what} ({nbytes} bytes) is planned at byte {offset} of arena {mid}, which has "
                f"{arenas[mid]} bytes"
            )
