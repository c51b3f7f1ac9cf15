"""What a ``.pte`` holds and what it will cost at load: the data behind ``lazykv inspect``
(and ``lazykv check``).

Read with ExecuTorch's own flatbuffer deserializer through :mod:`lazykv.pte_file` (no
weight bytes are read). The JSON keys documented in :func:`inspect_pte` are a contract:
later commands and users' CI scripts rely on them.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Union

from executorch.exir.schema import (
    Bool,
    DelegateCall,
    Double,
    Int,
    KernelCall,
    String,
    Tensor,
    TensorShapeDynamism,
)

from lazykv.pte_file import PteFile, open_pte

_SCALAR_NAMES = {
    0: "uint8", 1: "int8", 2: "int16", 3: "int32", 4: "int64", 5: "float16", 6: "float32",
    7: "float64", 11: "bool", 15: "bfloat16", 27: "uint16", 28: "uint32", 29: "uint64",
}
_SCALAR_BYTES = {
    "uint8": 1, "int8": 1, "int16": 2, "int32": 4, "int64": 8, "float16": 2, "float32": 4,
    "float64": 8, "bool": 1, "bfloat16": 2, "uint16": 2, "uint32": 4, "uint64": 8,
}
#: Kernels whose second argument is a cache written in place at a position.
_CACHE_UPDATE_OPS = {
    "llama::update_cache": 1,
    "llama::update_cache_with_indices": 1,
    "llama::update_quantized_cache": 1,
}


def dtype_name(scalar_type) -> str:
    """``torch``-style dtype name of an ExecuTorch ``ScalarType``."""
    return _SCALAR_NAMES.get(int(scalar_type), f"scalar_type_{int(scalar_type)}")


def tensor_nbytes(t: Tensor) -> int:
    """Bytes of a serialized tensor at its recorded (upper-bound) shape."""
    n = _SCALAR_BYTES.get(dtype_name(t.scalar_type), 1)
    for d in t.sizes:
        n *= d
    return n


def _tensor_json(idx: int, t: Tensor) -> dict:
    return {
        "value_index": idx,
        "shape": list(t.sizes),
        "dtype": dtype_name(t.scalar_type),
        "dynamism": TensorShapeDynamism(t.shape_dynamism).name,
        "nbytes": tensor_nbytes(t),
        "planned": t.allocation_info is not None,
    }


def _evalue_json(idx: int, v) -> dict:
    val = v.val
    if isinstance(val, Tensor):
        return _tensor_json(idx, val)
    if isinstance(val, Int):
        return {"value_index": idx, "type": "int", "value": val.int_val}
    if isinstance(val, Bool):
        return {"value_index": idx, "type": "bool", "value": val.bool_val}
    if isinstance(val, Double):
        return {"value_index": idx, "type": "float", "value": val.double_val}
    if isinstance(val, String):
        return {"value_index": idx, "type": "str", "value": val.string_val}
    return {"value_index": idx, "type": type(val).__name__}


def _is_constant_method(plan) -> bool:
    return not plan.inputs and all(not c.instructions for c in plan.chains)


def _mutable_buffers(plan) -> Dict[int, Tensor]:
    """Value index -> tensor for the plan's mutable buffers.

    The emitter writes placeholders first (parameters, buffers, then user inputs);
    constants carry a data buffer, so a non-constant tensor placed before the first user
    input is a mutable buffer. A tensor with an FQN that is not constant is one too.
    """
    first_input = min(plan.inputs) if plan.inputs else len(plan.values)
    out = {}
    for i, v in enumerate(plan.values):
        t = v.val
        if not isinstance(t, Tensor) or t.data_buffer_idx != 0:
            continue
        named = t.extra_tensor_info is not None and t.extra_tensor_info.fully_qualified_name
        if i in plan.outputs or i in plan.inputs:
            continue
        planned_or_unbound = (
            t.allocation_info is not None
            or t.shape_dynamism == TensorShapeDynamism.DYNAMIC_UNBOUND
        )
        if (i < first_input and planned_or_unbound) or named:
            out[i] = t
    return out


def _cache_targets(plan) -> set:
    """Value indices written by a position-indexed cache update kernel."""
    targets = set()
    ops = [f"{o.name}" for o in plan.operators]
    for chain in plan.chains:
        for ins in chain.instructions:
            a = ins.instr_args
            if isinstance(a, KernelCall) and 0 <= a.op_index < len(ops):
                pos = _CACHE_UPDATE_OPS.get(ops[a.op_index])
                if pos is not None and pos < len(a.args):
                    targets.add(a.args[pos])
    return targets


def inspect_pte(path_or_pte: Union[str, os.PathLike, PteFile]) -> dict:
    """Describe a ``.pte`` as a JSON-ready dict.

    Keys (a contract):
      ``planned_bytes``: bytes the runtime allocates for planned arenas at load: per
        arena (memory id >= 1) the maximum over methods, summed (``executorch.runtime``
        sizes each arena to the max across methods and shares it).
      ``methods``: name -> {``planned_bytes``, ``arenas``, ``inputs``, ``outputs``,
        ``operators``, ``delegates``, ``constants``}, for every non-constant method.
      ``constant_methods``: name -> value (e.g. ``get_max_context_len``).
      ``kv_buffers``: list of {``fqn``, ``shape``, ``dtype``, ``dynamism``, ``nbytes``,
        ``lazy``, ``methods``, ``arena``, ``bytes_per_position``, ``growth_axis``}: the
        position-indexed caches (lazy ones from the manifest; static ones found as the
        cache argument of ``llama::update_cache``-style kernels).
      ``mutable_buffers``: every mutable buffer, same fields (``kv`` says if it is one).
      ``kv_bytes_at_max_context``: bytes of all KV buffers at their upper bound.
      ``unmarked_buffers``: mutable buffers a lazy export left planned, each {``fqn``,
        ``kind`` (``kv_cache`` or ``state``), ``cause``, ``reason``, ``fix``,
        ``methods``}; those buffers' entries also carry ``planned_because``.
      ``lazy_kv_bytes``: of those, bytes no longer planned (lazy).
      ``constants``: {``count``, ``bytes``, ``named_data_count``, ``named_data_bytes``,
        ``by_method``}; ``manifest``: the lazykv manifest as stored, or None.
    """
    pte = path_or_pte if isinstance(path_or_pte, PteFile) else open_pte(path_or_pte)
    program = pte.program
    manifest = pte.manifest
    lazy_fqns = {b.fqn: b for b in manifest.lazy_buffers} if manifest else {}
    unmarked = {u.fqn: u for u in manifest.unmarked_buffers} if manifest else {}

    methods: Dict[str, dict] = {}
    constant_methods: Dict[str, object] = {}
    buffers: Dict[str, dict] = {}
    arena_max: List[int] = []
    const_count = 0
    const_bytes = 0
    seen_const = set()
    for plan in program.execution_plan:
        if _is_constant_method(plan):
            vals = [_evalue_json(i, plan.values[i]) for i in plan.outputs]
            constant_methods[plan.name] = vals[0].get("value") if len(vals) == 1 else vals
            continue
        sizes = list(plan.non_const_buffer_sizes)
        for mem_id in range(1, len(sizes)):
            while len(arena_max) < mem_id:
                arena_max.append(0)
            arena_max[mem_id - 1] = max(arena_max[mem_id - 1], sizes[mem_id])
        consts = [
            (i, v.val)
            for i, v in enumerate(plan.values)
            if isinstance(v.val, Tensor) and v.val.data_buffer_idx > 0
        ]
        for i, t in consts:
            if t.data_buffer_idx not in seen_const:
                seen_const.add(t.data_buffer_idx)
                const_count += 1
                const_bytes += tensor_nbytes(t)
        targets = _cache_targets(plan)
        for i, t in _mutable_buffers(plan).items():
            fqn = (t.extra_tensor_info.fully_qualified_name if t.extra_tensor_info else None)
            key = fqn or (
                f"mem{t.allocation_info.memory_id}@{t.allocation_info.memory_offset_low}"
                f"+{t.allocation_info.memory_offset_high << 32}"
                if t.allocation_info is not None
                else f"{plan.name}:value{i}"
            )
            lazy = fqn in lazy_fqns or t.shape_dynamism == TensorShapeDynamism.DYNAMIC_UNBOUND
            entry = buffers.get(key)
            if entry is None:
                lb = lazy_fqns.get(fqn) if fqn else None
                entry = {
                    "fqn": fqn,
                    "shape": list(lb.max_shape) if lb else list(t.sizes),
                    "dtype": dtype_name(t.scalar_type),
                    "dynamism": TensorShapeDynamism(t.shape_dynamism).name,
                    "nbytes": lb.nbytes_at_max if lb else tensor_nbytes(t),
                    "lazy": bool(lazy),
                    "kv": bool(lb) or i in targets,
                    "arena": None if t.allocation_info is None else t.allocation_info.memory_id,
                    "growth_axis": lb.growth_axis if lb else None,
                    "bytes_per_position": lb.bytes_per_position if lb else None,
                    "methods": [],
                    "value_index": {},
                }
                u = unmarked.get(fqn) if fqn else None
                if u is not None:  # left planned by a lazy export: why
                    entry["kv"] = entry["kv"] or u.kind == "kv_cache"
                    entry["planned_because"] = {"cause": u.cause, "reason": u.reason,
                                                "fix": u.fix}
                buffers[key] = entry
            entry["kv"] = entry["kv"] or i in targets
            entry["methods"].append(plan.name)
            entry["value_index"][plan.name] = i
        ops = sorted({f"{o.name}" + (f".{o.overload}" if o.overload else "") for o in plan.operators})
        delegates = []
        for d in plan.delegates:
            size = None
            if d.processed.location == 1 and program.segments:  # DataLocation.SEGMENT
                if 0 <= d.processed.index < len(program.segments):
                    size = program.segments[d.processed.index].size
            delegates.append({"id": d.id, "bytes": size})
        methods[plan.name] = {
            "planned_bytes": sum(sizes[1:]),
            "arenas": sizes[1:],
            "inputs": [_evalue_json(i, plan.values[i]) for i in plan.inputs],
            "outputs": [_evalue_json(i, plan.values[i]) for i in plan.outputs],
            "operators": ops,
            "delegates": delegates,
            "constants": {"count": len(consts), "bytes": sum(tensor_nbytes(t) for _, t in consts)},
            "instructions": sum(len(c.instructions) for c in plan.chains),
        }

    named = [nd for nd in (program.named_data or []) if not nd.key.startswith("lazykv/")]
    named_keys = {nd.key for nd in named}
    named_bytes = 0
    for nd in named:
        if 0 <= nd.segment_index < len(program.segments or []):
            named_bytes += program.segments[nd.segment_index].size
    all_buffers = list(buffers.values())
    kv = [b for b in all_buffers if b["kv"] or b["lazy"]]
    return {
        "file": pte.source,
        "file_bytes": pte.file_size,
        "lazykv_manifest_version": manifest.version if manifest else None,
        "planned_bytes": sum(arena_max),
        "arena_bytes": arena_max,
        "methods": methods,
        "constant_methods": constant_methods,
        "kv_buffers": kv,
        "mutable_buffers": all_buffers,
        "kv_bytes_at_max_context": sum(b["nbytes"] for b in kv),
        "lazy_kv_bytes": sum(b["nbytes"] for b in kv if b["lazy"]),
        "constants": {
            "count": const_count,
            "bytes": const_bytes,
            "named_data_count": len(named),
            "named_data_bytes": named_bytes,
            "by_method": {m: v["constants"] for m, v in methods.items()},
        },
        "shared_constants": [
            {"fqn": c.fqn, "nbytes": c.nbytes, "methods": list(c.methods),
             "stored_once": c.stored_once, "storage_key": c.storage_key,
             "stored_in": ("named_data" if c.storage_key in named_keys else "constant_segment")}
            for c in (manifest.shared_constants if manifest else ())
        ],
        # Resident bytes a per-method copy of each shared constant would cost on top of
        # one copy (what the XNNPACK weight cache saves when methods share weights).
        "shared_constant_bytes_saved": sum(
            c.nbytes * (len(c.methods) - 1)
            for c in (manifest.shared_constants if manifest else ())
            if c.stored_once
        ),
        "unmarked_buffers": [
            {"fqn": u.fqn, "kind": u.kind, "cause": u.cause, "reason": u.reason, "fix": u.fix,
             "methods": list(u.methods)}
            for u in (manifest.unmarked_buffers if manifest else ())
        ],
        "manifest": None if manifest is None else __import__("json").loads(manifest.to_json()),
    }
