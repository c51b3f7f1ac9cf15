"""The ``lazykv`` command: a click group; each command lives in its own module.

Errors lazykv raises on purpose (:class:`lazykv.errors.LazyKVError`) are printed as one
line on stderr, without a traceback unless ``--debug``, and end the command with the
error's exit code (1 for a refusal, 2 for an unreadable file or an output path that
cannot be written). Usage errors exit 2. ``--debug`` may come before or after the
command name. No command imports torch before its options are parsed, so ``--help``
and usage errors answer at once.
"""

from __future__ import annotations

import logging
import sys

import click

from lazykv import __version__
from lazykv.errors import LazyKVError


#: Exit codes every command shares (each command's --help lists its own).
EXIT_CODES = """\b
Exit codes:
  0  success
  1  lazykv refused the program or the run (the message names the problem and the fix)
  2  usage error, unreadable input file, or an output path that cannot be written
"""


class _Group(click.Group):
    """Turns LazyKVError into a clean message + exit code; accepts ``--debug`` after the
    command name too."""

    def parse_args(self, ctx, args):
        # `lazykv generate x.pte --debug` means the same as `lazykv --debug generate x.pte`.
        end = args.index("--") if "--" in args else len(args)
        if "--debug" in args[:end]:
            args = ["--debug"] + [a for i, a in enumerate(args) if i >= end or a != "--debug"]
        return super().parse_args(ctx, args)

    def invoke(self, ctx):
        from lazykv.cli._quiet import log_explains, native_output_captured

        debug = bool(ctx.params.get("debug")) or bool(ctx.obj and ctx.obj.get("debug"))
        try:
            with native_output_captured(enabled=not debug, explains=log_explains):
                return super().invoke(ctx)
        except LazyKVError as e:
            if debug:
                raise
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES)
@click.version_option(__version__, prog_name="lazykv")
@click.option("--debug", is_flag=True,
              help="Show tracebacks and ExecuTorch's logs (before or after the command name).")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Pay-as-you-go memory for ExecuTorch programs.

    \b
    Typical flow:
      lazykv export --model llama --preset tiny --max-context 4096 --lazy-kv-cache -o tiny.pte
      lazykv inspect tiny.pte
      lazykv generate tiny.pte --prompt-len 16 --new-tokens 64
      lazykv check tiny.pte --expect-lazy-kv --max-planned-bytes 8MiB
      lazykv cache        # what lazykv keeps on disk (and `lazykv cache clear`)
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    logging.basicConfig(level=logging.INFO if debug else logging.WARNING)


def _register() -> None:
    from lazykv.cli.cache_cmd import cache
    from lazykv.cli.export_cmd import export
    from lazykv.cli.inspect_cmd import inspect

    cli.add_command(export)
    cli.add_command(inspect)
    cli.add_command(cache)
    for module, name in (
        ("lazykv.cli.generate_cmd", "generate"),
        ("lazykv.cli.check_cmd", "check"),
    ):
        try:
            mod = __import__(module, fromlist=[name])
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue
        cli.add_command(getattr(mod, name))


_register()

if __name__ == "__main__":
    cli()
