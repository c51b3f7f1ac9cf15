"""Measurements that run in a process of their own.

``python -m benchmarks.worker TASK JSON`` runs one task in a fresh interpreter and prints
its result as one JSON line. ``python -m benchmarks.worker serve`` is a fork server: it
imports torch, executorch's runtime and the shim once (about 7 s of CPU per process, most
of it ``executorch.exir``'s ``__init__``), then runs each task it is sent in a child
``fork()``ed from that state, so each measurement still has a process of its own (its own
heap, RSS, high-water mark and runtime state) without paying the imports again.

RSS figures come from ``/proc/self/status``; "peak during" a step is ``VmHWM`` after the
step, with the high-water mark reset (``clear_refs`` 5) just before it. Both ways import
the same modules (:func:`preload`) before any measurement, so import costs never land in
one.

About 770 lines in one module on purpose: one function per task, each the subprocess side
of a case in :mod:`benchmarks.cases`, sharing the RSS helpers and the fork server.
"""

from __future__ import annotations

import dataclasses
import gc
import functools
import json
import logging
import os
import sys
import time
import warnings

from benchmarks.common import proc_status, reset_peak_rss

TASKS = {}


def task(fn):
    TASKS[fn.__name__] = fn
    return fn


def _quiet() -> None:
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)


def _runtime():
    """executorch's runtime with the LLM custom ops registered (DESIGN fact 3); the same
    imports for the stock and the shim paths."""
    from lazykv.runtime_shim.program import _runtime as shim_runtime

    return shim_runtime()


def preload() -> None:
    """Everything the measurement tasks import, imported before any of them runs (fresh
    process and fork server alike, so both start from the same modules)."""
    import torch  # noqa: F401
    from lazykv import runtime_shim  # noqa: F401
    from lazykv.runtime_shim import weight_cache  # noqa: F401

    _runtime()


def _rss() -> int:
    gc.collect()
    return proc_status()["VmRSS"]


# ------------------------------------------------------------------------------ export


@task
def checkpoints(presets):
    # Private, and the one thing here that still is: lazykv has no public function that
    # writes (or returns) the cached random checkpoint its exports read;
    # write_random_checkpoint writes into a directory of the caller's, not that cache.
    from lazykv.export import checkpoint_for
    from lazykv.models.llama import PRESETS

    for p in presets:
        checkpoint_for(PRESETS[p], 0)
    return {"presets": presets}


@task
def export(art, out):
    """Export one artifact (see :class:`benchmarks.artifacts.Art`)."""
    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))  # pinned lanes: one thread per CPU

    if art["kind"] == "linear2":
        return _export_linear2(out)
    from lazykv.export import ExportConfig, export_model
    from lazykv.models.llama import PRESETS

    kw = dict(model="llama", max_context=art["max_context"], shape=PRESETS[art["preset"]],
              lazy_kv_cache=art["lazy"], xnnpack=True, seed=0)
    if art.get("methods"):
        kw["methods"] = tuple(art["methods"])
    cfg = ExportConfig(**kw)
    with torch.no_grad():
        rep = export_model(cfg, out)
    return {
        "planned_bytes": rep.planned_bytes,
        "non_const_buffer_sizes": rep.non_const_buffer_sizes,
        "kv_bytes_at_max_context": rep.kv_bytes_at_max_context,
        "lazy_buffers": rep.lazy_buffers,
        "file_bytes": rep.file_bytes,
        "stage_seconds": rep.stage_seconds,
        "export_seconds": rep.total_seconds,
    }


LINEAR_LAYERS, LINEAR_WIDTH, LINEAR_PREFILL_ROWS = 8, 2048, 16


def _export_linear2(out):
    """``prefill`` (16 rows) and ``decode`` (1 row) over the same 8 x Linear(2048, 2048),
    XNNPACK (DESIGN fact 7, issue 6)."""
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        *[torch.nn.Linear(LINEAR_WIDTH, LINEAR_WIDTH) for _ in range(LINEAR_LAYERS)]
    ).eval()
    with torch.no_grad():
        programs = {
            "prefill": torch.export.export(model, (torch.randn(LINEAR_PREFILL_ROWS, LINEAR_WIDTH),)),
            "decode": torch.export.export(model, (torch.randn(1, LINEAR_WIDTH),)),
        }
    edge = to_edge_transform_and_lower(programs, partitioner=[XnnpackPartitioner()])
    et = edge.to_executorch()
    tmp = out + f".tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        et.write_to_file(f)
    os.replace(tmp, out)
    return {"planned_bytes": 0, "file_bytes": os.path.getsize(out),
            "export_seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------------------ load


@task
def load(mode, path, cache_dir=None, method="forward"):
    """One load in this fresh process. ``stock``: ``Runtime.load_program(path)`` +
    ``load_method``; ``shim``: ``lazykv.runtime_shim.load(path)`` + the method loaded;
    ``native``: the C++ loader through ``runtime_shim.native_runtime`` + the method + a
    session. RSS figures are above the RSS after imports; ``written``: bytes this process
    wrote while loading (``/proc/self/io`` wchar; for the shim including the metadata its
    hashing thread stores after ``load`` returned) and ``cache_growth``: bytes added under
    ``cache_dir``."""
    from lazykv import runtime_shim

    rt = _runtime()
    if mode == "native":
        from lazykv.runtime_shim import native_runtime

        native_runtime.library()  # loading the library is an import, not a load
    cache_before = _tree_bytes(cache_dir)
    io_before = _written()
    base = _rss()
    reset_peak_rss()
    t0 = time.perf_counter()
    if mode == "stock":
        prog = rt.load_program(path)
        m = prog.load_method(method)
        hit = None
    elif mode == "native":
        prog = native_runtime.NativeProgram(path)
        prog.load_method(method)
        m, hit = prog.session(), None
    else:
        prog = runtime_shim.load(path, cache_dir=cache_dir)
        prog.load_method(method)  # the shim loads methods on first use; load it now
        m, hit = prog, prog.cache_hit
    seconds = time.perf_counter() - t0
    st = proc_status()
    after = _rss()
    if mode == "shim":
        # A first load hashes the file and stores its metadata in a thread, off the
        # critical path: wait for it, so what it writes is counted.
        prog.digest
    return {"seconds": seconds, "base_rss": base, "growth": after - base,
            "peak_during": st["VmHWM"] - base, "cache_hit": hit, "alive": m is not None,
            "written": _written() - io_before, "cache_growth": _tree_bytes(cache_dir) - cache_before}


def _written() -> int:
    """Bytes this process has passed to write() so far (``/proc/self/io`` wchar)."""
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("wchar:"):
                return int(line.split()[1])
    return 0


def _tree_bytes(folder) -> int:
    """Bytes of the files under ``folder`` (0 if it does not exist)."""
    if not folder or not os.path.isdir(folder):
        return 0
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


# ------------------------------------------------------------------------------ decode


def _chunk(prog, method="forward") -> int:
    """Longest token chunk one call takes (export_llm's bound is max_seq_len - 1)."""
    return int(prog.method_info(method).inputs[0].sizes[1])


def _argmax(logits):
    return int(logits.reshape(-1, logits.shape[-1])[-1].argmax())


@task
def decode(static, lazy, contexts, blocks, steps, max_context, seed=0, route="shim"):
    """Stock runtime + static program against shim + lazy program, alternating blocks.

    Both get the same prompt (prefilled in chunks of ``max_seq_len``), of ``context + 1``
    tokens. Then each block runs ``steps`` greedy steps from the end of the prompt as a
    generation loop does (execute, argmax, next inputs), first on one side and then on
    the other, alternating which side goes first; the lazy session then trims back to the
    prompt, so every block decodes the same positions from the same token (the static
    program overwrites its cache rows). The two sides give the same tokens and logits
    (checked). ``route="native"``: the lazy side is the C++ runtime's session through
    ``runtime_shim.native_runtime`` instead of the Python shim. A block's ratio is (static seconds) / (lazy seconds), i.e. lazy tokens/s
    over static tokens/s. The prompt is one past ``context`` so that trimming back keeps
    the doubling policy's capacity (checked): no block regrows the storage.

    Whole loops, not single calls interleaved step by step: XNNPACK's thread pool spins
    for a few microseconds after a call and then sleeps, so a call made right after the
    other program's call finds the pool awake (~20 us faster on tiny), and interleaving
    hands that advantage to whichever side has less Python before its call. Within a
    loop both sides pay the same wake-up after their own argmax.
    """
    import torch
    from lazykv import runtime_shim

    torch.manual_seed(seed)
    rt = _runtime()
    sm = rt.load_program(static).load_method("forward")
    if route == "native":
        from lazykv.format.pte import open_pte
        from lazykv.runtime_shim.native_runtime import NativeProgram

        with open_pte(lazy) as pte:
            plan = pte.plan("forward")
            max_seq_len = int(plan.tensors[plan.inputs[0]].sizes[1])
        lp = NativeProgram(lazy, policy="doubling")
    else:
        lp = runtime_shim.load(lazy, policy="doubling")
        max_seq_len = _chunk(lp)

    def loop(call, tok, pos):
        """``steps`` greedy steps from ``tok`` at ``pos``: (seconds, tokens, logits)."""
        toks, kept = [], []
        t0 = time.perf_counter()
        for i in range(steps):
            logits = call([torch.tensor([[tok]], dtype=torch.long),
                           torch.tensor([pos + i], dtype=torch.long)])[0]
            tok = _argmax(logits)
            toks.append(tok)
            kept.append(logits.clone())  # the runtime reuses its output buffer
        return time.perf_counter() - t0, toks, torch.stack(kept)

    out = {}
    for ctx in contexts:
        start = min(ctx + 1, max_context - steps - 2)
        with lp.session() as sess:
            prompt = torch.randint(0, 1000, (1, start), dtype=torch.long)
            pos = 0
            while pos < start:
                n = min(max_seq_len, start - pos)
                chunk = prompt[:, pos:pos + n].contiguous()
                ls = sm.execute([chunk, torch.tensor([pos], dtype=torch.long)])[0]
                ll = sess.run("forward", [chunk, torch.tensor([pos], dtype=torch.long)])[0]
                pos += n
            diff = float((ls - ll).abs().max())
            tok = _argmax(ls)
            # As a generation loop calls it: sess.run("forward", inputs), no wrapper frame.
            lazy_call = functools.partial(sess.run, "forward")

            blk, held = [], None
            for b in range(blocks + 1):  # block 0 warms both sides up, untimed
                sides = [("static", sm.execute), ("lazy", lazy_call)]
                if b % 2:
                    sides.reverse()
                got = {}
                for name, call in sides:
                    got[name] = loop(call, tok, start)
                    if name == "lazy":
                        sess.trim(steps)
                (ts, tok_s, ls), (tl, tok_l, ll) = got["static"], got["lazy"]
                if tok_s != tok_l:
                    raise AssertionError(f"context {ctx}: tokens differ in block {b}")
                diff = max(diff, float((ls - ll).abs().max()))
                if held is None:
                    held = sess.kv_bytes
                elif sess.kv_bytes != held:
                    raise AssertionError(f"context {ctx}: trimming back changed the KV storage")
                if b:
                    blk.append({"static_tps": steps / ts, "lazy_tps": steps / tl, "ratio": ts / tl})
            out[str(ctx)] = {"start": start, "end": start + steps, "blocks": blk,
                             "max_abs_diff": diff, "kv_bytes": sess.kv_bytes, "steps": steps}
    return out


# ------------------------------------------------------------------------------ policies


@task
def policies(lazy, policies, max_tokens, chunk):
    """KV bytes held against positions filled, for each growth policy (one session each)."""
    import torch
    from lazykv import runtime_shim

    _runtime()
    out = {}
    for spec in policies:
        prog = runtime_shim.load(lazy, policy=spec)
        prog.load_method("forward")
        with prog.session() as s:
            trace = [(0, s.kv_bytes, s.capacity)]
            pos = 0
            tokens = torch.randint(0, 1000, (1, chunk), dtype=torch.long)
            while pos + chunk <= max_tokens:
                s.run("forward", [tokens, torch.tensor([pos], dtype=torch.long)])
                pos += chunk
                trace.append((pos, s.kv_bytes, s.capacity))
            st = s.stats
            out[spec] = {
                "trace": trace,
                "bytes_per_position": st.bytes_per_position,
                "max_positions": st.max_positions,
                "grow_events": st.grow_events,
                "bytes_copied": st.bytes_copied,
                "peak_bytes": st.peak_bytes,
                "policy": prog.policy.spec(),
                "params": dataclasses.asdict(prog.policy),
            }
        del prog
        gc.collect()
    return out


# ------------------------------------------------------------------------------ transient


@task
def transient(lazy, fill):
    """One doubling grow event at ``fill`` positions (capacity ``fill`` -> ``2 fill``):
    the allocator's peak over committed bytes, and the process's peak RSS during the
    growing call against an identical call that does not grow."""
    import torch
    from lazykv import runtime_shim

    _runtime()
    prog = runtime_shim.load(lazy, policy="doubling")
    prog.load_method("forward")
    max_seq_len = _chunk(prog)
    s = prog.session()
    one = torch.tensor([[1]], dtype=torch.long)
    pos = 0
    while pos < fill - 1:
        n = min(max_seq_len, fill - 1 - pos)
        s.run("forward", [torch.randint(0, 1000, (1, n)), torch.tensor([pos])])
        pos += n
    s.run("forward", [one, torch.tensor([pos])])  # a one-token call that fits: warms that path
    pos += 1
    assert s.capacity == fill, (s.capacity, fill)
    alloc = s.allocator
    before = s.stats
    committed_before = before.current_bytes
    buf_bytes_old = committed_before // max(1, len(prog.buffers))
    n_events, peak_before = len(alloc.events), alloc.peak_bytes
    rss0 = _rss()
    reset_peak_rss()
    s.run("forward", [one, torch.tensor([pos])])
    hwm_grow = proc_status()["VmHWM"] - rss0
    pos += 1
    after = s.stats
    events = [dict(kind=e.kind, old=e.old_bytes, new=e.new_bytes, current=e.current_bytes)
              for e in alloc.events[n_events:]]
    # The allocator's own peak, which this call raised (an earlier grow set the old one);
    # else the same figure from the events: old and new storage of the buffer being
    # copied are both live, i.e. current + old.
    tracked_peak = alloc.peak_bytes if alloc.peak_bytes > peak_before else max(
        [committed_before] + [e["current"] + e["old"] for e in events if e["kind"] == "grow"])
    # control: the same call, no growth
    rss1 = _rss()
    reset_peak_rss()
    s.run("forward", [one, torch.tensor([pos])])
    hwm_ctrl = proc_status()["VmHWM"] - rss1
    rss_committed_after = _rss() - rss0
    s.close()
    return {
        "fill": fill,
        "buffers": len(prog.buffers),
        "committed_before": committed_before,
        "committed_after": after.current_bytes,
        "tracked_peak": tracked_peak,
        "buffer_old": buf_bytes_old,
        "buffer_new": after.current_bytes // max(1, len(prog.buffers)),
        "events": events,
        "rss_peak_grow_call": hwm_grow,
        "rss_peak_plain_call": hwm_ctrl,
        "rss_growth_after": rss_committed_after,
        "filled_bytes": fill * before.bytes_per_position,
    }


# ------------------------------------------------------------------------------ multimethod


def _mm_inputs(spec, gen):
    """``["randn", shape]`` or ``["tokens", length, pos]`` -> the method's user inputs."""
    import torch

    if spec[0] == "randn":
        return [torch.randn(*spec[1], generator=gen)]
    return [torch.randint(0, 1000, (1, spec[1]), generator=gen), torch.tensor([spec[2]])]


@task
def multimethod_plan(path, methods, kv_positions):
    """How to run ``path`` method by method: per method, the shapes and dtypes of the KV
    storage to pass after the user's inputs (``kv_positions`` positions each, as a
    session would hold; a lazy program's KV buffers are inputs once rebound)."""
    from lazykv import runtime_shim

    prog = runtime_shim.load(path)
    bufs = {b.fqn: b for b in prog.buffers}
    kv = {name: [[b.fqn, list(b.shape_at(kv_positions)), b.dtype]
                 for b in (bufs[f] for f in prog.method_info(name).lazy_fqns)]
          for name in methods}
    return {"kv": kv}


@task
def multimethod(path, mode, methods, inputs, plan=None):
    """Resident memory of a two-method program, from RSS before the program loads.

    ``off``/``on``: XNNPACK's weight cache switched (``weight_cache.enable``), then the
    shim's runtime engine loads the program (``native_engine.RawProgram``: the stock
    ExecuTorch runtime, lazy buffers rebound in memory) and each method in turn and runs
    it with the KV storage of ``plan`` (see :func:`multimethod_plan`), a point after
    each: the one-method point needs methods loaded one at a time,
    which ``runtime_shim.load`` does not do for a multi-method program (it loads them all
    inside the cache setting, by design). ``default``: plain ``runtime_shim.load(path)``
    and a session running both methods: what users get. ``inputs[name]`` is
    ``["randn", shape]`` or ``["tokens", length, pos]``. KV storage is not weights: it is
    left out of the points.
    """
    import torch
    from lazykv import runtime_shim
    from lazykv.runtime_shim import weight_cache

    _runtime()
    gen = torch.Generator().manual_seed(1)
    base = _rss()
    took = prog = sess = None
    load_s, kv_bytes = {}, 0
    if mode == "default":
        prog = runtime_shim.load(path)
        sess = prog.session()
    else:
        from lazykv.runtime_shim.native_engine import RawProgram

        took = weight_cache.enable(mode == "on")
        et = RawProgram(path, path)
        kv = {}  # one tensor per buffer, shared by the methods (as in a session)
        for fqn, shape, dtype in (b for name in methods for b in plan["kv"][name]):
            if fqn not in kv:
                kv[fqn] = torch.zeros(shape, dtype=getattr(torch, dtype))
        kv_bytes = sum(t.numel() * t.element_size() for t in kv.values())
        loaded = {}
    points = {"loaded": _rss() - base - kv_bytes}
    for name in methods:
        args = _mm_inputs(inputs[name], gen)
        t0 = time.perf_counter()
        if prog is not None:
            prog.load_method(name)  # a no-op: load() loaded every method
            load_s[name] = time.perf_counter() - t0
            sess.run(name, args)
            kv_bytes = sess.kv_bytes
        else:
            loaded[name] = et.method(name)
            load_s[name] = time.perf_counter() - t0
            loaded[name].execute(args + [kv[fqn] for fqn, _, _ in plan["kv"][name]])
        points[name] = _rss() - base - kv_bytes
    return {"mode": mode, "took_effect": took, "points": points, "load_s": load_s,
            "cache_enabled_now": weight_cache.is_enabled(),
            "shim_weight_cache": getattr(prog, "weight_cache", None)}


# ------------------------------------------------------------------------------ sessions


@task
def sessions(lazy, counts, tokens):
    """RSS with 1, 2, 4 sessions of ``tokens`` positions each over one loaded program."""
    import torch
    from lazykv import runtime_shim

    _runtime()
    base = _rss()
    prog = runtime_shim.load(lazy, policy="doubling")
    prog.load_method("forward")
    loaded = _rss() - base
    max_seq_len = _chunk(prog)
    # Warm the decode path (XNNPACK workspace, first-call allocations), then give it back.
    with prog.session() as w:
        w.run("forward", [torch.randint(0, 1000, (1, max_seq_len)), torch.tensor([0])])
    warm = _rss() - base
    open_sessions, points = [], {}
    for n in sorted(counts):
        while len(open_sessions) < n:
            s = prog.session()
            pos = 0
            while pos < tokens:
                k = min(max_seq_len, tokens - pos)
                s.run("forward", [torch.randint(0, 1000, (1, k)), torch.tensor([pos])])
                pos += k
            open_sessions.append(s)
        points[str(n)] = {"rss": _rss() - base, "kv_bytes": sum(s.kv_bytes for s in open_sessions)}
    for s in open_sessions:
        s.close()
    open_sessions.clear()
    closed = _rss() - base
    return {"base_rss": base, "loaded": loaded, "warm": warm, "points": points, "closed": closed,
            "kv_per_session": tokens * prog.bytes_per_position}


@task
def interleave(lazy, prompt_len, new_tokens, seed=0):
    """Two sessions decoding greedily, alone and then interleaved token by token."""
    import torch
    from lazykv import runtime_shim

    _runtime()
    prog = runtime_shim.load(lazy)
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 1000, (1, prompt_len), generator=gen) for _ in range(2)]

    def start(s, prompt):
        return _argmax(s.run("forward", [prompt, torch.tensor([0])])[0])

    def step(s, tok):
        return _argmax(s.run("forward", [torch.tensor([[tok]]), torch.tensor([s.offset])])[0])

    alone = []
    for p in prompts:
        with prog.session() as s:
            toks = [start(s, p)]
            for _ in range(new_tokens - 1):
                toks.append(step(s, toks[-1]))
            alone.append(toks)
    a, b = prog.session(), prog.session()
    inter = [[start(a, prompts[0])], [start(b, prompts[1])]]
    for _ in range(new_tokens - 1):
        inter[0].append(step(a, inter[0][-1]))
        inter[1].append(step(b, inter[1][-1]))
    a.close(), b.close()
    mism = sum(x != y for i in range(2) for x, y in zip(alone[i], inter[i]))
    return {"mismatches": mism, "tokens": 2 * new_tokens}


# ------------------------------------------------------------------------------ serving


def _feed(s, toks, chunk):
    """Feed ``toks`` ([1, S]) from the session's offset in calls of ``chunk``; last logits."""
    import torch

    out = None
    for i in range(0, toks.shape[1], chunk):
        out = s.run("forward", [toks[:, i:i + chunk].contiguous(), torch.tensor([s.offset])])[0]
    return out


def _greedy_steps(s, first, steps):
    """``steps`` greedy decode calls from token ``first``: every call's logits."""
    import torch

    outs, tok = [], first
    for _ in range(steps):
        out = s.run("forward", [torch.tensor([[tok]]), torch.tensor([s.offset])])[0]
        outs.append(out)
        tok = _argmax(out)
    return outs


@task
def serving_fork(lazy, prompt_len, steps, forks=5, seed=0):
    """A ``prompt_len``-token prompt, then ``forks`` forks of it timed one by one (each
    closed, RSS and allocator bytes read while it lives), then the session and a fork
    decode ``steps`` greedy tokens each from different first tokens; two fresh sessions
    fed the same calls give the references (their prefills give more prefill timings)."""
    import torch
    from lazykv import runtime_shim

    _runtime()
    prog = runtime_shim.load(lazy, policy="doubling")
    prog.load_method("forward")
    chunk = _chunk(prog)
    with prog.session() as w:  # warm the call path at this chunk size
        w.run("forward", [torch.randint(0, 1000, (1, chunk)), torch.tensor([0])])
    prompt = torch.randint(0, 1000, (1, prompt_len), generator=torch.Generator().manual_seed(seed))
    prefill_s = []
    a = prog.session()
    t = time.perf_counter()
    _feed(a, prompt, chunk)
    prefill_s.append(time.perf_counter() - t)
    fork_s, fork_rss, fork_alloc, fork_copied = [], [], [], []
    for _ in range(forks):
        rss0 = _rss()
        t = time.perf_counter()
        f = a.fork()
        fork_s.append(time.perf_counter() - t)
        fork_rss.append(_rss() - rss0)
        fork_alloc.append(f.allocator.current_bytes)
        fork_copied.append(f.stats.bytes_copied)
        f.close()
    b = a.fork()
    firsts = (5, 9)
    outs = {0: [], 1: []}
    for _ in range(steps):  # interleaved: the two must not share anything
        for k, s in enumerate((a, b)):
            tok = firsts[k] if not outs[k] else _argmax(outs[k][-1])
            outs[k] += _greedy_steps(s, tok, 1)
    a.close(), b.close()
    max_diff, equal = 0.0, True
    for k in (0, 1):
        with prog.session() as r:
            t = time.perf_counter()
            _feed(r, prompt, chunk)
            prefill_s.append(time.perf_counter() - t)
            ref = _greedy_steps(r, firsts[k], steps)
        for x, y in zip(ref, outs[k]):
            equal = equal and torch.equal(x, y)
            max_diff = max(max_diff, (x - y).abs().max().item())
    return {"prompt_len": prompt_len, "steps": steps, "prefill_s": prefill_s, "fork_s": fork_s,
            "fork_rss": fork_rss, "fork_alloc": fork_alloc, "fork_copied": fork_copied,
            "prefix_bytes": prompt_len * prog.bytes_per_position, "bit_exact": equal,
            "max_abs_diff": max_diff, "loadavg": os.getloadavg()[0]}


def _grid_calls(n, tail_from, grid=32):
    """Calls (start, end) covering positions [0, n): ``grid``-long calls up to
    ``tail_from`` (a multiple of ``grid``), then one call per position. A prefix that
    ends at a call boundary is computed alike by any session fed this way (XNNPACK may
    round a position differently inside a longer call)."""
    cuts = list(range(0, min(n, tail_from), grid)) + list(range(min(n, tail_from), n))
    return [(c, min(e, n)) for c, e in zip(cuts, cuts[1:] + [n])]


def _feed_calls(s, toks, calls):
    import torch

    out = None
    for a, b in calls:
        if b > s.offset:
            a = max(a, s.offset)
            out = s.run("forward", [torch.tensor([toks[a:b]]), torch.tensor([a])])[0]
    return out


@task
def serving_cache(lazy, system_len, own_min, own_max, inserts, fetches, budget_prefixes, seed=0):
    """PromptCache on a real model: ``inserts`` prompts (a shared ``system_len``-token
    system prompt + their own tokens) and ``fetches`` queries in a seeded order, with
    max_bytes = ``budget_prefixes`` x the longest prompt. After every call the cache's
    bytes; the process's peak RSS over the loaded, warmed program; every fetched
    session's logits against a fresh session fed the same calls; times of a hit
    (fork + rest) and of computing the whole query."""
    import random

    import torch
    from lazykv import runtime_shim
    from lazykv.runtime_shim import PromptCache

    _runtime()
    prog = runtime_shim.load(lazy, policy="doubling")
    prog.load_method("forward")
    from lazykv.runtime_shim.generate import vocab_size

    bpp = prog.bytes_per_position
    vocab = vocab_size(prog)
    rng = random.Random(seed)
    system = [rng.randrange(vocab) for _ in range(system_len)]
    prompts = []
    while len(prompts) < inserts:
        n = rng.randint(own_min, own_max)
        if (system_len + n) % 32:  # a prompt's own calls end off the grid (see _grid_calls)
            prompts.append(system + [rng.randrange(vocab) for _ in range(n)])
    longest = max(len(p) for p in prompts)
    cache = PromptCache(prog, budget_prefixes * longest * bpp)
    chunk = _chunk(prog)
    with prog.session() as w:  # warm the call lengths the run uses
        _feed_calls(w, prompts[0], _grid_calls(40, 32))
        _feed(w, torch.tensor([prompts[0][40:40 + chunk]]), chunk)
    ops = ["i"] * inserts + ["f"] * fetches
    rng.shuffle(ops)
    ops.insert(0, ops.pop(ops.index("i")))
    base = _rss()
    reset_peak_rss()
    held_max, mismatches, hit_s, full_s, kinds = 0, 0, [], [], []
    inserted = []
    for op in ops:
        if op == "i":
            p = prompts[len(inserted)]
            with prog.session() as s:
                _feed_calls(s, p, _grid_calls(len(p), (len(p) - 1) // 32 * 32))
                cache.insert(s, p)
            inserted.append(p)
            held_max = max(held_max, cache.bytes)
            continue
        kind = rng.choice(["again", "extend", "system", "miss"])
        b = rng.choice(inserted)
        q = {"again": b, "extend": b + [rng.randrange(vocab) for _ in range(5)],
             "system": system + [rng.randrange(vocab) for _ in range(6)],
             "miss": [rng.randrange(vocab) for _ in range(12)]}[kind]
        t = time.perf_counter()
        s, reused = cache.fetch(q)
        rest = [(a, min(a + chunk, len(q))) for a in range(reused, len(q), chunk)]
        got = _feed_calls(s, q, rest)
        dt = time.perf_counter() - t
        s.close()
        held_max = max(held_max, cache.bytes)
        kinds.append([kind, reused])
        with prog.session() as r:  # the same calls as the entry's up to `reused`, then the rest
            ref = _feed_calls(r, q, _grid_calls(reused, reused // 32 * 32) + rest)
        mismatches += 0 if torch.equal(ref, got) else 1
        if reused:
            with prog.session() as r:  # what a hit saves: the whole query in ordinary calls
                t = time.perf_counter()
                _feed(r, torch.tensor([q]), chunk)
                full_s.append(time.perf_counter() - t)
            hit_s.append(dt)
    peak = proc_status()["VmHWM"] - base
    st = cache.stats
    cache.clear()
    return {"budget": cache.max_bytes, "prefix_bytes": longest * bpp, "held_max": held_max,
            "peak_rss_growth": peak, "mismatches": mismatches, "fetches": fetches,
            "hit_s": hit_s, "full_s": full_s, "stats": st.as_dict(), "kinds": kinds,
            "loadavg": os.getloadavg()[0]}


@task
def serving_estimate(lazy, counts, tokens):
    """:func:`sessions` (RSS with 1, 2, 4 sessions of ``tokens`` positions over one loaded
    program) beside ``lazykv.estimate``'s figure for each point."""
    from lazykv.estimate import footprint_of
    from lazykv.runtime_shim.policy import parse_policy

    r = sessions(lazy, counts, tokens)
    fp = footprint_of(lazy)
    r["estimate"] = {str(n): fp.estimate(tokens, n, parse_policy("doubling")) for n in counts}
    r["fixed_estimate"] = fp.fixed_bytes
    return r


def serve() -> None:
    """Fork server: read one ``{"task", "args"}`` JSON line at a time on stdin, run it in a
    forked child, answer one JSON line ``{"out" | "error", "wall", "cpu", "status"}``."""
    import traceback

    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # the runtime's C++ logs and stray prints must not reach the protocol
    sys.stdout = sys.stderr
    preload()
    proto.write(json.dumps({"ready": os.getpid()}) + "\n")
    proto.flush()
    for line in sys.stdin:
        req = json.loads(line)
        r, w = os.pipe()
        t0 = time.perf_counter()
        pid = os.fork()
        if pid == 0:  # the child: one task, then exit without teardown
            os.close(r)
            code = 0
            try:
                res = {"out": TASKS[req["task"]](**req["args"])}
            except BaseException:
                res, code = {"error": traceback.format_exc()}, 1
            with os.fdopen(w, "w") as f:
                f.write(json.dumps(res))
            os._exit(code)
        os.close(w)
        with os.fdopen(r) as f:
            data = f.read()
        _, status, ru = os.wait4(pid, 0)
        res = json.loads(data) if data else {"error": f"child died (wait status {status})"}
        res.update(wall=time.perf_counter() - t0, cpu=ru.ru_utime + ru.ru_stime, status=status)
        proto.write(json.dumps(res) + "\n")
        proto.flush()


def main(argv):
    _quiet()
    name, args = argv[0], json.loads(argv[1]) if len(argv) > 1 else {}
    if name == "serve":
        serve()
        os._exit(0)
    if name not in ("export", "checkpoints"):
        preload()
    result = TASKS[name](**args)
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    # Skip interpreter teardown (the runtime's destructors can be slow).
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
