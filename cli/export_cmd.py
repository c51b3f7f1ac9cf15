"""``lazykv export``: export_llm's configurations (``--config``), or a model with random
weights, to a ``.pte``."""

from __future__ import annotations

import click

from lazykv.cli._quiet import fmt_bytes, quiet_third_party, silence_import_noise

_EPILOG = """\b
Exit codes:
  0  the .pte was written
  1  lazykv refused the export (e.g. a KV cache that is read in full); the message
     names the buffer, the reading node and the fix
  2  usage error (e.g. --max-seq-len above --max-context), or -o cannot be written
     (a directory, device, FIFO or link; a folder that is not writable): checked
     before any export work
"""


@click.command(epilog=_EPILOG, context_settings={"ignore_unknown_options": False})
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
              default=None,
              help="An export_llm configuration (YAML), read as `python -m executorch.extension."
                   "llm.export.export_llm --config FILE` reads it, with KEY=VALUE overrides as "
                   "arguments (Hydra syntax: +key=value for a key the file does not set). "
                   "Your model class, checkpoint, params, quantizers, dtypes and backends; "
                   "without --lazy-kv-cache the .pte is byte-identical to export_llm's.")
@click.argument("overrides", nargs=-1)
@click.option("--strict", is_flag=True,
              help="With --lazy-kv-cache: refuse the export if any KV cache must stay planned "
                   "(ring buffer, masked or cast read) instead of leaving it planned and "
                   "listing it with its reason.")
@click.option("--model", type=click.Choice(["llama", "example"]), default="llama", show_default=True,
              help="'llama': ExecuTorch's own Llama (executorch.examples.models.llama); "
                   "'example': lazykv's bundled small decoder (examples/decoder.py).")
@click.option("--preset", type=click.Choice(["tiny", "stories110m"]), default=None,
              help="Llama size: tiny (4 layers, dim 256, 8 heads, 4 KV heads, vocab 1024) or "
                   "stories110m (12 layers, dim 768, 12 heads, vocab 32000). Default: tiny.")
@click.option("--n-layers", type=click.IntRange(min=1), help="Llama: override the layer count.")
@click.option("--dim", type=click.IntRange(min=1), help="Llama: override the model width.")
@click.option("--n-heads", type=click.IntRange(min=1), help="Llama: override the attention heads.")
@click.option("--n-kv-heads", type=click.IntRange(min=1), help="Llama: override the KV heads.")
@click.option("--vocab-size", type=click.IntRange(min=2), help="Llama: override the vocabulary.")
@click.option("--max-context", type=click.IntRange(min=2), default=None,
              help="Positions the KV cache can hold (its exported upper bound). Required "
                   "without --config (with it: export.max_context_length=N).")
@click.option("--max-seq-len", type=click.IntRange(min=1), default=None,
              help="Longest prompt chunk one call accepts, at most --max-context (default: "
                   "128 for llama, 64 for example, capped at --max-context).")
@click.option("--lazy-kv-cache", is_flag=True,
              help="Mark the KV cache DYNAMIC_UNBOUND and leave it out of memory planning, "
                   "after proving nothing reads past the filled prefix. Run the result with "
                   "lazykv's runtime shim (`lazykv generate`).")
@click.option("--xnnpack/--no-xnnpack", default=True, show_default=True,
              help="Delegate to XNNPACK (llama: the partitioners export_llm uses).")
@click.option("--methods", default="forward", show_default=True,
              type=click.Choice(["forward", "prefill,decode"]),
              help="'prefill,decode': two methods over the same weights and KV buffers "
                   "(prefill takes up to --max-seq-len tokens, decode exactly one). Constants "
                   "are keyed by FQN across methods and stored once.")
@click.option("--allow-divergent-constants", is_flag=True,
              help="With several methods: accept the same FQN holding different bytes "
                   "(each method keeps its own copy) instead of failing the export.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights.")
@click.option("-o", "--output", "output", type=click.Path(), required=True,
              help="Where to write the .pte: a new or regular file (written atomically); "
                   "missing folders are created.")
@click.option("--quiet", is_flag=True, help="Print only errors.")
@click.pass_context
def export(ctx, config_file, overrides, strict, model, preset, n_layers, dim, n_heads,
           n_kv_heads, vocab_size, max_context, max_seq_len, lazy_kv_cache, xnnpack, methods,
           allow_divergent_constants, seed, output, quiet):
    """Export a model to a .pte: an export_llm configuration (--config FILE.yaml
    [KEY=VALUE ...]), or a model with random weights (fixed seed).

    Shows each stage (build, export, lower, plan, serialize) with its time, then one
    summary line: planned arena bytes, KV bytes at max context, and how many KV buffers
    are lazy; with --lazy-kv-cache, every buffer left planned and why.

    \b
    lazykv export --config llama_xnnpack.yaml +base.checkpoint=c.pth +base.params=p.json \\
        +export.max_context_length=8192 --lazy-kv-cache -o model.pte
    """
    from lazykv.context_limits import resolve_max_seq_len
    from lazykv.output_path import check_output_path

    # Before any import or work: the output path and the limits (exit code 2).
    check_output_path(output, "the .pte (-o)")
    debug = bool(ctx.obj and ctx.obj.get("debug"))
    if not debug:
        silence_import_noise()
    import dataclasses

    if config_file is not None or overrides:
        flags = {"--model": model != "llama", "--preset": preset, "--n-layers": n_layers,
                 "--dim": dim, "--n-heads": n_heads, "--n-kv-heads": n_kv_heads,
                 "--vocab-size": vocab_size, "--max-context": max_context,
                 "--max-seq-len": max_seq_len, "--no-xnnpack": not xnnpack,
                 "--methods": methods != "forward", "--seed": seed != 0,
                 "--allow-divergent-constants": allow_divergent_constants}
        given = [k for k, v in flags.items() if v]
        if given:
            raise click.UsageError(
                f"{', '.join(given)} do not apply with --config/KEY=VALUE: set export_llm's "
                f"keys instead (e.g. export.max_context_length=4096, "
                f"backend.xnnpack.enabled=False)")
        if strict and not lazy_kv_cache:
            raise click.UsageError("--strict applies to --lazy-kv-cache only")
        _export_config(ctx, config_file, overrides, lazy_kv_cache, strict, output, quiet)
        return
    if strict and not lazy_kv_cache:
        raise click.UsageError("--strict applies to --lazy-kv-cache only")
    if max_context is None:
        raise click.UsageError("--max-context is required (or export an export_llm "
                               "configuration with --config)")
    max_seq_len = resolve_max_seq_len(max_context, max_seq_len, model)

    from lazykv.export import ExportConfig, export_model
    from lazykv.models.llama import PRESETS

    overrides = {k: v for k, v in dict(n_layers=n_layers, dim=dim, n_heads=n_heads,
                                       n_kv_heads=n_kv_heads, vocab_size=vocab_size).items()
                 if v is not None}
    if model == "example" and (preset or overrides):
        raise click.UsageError("--preset and size flags apply to --model llama only")
    shape = None
    if model == "llama":
        try:
            shape = dataclasses.replace(PRESETS[preset or "tiny"], **overrides)
        except ValueError as e:
            raise click.UsageError(str(e))
    cfg = ExportConfig(model=model, max_context=max_context, max_seq_len=max_seq_len, shape=shape,
                       lazy_kv_cache=lazy_kv_cache, xnnpack=xnnpack, seed=seed,
                       methods=tuple(methods.split(",")),
                       allow_divergent_constants=allow_divergent_constants)

    def progress(stage, seconds):
        if not quiet:
            click.echo(f"  {stage:<10} {seconds:7.1f} s", err=True)

    if not quiet:
        what = f"{model}" + (f" ({preset or 'tiny'}{', custom size' if overrides else ''})" if model == "llama" else "")
        click.echo(f"exporting {what}, max context {max_context}"
                   f"{', lazy KV cache' if lazy_kv_cache else ''}"
                   f"{', XNNPACK' if xnnpack else ''}, methods {methods} -> {output}", err=True)
    if strict:
        raise click.UsageError("--strict applies to --config exports")
    with quiet_third_party(debug):
        report = export_model(cfg, output, progress=progress)
    if not quiet:
        _summary(report)


def _summary(report) -> None:
    click.echo(
        f"wrote {report.path} ({fmt_bytes(report.file_bytes)}) in {report.total_seconds:.1f} s: "
        f"planned {report.planned_bytes:,} B, KV at max context "
        f"{report.kv_bytes_at_max_context:,} B, {report.lazy_buffers} lazy KV buffers, "
        f"peak RSS {fmt_bytes(report.peak_rss_bytes)}"
    )
    caches = [u for u in report.unmarked if u["kind"] == "kv_cache"]
    states = [u for u in report.unmarked if u["kind"] != "kv_cache"]
    if caches:
        click.echo(f"{len(caches)} KV buffers left planned (--strict refuses instead):")
        for u in caches:
            click.echo(f"  {u['fqn']} ({u['cause']}): {u['reason']}. Fix: {u['fix']}")
    if states:
        click.echo(f"{len(states)} state buffers planned (not KV caches): "
                   + ", ".join(u["fqn"] for u in states))


def _export_config(ctx, config_file, overrides, lazy_kv_cache, strict, output, quiet) -> None:
    """The --config route: export_llm's configuration, export_llm's code."""
    from lazykv.export import export_llm_config
    from lazykv.llm_config import load_llm_config
    from lazykv.passes import LazyKVConfig

    llm = load_llm_config(config_file, overrides)

    def progress(stage, seconds):
        if not quiet:
            click.echo(f"  {stage:<10} {seconds:7.1f} s", err=True)

    if not quiet:
        click.echo(f"exporting {config_file or 'LlmConfig defaults'}"
                   f"{' ' + ' '.join(overrides) if overrides else ''} (model class "
                   f"{llm.base.model_class.value}, max context {llm.export.max_context_length}"
                   f"{', lazy KV cache' if lazy_kv_cache else ''}{', strict' if strict else ''})"
                   f" -> {output}", err=True)
    lazy = LazyKVConfig(strict=strict) if lazy_kv_cache else None
    with quiet_third_party(bool(ctx.obj and ctx.obj.get("debug"))):
        report = export_llm_config(llm, output, lazy=lazy, progress=progress)
    if not quiet:
        _summary(report)
