"""Fuzz mutations of ``.pte`` files: what one case does to one base file.

A *case* is ``(seed, index)``: :func:`build_case` turns it, deterministically, into one
mutation of one base ``.pte`` (truncation, bit flips and byte overwrites in the program
flatbuffer or in a segment, extended-header field edits, lazykv-manifest edits, or a
structure-aware edit of one field of the program, made on ExecuTorch's object model:
:mod:`pte_objects`). :mod:`fuzz_worker` applies and checks cases in subprocesses.
"""

from __future__ import annotations

import dataclasses
import random
from typing import List, Optional, Sequence, Tuple

#: Mutation kinds and their weights (out of 100).
KINDS = (
    ("truncate", 12),
    ("program_bitflip", 16),
    ("program_overwrite", 16),
    ("header_field", 8),
    ("segment_bitflip", 7),
    ("segment_overwrite", 7),
    ("manifest_edit", 9),
    ("program_field", 25),
)

_INTERESTING32 = (
    0, 1, 2, 3, 4, 7, 8, 15, 16, 31, 32, 63, 64, 127, 128, 255, 256, 1023, 1024, 4095,
    4096, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF,
    0xFFFFFFFE, 0xFFFFFFF0,
)
_INTERESTING_FIELD = (0, 1, -1, 2, 3, 7, 8, 64, 255, 256, 1024, 65535, 2**31 - 1, -(2**31), 2**40)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where things are in a base ``.pte``: sizes, and each segment's absolute span."""

    name: str
    size: int
    program_size: int
    segment_base: int
    segments: Tuple[Tuple[int, int], ...]  # absolute (start, end) of each segment
    manifest_segment: Optional[int]


def layout_full(name: str, data: bytes) -> Layout:
    """The layout of a base file (worker side: parses it with lazykv)."""
    from lazykv.format.pte import open_pte
    from lazykv.manifest import MANIFEST_KEY

    pte = open_pte(data)
    segs = tuple(
        (pte.segment_base_offset + s.offset, pte.segment_base_offset + s.offset + s.size)
        for s in pte.program.segments or []
    )
    man = None
    for nd in pte.program.named_data or []:
        if nd.key == MANIFEST_KEY:
            man = nd.segment_index
    return Layout(name, len(data), pte.program_size, pte.segment_base_offset, segs, man)


# -- planning a case -----------------------------------------------------------------------


def _rng(seed: int, index: int) -> random.Random:
    return random.Random(f"lazykv-fuzz:{seed}:{index}")


def _pick_kind(rng: random.Random, lay: Layout) -> str:
    kinds = [(k, w) for k, w in KINDS]
    if lay.manifest_segment is None:
        kinds = [(k, w) for k, w in kinds if k != "manifest_edit"]
    if not lay.segments:
        kinds = [(k, w) for k, w in kinds if not k.startswith("segment_")]
    total = sum(w for _, w in kinds)
    x = rng.uniform(0, total)
    for k, w in kinds:
        x -= w
        if x <= 0:
            return k
    return kinds[-1][0]


def _int32_value(rng: random.Random, old: int) -> int:
    r = rng.random()
    if r < 0.5:
        return rng.choice(_INTERESTING32)
    if r < 0.8:
        return (old + rng.choice((-4, -2, -1, 1, 2, 4, 8, 16, 64))) & 0xFFFFFFFF
    return rng.getrandbits(32)


def plan_bytes_mutation(rng: random.Random, kind: str, lay: Layout, data: bytes) -> List[list]:
    """Byte-level operations for ``kind``: ``["truncate", n]``, ``["flip", off, bit]``,
    ``["write", off, hex]``."""
    ops: List[list] = []
    if kind == "truncate":
        points = [0, 4, 8, 15, 16, 32, 63, 64, lay.program_size - 1, lay.program_size,
                  lay.segment_base, lay.size - 1, lay.size - 128]
        for s, e in lay.segments:
            points += [s, s + 1, e - 1]
        r = rng.random()
        if r < 0.4:
            n = rng.choice(points) + rng.choice((-1, 0, 0, 1))
        elif r < 0.7:
            n = rng.randrange(0, max(1, lay.program_size))
        else:
            n = rng.randrange(0, lay.size)
        ops.append(["truncate", max(0, min(n, lay.size - 1))])
    elif kind in ("program_bitflip", "segment_bitflip"):
        lo, hi = _region(rng, kind, lay)
        for _ in range(rng.choice((1, 1, 1, 2, 3, 4, 8))):
            ops.append(["flip", rng.randrange(lo, hi), rng.randrange(8)])
    elif kind in ("program_overwrite", "segment_overwrite"):
        lo, hi = _region(rng, kind, lay)
        for _ in range(rng.choice((1, 1, 2, 3))):
            width = rng.choice((1, 2, 4, 4, 4, 8))
            off = rng.randrange(lo, max(lo + 1, hi - width))
            if width == 4 and rng.random() < 0.7:
                off -= off % 4  # flatbuffer offsets and lengths are 4-byte aligned
            old = int.from_bytes(data[off : off + width].ljust(width, b"\0"), "little")
            if width == 4:
                val = _int32_value(rng, old)
            elif width == 8:
                val = rng.choice((0, 2**63 - 1, 2**64 - 1, old + 1, rng.getrandbits(64))) % 2**64
            else:
                val = rng.choice((0, 2 ** (8 * width) - 1, rng.getrandbits(8 * width), old ^ 1))
            ops.append(["write", off, (val % 2 ** (8 * width)).to_bytes(width, "little").hex()])
    elif kind == "header_field":
        # Bytes 0..4: root offset; 4..8: file identifier; 8..12 "eh00"; 12..16 header
        # length; 16..24 program size; 24..32 segment base; 32..40 segment data size.
        field = rng.choice(("root", "ident", "magic", "length", "program_size",
                            "segment_base", "segment_data_size", "segment_base",
                            "program_size"))
        where = {"root": (0, 4), "ident": (4, 4), "magic": (8, 4), "length": (12, 4),
                 "program_size": (16, 8), "segment_base": (24, 8),
                 "segment_data_size": (32, 8)}[field]
        off, width = where
        old = int.from_bytes(data[off : off + width], "little")
        cands = [0, 1, old - 1, old + 1, old + 8, old - 8, old * 2, lay.size, lay.size + 1,
                 lay.program_size, lay.segment_base, 2 ** (8 * width) - 1, 2 ** (8 * width - 1),
                 rng.getrandbits(8 * width), old ^ (1 << rng.randrange(8 * width))]
        if field == "ident":
            cands = [int.from_bytes(x, "little") for x in (b"ET13", b"ET99", b"XX12", b"ETab", b"\0\0\0\0")]
            cands.append(old ^ (1 << rng.randrange(32)))
        val = rng.choice(cands) % 2 ** (8 * width)
        ops.append(["write", off, val.to_bytes(width, "little").hex()])
    else:
        raise ValueError(kind)
    return ops


def _region(rng: random.Random, kind: str, lay: Layout) -> Tuple[int, int]:
    if kind.startswith("program_"):
        return 0, max(1, lay.program_size)
    i = rng.randrange(len(lay.segments))
    s, e = lay.segments[i]
    if e <= s:
        return 0, max(1, lay.program_size)
    if rng.random() < 0.5:  # headers of delegate blobs / starts of tensors
        return s, min(e, s + 128)
    return s, e


def apply_ops(data: bytes, ops: Sequence[list]) -> bytes:
    """Apply byte-level operations in order."""
    b = bytearray(data)
    for op in ops:
        if op[0] == "truncate":
            del b[op[1] :]
        elif op[0] == "flip":
            if op[1] < len(b):
                b[op[1]] ^= 1 << op[2]
        elif op[0] == "write":
            val = bytes.fromhex(op[2])
            b[op[1] : op[1] + len(val)] = val
        else:
            raise ValueError(op)
    return bytes(b)


def describe_ops(ops: Sequence[list]) -> str:
    parts = []
    for op in ops:
        if op[0] == "truncate":
            parts.append(f"truncate to {op[1]} bytes")
        elif op[0] == "flip":
            parts.append(f"flip bit {op[2]} of byte {op[1]}")
        elif op[0] == "write":
            parts.append(f"write {op[2]} at byte {op[1]}")
        elif op[0] == "field":
            parts.append(f"set {op[1]} from {op[2]!r} to {op[3]!r}")
        elif op[0] == "manifest":
            parts.append(f"manifest {op[1]}")
        else:
            parts.append(str(op))
    return "; ".join(parts)


# -- structure-aware edits (worker side: need ExecuTorch's schema) -----------------------------


def _walk_fields(obj, path: str, out: list) -> None:
    """Every int-valued leaf (and int list) of a parsed Program, with its path."""
    from enum import IntEnum

    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            p = f"{path}.{f.name}" if path else f.name
            if isinstance(v, bool):
                continue
            if isinstance(v, (int, IntEnum)):
                out.append((p, obj, f.name, None))
            elif isinstance(v, list):
                if v and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
                    out.append((p, obj, f.name, "list"))
                    for i in range(len(v)):
                        out.append((f"{p}[{i}]", v, i, None))
                else:
                    for i, x in enumerate(v):
                        _walk_fields(x, f"{p}[{i}]", out)
            elif dataclasses.is_dataclass(v):
                _walk_fields(v, p, out)


def plan_field_edit(rng: random.Random, program) -> Tuple[list, object]:
    """Change one int field of ``program`` in place; return the op and the program."""
    leaves: list = []
    _walk_fields(program, "", leaves)
    # Skip the bulk of uninteresting leaves evenly: pick a leaf uniformly.
    path, holder, key, what = rng.choice(leaves)
    nvals = max(len(p.values) for p in program.execution_plan) if program.execution_plan else 1
    if what == "list":
        lst = getattr(holder, key)
        r = rng.random()
        old = list(lst)
        if r < 0.4 and lst:
            del lst[rng.randrange(len(lst))]
        elif r < 0.7:
            lst.insert(rng.randrange(len(lst) + 1), rng.choice([0, 1, rng.randrange(nvals), -1]))
        else:
            rng.shuffle(lst)
        return ["field", path, old, list(lst)], program
    old = holder[key] if isinstance(holder, list) else getattr(holder, key)
    r = rng.random()
    if r < 0.35:
        new = rng.randrange(nvals)  # another value index: type confusion
    elif r < 0.6:
        new = rng.choice(_INTERESTING_FIELD)
    elif r < 0.85:
        new = int(old) + rng.choice((-2, -1, 1, 2, 8))
    else:
        new = int(old) * rng.choice((2, 16, 1 << 20))
    new = int(new)
    if isinstance(holder, list):
        holder[key] = new
    else:
        setattr(holder, key, new)
    return ["field", path, int(old), new], program


def serialize_with_segments(program, data: bytes, segment_base: int) -> bytes:
    """``program`` (ExecuTorch's object model) re-serialized in front of ``data``'s
    untouched segment bytes."""
    from pte_objects import with_segments

    return with_segments(program, data, segment_base)


def plan_manifest_edit(rng: random.Random, lay: Layout, data: bytes) -> List[list]:
    """Edits of the JSON manifest that keep its length: swap a digit, a letter, or a
    structural character, or replace a number by another of the same width."""
    s, e = lay.segments[lay.manifest_segment]
    blob = data[s:e]
    ops: List[list] = []
    for _ in range(rng.choice((1, 1, 2))):
        r = rng.random()
        if r < 0.6:
            digits = [i for i, c in enumerate(blob) if 48 <= c <= 57]
            i = rng.choice(digits)
            new = bytes([rng.choice(b"0123456789")])
        elif r < 0.8:
            i = rng.randrange(len(blob))
            new = bytes([rng.choice(b'{}[]",:-0aZ \x00\xff')])
        else:
            letters = [i for i, c in enumerate(blob) if 97 <= c <= 122]
            i = rng.choice(letters)
            new = bytes([rng.choice(b"abcdefghijklmnopqrstuvwxyz_")])
        ops.append(["write", s + i, new.hex()])
    return ops


def build_case(seed: int, index: int, bases: Sequence[Tuple[str, bytes, Layout]]) -> Tuple[str, str, bytes]:
    """``(base name, description, mutated bytes)`` of case ``index`` under ``seed``."""
    rng = _rng(seed, index)
    name, data, lay = bases[rng.randrange(len(bases))]
    kind = _pick_kind(rng, lay)
    if kind == "program_field":
        from pte_objects import program_objects

        program = program_objects(data)
        op, program = plan_field_edit(rng, program)
        try:
            out = serialize_with_segments(program, data, lay.segment_base)
        except Exception as e:  # the edit cannot be serialized (e.g. a negative uint)
            op = op + [f"unserializable: {type(e).__name__}"]
            out = data
        return name, f"{kind}: {describe_ops([op])}", out
    if kind == "manifest_edit":
        ops = plan_manifest_edit(rng, lay, data)
    else:
        ops = plan_bytes_mutation(rng, kind, lay, data)
    return name, f"{kind}: {describe_ops(ops)}", apply_ops(data, ops)
