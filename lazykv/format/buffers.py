"""A program's mutable buffers and which of them are KV caches, read from the model.

What ``lazykv inspect`` reports as ``mutable_buffers`` and ``kv_buffers``, and what
``lazykv generate`` counts as planned KV bytes: one classification, here. A KV cache is
a lazy buffer of the manifest, or a buffer that a position-indexed update kernel
(``llama::update_cache``...) writes; a buffer shared by several methods (same FQN, or the
same arena offset) is one entry.
"""

from __future__ import annotations

from typing import Dict, List, Optional

from lazykv.format import schema as S
from lazykv.format.program import Plan, Program, Tensor
from lazykv.manifest import Manifest

#: Kernels whose argument 1 is a cache written in place at a position.
CACHE_UPDATE_OPS = {
    "llama::update_cache": 1,
    "llama::update_cache_with_indices": 1,
    "llama::update_quantized_cache": 1,
}


def mutable_buffers(plan: Plan) -> Dict[int, Tensor]:
    """Value index -> tensor for the plan's mutable buffers.

    The emitter writes placeholders first (parameters, buffers, then user inputs);
    constants carry a data buffer, so a non-constant tensor placed before the first user
    input is a mutable buffer. A tensor with an FQN that is not constant is one too.
    """
    first_input = min(plan.inputs) if plan.inputs else len(plan.kinds)
    inputs, outputs = set(plan.inputs), set(plan.outputs)
    out = {}
    for i, t in plan.tensors.items():
        if t.data_buffer_idx != 0 or i in outputs or i in inputs:
            continue
        planned_or_unbound = t.allocation is not None or t.dynamism == S.DYNAMIC_UNBOUND
        if (i < first_input and planned_or_unbound) or t.fqn:
            out[i] = t
    return out


def cache_targets(plan: Plan) -> set:
    """Value indices written by a position-indexed cache update kernel."""
    targets = set()
    for op, args in plan.kernel_calls():
        pos = CACHE_UPDATE_OPS.get(op.name)
        if pos is not None and pos < len(args):
            targets.add(args[pos])
    return targets


def buffer_report(program: Program, manifest: Optional[Manifest]) -> List[dict]:
    """Every mutable buffer as ``lazykv inspect`` reports it (JSON-ready dicts: ``fqn``,
    ``shape``, ``dtype``, ``dynamism``, ``nbytes``, ``lazy``, ``kv``, ``arena``,
    ``growth_axis``, ``bytes_per_position``, ``methods``, ``value_index``, and
    ``planned_because`` for a buffer a lazy export left planned)."""
    lazy_fqns = {b.fqn: b for b in manifest.lazy_buffers} if manifest else {}
    unmarked = {u.fqn: u for u in manifest.unmarked_buffers} if manifest else {}
    buffers: Dict[str, dict] = {}
    for plan in program.plans:
        if plan.is_constant_method:
            continue
        targets = cache_targets(plan)
        for i, t in mutable_buffers(plan).items():
            a = t.allocation
            key = t.fqn or (
                f"mem{a.memory_id}@{a.offset_low}+{a.offset_high << 32}"
                if a is not None else f"{plan.name}:value{i}"
            )
            entry = buffers.get(key)
            if entry is None:
                lb = lazy_fqns.get(t.fqn) if t.fqn else None
                entry = {
                    "fqn": t.fqn,
                    "shape": list(lb.max_shape) if lb else list(t.sizes),
                    "dtype": t.dtype,
                    "dynamism": S.DYNAMISM_NAMES.get(t.dynamism, str(t.dynamism)),
                    "nbytes": lb.nbytes_at_max if lb else t.nbytes,
                    "lazy": bool(t.fqn in lazy_fqns or t.dynamism == S.DYNAMIC_UNBOUND),
                    "kv": bool(lb) or i in targets,
                    "arena": None if a is None else a.memory_id,
                    "growth_axis": lb.growth_axis if lb else None,
                    "bytes_per_position": lb.bytes_per_position if lb else None,
                    "methods": [],
                    "value_index": {},
                }
                u = unmarked.get(t.fqn) if t.fqn else None
                if u is not None:  # left planned by a lazy export: why
                    entry["kv"] = entry["kv"] or u.kind == "kv_cache"
                    entry["planned_because"] = {"cause": u.cause, "reason": u.reason,
                                                "fix": u.fix}
                buffers[key] = entry
            entry["kv"] = entry["kv"] or i in targets
            entry["methods"].append(plan.name)
            entry["value_index"][plan.name] = i
    return list(buffers.values())


def kv_buffers(report: List[dict]) -> List[dict]:
    """The KV caches of a :func:`buffer_report` (lazy, or written at a position)."""
    return [b for b in report if b["kv"] or b["lazy"]]
