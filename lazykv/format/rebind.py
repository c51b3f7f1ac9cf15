"""The one rebinding path: lazy KV tensors become trailing method inputs, by patching the
program flatbuffer's bytes.

The stock runtime refuses ``DYNAMIC_UNBOUND`` tensors (DESIGN fact 4) but accepts the
same tensor marked ``DYNAMIC_BOUND``, with no ``allocation_info``, listed among the
plan's ``inputs`` (fact 5): the caller then passes storage of any capacity up to the
bound and the runtime writes it in place. :func:`rebind_region` makes exactly these
edits on a copy of the program flatbuffer region, nothing else (``docs/format.md``,
"Rebinding", spells them out byte for byte, for a C++ loader to mirror):

1. each lazy tensor's ``shape_dynamism`` byte: ``DYNAMIC_UNBOUND`` (2) ->
   ``DYNAMIC_BOUND`` (1), in place (the field is stored: 2 is not its default);
2. each plan that uses lazy buffers gets a new ``inputs`` vector, appended after the
   flatbuffer's end (4-byte aligned): the old inputs, then the lazy tensors' value
   indices in manifest order; the field's forward offset is pointed at it;
3. the extended header gets the new program size (and, in a 32-byte header, the segment
   data size); the segment base offset stays put
   when the padding in front of the segments has room for the new vectors, else it
   moves to the next multiple of its alignment (the largest power of two dividing it,
   at least 128, at most 64 KiB; ExecuTorch's Llama exports move by a few hundred
   bytes), and the segment bytes follow unchanged.

Anything else in the file is as exported. A layout this cannot patch (no extended
header, a lazy tensor that is planned or has no FQN, a plan without an inputs field)
raises :class:`lazykv.errors.InvalidProgram` naming what was unexpected.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Dict, List, Tuple

from lazykv.errors import InvalidProgram
from lazykv.format import schema as S
from lazykv.format.flatbuffer import Reader
from lazykv.format.header import EXTENDED_HEADER_AT, LENGTH, ExtendedHeader, aligned
from lazykv.format.program import Plan, Tensor
from lazykv.format.pte import PteFile
from lazykv.manifest import Manifest

#: Segment alignment when the base offset has to move (ExecuTorch's default is 128).
MIN_SEGMENT_ALIGNMENT = 128


@dataclasses.dataclass(frozen=True)
class Rebound:
    """A rebound program region: write ``region``, then the source's bytes from its old
    segment base offset to its end (``segment_data_size`` bytes)."""

    #: The patched flatbuffer, padded with zeros up to ``segment_base_offset``.
    region: bytes
    segment_base_offset: int
    segment_data_size: int
    #: Per method, the FQNs appended to its inputs, in order (empty: none).
    appended: Dict[str, Tuple[str, ...]]


def lazy_tensors(plan: Plan, source: str) -> Dict[str, Tuple[int, Tensor]]:
    """``{fqn: (value index, tensor)}`` of a plan's ``DYNAMIC_UNBOUND`` tensors."""
    found: Dict[str, Tuple[int, Tensor]] = {}
    for i, t in plan.tensors.items():
        if t.dynamism != S.DYNAMIC_UNBOUND:
            continue
        if t.fqn is None:
            raise InvalidProgram(
                f"{source}: method {plan.name!r} value {i} is DYNAMIC_UNBOUND but has no "
                f"fully qualified name; re-export with lazykv"
            )
        if t.fqn in found:
            raise InvalidProgram(f"{source}: lazy buffer {t.fqn!r} appears twice in {plan.name!r}")
        found[t.fqn] = (i, t)
    return found


def bound_inputs(pte: PteFile, manifest: Manifest) -> Dict[str, Tuple[Tuple[str, ...], List[int]]]:
    """Per method: the FQNs of the lazy buffers to append to its inputs (manifest
    order) and their value indices, after checking the tensors against the manifest."""
    source = pte.source
    out = {}
    for plan in pte.program.plans:
        lazy = lazy_tensors(plan, source)
        for b in manifest.buffers_of(plan.name):
            if b.fqn not in lazy:
                raise InvalidProgram(
                    f"{source}: the manifest says {plan.name!r} uses lazy buffer {b.fqn!r} but "
                    f"that method has no DYNAMIC_UNBOUND tensor by that name"
                )
        fqns = tuple(b.fqn for b in manifest.lazy_buffers if b.fqn in lazy)
        unlisted = sorted(set(lazy) - set(fqns))
        if unlisted:
            raise InvalidProgram(
                f"{source}: method {plan.name!r} has DYNAMIC_UNBOUND tensors the lazykv "
                f"manifest does not list: {unlisted}; re-export with lazykv"
            )
        for fqn in fqns:
            i, t = lazy[fqn]
            lb = manifest.buffer(fqn)
            if tuple(t.sizes) != tuple(lb.max_shape) or t.dtype != lb.dtype:
                raise InvalidProgram(
                    f"{source}: lazy buffer {fqn!r} in {plan.name!r} is {t.dtype}"
                    f"{list(t.sizes)} but the manifest says {lb.dtype}{list(lb.max_shape)}"
                )
            if t.allocation is not None:
                raise InvalidProgram(
                    f"{source}: lazy buffer {fqn!r} in {plan.name!r} is DYNAMIC_UNBOUND but "
                    f"planned (memory id {t.allocation.memory_id}); a lazy tensor has no "
                    f"allocation_info. Re-export with lazykv"
                )
        out[plan.name] = (fqns, [lazy[f][0] for f in fqns])
    return out


def rebind_region(pte: PteFile, manifest: Manifest) -> Rebound:
    """The program region of ``pte`` with every lazy buffer of ``manifest`` rebound as a
    trailing input (see the module docstring for the exact edits)."""
    source = pte.source
    header = pte.header
    if header is None or not pte.segment_base_offset:
        raise InvalidProgram(
            f"{source}: has lazy buffers but no extended header or segments (the manifest "
            f"lives in a segment); the file is corrupt or was not written by lazykv"
        )
    buf = bytearray(pte.region)
    fb = Reader(buf)
    appended: Dict[str, Tuple[str, ...]] = {}
    new_vectors = []  # (position of the inputs field, new items)
    bound = bound_inputs(pte, manifest)
    for plan in pte.program.plans:
        fqns, indices = bound[plan.name]
        appended[plan.name] = fqns
        if not fqns:
            continue
        for fqn, i in zip(fqns, indices):
            at = fb.field(plan.tensors[i].at, S.Tensor.shape_dynamism)
            if not at:  # cannot happen for a tensor read as DYNAMIC_UNBOUND (not the default)
                raise InvalidProgram(f"{source}: lazy buffer {fqn!r} stores no shape_dynamism")
            buf[at] = S.DYNAMIC_BOUND
        field = fb.field(plan.at, S.ExecutionPlan.inputs)
        if not field:
            raise InvalidProgram(f"{source}: method {plan.name!r} has no inputs field to extend")
        new_vectors.append((field, plan.inputs + indices))
    for field, items in new_vectors:
        buf.extend(b"\x00" * (aligned(len(buf), 4) - len(buf)))
        vector = len(buf)
        buf.extend(struct.pack(f"<I{len(items)}i", len(items), *items))
        struct.pack_into("<I", buf, field, vector - field)
    program_size = len(buf)
    base = old_base = pte.segment_base_offset
    if program_size > base:
        alignment = max(MIN_SEGMENT_ALIGNMENT, min(old_base & -old_base, 1 << 16))
        base = aligned(program_size, alignment)
    data_size = pte.file_size - old_base
    if header.length >= LENGTH:
        buf[EXTENDED_HEADER_AT : EXTENDED_HEADER_AT + LENGTH] = ExtendedHeader(
            program_size, base, data_size).to_bytes()
    else:  # an older 24-byte header: it has no segment data size field to write
        struct.pack_into("<QQ", buf, EXTENDED_HEADER_AT + 8, program_size, base)
    buf.extend(b"\x00" * (base - program_size))
    return Rebound(bytes(buf), base, data_size, appended)
