"""``lazykv inspect``: what a .pte holds and what it costs at load."""

from __future__ import annotations

import json

import click

from lazykv.cli._quiet import fmt_bytes


def _shape(s):
    return "[" + ", ".join(str(d) for d in s) + "]"


def render(info: dict) -> str:
    """The human-readable report of :func:`lazykv.inspect.inspect_pte` output."""
    out = []
    w = out.append
    w(f"{info['file']}  ({fmt_bytes(info['file_bytes'])})")
    mv = info["lazykv_manifest_version"]
    w(f"lazykv manifest: {'version ' + str(mv) if mv else 'none (not exported by lazykv)'}")
    w(f"planned arenas at load: {info['planned_bytes']:,} B ({fmt_bytes(info['planned_bytes'])})"
      f"  per arena: {', '.join(f'{b:,} B' for b in info['arena_bytes']) or 'none'}")
    kv = info["kv_buffers"]
    lazy = [b for b in kv if b["lazy"]]
    w(f"KV cache at max context: {info['kv_bytes_at_max_context']:,} B "
      f"({fmt_bytes(info['kv_bytes_at_max_context'])}); lazy (not planned): "
      f"{info['lazy_kv_bytes']:,} B in {len(lazy)} of {len(kv)} buffers")
    w("")
    w("methods:")
    for name, m in info["methods"].items():
        w(f"  {name}: planned {m['planned_bytes']:,} B, {m['instructions']} instructions, "
          f"{len(m['delegates'])} delegate calls")
        for kind in ("inputs", "outputs"):
            items = []
            for v in m[kind]:
                if "shape" in v:
                    items.append(f"{v['dtype']}{_shape(v['shape'])}"
                                 + ("" if v["dynamism"] == "STATIC" else f" {v['dynamism'].lower()}"))
                else:
                    items.append(f"{v.get('type')}={v.get('value')}")
            w(f"    {kind:<8} {', '.join(items)}")
        w(f"    operators {', '.join(m['operators'])}")
        if m["delegates"]:
            ids = {}
            for d in m["delegates"]:
                ids.setdefault(d["id"], [0, 0])
                ids[d["id"]][0] += 1
                ids[d["id"]][1] += d["bytes"] or 0
            w("    delegates " + ", ".join(f"{k} x{n} ({fmt_bytes(b)})" for k, (n, b) in ids.items()))
    if info["constant_methods"]:
        w("constant methods: " + ", ".join(f"{k}={v}" for k, v in info["constant_methods"].items()))
    w("")
    w("mutable buffers:")
    if not info["mutable_buffers"]:
        w("  none")
    for b in info["mutable_buffers"]:
        tag = "lazy KV" if b["lazy"] else ("KV" if b["kv"] else "state")
        where = "not planned" if b["arena"] is None else f"arena {b['arena']}"
        w(f"  {b['fqn'] or '(unnamed)':<40} {b['dtype']}{_shape(b['shape'])} {b['dynamism'].lower()}"
          f"  {fmt_bytes(b['nbytes'])}  {tag}, {where}, methods {','.join(b['methods'])}")
        why = b.get("planned_because")
        if why and why["cause"] != "state":
            w(f"      planned ({why['cause']}): {why['reason']}. Fix: {why['fix']}")
    c = info["constants"]
    w("")
    w(f"constants: {c['count']} in the constant segment ({fmt_bytes(c['bytes'])}), "
      f"{c['named_data_count']} named blobs for delegates ({fmt_bytes(c['named_data_bytes'])})")
    for name, mc in c["by_method"].items():
        w(f"  {name}: {mc['count']} constants, {fmt_bytes(mc['bytes'])}")
    for sc in info.get("shared_constants") or []:
        w(f"  shared {sc['fqn']}: {fmt_bytes(sc['nbytes'])} methods {','.join(sc['methods'])}"
          f" {'stored once' if sc['stored_once'] else 'stored per method'}")
    est = info.get("memory_estimate")
    if est:
        w("")
        w(f"memory estimate (lazykv.estimate): {fmt_bytes(est['fixed_bytes'])} once (weights "
          f"{fmt_bytes(est['weights_bytes'])}, arenas {fmt_bytes(est['planned_bytes'])}, runtime "
          f"{fmt_bytes(est['runtime_bytes'])})")
        if est["kv_bytes_per_position"]:
            w(f"  + per session {est['kv_bytes_per_position']:,} B per position, "
              f"{fmt_bytes(est['kv_bytes_per_session_at_max_context'])} at max context; one session "
              f"at max context: {fmt_bytes(est['one_session_at_max_context'])}")
        else:
            w("  sessions share the program's planned state (no lazy KV buffers)")
    return "\n".join(out)


@click.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
def inspect(file, as_json):
    """Show what FILE.pte holds: per method its inputs, outputs, planned arena bytes,
    operators and delegates; every mutable buffer (FQN, shape, dtype, dynamism, bytes,
    arena, methods; KV caches marked, lazy ones too); constants; and the KV bytes at max
    context.

    \b
    JSON keys scripts can rely on: planned_bytes, methods{name: {planned_bytes, inputs,
    outputs}}, kv_buffers[{fqn, shape, dtype, dynamism, nbytes, lazy, methods}],
    kv_bytes_at_max_context, lazy_kv_bytes, constants, mutable_buffers,
    memory_estimate{fixed_bytes, weights_bytes, planned_bytes, runtime_bytes,
    kv_bytes_per_position, kv_bytes_per_session_at_max_context, one_session_at_max_context}
    (resident bytes expected once loaded, see lazykv.estimate).
    \b
    Exit codes: 0 success; 2 FILE cannot be read (missing, truncated, not a .pte).
    """
    from lazykv.inspect import inspect_pte  # torch-free: the format layer only

    from lazykv.estimate import footprint

    info = inspect_pte(file)
    info["memory_estimate"] = footprint(info).as_json()
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
    else:
        click.echo(render(info))
