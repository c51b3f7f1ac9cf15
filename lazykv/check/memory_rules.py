"""``lazykv check``'s memory rules: lazy KV, planned and load bytes, KV at max context,
required methods, KV shared across methods. Each takes a :class:`CheckedProgram` and
the :class:`Rules` and returns a :class:`RuleResult` whose failures name the offender
and its figure against the limit."""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from lazykv.check.config import Rules
from lazykv.check.program import (CheckedProgram, constant_buffers, dtype_shape, fmt_bytes,
                                  kv_name, planned_buffers)
from lazykv.check.report import RuleResult
from lazykv.format.program import Tensor


def rule_expect_lazy_kv(p: CheckedProgram, rules: Rules) -> RuleResult:
    """``expect-lazy-kv``: every position-indexed KV cache is lazy (marked, not planned)."""
    info = p.info
    kv = info["kv_buffers"]
    r = RuleResult("expect-lazy-kv", True, "", figures={
        "kv_buffers": len(kv), "lazy": sum(bool(b["lazy"]) for b in kv),
        "lazy_kv_bytes": info["lazy_kv_bytes"], "kv_bytes_at_max_context": info["kv_bytes_at_max_context"],
    })
    if not kv:
        r.passed = False
        r.summary = "no position-indexed KV cache found"
        r.failures.append(
            "no position-indexed KV cache found (no lazykv manifest and no llama::update_cache-"
            "style kernel writes a mutable buffer), so none is lazy; export with "
            "`lazykv export --lazy-kv-cache` or lazykv.passes.to_executorch_lazy"
        )
        return r
    for b in kv:
        if not b["lazy"]:
            why = b.get("planned_because")  # left planned by a lazy export: its reason
            r.failures.append(
                f"KV buffer {kv_name(b)} {dtype_shape(b)} {fmt_bytes(b['nbytes'])} is not lazy: "
                f"{b['dynamism']}, planned in arena {b['arena']} (methods {', '.join(b['methods'])})"
                + (f"; the lazy export left it planned ({why['cause']}): {why['reason']}. "
                   f"Fix: {why['fix']}" if why else "")
            )
        elif b["arena"] is not None:
            r.failures.append(
                f"KV buffer {kv_name(b)} {dtype_shape(b)} is marked lazy but still planned in arena "
                f"{b['arena']} ({fmt_bytes(b['nbytes'])} allocated at load)"
            )
    lazy = r.figures["lazy"]
    if r.failures:
        r.passed = False
        static_bytes = sum(b["nbytes"] for b in kv if not b["lazy"] or b["arena"] is not None)
        causes = sorted({b["planned_because"]["cause"] for b in kv
                         if not b["lazy"] and b.get("planned_because")})
        hint = (f"the lazy export left them planned ({', '.join(causes)}): see the failures"
                if causes else "export with --lazy-kv-cache")
        r.summary = (f"{len(kv) - lazy} of {len(kv)} KV buffers are planned ({fmt_bytes(static_bytes)}); "
                     f"{hint}")
    else:
        r.summary = f"{lazy} of {len(kv)} KV buffers lazy ({fmt_bytes(info['lazy_kv_bytes'])} not planned)"
    return r


def rule_max_planned(p: CheckedProgram, rules: Rules) -> RuleResult:
    """``max-planned-bytes``: the planned arenas stay within the limit; names the largest buffers."""
    info, limit = p.info, rules.max_planned_bytes
    planned = info["planned_bytes"]
    r = RuleResult("max-planned-bytes", planned <= limit,
                   f"planned {fmt_bytes(planned)} <= limit {fmt_bytes(limit)}",
                   figures={"planned_bytes": planned, "limit": limit,
                            "by_method": {m: v["planned_bytes"] for m, v in info["methods"].items()}})
    if r.passed:
        return r
    bufs = planned_buffers(p)
    kv_planned = [b for b in bufs if b["kv"] or b["lazy"]]
    tail = ""
    if kv_planned:
        tail = (f" ({len(kv_planned)} planned KV buffers hold {fmt_bytes(sum(b['nbytes'] for b in kv_planned))}; "
                f"largest {kv_name(kv_planned[0])} {dtype_shape(kv_planned[0])} {fmt_bytes(kv_planned[0]['nbytes'])})")
    elif bufs:
        tail = f" (largest planned buffer {kv_name(bufs[0])} {fmt_bytes(bufs[0]['nbytes'])})"
    over = [(m, v["planned_bytes"]) for m, v in info["methods"].items() if v["planned_bytes"] > limit]
    for m, n in over:
        r.failures.append(f"{m}: planned {fmt_bytes(n)} > limit {fmt_bytes(limit)}" + tail)
    if not over:
        per = ", ".join(f"{m} {fmt_bytes(v['planned_bytes'])}" for m, v in info["methods"].items())
        r.failures.append(
            f"program: planned {fmt_bytes(planned)} > limit {fmt_bytes(limit)} (each arena sized to its largest "
            f"method: {per}; arenas {[f'{a:,}' for a in info['arena_bytes']]})" + tail)
    r.summary = f"planned {fmt_bytes(planned)} > limit {fmt_bytes(limit)}"
    return r


def rule_max_kv(p: CheckedProgram, rules: Rules) -> RuleResult:
    """``max-kv-bytes-at-max-context``: all KV caches at their bound stay within the limit."""
    info, limit = p.info, rules.max_kv_bytes_at_max_context
    kv = sorted(info["kv_buffers"], key=lambda b: -b["nbytes"])
    total = info["kv_bytes_at_max_context"]
    r = RuleResult("max-kv-bytes-at-max-context", total <= limit,
                   f"KV at max context {fmt_bytes(total)} <= limit {fmt_bytes(limit)} ({len(kv)} buffers)",
                   figures={"kv_bytes_at_max_context": total, "limit": limit, "kv_buffers": len(kv)})
    if r.passed:
        return r
    ctx = _max_context(p)
    largest = kv[0]
    r.failures.append(
        f"KV at max context {fmt_bytes(total)} > limit {fmt_bytes(limit)}: {len(kv)} buffers"
        + (f" at max context {ctx:,}" if ctx else "")
        + f", largest {kv_name(largest)} {dtype_shape(largest)} {fmt_bytes(largest['nbytes'])}"
    )
    r.summary = f"KV at max context {fmt_bytes(total)} > limit {fmt_bytes(limit)}"
    return r


def _max_context(p: CheckedProgram) -> Optional[int]:
    man = p.pte.manifest
    if man is not None and man.lazy_buffers:
        return min(b.max_positions for b in man.lazy_buffers)
    v = p.info["constant_methods"].get("get_max_context_len")
    return v if isinstance(v, int) else None


def rule_max_load(p: CheckedProgram, rules: Rules) -> RuleResult:
    """``max-load-bytes``: planned + constants + named data + delegate blobs within the limit."""
    info, limit = p.info, rules.max_load_bytes
    planned = info["planned_bytes"]
    consts = info["constants"]["bytes"]
    named = info["constants"]["named_data_bytes"]
    delegates = p.delegate_blobs()
    dbytes = sum(d["size"] for d in delegates.values())
    total = planned + consts + named + dbytes
    parts = {"planned": planned, "constant segment": consts, "named data": named, "delegate blobs": dbytes}
    breakdown = " + ".join(f"{k} {v:,}" for k, v in parts.items())
    r = RuleResult("max-load-bytes", total <= limit,
                   f"load {fmt_bytes(total)} <= limit {fmt_bytes(limit)} ({breakdown})",
                   figures={"load_bytes": total, "limit": limit, "planned_bytes": planned,
                            "constant_bytes": consts, "named_data_bytes": named,
                            "delegate_bytes": dbytes})
    if r.passed:
        return r
    # Name the largest single things that load eagerly.
    items: List[Tuple[int, str]] = []
    bufs = planned_buffers(p)
    for k, size in enumerate(info["arena_bytes"]):
        owner = max(info["methods"], key=lambda m: (info["methods"][m]["arenas"] + [0] * (k + 1))[k])
        inside = [b for b in bufs if b["arena"] == k + 1]
        items.append((size, f"planned arena {k + 1} (sized by {owner}"
                      + (f"; largest buffer {kv_name(inside[0])} {fmt_bytes(inside[0]['nbytes'])})" if inside else ")")))
    prog = p.program
    for nd in prog.named_data:
        if not nd.key.startswith("lazykv/"):
            items.append((prog.segments[nd.segment_index].size, f"named data {nd.key!r}"))
    for (loc, idx), d in delegates.items():
        items.append((d["size"], f"{d['id']} delegate blob {idx} ({', '.join(d['methods'])})"))
    for idx, (name, methods, nbytes) in constant_buffers(p).items():
        items.append((nbytes, name))
    items.sort(key=lambda t: -t[0])
    top = "; ".join(f"{name} {fmt_bytes(n)}" for n, name in items[:3] if n)
    r.failures.append(f"load {fmt_bytes(total)} > limit {fmt_bytes(limit)} = {breakdown}; largest: {top}")
    r.summary = f"load {fmt_bytes(total)} > limit {fmt_bytes(limit)}"
    return r


def rule_methods(p: CheckedProgram, rules: Rules) -> RuleResult:
    """``methods``: the program has at least these methods."""
    have = p.pte.method_names
    missing = [m for m in rules.methods if m not in have]
    shown = ", ".join(have)
    r = RuleResult("methods", not missing,
                   f"has {', '.join(rules.methods)} (program methods: {shown})",
                   figures={"expected": list(rules.methods), "methods": list(have), "missing": missing})
    for m in missing:
        r.failures.append(f"missing method {m!r}; the program has: {shown}")
    if missing:
        r.summary = f"missing {', '.join(repr(m) for m in missing)}"
    return r


def _alloc_range(t: Tensor) -> Optional[Tuple[int, int, int]]:
    """(memory id, start, end) of a planned tensor, or None."""
    a = t.allocation
    if a is None:
        return None
    return a.memory_id, a.offset, a.offset + t.nbytes


def rule_shared_kv(p: CheckedProgram, rules: Rules) -> RuleResult:
    """``shared-kv``: every method that binds a KV cache binds the same ones, not overwritten."""
    kv = p.info["kv_buffers"]
    r = RuleResult("shared-kv", True, "", figures={"kv_buffers": len(kv)})
    if not kv:
        r.passed = False
        r.summary = "no position-indexed KV cache found"
        r.failures.append("no position-indexed KV cache found, so no method binds one")
        return r
    order = p.pte.method_names
    kv_methods = [m for m in order if any(m in b["methods"] for b in kv)]
    r.figures["methods"] = kv_methods
    for b in kv:
        missing = [m for m in kv_methods if m not in b["methods"]]
        for m in missing:
            r.failures.append(
                f"{m}: does not bind KV buffer {kv_name(b)} {dtype_shape(b)} (bound by "
                f"{', '.join(b['methods'])}): its methods keep separate caches"
            )
    # Planned caches: same place in every method, and nothing else planned over them.
    kv_ranges: Dict[str, Dict[str, Tuple[int, int, int]]] = {}
    for b in kv:
        if len(b["methods"]) < 2:
            continue
        per = {}
        for m, i in (b.get("value_index") or {}).items():
            t = p.plan(m).tensors.get(i)
            rng = None if t is None else _alloc_range(t)
            if rng is not None:
                per[m] = rng
        if not per:
            continue
        if len(set(per.values())) > 1:
            where = ", ".join(f"{m} at arena {a} offset {s:,}" for m, (a, s, e) in per.items())
            r.failures.append(f"KV buffer {kv_name(b)} is planned in different places ({where}): "
                              f"each method has its own copy")
        else:
            kv_ranges[kv_name(b)] = per
    if kv_ranges:
        kv_values = {(m, i) for b in kv for m, i in (b.get("value_index") or {}).items()}
        spans = {name: next(iter(per.values())) for name, per in kv_ranges.items()}
        for m in order:
            plan = p.plan(m)
            for i, t in plan.tensors.items():
                if (m, i) in kv_values or t.allocation is None:
                    continue
                rng = _alloc_range(t)
                for name, (a, s, e) in spans.items():
                    if rng[0] == a and rng[1] < e and s < rng[2] and (rng[1], rng[2]) != (s, e):
                        r.failures.append(
                            f"KV buffer {name} (arena {a}, bytes {s:,}..{e - 1:,}): {m} plans value "
                            f"{i} ({fmt_bytes(rng[2] - rng[1])}) over it, so running {m} overwrites the cache "
                            f"the other methods keep; export with MemoryPlanningPass("
                            f"share_mutable_buffers=True) or lazy KV"
                        )
                        break
    if r.failures:
        r.passed = False
        r.summary = f"{len(r.failures)} problem(s) across {', '.join(kv_methods)}"
    elif len(kv_methods) == 1:
        r.summary = f"only {kv_methods[0]} binds KV ({len(kv)} buffers): nothing to share"
    else:
        r.summary = f"{', '.join(kv_methods)} bind the same {len(kv)} KV buffers"
    return r
