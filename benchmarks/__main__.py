"""``python -m benchmarks all`` | ``python -m benchmarks CASE [CASE ...]``.

Exports what the chosen cases need (once; cached in ``benchmarks/cache/``), measures,
merges the rows into ``benchmarks/results/latest.json``, rewrites ``latest.md`` and the
PNGs of the cases run, and prints the table.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
import traceback

from benchmarks.artifacts import build_all, export_records
from benchmarks.cases import CASES, Ctx
from benchmarks.common import (
    CASE_ORDER,
    Result,
    fork_server,
    log,
    machine,
    now,
    print_table,
    versions,
    write_readme,
    write_results,
)


def parse(argv):
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="lazykv against the stock ExecuTorch runtime, side by side.",
        epilog="cases: " + ", ".join(CASE_ORDER) + ". Results: benchmarks/results/latest.{json,md}, *.png.",
    )
    ap.add_argument("cases", nargs="+", metavar="CASE", choices=["all", *CASE_ORDER],
                    help="'all' or one or more of: " + ", ".join(CASE_ORDER))
    ap.add_argument("--reps", type=int, default=5,
                    help="repeats of the 2048 load comparison (default 5, min 5); the other max "
                         "contexts get 3")
    ap.add_argument("--load-contexts", type=lambda v: tuple(int(x) for x in v.split(",")), default=(),
                    help="max contexts the load case measures, e.g. 2048 (default: all; each needs "
                         "its stories110m exports)")
    ap.add_argument("--quick", action="store_true",
                    help="fewer repeats and shorter runs (development only; medians of fewer than 5)")
    ap.add_argument("--rebuild", action="store_true",
                    help="re-export the export case's programs even if cached, to re-time them")
    ap.add_argument("--fresh", action="store_true",
                    help="run every measurement in a fresh interpreter instead of a child forked "
                         "from one that has imported torch and executorch (about 7 s more CPU "
                         "per measurement process; for checking the fork server)")
    ap.add_argument("--jobs", type=int, default=2,
                    help="export lanes, each pinned to one CPU (default 2); 1 = one export at a "
                         "time, unpinned")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    cases = list(CASE_ORDER) if "all" in args.cases else list(dict.fromkeys(args.cases))
    ctx = Ctx(reps=max(5, args.reps), quick=args.quick, load_contexts=args.load_contexts)
    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    date = now()
    log(f"cases: {', '.join(cases)}")

    arts = list(dict.fromkeys(a for c in cases for a in ctx.arts_for(c)))
    to_build = [a.label for a in arts if not a.exists]
    build_all(arts, jobs=args.jobs, rebuild_timed=args.rebuild and "export" in cases)
    export_s = time.perf_counter() - t0
    log(f"programs ready after {export_s:.0f} s ({len(to_build)} exported now)")

    rows, case_s = [], {}
    with fork_server(enabled=not args.fresh):
        for c in cases:
            t = time.perf_counter()
            log(f"case {c} ...")
            try:
                rows += CASES[c](ctx)
            except Exception as e:  # one broken case must not lose the others' results
                traceback.print_exc()
                rows.append(Result(f"{c}: failed", None, "", None, None, c,
                                   f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:200] if str(e).strip() else ''}"))
            case_s[c] = round(time.perf_counter() - t, 1)
            log(f"case {c} done in {case_s[c]:.0f} s")

    wall = time.perf_counter() - t0
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = ru.ru_utime + ru.ru_stime
    command = "python -m benchmarks " + " ".join(sys.argv[1:] if argv is None else argv)
    meta = {"date": date, "machine": machine(), "versions": versions(), "command": command,
            "wall_seconds": wall if "all" in args.cases else None, "quick": args.quick,
            "children_cpu_seconds": round(cpu_s), "loadavg_start": load0, "loadavg_end": os.getloadavg()[0],
            "case_seconds": case_s, "export_phase_seconds": round(export_s, 1),
            "fork_server": not args.fresh,
            "export_cache": {"state": "cold" if to_build else "warm", "exported_now": to_build,
                             "programs": len(arts)},
            # every cached program's export record, not only this run's: what a cold cache costs
            "exports": export_records({a: a.record() for c in CASE_ORDER for a in ctx.arts_for(c)})}
    merged, meta = write_results(rows, cases, meta)
    readme = not args.quick and write_readme(merged, meta)
    print(f"lazykv benchmarks, {date}; {meta['machine']['nproc']} CPUs, "
          f"{meta['machine']['memory_gib']} GiB, {meta['machine']['cpu']}")
    print_table(merged)
    print(f"\nwall time {wall / 60:.1f} min: exports {export_s:.0f} s ({'cold cache, ' + str(len(to_build)) + ' exported' if to_build else 'warm cache'}), "
          + ", ".join(f"{c} {s:.0f} s" for c, s in case_s.items())
          + f" (CPU time of all subprocesses {cpu_s / 60:.1f} min; 1-min load average {load0:.1f} at start, "
          f"{os.getloadavg()[0]:.1f} at end); results in benchmarks/results/latest.json, latest.md, *.png"
          + ("; README.md updated" if readme else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
