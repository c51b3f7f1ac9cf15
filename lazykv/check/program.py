"""One ``.pte`` as ``lazykv check``'s rules see it: opened once, inspected once."""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from lazykv.format import schema as S
from lazykv.format.program import Plan, Program, Tensor
from lazykv.format.pte import open_pte
from lazykv.inspect import inspect_pte


class CheckedProgram:
    """One opened ``.pte`` plus what several rules need, computed once.

    Read through the format layer and checked by :func:`lazykv.verify.check_program`
    (inside :func:`inspect_pte`): no torch, no ExecuTorch runtime. Only the ``runs`` rule
    loads the program, through the runtime shim, which verifies it fully.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.pte = open_pte(path)
        try:
            self.info = inspect_pte(self.pte)
        except BaseException:
            self.pte.close()
            raise
        self._delegates: Optional[Dict[Tuple[int, int], dict]] = None

    @property
    def program(self) -> Program:
        """The program model (:mod:`lazykv.format.program`)."""
        return self.pte.program

    def plan(self, name: str) -> Plan:
        """The method named ``name``."""
        return self.pte.plan(name)

    def delegate_blobs(self) -> Dict[Tuple[int, int], dict]:
        """(location, index) -> {size, methods, id} for every delegate blob called."""
        if self._delegates is None:
            out: Dict[Tuple[int, int], dict] = {}
            prog = self.program
            for plan in prog.plans:
                for d in plan.delegates:
                    e = out.setdefault((d.location, d.index), {"id": d.id, "methods": [], "size": 0})
                    if plan.name not in e["methods"]:
                        e["methods"].append(plan.name)
                    if d.location == S.SEGMENT:
                        e["size"] = prog.segments[d.index].size
                    else:
                        e["size"] = prog.inline_delegates[d.index].size
            self._delegates = out
        return self._delegates

    def delegate_bytes(self, loc: int, idx: int) -> bytes:
        """The bytes of a delegate blob (a segment, or inline in the program)."""
        if loc == S.SEGMENT:
            return bytes(self.pte.segment(idx))
        span = self.program.inline_delegates[idx]
        return self.pte.region[span.start : span.start + span.size]

    def close(self) -> None:
        """Unmap the file."""
        self.pte.close()


def fmt_bytes(n: int) -> str:
    """``18354112`` -> ``'18,354,112 B'`` (exact figures: CI logs get compared)."""
    return f"{int(n):,} B"


def kv_name(b: dict) -> str:
    """A KV buffer as a reader can find it: its FQN, else method and value index."""
    if b.get("fqn"):
        return repr(b["fqn"])
    vi = b.get("value_index") or {}
    where = ", ".join(f"{m} value {i}" for m, i in vi.items())
    return f"(unnamed: {where})"


def dtype_shape(t) -> str:
    """``float32[1, 4096, 4, 32]`` of a :class:`Tensor` or of an ``inspect`` buffer dict."""
    if isinstance(t, Tensor):
        return f"{t.dtype}[{', '.join(str(d) for d in t.sizes)}]"
    return f"{t['dtype']}[{', '.join(str(d) for d in t['shape'])}]"


def planned_buffers(p: CheckedProgram) -> List[dict]:
    """Every planned mutable buffer, largest first."""
    return sorted((b for b in p.info["mutable_buffers"] if b["arena"] is not None),
                  key=lambda b: -b["nbytes"])


def constant_buffers(p: CheckedProgram) -> Dict[int, Tuple[str, List[str], int]]:
    """data_buffer_idx -> (name, methods using it, tensor bytes) of every constant tensor."""
    out: Dict[int, Tuple[str, List[str], int]] = {}
    for plan in p.program.plans:
        for i, t in plan.tensors.items():
            if t.data_buffer_idx <= 0:
                continue
            e = out.get(t.data_buffer_idx)
            if e is None:
                name = f"constant buffer {t.data_buffer_idx} " + (
                    f"{t.fqn!r}" if t.fqn else f"({plan.name} value {i})")
                e = out[t.data_buffer_idx] = (f"{name} {dtype_shape(t)}", [], t.nbytes)
            if plan.name not in e[1]:
                e[1].append(plan.name)
    return out
