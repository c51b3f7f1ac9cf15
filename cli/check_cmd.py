"""``lazykv check``: a CI gate for exported ``.pte`` files (rules in :mod:`lazykv.check`)."""

from __future__ import annotations

import json
import os

import click

from lazykv.check import RULES, CheckConfigError
from lazykv.cli.params import SIZE_OR_OFF
from lazykv.output_path import OutputPathError, atomic_write, check_output_path

_EPILOG = """\b
Rules can also come from TOML: --config FILE (a [check] table, keys at the top level,
or [tool.lazykv.check]); without --config, [tool.lazykv.check] of ./pyproject.toml is
read when present. Keys are the option names with _ or -, e.g.
\b
  [tool.lazykv.check]
  expect_lazy_kv = true
  max_planned_bytes = "8MiB"
  methods = ["prefill", "decode"]
\b
Options given on the command line override the file. With no rule at all, check
refuses to run (usage error, exit code 2): a gate that checks nothing would pass
silently.
\b
SIZE: bytes (123, 8,388,608), KiB/MiB/GiB (powers of 1024: 64MiB) or KB/MB/GB
(powers of 1000: 1.5GB); "off" removes a limit set in a config file.
\b
Exit codes:
  0  every rule holds for every file
  1  at least one rule fails (each failure names the tensor, method or constant
     and its figure against the limit)
  2  a file cannot be read (the other files are still checked and reported;
     2 wins over 1), or a usage/config error
"""


SIZE = SIZE_OR_OFF  # a byte count (lazykv.units), or "off"


def _render_table(report) -> str:
    """The default report: one row per rule per file, then every failure in full."""
    rows = [("FILE", "RULE", "RESULT", "DETAIL")]
    for f in report.files:
        name = f.file
        if f.error is not None:
            rows.append((name, "(read)", "ERROR", f.error))
            continue
        for r in f.rules:
            rows.append((name, r.rule, "pass" if r.passed else "FAIL", r.summary))
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines = [f"{a:<{w0}}  {b:<{w1}}  {c:<6}  {d}" for a, b, c, d in rows]
    fails = report.failure_lines()
    if fails:
        lines.append("")
        lines.append("failures:")
        lines.extend(f"  {line}" for line in fails)
    return "\n".join(lines)


def _summary(report) -> str:
    n = len(report.files)
    bad = sum(f.error is not None for f in report.files)
    failed = len(report.failed)
    total = sum(len(f.rules) for f in report.files)
    parts = [f"{n} file{'s' if n != 1 else ''} checked", f"{total - failed} of {total} rule checks passed"]
    if failed:
        parts.append(f"{failed} failed")
    if bad:
        parts.append(f"{bad} unreadable")
    return ", ".join(parts)


@click.command(epilog=_EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=True, path_type=str),
                metavar="FILE.pte...")
@click.option("--expect-lazy-kv/--no-expect-lazy-kv", default=None,
              help="Every position-indexed KV cache is lazy (marked, not planned). "
                   "Fails if the program has no KV cache.")
@click.option("--max-planned-bytes", type=SIZE, default=None,
              help="Limit on the planned arenas allocated at load (per arena the max over "
                   "methods, summed; as `inspect` reports).")
@click.option("--max-load-bytes", type=SIZE, default=None,
              help="Limit on planned bytes + constant segment + named data (delegate weights) "
                   "+ delegate blobs: what loads eagerly.")
@click.option("--max-kv-bytes-at-max-context", type=SIZE, default=None,
              help="Limit on all KV caches together at their upper bound (max context).")
@click.option("--no-duplicate-constants/--allow-duplicate-constants", default=None,
              help="No constant stored twice (same bytes in two constant buffers, named-data "
                   "or delegate blobs; lazykv manifest stored_once=false) or resident twice "
                   "(one weight packed by the XNNPACK delegates of several methods).")
@click.option("--assume-weight-cache/--no-assume-weight-cache", default=None,
              help="With --no-duplicate-constants: the runtime has XNNPACK's weight cache on "
                   "(lazykv.runtime_shim.weight_cache), so weights used by several methods' "
                   "delegates are resident once.")
@click.option("--methods", metavar="NAMES", default=None,
              help="Comma-separated method names the program must have (at least these; "
                   "others, e.g. constant methods, are allowed).")
@click.option("--shared-kv/--no-shared-kv", default=None,
              help="Every method that binds a KV cache binds the same ones (same FQNs; "
                   "planned ones at the same arena offset, not overwritten by another method).")
@click.option("--runs/--no-runs", default=None,
              help="Load through lazykv.runtime_shim and run every method once on zero "
                   "inputs ([1,1] tokens at position 0 for token/position methods). Imports "
                   "the ExecuTorch runtime (slower); the other rules never do.")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False, path_type=str),
              default=None, help="TOML file with the rules (see below).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout (nothing else).")
@click.option("--junit-xml", type=click.Path(dir_okay=False, writable=True, path_type=str), default=None,
              metavar="PATH", help="Also write a JUnit XML report: one test case per rule per file.")
@click.pass_context
def check(ctx, files, expect_lazy_kv, max_planned_bytes, max_load_bytes,
          max_kv_bytes_at_max_context, no_duplicate_constants, assume_weight_cache, methods,
          shared_kv, runs, config_path, as_json, junit_xml):
    """Check FILE.pte... against memory rules; exit 1 when one fails (a CI gate).

    \b
    Examples:
      lazykv check model.pte --expect-lazy-kv --max-planned-bytes 8MiB
      lazykv check a.pte b.pte --methods prefill,decode --shared-kv --json
      lazykv check model.pte --config lazykv.toml --junit-xml check.xml
    """
    from lazykv.check import Rules, check_files, load_config, pyproject_config

    try:
        if config_path is not None:
            fields, source = load_config(config_path)
        else:
            fields, source = pyproject_config(os.getcwd())
        cli_values = {
            "expect_lazy_kv": expect_lazy_kv,
            "max_planned_bytes": max_planned_bytes,
            "max_load_bytes": max_load_bytes,
            "max_kv_bytes_at_max_context": max_kv_bytes_at_max_context,
            "no_duplicate_constants": no_duplicate_constants,
            "assume_weight_cache": assume_weight_cache,
            "methods": methods,
            "shared_kv": shared_kv,
            "runs": runs,
        }
        for k, v in cli_values.items():
            if v is not None:
                fields[k] = None if v == "off" else v
        rules = Rules(**fields)
    except CheckConfigError as e:
        raise click.UsageError(str(e), ctx) from None
    if junit_xml:
        try:  # before any work: an unwritable report path is known at once
            check_output_path(junit_xml, "the JUnit report (--junit-xml)")
        except OutputPathError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(2)
    if not rules.enabled:
        flags = ", ".join("--" + r for r in RULES)
        where = f" (read {source})" if source else ""
        raise click.UsageError(
            f"no rules given{where}: pass at least one of {flags}, or set them in "
            f"--config FILE or [tool.lazykv.check] of ./pyproject.toml", ctx)
    if source and not as_json:
        click.echo(f"rules from {source}", err=True)
    if rules.runs and not (ctx.obj and ctx.obj.get("debug")):
        from lazykv.cli._quiet import silence_import_noise

        silence_import_noise()  # the runtime imports torch; the group left it to us

    def progress(fr):
        if not as_json and fr.error is not None:
            click.echo(f"error: {fr.error}", err=True)

    report = check_files(files, rules, config_source=source, progress=progress)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        click.echo(_render_table(report))
    if junit_xml:
        try:
            with atomic_write(junit_xml, "the JUnit report (--junit-xml)") as f:
                f.write(report.to_junit_xml().encode("utf-8"))
        except OutputPathError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(2)
    if not as_json:
        click.echo(_summary(report) + ("" if not junit_xml else f"; JUnit XML in {junit_xml}"), err=True)
    ctx.exit(report.return_code)
