"""``lazykv check --no-duplicate-constants``: no constant stored twice, none resident twice.

Stored twice: two constant-segment buffers, named-data blobs or delegate blobs with the
same bytes (a cheap fingerprint first, sha256 only where fingerprints collide), or a
shared constant the lazykv manifest records as ``stored_once = false``. Resident twice:
a named-data blob used by the XNNPACK delegates of several methods, packed once per
method on the stock runtime (DESIGN fact 7) unless XNNPACK's weight cache is on.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Dict, List, Tuple

from lazykv.check.config import Rules
from lazykv.check.program import CheckedProgram, constant_buffers, fmt_bytes
from lazykv.check.report import RuleResult


def _fingerprint(view) -> Tuple[int, bytes, bytes]:
    n = len(view)
    return n, bytes(view[:64]), bytes(view[max(0, n - 64):])


def _duplicates(blobs: List[Tuple[str, List[str], Callable[[], Any]]]) -> List[List[Tuple[str, List[str], int]]]:
    """Groups (size >= 2) of blobs with equal bytes. ``blobs``: (name, methods, get_view).

    A cheap fingerprint (size, first and last 64 bytes) first; sha256 only for blobs whose
    fingerprints collide, so a program without duplicates is not read in full.
    """
    by_fp: Dict[Tuple, List[int]] = {}
    views = [get() for _, _, get in blobs]
    for k, v in enumerate(views):
        if len(v):
            by_fp.setdefault(_fingerprint(v), []).append(k)
    groups = []
    for ks in by_fp.values():
        if len(ks) < 2:
            continue
        by_hash: Dict[bytes, List[int]] = {}
        for k in ks:
            by_hash.setdefault(hashlib.sha256(views[k]).digest(), []).append(k)
        groups.extend([(blobs[k][0], blobs[k][1], len(views[k])) for k in same]
                      for same in by_hash.values() if len(same) > 1)
    return groups


#: At most this many duplicate groups are spelled out per kind (all are in ``figures``).
_MAX_LISTED = 10


def rule_no_duplicate_constants(p: CheckedProgram, rules: Rules) -> RuleResult:
    """``no-duplicate-constants`` (module docstring)."""
    prog = p.program
    r = RuleResult("no-duplicate-constants", True, "")
    # 1. What the lazykv manifest records about constants shared by FQN.
    for c in p.info.get("shared_constants") or []:
        if not c["stored_once"]:
            r.failures.append(
                f"constant {c['fqn']!r} ({fmt_bytes(c['nbytes'])}) is stored once per method "
                f"({', '.join(c['methods'])}; lazykv manifest: stored_once = false)"
            )
    n_manifest = len(r.failures)
    # 2. Constant-segment tensors with equal bytes.
    consts = constant_buffers(p)
    const_blobs = []
    cs = prog.constant_segment
    segs = prog.segments
    if cs is not None and cs.offsets and segs[cs.segment_index].size:
        seg = p.pte.segment(cs.segment_index)
        offsets = list(cs.offsets)
        for idx in sorted(consts):
            name, methods, nbytes = consts[idx]
            if 0 <= idx < len(offsets):
                start = offsets[idx]
                const_blobs.append((name, methods, lambda s=start, n=nbytes: seg[s:s + n]))
    elif prog.constant_buffers:
        for idx in sorted(consts):
            name, methods, _ = consts[idx]
            if 0 <= idx < len(prog.constant_buffers):
                span = prog.constant_buffers[idx]
                data = p.pte.region[span.start : span.start + span.size]
                const_blobs.append((name, methods, lambda d=data: memoryview(d)))
    # 3. Named data (delegate weights) and delegate blobs with equal bytes; which methods'
    #    delegates name each blob (its key appears in the delegate's payload).
    delegates = p.delegate_blobs()
    named = [nd for nd in prog.named_data if not nd.key.startswith("lazykv/")]
    key_users: Dict[str, List[str]] = {nd.key: [] for nd in named}
    delegate_methods = {m for d in delegates.values() for m in d["methods"]}
    if named and len(delegate_methods) > 1:
        for (loc, idx), d in delegates.items():
            blob = p.delegate_bytes(loc, idx)
            for nd in named:
                if len(nd.key) >= 8 and nd.key.encode() in blob:
                    key_users[nd.key].extend(m for m in d["methods"] if m not in key_users[nd.key])
    named_blobs = [(f"named data {nd.key!r}", key_users[nd.key],
                    lambda i=nd.segment_index: p.pte.segment(i)) for nd in named]
    dblobs = [(f"{d['id']} delegate blob {idx}", d["methods"],
               lambda loc=loc, idx=idx: memoryview(p.delegate_bytes(loc, idx)))
              for (loc, idx), d in delegates.items()]
    groups = []
    for blobs in (const_blobs, named_blobs, dblobs):
        groups.extend(_duplicates(blobs))
    groups.sort(key=lambda g: -g[0][2] * (len(g) - 1))
    for g in groups[:_MAX_LISTED]:
        size = g[0][2]
        desc = "; ".join(name + (f" (used by {', '.join(ms)})" if ms else "") for name, ms, _ in g)
        r.failures.append(f"the same {fmt_bytes(size)} is stored {len(g)} times: {desc}")
    if len(groups) > _MAX_LISTED:
        extra = groups[_MAX_LISTED:]
        r.failures.append(
            f"... and {len(extra)} more duplicated blobs ({fmt_bytes(sum(g[0][2] * (len(g) - 1) for g in extra))} "
            f"stored more than once; all are listed in the JSON report)")
    # 4. Resident twice: one weight packed by the XNNPACK delegates of several methods.
    resident = []
    if not rules.assume_weight_cache:
        xnn_methods = {m for d in delegates.values() if d["id"] == "XnnpackBackend" for m in d["methods"]}
        for nd in named:
            ms = [m for m in key_users[nd.key] if m in xnn_methods]
            if len(ms) > 1:
                resident.append((prog.segments[nd.segment_index].size, nd.key, ms))
    resident.sort(key=lambda t: -t[0])
    if resident:
        order = p.pte.method_names
        methods = sorted({m for _, _, mm in resident for m in mm}, key=order.index)
        size, key, ms = resident[0]
        r.failures.append(
            f"{len(resident)} weights ({fmt_bytes(sum(t[0] for t in resident))}) are packed by the XNNPACK "
            f"delegates of {', '.join(methods)}: each is resident once per method on the stock "
            f"runtime (largest: named data {key!r} {fmt_bytes(size)}, used by {', '.join(ms)}); switch "
            f"XNNPACK's weight cache on before loading (lazykv.runtime_shim.weight_cache.enable()) "
            f"and check with --assume-weight-cache"
        )
    wasted = sum(g[0][2] * (len(g) - 1) for g in groups)
    r.figures = {
        "constant_buffers": len(const_blobs), "named_data": len(named_blobs),
        "delegate_blobs": len(dblobs), "duplicate_bytes": wasted,
        "duplicates": [[{"name": n, "methods": ms, "bytes": b} for n, ms, b in g] for g in groups],
        "resident_per_method": [{"key": k, "bytes": b, "methods": ms} for b, k, ms in resident],
        "assume_weight_cache": rules.assume_weight_cache,
    }
    if r.failures:
        r.passed = False
        parts = []
        if groups:
            parts.append(f"{fmt_bytes(wasted)} stored more than once")
        if resident:
            parts.append(f"{len(resident)} weights resident once per method")
        if n_manifest:
            parts.append(f"{n_manifest} shared constants stored once per method (manifest)")
        r.summary = "; ".join(parts)
    else:
        r.summary = (f"{len(const_blobs)} constant tensors, {len(named_blobs)} named blobs, "
                     f"{len(dblobs)} delegate blobs: each stored once"
                     + (", none packed by two methods' delegates" if len(delegate_methods) > 1
                        and not rules.assume_weight_cache else ""))
    return r
