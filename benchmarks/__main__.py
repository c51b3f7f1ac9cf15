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

from benchmarks.artifacts import build_all
from benchmarks.cases import CASES, Ctx
from benchmarks.common import (
    CASE_ORDER,
    Result,
    log,
    machine,
    now,
    print_table,
    versions,
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
    ap.add_argument("--full", action="store_true",
                    help="also export and load stories110m static 8192 and lazy 131072 (their "
                         "exports peak near 5.5 GB and 12 GB; several more minutes)")
    ap.add_argument("--reps", type=int, default=5,
                    help="fresh-process repeats of the 2048 load comparison (default 5, min 5)")
    ap.add_argument("--quick", action="store_true",
                    help="fewer repeats and shorter runs (development only; medians of fewer than 5)")
    ap.add_argument("--rebuild", action="store_true",
                    help="re-export the export case's programs even if cached, to re-time them")
    ap.add_argument("--jobs", type=int, default=2,
                    help="export lanes, each pinned to one CPU (default 2); 1 = one export at a "
                         "time, unpinned")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    cases = list(CASE_ORDER) if "all" in args.cases else list(dict.fromkeys(args.cases))
    ctx = Ctx(reps=max(5, args.reps), full=args.full, quick=args.quick)
    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    date = now()
    log(f"cases: {', '.join(cases)}")

    arts = [a for c in cases for a in ctx.arts_for(c)]
    build_all(arts, jobs=args.jobs, rebuild_timed=args.rebuild and "export" in cases)
    log(f"programs ready after {time.perf_counter() - t0:.0f} s")

    rows = []
    for c in cases:
        t = time.perf_counter()
        log(f"case {c} ...")
        try:
            rows += CASES[c](ctx)
        except Exception as e:  # one broken case must not lose the others' results
            traceback.print_exc()
            rows.append(Result(f"{c}: failed", None, "", None, None, c,
                               f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:200] if str(e).strip() else ''}"))
        log(f"case {c} done in {time.perf_counter() - t:.0f} s")

    wall = time.perf_counter() - t0
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = ru.ru_utime + ru.ru_stime
    command = "python -m benchmarks " + " ".join(sys.argv[1:] if argv is None else argv)
    meta = {"date": date, "machine": machine(), "versions": versions(), "command": command,
            "wall_seconds": wall if "all" in args.cases else None, "quick": args.quick,
            "children_cpu_seconds": round(cpu_s), "loadavg_start": load0, "loadavg_end": os.getloadavg()[0]}
    merged = write_results(rows, cases, meta)
    print(f"lazykv benchmarks, {date}; {meta['machine']['nproc']} CPUs, "
          f"{meta['machine']['memory_gib']} GiB, {meta['machine']['cpu']}")
    print_table(merged)
    print(f"\nwall time {wall / 60:.1f} min (CPU time of all subprocesses {cpu_s / 60:.1f} min; "
          f"1-min load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end); "
          f"results in benchmarks/results/latest.json, latest.md, *.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
