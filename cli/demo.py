"""``make demo``: lazykv's main job, end to end, on the bundled example decoder.

1. export the example decoder twice at the same max context: static, and with
   ``--lazy-kv-cache``;
2. compare what each plans at load (``inspect``);
3. run the same greedy generation on both: the static program on ExecuTorch's stock
   runtime, the lazy one through lazykv's runtime shim, and check the logits are
   bit-identical while the lazy KV memory grows with the tokens;
4. write a PNG of KV bytes against tokens.

Run: ``python -m lazykv.cli.demo [--out-dir build/demo]``.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import click

from lazykv.cli._quiet import fmt_bytes, quiet_third_party
from lazykv.output_path import atomic_write


def _say(msg: str) -> None:
    click.echo(msg, err=True)


@click.command()
@click.option("--out-dir", type=click.Path(file_okay=False), default="build/demo", show_default=True)
@click.option("--max-context", type=click.IntRange(min=64), default=4096, show_default=True)
@click.option("--prompt-len", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--new-tokens", type=click.IntRange(min=1), default=200, show_default=True)
def main(out_dir, max_context, prompt_len, new_tokens):
    """Export the example decoder static and lazy, run both, compare memory and logits."""
    import torch

    from lazykv.export import ExportConfig, export_model
    from lazykv.inspect import inspect_pte
    from lazykv import runtime_shim

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    warnings.simplefilter("ignore")
    paths = {}
    _say(f"[1/4] exporting the example decoder twice, max context {max_context}: static KV "
         f"cache, then lazy")
    with quiet_third_party():
        for lazy in (False, True):
            name = "example_lazy.pte" if lazy else "example_static.pte"
            _say(f"      {'lazy' if lazy else 'static'} -> {out / name}")
            cfg = ExportConfig(model="example", max_context=max_context, lazy_kv_cache=lazy)
            rep = export_model(cfg, out / name,
                               progress=lambda s, t: _say(f"      {s:<10} {t:6.1f} s"))
            paths[lazy] = rep.path

    static_info, lazy_info = inspect_pte(paths[False]), inspect_pte(paths[True])
    _say("[2/4] what each program plans at load (lazykv inspect):")
    _say(f"      static: {static_info['planned_bytes']:>12,} B planned "
         f"(KV {static_info['kv_bytes_at_max_context']:,} B of it)")
    _say(f"      lazy:   {lazy_info['planned_bytes']:>12,} B planned "
         f"({len([b for b in lazy_info['kv_buffers'] if b['lazy']])} KV buffers left to the shim)")

    _say(f"[3/4] greedy generation, {prompt_len}-token prompt + {new_tokens} tokens: static on "
         f"the stock runtime vs lazy through the shim")
    from executorch.extension.pybindings import portable_lib  # noqa: F401
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401
    from executorch.runtime import Runtime

    stock = Runtime.get().load_program(str(paths[False])).load_method("forward")
    program = runtime_shim.load(paths[True])
    gen = torch.Generator().manual_seed(0)
    vocab = static_info["methods"]["forward"]["outputs"][0]["shape"][-1]
    tokens = torch.randint(0, vocab, (1, prompt_len), generator=gen)
    pos, worst, trace = 0, 0.0, []
    t0 = time.perf_counter()
    with program.session() as session:
        trace.append((0, session.kv_bytes))
        for step in range(new_tokens + 1):
            a = stock.execute([tokens, torch.tensor([pos])])[0]
            b = session.run("forward", [tokens, torch.tensor([pos])])[0]
            worst = max(worst, (a - b).abs().max().item())
            pos += tokens.shape[1]
            trace.append((pos, session.kv_bytes))
            tokens = b.reshape(-1, b.shape[-1])[-1:].argmax(-1).reshape(1, 1)
        stats = session.stats
    seconds = time.perf_counter() - t0
    per_pos = lazy_info["lazy_kv_bytes"] // max_context
    _say(f"      {pos} positions in {seconds:.2f} s; logits max |static - lazy| = {worst} "
         f"({'bit-identical' if worst == 0.0 else 'DIFFERENT'})")
    _say(f"      lazy KV held at the end: {fmt_bytes(trace[-1][1])} for {pos} positions "
         f"(ideal {fmt_bytes(per_pos * pos)}; static holds "
         f"{fmt_bytes(static_info['kv_bytes_at_max_context'])} from load on)")
    _say(f"      growth: {stats.grow_events} grow events, {fmt_bytes(stats.bytes_copied)} copied, "
         f"peak {fmt_bytes(stats.peak_bytes)} (policy 'doubling')")

    png = out / "kv_bytes.png"
    _say(f"[4/4] writing {png}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [p for p, _ in trace]
    ax.step(xs, [b / 2**20 for _, b in trace], where="pre", label="lazy KV held (shim)")
    ax.plot(xs, [per_pos * p / 2**20 for p in xs], "--", label="ideal (bytes/position x positions)")
    ax.axhline(static_info["kv_bytes_at_max_context"] / 2**20, color="r", label="static KV (stock)")
    ax.set_yscale("symlog", linthresh=per_pos * 16 / 2**20)
    ax.set_xlabel("positions filled")
    ax.set_ylabel("KV bytes (MiB)")
    ax.set_title(f"example decoder, max context {max_context}")
    ax.legend()
    fig.tight_layout()
    with atomic_write(png, "the demo's plot") as f:
        fig.savefig(f, dpi=100, format="png")
    click.echo(f"demo done: static plans {static_info['planned_bytes']:,} B, lazy plans "
               f"{lazy_info['planned_bytes']:,} B and held {trace[-1][1]:,} B of KV after "
               f"{pos} positions; logits {'bit-identical' if worst == 0.0 else 'DIFFER'}; plot {png}")
    if worst != 0.0:
        raise SystemExit(1)


def run() -> None:
    """Entry point: ``main`` with ExecuTorch's C++ log lines kept off the terminal."""
    from lazykv.cli._quiet import native_output_captured, silence_import_noise

    silence_import_noise()
    with native_output_captured():
        main()


if __name__ == "__main__":
    run()
