"""``lazykv generate``: greedy generation through the runtime shim, with KV memory figures."""

from __future__ import annotations

import json
import sys

import click

from lazykv.cli._quiet import fmt_bytes, quiet_third_party, silence_import_noise
from lazykv.cli.params import POLICY, POLICY_HELP, SIZE

_EPILOG = """\b
Methods: `forward` for the prompt and the new tokens; a program exported with
--methods prefill,decode runs the prompt through `prefill` and each new token
through `decode`, automatically. --method NAME (or PREFILL,DECODE) picks others.
\b
KV bytes count what the program holds as `lazykv inspect` does: a static program's
planned KV cache from load on (held once, shared by its sessions), plus each
session's lazy storage.
\b
--json prints one object on stdout (schema "lazykv-generate", version 1; every key
present whatever --sessions is):
  schema, version, program, lazy, policy, methods {prefill, decode}, prompt_len,
  new_tokens, max_positions, bytes_per_position (lazy, per session),
  planned_kv_bytes (static, shared), kv_bytes_at_max_context,
  sessions: [{index, prompt, tokens, positions_filled, kv_bytes_after_prefill,
              kv_bytes_end, peak_kv_bytes, grows, buffer_grow_events,
              bytes_copied}]   (bytes: the session's own lazy storage),
  totals: {sessions, kv_bytes_after_load, kv_bytes_after_prefill, kv_bytes_end,
           peak_kv_bytes, grows, bytes_copied, prefill_seconds, decode_seconds,
           decode_tokens, decode_tokens_per_s}   (bytes: planned + all sessions),
  shared_prefix: null, or with --shared-prefix {positions, prefill_seconds,
           fork_seconds, bytes_copied, prefill_seconds_unshared_estimate,
           seconds_saved, positions_saved, bytes_saved}
`grows` counts enlargements of a session's storage (all buffers at once count
once); `buffer_grow_events` counts them per buffer.
\b
Exit codes:
  0  generated
  1  lazykv refused the run (e.g. more positions than the program holds, a KV
     budget exceeded) or the runtime failed; the message says why
  2  usage error (bad --policy or --max-bytes), PTE unreadable, or --plot cannot
     be written: all checked before loading
"""


def _plot(result, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lazykv.output_path import atomic_write

    xs = [p for p, _ in result.trace]
    n = len(result.sessions)
    static = result.kv_bytes_at_max_context * (n if result.lazy else 1)
    top = max([b for _, b in result.trace] + [static, 1])
    unit, div = ("MiB", 2**20) if top >= 2**20 else ("KiB", 2**10)
    ys = [b / div for _, b in result.trace]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.step(xs, ys, where="post", label=f"KV bytes held ({result.policy})")
    if result.bytes_per_position:
        ideal = [(result.planned_kv_bytes + p * result.bytes_per_position * n) / div for p in xs]
        ax.plot(xs, ideal, "--", color="gray", label="ideal (bytes/position x positions)")
    ax.set_ylim(bottom=0)
    if result.lazy:
        title = f"static KV would be {static / 2**20:.1f} MiB"
    else:
        title = f"static program: {result.planned_kv_bytes / 2**20:.1f} MiB of KV planned from load on"
    ax.set_title(f"lazykv generate: {n} session(s); {title}", fontsize=10)
    ax.set_ylabel(f"KV storage ({unit})")
    ax.set_xlabel("positions filled per session (tokens)")
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_write(path, "the plot (--plot)") as f:
        fig.savefig(f, dpi=120, format="png")
    plt.close(fig)


def _methods(value):
    if value is None:
        return None
    parts = [p.strip() for p in value.split(",")]
    if len(parts) > 2 or not all(parts):
        raise click.BadParameter("give one method name or PREFILL,DECODE", param_hint="--method")
    return parts[0] if len(parts) == 1 else tuple(parts)


@click.command("generate", epilog=_EPILOG)
@click.argument("pte", type=click.Path(exists=True, dir_okay=False))
@click.option("--prompt-len", type=click.IntRange(min=1), default=16, show_default=True,
              help="Tokens in the random prompt.")
@click.option("--new-tokens", type=click.IntRange(min=0), default=64, show_default=True,
              help="Tokens to generate greedily.")
@click.option("--policy", type=POLICY, default="doubling", show_default=True, help=POLICY_HELP)
@click.option("--max-bytes", type=SIZE, default=None,
              help="Cap on each session's lazy KV storage: bytes, 64MiB (2^20) or 64MB (10^6).")
@click.option("--sessions", type=click.IntRange(min=1), default=1, show_default=True,
              help="Independent sessions, interleaved token by token.")
@click.option("--shared-prefix", type=click.IntRange(min=0), default=0, show_default=True,
              help="The first P prompt tokens are the same in every session: computed once, "
                   "then forked into the others (lazy programs).")
@click.option("--method", default=None, metavar="NAME[,NAME]",
              help="Method for prompt and new tokens, or PREFILL,DECODE (default: forward, "
                   "else prefill,decode).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random prompt.")
@click.option("--prompt-tokens", default=None, metavar="ID,ID,...",
              help="The prompt as token ids, e.g. 1,2,3 (instead of a random one; overrides "
                   "--prompt-len). lazykv_run takes the same list and prints the same tokens.")
@click.option("--json", "as_json", is_flag=True, help="Print only a JSON object on stdout (see below).")
@click.option("--plot", type=click.Path(), default=None,
              help="Write a PNG of KV bytes against tokens, with the ideal as floor (checked "
                   "before loading; missing folders are created).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.pass_context
def generate(ctx, pte, prompt_len, new_tokens, policy, max_bytes, sessions, shared_prefix, method,
             seed, prompt_tokens, as_json, plot, quiet):
    """Generate greedily from a seeded random prompt and report KV memory.

    Prints tokens/s and the KV bytes held after load, after the prefill and at the end
    (messages on stderr; with --json, stdout holds only the JSON object).
    """
    method = _methods(method)
    tokens = None
    if prompt_tokens is not None:
        try:
            tokens = [int(t) for t in prompt_tokens.split(",")]
        except ValueError:
            raise click.BadParameter(
                f"must be integers separated by commas, got {prompt_tokens!r}",
                param_hint="--prompt-tokens",
            ) from None
        prompt_len = len(tokens)
    if shared_prefix > prompt_len:
        raise click.UsageError(
            f"--shared-prefix {shared_prefix} is longer than --prompt-len {prompt_len}"
            + (" (the number of --prompt-tokens)" if tokens is not None else "")
        )
    if plot:
        from lazykv.output_path import check_output_path

        check_output_path(plot, "the plot (--plot)")  # before loading: nothing is lost
    debug = bool(ctx.obj and ctx.obj.get("debug"))
    if not debug:
        silence_import_noise()
    from lazykv.runtime_shim import load
    from lazykv.runtime_shim.generate import greedy_generate

    def err(msg):
        click.echo(msg, err=True)

    with quiet_third_party(debug):
        program = load(pte, policy=policy, max_bytes=max_bytes)
        if not quiet:
            err(f"loaded {pte} in {program.load_seconds:.2f} s "
                f"({'lazy KV, ' + str(len(program.buffers)) + ' buffers' if program.lazy else 'no lazy KV buffers'}"
                f"{', verified before: cached' if program.cache_hit else ''}); policy {policy.spec()}")
        bar = None
        if not quiet and sys.stderr.isatty():
            total = sessions * (1 + max(new_tokens - 1, 0))
            bar = click.progressbar(length=total, label="generating", file=sys.stderr)
            bar.__enter__()
        last = [0]

        def progress(done, total):
            if bar is not None:
                bar.update(done - last[0])
                last[0] = done
            elif not quiet and (done == total or done % 50 == 0):
                err(f"  {done}/{total} tokens")

        try:
            result = greedy_generate(program, prompt_len, new_tokens, sessions=sessions,
                                     seed=seed, method=method, progress=progress,
                                     shared_prefix=shared_prefix, prompt_tokens=tokens)
        finally:
            if bar is not None:
                bar.__exit__(None, None, None)
    if as_json:
        click.echo(json.dumps(result.as_json()))
    if not quiet:
        _summary(err, result, prompt_len, sessions)
    if plot:  # after the summary: a failing plot loses nothing
        _plot(result, plot)
        if not quiet:
            err(f"wrote {plot}")


def _summary(err, result, prompt_len: int, sessions: int) -> None:
    if result.prefill_method != result.decode_method:
        err(f"methods: prompt through {result.prefill_method!r}, new tokens through "
            f"{result.decode_method!r}")
    err(f"prefill {prompt_len} x {sessions}: {result.prefill_seconds:.3f} s; decode: "
        f"{result.decode_tokens_per_s:.1f} tokens/s")
    err(f"KV bytes: after load {result.kv_bytes_after_load:,} "
        f"({fmt_bytes(result.kv_bytes_after_load)}), after prefill "
        f"{result.kv_bytes_after_prefill:,} ({fmt_bytes(result.kv_bytes_after_prefill)}), "
        f"end {result.kv_bytes_end:,} ({fmt_bytes(result.kv_bytes_end)}), peak "
        f"{result.peak_kv_bytes:,} ({fmt_bytes(result.peak_kv_bytes)})")
    if result.planned_kv_bytes:
        err(f"  of which planned (static KV cache, held from load on, shared by the "
            f"sessions): {result.planned_kv_bytes:,} ({fmt_bytes(result.planned_kv_bytes)})")
    if result.lazy:
        err(f"a static program would hold {result.kv_bytes_at_max_context * sessions:,} bytes "
            f"of KV ({sessions} x {result.kv_bytes_at_max_context:,}); the sessions grew "
            f"{result.grows} times, copying {result.bytes_copied:,} bytes")
    sp = result.shared_prefix
    if sp is not None:
        err(f"shared prefix {sp['positions']} tokens: computed once in {sp['prefill_seconds']:.3f} s, "
            f"forked {sessions - 1} x in {sp['fork_seconds']:.3f} s ({fmt_bytes(sp['bytes_copied'])} "
            f"copied); computing it in every session: ~{sp['prefill_seconds_unshared_estimate']:.3f} s")
    for k, toks in enumerate(result.tokens):
        err(f"session {k}: {toks[:32]}{' ...' if len(toks) > 32 else ''}")
