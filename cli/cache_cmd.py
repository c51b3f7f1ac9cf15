"""``lazykv cache``: what lazykv keeps on disk, its size, and emptying it."""

from __future__ import annotations

import datetime
import json
import os

import click

from lazykv.cli._quiet import fmt_bytes

_EPILOG = """\b
Where: $LAZYKV_CACHE_DIR, else $XDG_CACHE_HOME/lazykv, else ~/.cache/lazykv.
What: per loaded .pte, what verifying it found (a few KB of JSON; no copy of the
program is ever written), lazykv export's random checkpoints, the native helper.
Bound: $LAZYKV_CACHE_MAX_BYTES (default 4GiB; sizes like 2GiB or 500MB): after each
new checkpoint, the least recently used entries are evicted until the folder fits.
LAZYKV_CACHE_MAX_BYTES=0 (or off) keeps nothing: every load verifies its program.
\b
Exit codes: 0 success; 2 usage error or an unreadable LAZYKV_CACHE_MAX_BYTES.
"""


def _cap_line() -> str:
    from lazykv import disk_cache

    cap = disk_cache.max_bytes()
    if cap == 0:
        return f"off ({disk_cache.ENV_MAX_BYTES}=0: nothing is kept)"
    source = disk_cache.ENV_MAX_BYTES if os.environ.get(disk_cache.ENV_MAX_BYTES) else "default"
    return f"{fmt_bytes(cap)} ({source})"


@click.group(invoke_without_command=True, epilog=_EPILOG)
@click.pass_context
def cache(ctx):
    """Show lazykv's disk cache: verified metadata of loaded programs, random
    checkpoints, the native helper. Without a subcommand: `list`."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(list_entries)


@cache.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the entries as JSON on stdout.")
def list_entries(as_json=False):
    """One line per entry, least recently used first: kind, size, last use, key."""
    from lazykv import disk_cache

    root = disk_cache.cache_dir()
    items = disk_cache.entries(root)
    total = sum(e.nbytes for e in items)
    if as_json:
        click.echo(json.dumps({"dir": str(root), "max_bytes": disk_cache.max_bytes(),
                               "total_bytes": total, "entries": [e.as_dict() for e in items]},
                              indent=2))
        return
    click.echo(f"cache folder {root}; cap {_cap_line()}")
    if not items:
        click.echo("  (empty)")
    for e in items:
        when = datetime.datetime.fromtimestamp(e.last_used).strftime("%Y-%m-%d %H:%M")
        click.echo(f"  {e.kind:<10} {fmt_bytes(e.nbytes):>10}  {when}  {e.key}")
    click.echo(f"total {fmt_bytes(total)} ({total:,} B) in {len(items)} entries")


@cache.command("size")
def size():
    """The cache's total size in bytes (and its folder and cap)."""
    from lazykv import disk_cache

    root = disk_cache.cache_dir()
    total = disk_cache.total_bytes(root)
    click.echo(f"{total:,} B ({fmt_bytes(total)}) in {root}; cap {_cap_line()}")


@cache.command("clear")
def clear():
    """Remove every entry. Programs loaded now keep working; later loads rebuild what
    they need (a first load is slower again)."""
    from lazykv import disk_cache

    root = disk_cache.cache_dir()
    n, freed = disk_cache.clear(root)
    click.echo(f"removed {n} entries, {freed:,} B ({fmt_bytes(freed)}) from {root}")
