"""Rebind without parsing the program into Python objects: patch the flatbuffer in place.

ExecuTorch's Python object reader and writer cost seconds on a big program (stories110m:
0.6 s to parse, 0.2 s to copy, 1.3 s to re-serialize a 157 KB flatbuffer). The rebinding
needs three small edits, all possible on the bytes:

* each lazy tensor's ``shape_dynamism`` byte: ``DYNAMIC_UNBOUND`` (2) -> ``DYNAMIC_BOUND``
  (1) (the field is stored since 2 is not the default);
* no ``allocation_info``: the lazy format already has none (else: slow path);
* each plan's ``inputs`` vector gets the lazy value indices appended: a new vector is
  written after the flatbuffer's end and the field's forward offset is pointed at it.

The program region grows by a few bytes; the segment base offset stays put when the
padding in front of it has room (it almost always does), else it moves to the next
multiple of its alignment. Anything unexpected raises :class:`_Unsupported` and the
caller falls back to the object path (:mod:`lazykv.runtime_shim.binding`).
"""

from __future__ import annotations

import mmap
import os
import struct
from typing import Dict, List, Optional, Tuple

from executorch.exir._serialize._program import _ExtendedHeader
from executorch.exir._serialize.padding import aligned_size

from lazykv.errors import InvalidProgram
from lazykv.manifest import MANIFEST_KEY, Manifest

_TENSOR = 5
_INT, _BOOL, _DOUBLE = 2, 3, 4
_UNBOUND, _BOUND = 2, 1
_SLOT_SHAPE_DYNAMISM = 20
_SLOT_ALLOCATION_INFO = 16
_SLOT_PLAN_INPUTS = 10


class _Unsupported(Exception):
    """The fast path cannot handle this file; use the object path."""


class _T:
    """A flatbuffer table at ``pos`` (slots as in ExecuTorch's ``program.fbs``).

    ExecuTorch's generated Python accessors cannot be used: their late module imports
    shadow the classes (``ExecutionPlan()`` -> "'module' object is not callable")."""

    __slots__ = ("buf", "pos")

    def __init__(self, buf, pos: int) -> None:
        self.buf, self.pos = buf, pos

    def off(self, slot: int) -> int:
        vt = self.pos - struct.unpack_from("<i", self.buf, self.pos)[0]
        vt_len = struct.unpack_from("<H", self.buf, vt)[0]
        if slot >= vt_len:
            return 0
        return struct.unpack_from("<H", self.buf, vt + slot)[0]

    def get(self, fmt: str, slot: int, default=0):
        o = self.off(slot)
        return struct.unpack_from("<" + fmt, self.buf, self.pos + o)[0] if o else default

    def _ref(self, slot: int) -> int:
        o = self.off(slot)
        if not o:
            return 0
        at = self.pos + o
        return at + struct.unpack_from("<I", self.buf, at)[0]

    def table(self, slot: int) -> Optional["_T"]:
        r = self._ref(slot)
        return _T(self.buf, r) if r else None

    def vec(self, slot: int) -> Tuple[int, int]:
        """(start of elements, length) of a vector field; (0, 0) if absent."""
        r = self._ref(slot)
        if not r:
            return 0, 0
        return r + 4, struct.unpack_from("<I", self.buf, r)[0]

    def vec_tables(self, slot: int) -> List["_T"]:
        start, n = self.vec(slot)
        out = []
        for i in range(n):
            at = start + 4 * i
            out.append(_T(self.buf, at + struct.unpack_from("<I", self.buf, at)[0]))
        return out

    def vec_ints(self, slot: int, fmt: str = "i") -> List[int]:
        start, n = self.vec(slot)
        return list(struct.unpack_from(f"<{n}{fmt}", self.buf, start)) if n else []

    def string(self, slot: int) -> Optional[str]:
        start, n = self.vec(slot)
        if not start:
            return None
        return bytes(self.buf[start : start + n]).decode("utf-8")


class FastPte:
    """Read-only view of a ``.pte``'s program flatbuffer through the generated accessors."""

    def __init__(self, path: Optional[str], data: Optional[bytes]) -> None:
        if path is not None:
            with open(path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self.file_size = len(self._mm)
            head = self._mm[:64]
        else:
            self._mm = data
            self.file_size = len(data)
            head = bytes(data[:64])
        if len(head) < 40 or head[4:6] != b"ET":
            raise _Unsupported("not a .pte")
        eh = _ExtendedHeader.from_bytes(head[8:64])
        if not eh.is_valid() or not eh.segment_base_offset or eh.length != eh.EXPECTED_LENGTH:
            raise _Unsupported("no extended header / segments")
        if not (eh.program_size <= eh.segment_base_offset <= self.file_size):
            raise _Unsupported("inconsistent header")
        self.header = eh
        self.program_size = eh.program_size
        self.segment_base_offset = eh.segment_base_offset
        self.buf = bytearray(self._mm[: self.program_size])
        self.root = _T(self.buf, struct.unpack_from("<I", self.buf, 0)[0])
        self.plans = self.root.vec_tables(6)
        self.method_names: List[str] = [p.string(4) for p in self.plans]

    def close(self) -> None:
        if isinstance(self._mm, mmap.mmap):
            self._mm.close()

    # -- reading ---------------------------------------------------------------------------

    def manifest(self, source: str) -> Optional[Manifest]:
        segments = self.root.vec_tables(12)
        for nd in self.root.vec_tables(18):
            if nd.string(4) == MANIFEST_KEY:
                seg = segments[nd.get("I", 6)]
                start = self.segment_base_offset + seg.get("Q", 4)
                size = seg.get("Q", 6)
                if start + size > self.file_size:
                    raise InvalidProgram(
                        f"{source}: the lazykv manifest lies past the end of the file "
                        f"(truncated .pte: a partial copy or download?)"
                    )
                return Manifest.from_bytes(bytes(self._mm[start : start + size]), source)
        return None

    def input_specs(self, plan_index: int) -> List[dict]:
        plan = self.plans[plan_index]
        values = plan.vec_tables(8)
        out = []
        for i, idx in enumerate(plan.vec_ints(10)):
            ev = values[idx]
            vt = ev.get("B", 4)
            if vt == _TENSOR:
                t = ev.table(6)
                out.append({
                    "index": i, "kind": "tensor", "scalar_type": t.get("b", 4),
                    "sizes": t.vec_ints(8),
                    "dynamic": t.get("b", 20) != 0,
                })
            else:
                kind = {_INT: "int", _BOOL: "bool", _DOUBLE: "float"}.get(vt, "other")
                out.append({"index": i, "kind": kind})
        return out

    def lazy_tensors(self, plan_index: int) -> Dict[str, Tuple[int, _T]]:
        plan = self.plans[plan_index]
        found: Dict[str, Tuple[int, _T]] = {}
        for j, ev in enumerate(plan.vec_tables(8)):
            if ev.get("B", 4) != _TENSOR:
                continue
            t = ev.table(6)
            if t.get("b", 20) != _UNBOUND:
                continue
            info = t.table(22)
            name = info.string(6) if info is not None else None
            if name is None:
                raise _Unsupported("lazy tensor without FQN")
            found[name] = (j, t)
        return found

    # -- patching --------------------------------------------------------------------------

    def rebound_region(self, manifest: Manifest, dtype_names: Dict[int, str]) -> Tuple[bytes, Dict[str, Tuple[str, ...]]]:
        """The patched program region (padded to the segment base) and, per method, the
        FQNs appended to its inputs."""
        buf = self.buf
        appended: Dict[str, Tuple[str, ...]] = {}
        new_vectors = []
        for pi, plan in enumerate(self.plans):
            name = self.method_names[pi]
            lazy = self.lazy_tensors(pi)
            for b in manifest.buffers_of(name):
                if b.fqn not in lazy:
                    raise InvalidProgram(
                        f"the manifest says {name!r} uses lazy buffer {b.fqn!r} but that method "
                        f"has no DYNAMIC_UNBOUND tensor by that name"
                    )
            fqns = tuple(b.fqn for b in manifest.lazy_buffers if b.fqn in lazy)
            if set(lazy) - set(fqns):
                raise InvalidProgram(
                    f"method {name!r} has DYNAMIC_UNBOUND tensors the lazykv manifest does not "
                    f"list: {sorted(set(lazy) - set(fqns))}; re-export with lazykv"
                )
            appended[name] = fqns
            if not fqns:
                continue
            idxs = []
            for fqn in fqns:
                j, t = lazy[fqn]
                lb = manifest.buffer(fqn)
                sizes = tuple(t.vec_ints(8))
                st = t.get("b", 4)
                if sizes != tuple(lb.max_shape) or dtype_names.get(st) != lb.dtype:
                    raise InvalidProgram(
                        f"lazy buffer {fqn!r} in {name!r} is {dtype_names.get(st)}"
                        f"{list(sizes)} but the manifest says {lb.dtype}{list(lb.max_shape)}"
                    )
                if t.off(_SLOT_ALLOCATION_INFO) != 0:
                    raise _Unsupported("lazy tensor with allocation_info")
                o = t.off(_SLOT_SHAPE_DYNAMISM)
                if o == 0:
                    raise _Unsupported("shape_dynamism not stored")
                buf[t.pos + o] = _BOUND
                idxs.append(j)
            o = plan.off(_SLOT_PLAN_INPUTS)
            if o == 0:
                raise _Unsupported("plan without an inputs vector")
            field = plan.pos + o
            old = plan.vec_ints(_SLOT_PLAN_INPUTS)
            new_vectors.append((field, old + idxs))
        end = len(buf)
        for field, items in new_vectors:
            pad = aligned_size(end, 4) - end
            buf.extend(b"\x00" * pad)
            vec = len(buf)
            buf.extend(struct.pack(f"<I{len(items)}i", len(items), *items))
            struct.pack_into("<I", buf, field, vec - field)
            end = len(buf)
        program_size = len(buf)
        base = self.segment_base_offset
        if program_size > base:
            align = max(128, min(base & -base, 1 << 16))
            base = aligned_size(program_size, align)
        eh = _ExtendedHeader(
            program_size=program_size,
            segment_base_offset=base,
            segment_data_size=self.file_size - self.segment_base_offset,
        ).to_bytes()
        buf[8 : 8 + len(eh)] = eh
        return bytes(buf) + b"\x00" * (base - program_size), appended
