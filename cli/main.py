"""The ``lazykv`` command: a click group; each command lives in its own module.

Errors lazykv raises on purpose (:class:`lazykv.errors.LazyKVError`) are printed as one
line on stderr, without a traceback unless ``--debug``, and end the command with the
error's exit code (1 for a refusal, 2 for an unreadable file). Usage errors exit 2.
"""

from __future__ import annotations

import logging
import sys

import click

from lazykv import __version__
from lazykv.errors import LazyKVError


class _Group(click.Group):
    """Turns LazyKVError into a clean message + exit code."""

    def invoke(self, ctx):
        from lazykv.cli._quiet import native_output_captured

        debug = "--debug" in sys.argv[1:2] or bool(ctx.obj and ctx.obj.get("debug"))
        try:
            with native_output_captured(enabled=not debug):
                return super().invoke(ctx)
        except LazyKVError as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)


#: Commands that may not need torch (2 s to import): the group does not import it for
#: them (``check`` quiets torch's logger itself when ``--runs`` needs the runtime;
#: ``inspect`` never needs it).
_TORCH_FREE_COMMANDS = frozenset({"check", "inspect"})


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lazykv")
@click.option("--debug", is_flag=True, help="Show tracebacks and ExecuTorch's logs.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Pay-as-you-go memory for ExecuTorch programs.

    \b
    Typical flow:
      lazykv export --model llama --preset tiny --max-context 4096 --lazy-kv-cache -o tiny.pte
      lazykv inspect tiny.pte
      lazykv generate tiny.pte --prompt-len 16 --new-tokens 64
      lazykv check tiny.pte --expect-lazy-kv --max-planned-bytes 8MiB
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    logging.basicConfig(level=logging.INFO if debug else logging.WARNING)
    if not debug:
        from lazykv.cli._quiet import silence_import_noise

        silence_import_noise(import_torch=ctx.invoked_subcommand not in _TORCH_FREE_COMMANDS)


def _register() -> None:
    from lazykv.cli.export_cmd import export
    from lazykv.cli.inspect_cmd import inspect

    cli.add_command(export)
    cli.add_command(inspect)
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
