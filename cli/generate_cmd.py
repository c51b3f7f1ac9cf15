"""``lazykv generate``: greedy generation through the runtime shim, with KV memory figures."""

from __future__ import annotations

import json
import sys

import click

from lazykv.cli._quiet import fmt_bytes, quiet_third_party

_POLICY_HELP = (
    "KV growth policy: doubling, step:N (default 256), hybrid "
    "(hybrid:start=256,linear_after=64MiB,increment=32MiB) or preallocate."
)


def _plot(result, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [p for p, _ in result.trace]
    top = max([b for _, b in result.trace] + [1])
    unit, div = ("MiB", 2**20) if top >= 2**20 else ("KiB", 2**10)
    ys = [b / div for _, b in result.trace]
    ideal = [p * result.bytes_per_position / div for p in xs]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.step(xs, ys, where="post", label=f"KV bytes held ({result.policy})")
    ax.plot(xs, ideal, "--", color="gray", label="ideal (bytes/position x positions)")
    ax.set_ylim(bottom=0)
    static = result.max_positions * result.bytes_per_position
    ax.set_title(
        f"lazykv generate: {len(result.tokens)} session(s); static KV would be "
        f"{static / 2**20:.1f} MiB", fontsize=10,
    )
    ax.set_ylabel(f"KV storage ({unit})")
    ax.set_xlabel("positions filled (tokens)")
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@click.command("generate")
@click.argument("pte", type=click.Path(exists=True, dir_okay=False))
@click.option("--prompt-len", type=click.IntRange(min=1), default=16, show_default=True,
              help="Tokens in the random prompt.")
@click.option("--new-tokens", type=click.IntRange(min=0), default=64, show_default=True,
              help="Tokens to generate greedily.")
@click.option("--policy", default="doubling", show_default=True, help=_POLICY_HELP)
@click.option("--max-bytes", default=None, help="Cap on each session's KV storage (e.g. 64MiB).")
@click.option("--sessions", type=click.IntRange(min=1), default=1, show_default=True,
              help="Independent sessions, interleaved token by token.")
@click.option("--shared-prefix", type=click.IntRange(min=0), default=0, show_default=True,
              help="The first P prompt tokens are the same in every session: computed once, "
                   "then forked into the others (lazy programs).")
@click.option("--method", default="forward", show_default=True, help="Decoder method to run.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random prompt.")
@click.option("--prompt-tokens", default=None,
              help="The prompt as token ids, e.g. 1,2,3 (instead of a random one; overrides "
                   "--prompt-len). lazykv_run takes the same list and prints the same tokens.")
@click.option("--json", "as_json", is_flag=True, help="Print only a JSON object on stdout.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="Write a PNG of KV bytes against tokens, with the ideal as floor.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.pass_context
def generate(ctx, pte, prompt_len, new_tokens, policy, max_bytes, sessions, shared_prefix, method,
             seed, prompt_tokens, as_json, plot, quiet):
    """Generate greedily from a seeded random prompt and report KV memory.

    Prints tokens/s and the KV bytes held after load, after the prefill and at the end
    (messages on stderr; with --json, stdout holds only the JSON object with keys
    kv_bytes_after_load, kv_bytes_after_prefill, kv_bytes_end, peak_kv_bytes,
    decode_tokens_per_s, tokens; with --shared-prefix also shared_prefix: positions,
    prefill_seconds, fork_seconds, bytes_copied, prefill_seconds_unshared_estimate,
    seconds_saved, positions_saved, bytes_saved).
    """
    from lazykv.runtime_shim import load
    from lazykv.runtime_shim.generate import greedy_generate
    from lazykv.runtime_shim.policy import PolicyError, parse_bytes, parse_policy

    debug = bool(ctx.obj and ctx.obj.get("debug"))
    try:
        pol = parse_policy(policy)
        mb = parse_bytes(max_bytes) if max_bytes is not None else None
    except PolicyError as e:
        raise click.UsageError(str(e)) from None
    tokens = None
    if prompt_tokens is not None:
        try:
            tokens = [int(t) for t in prompt_tokens.split(",")]
        except ValueError:
            raise click.UsageError(
                f"--prompt-tokens must be integers separated by commas, got {prompt_tokens!r}"
            ) from None
        prompt_len = len(tokens)
    if shared_prefix > prompt_len:
        raise click.UsageError(
            f"--shared-prefix {shared_prefix} is longer than --prompt-len {prompt_len}"
            + (" (the number of --prompt-tokens)" if tokens is not None else "")
        )

    def err(msg):
        click.echo(msg, err=True)

    with quiet_third_party(debug):
        program = load(pte, policy=pol, max_bytes=mb)
        if not quiet:
            err(f"loaded {pte} in {program.load_seconds:.2f} s "
                f"({'lazy KV, ' + str(len(program.buffers)) + ' buffers' if program.lazy else 'no lazy KV buffers'}"
                f"{', rebound copy cached' if program.cache_hit else ''}); policy {pol.spec()}")
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
    if plot:
        _plot(result, plot)
    if as_json:
        click.echo(json.dumps(result.as_json()))
    if not quiet:
        err(f"prefill {prompt_len} x {sessions}: {result.prefill_seconds:.3f} s; decode: "
            f"{result.decode_tokens_per_s:.1f} tokens/s")
        err(f"KV bytes: after load {result.kv_bytes_after_load:,} "
            f"({fmt_bytes(result.kv_bytes_after_load)}), after prefill "
            f"{result.kv_bytes_after_prefill:,} ({fmt_bytes(result.kv_bytes_after_prefill)}), "
            f"end {result.kv_bytes_end:,} ({fmt_bytes(result.kv_bytes_end)}), peak "
            f"{result.peak_kv_bytes:,} ({fmt_bytes(result.peak_kv_bytes)})")
        if program.lazy:
            err(f"static program would hold {program.max_positions * program.bytes_per_position * sessions:,} "
                f"bytes of KV; grow events {result.grow_events}, bytes copied {result.bytes_copied:,}")
        sp = result.shared_prefix
        if sp is not None:
            err(f"shared prefix {sp['positions']} tokens: computed once in {sp['prefill_seconds']:.3f} s, "
                f"forked {sessions - 1} x in {sp['fork_seconds']:.3f} s ({fmt_bytes(sp['bytes_copied'])} "
                f"copied); computing it in every session: ~{sp['prefill_seconds_unshared_estimate']:.3f} s")
        if plot:
            err(f"wrote {plot}")
        if not as_json:
            for k, toks in enumerate(result.tokens):
                err(f"session {k}: {toks[:32]}{' ...' if len(toks) > 32 else ''}")
