"""What a ``.pte`` holds and what it will cost at load: the data behind ``lazykv inspect``
(and ``lazykv check``).

Read through lazykv's format layer (:mod:`lazykv.format`: the program flatbuffer only,
no weight bytes) and checked with :func:`lazykv.verify.check_program` (pure Python):
neither torch nor ExecuTorch is imported. The JSON keys documented in
:func:`inspect_pte` are a contract: later commands and users' CI scripts rely on them.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Union

from lazykv.format import schema as S
from lazykv.format.program import BOOL, DOUBLE, INT, STRING, TENSOR, Plan, Tensor
from lazykv.format.buffers import buffer_report, kv_buffers
from lazykv.format.pte import PteFile, open_pte
from lazykv.verify import check_program

_SCALAR_JSON = {INT: ("int", "ints"), BOOL: ("bool", "scalars"), DOUBLE: ("float", "scalars"),
                STRING: ("str", "strings")}


def _tensor_json(idx: int, t: Tensor) -> dict:
    return {
        "value_index": idx,
        "shape": list(t.sizes),
        "dtype": t.dtype,
        "dynamism": S.DYNAMISM_NAMES.get(t.dynamism, str(t.dynamism)),
        "nbytes": t.nbytes,
        "planned": t.allocation is not None,
    }


def _value_json(plan: Plan, idx: int) -> dict:
    kind = plan.kinds[idx]
    if kind == TENSOR:
        return _tensor_json(idx, plan.tensors[idx])
    if kind in _SCALAR_JSON:
        name, table = _SCALAR_JSON[kind]
        return {"value_index": idx, "type": name, "value": getattr(plan, table)[idx]}
    return {"value_index": idx, "type": kind}


def inspect_pte(path_or_pte: Union[str, os.PathLike, PteFile]) -> dict:
    """Describe a ``.pte`` as a JSON-ready dict (checked with
    :func:`lazykv.verify.check_program` first: a corrupt file raises
    :class:`lazykv.errors.InvalidProgram` naming the problem).

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
    if isinstance(path_or_pte, PteFile):
        return _inspect(path_or_pte)
    with open_pte(path_or_pte) as pte:
        return _inspect(pte)


def _inspect(pte: PteFile) -> dict:
    program = pte.program
    manifest = check_program(pte)

    methods: Dict[str, dict] = {}
    constant_methods: Dict[str, object] = {}
    arena_max = program.arena_bytes()
    const_count, const_bytes = program.constant_tensor_bytes()
    for plan in program.plans:
        if plan.is_constant_method:
            vals = [_value_json(plan, i) for i in plan.outputs]
            constant_methods[plan.name] = vals[0].get("value") if len(vals) == 1 else vals
            continue
        sizes = list(plan.arenas)
        consts = [(i, t) for i, t in plan.tensors.items() if t.data_buffer_idx > 0]
        delegates = []
        for d in plan.delegates:
            size = None
            if d.location == S.SEGMENT and 0 <= d.index < len(program.segments):
                size = program.segments[d.index].size
            delegates.append({"id": d.id, "bytes": size})
        methods[plan.name] = {
            "planned_bytes": sum(sizes[1:]),
            "arenas": sizes[1:],
            "inputs": [_value_json(plan, i) for i in plan.inputs],
            "outputs": [_value_json(plan, i) for i in plan.outputs],
            "operators": sorted({o.full_name for o in plan.operators}),
            "delegates": delegates,
            "constants": {"count": len(consts), "bytes": sum(t.nbytes for _, t in consts)},
            "instructions": sum(len(c.instructions) for c in plan.chains),
        }

    named = [nd for nd in program.named_data if not nd.key.startswith("lazykv/")]
    named_keys = {nd.key for nd in named}
    named_bytes = program.named_data_bytes()
    all_buffers = buffer_report(program, manifest)
    kv = kv_buffers(all_buffers)
    shared = manifest.shared_constants if manifest else ()
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
            for c in shared
        ],
        # Resident bytes a per-method copy of each shared constant would cost on top of
        # one copy (what the XNNPACK weight cache saves when methods share weights).
        "shared_constant_bytes_saved": sum(
            c.nbytes * (len(c.methods) - 1) for c in shared if c.stored_once
        ),
        "unmarked_buffers": [
            {"fqn": u.fqn, "kind": u.kind, "cause": u.cause, "reason": u.reason, "fix": u.fix,
             "methods": list(u.methods)}
            for u in (manifest.unmarked_buffers if manifest else ())
        ],
        "manifest": None if manifest is None else json.loads(manifest.to_json()),
    }
