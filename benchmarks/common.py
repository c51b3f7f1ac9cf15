"""Shared pieces: paths, results, machine description, /proc readers, subprocess runner.

Nothing here imports torch or executorch, so the parent process stays light; the
measurements run in subprocesses (:mod:`benchmarks.worker`).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "benchmarks" / "cache"
RESULTS = ROOT / "benchmarks" / "results"
MIB = 1 << 20
GIB = 1 << 30


def log(msg: str) -> None:
    """Progress lines go to stderr; the table goes to stdout."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- results


@dataclasses.dataclass
class Result:
    """One row of the table. ``target`` is a readable bound ("<= 1.10"), ``holds`` is
    True/False when there is a target, None when the row is informational or could not
    be measured (``note`` says why)."""

    name: str
    value: Any
    unit: str
    target: Optional[str] = None
    holds: Optional[bool] = None
    case: str = ""
    note: str = ""

    def as_dict(self) -> dict:
        d = {
            "name": self.name,
            "value": self.value,
            "unit": self.unit,
            "target": self.target,
            "holds": self.holds,
            "case": self.case,
        }
        if self.note:
            d["note"] = self.note
        return d


def check(value: Optional[float], op: str, bound: float) -> Optional[bool]:
    """``value op bound`` (``op`` one of <=, <, >=, >, ==), None when not measured."""
    if value is None:
        return None
    return {
        "<=": value <= bound,
        "<": value < bound,
        ">=": value >= bound,
        ">": value > bound,
        "==": value == bound,
    }[op]


def row(case: str, name: str, value, unit: str, op: Optional[str] = None, bound=None,
        note: str = "", target: Optional[str] = None) -> Result:
    """A :class:`Result`; with ``op``/``bound`` the target is checked here (on the
    unrounded value)."""
    holds = check(value, op, bound) if op is not None else None
    if op is not None and target is None:
        target = f"{op} {_fmt_bound(bound)}"
    if isinstance(value, float):
        value = round(value, 4)
    return Result(name, value, unit, target, holds, case, note)


def _fmt_bound(b) -> str:
    if isinstance(b, float):
        return f"{b:g}"
    if isinstance(b, int) and abs(b) >= 10000:
        return f"{b:,}"
    return str(b)


def fmt_value(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if v != v:
            return "nan"
        a = abs(v)
        if a >= 1000:
            return f"{v:,.0f}"
        if a >= 100:
            return f"{v:.1f}"
        if a >= 1:
            return f"{v:.3g}" if a < 10 else f"{v:.2f}"
        return f"{v:.3f}"
    return str(v)


def _holds(h) -> str:
    return {True: "yes", False: "**NO**", None: ""}[h]


def machine() -> dict:
    """nproc, memory and CPU model of this machine."""
    cpu = platform.processor() or "unknown"
    info = {}
    try:
        for line in open("/proc/cpuinfo"):
            k, _, v = line.partition(":")
            info.setdefault(k.strip(), v.strip())
    except OSError:
        pass
    if info.get("model name"):
        cpu = info["model name"]
        if "cpu family" in info and "model" in info:
            cpu += f" (family {info['cpu family']}, model {info['model']})"
    mem = meminfo().get("MemTotal", 0)
    return {
        "nproc": os.cpu_count(),
        "memory_gib": round(mem / GIB, 1),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def versions() -> dict:
    """torch / executorch versions without importing them (package metadata only)."""
    from importlib import metadata

    out = {}
    for pkg in ("torch", "executorch", "lazykv"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def load_results() -> List[dict]:
    p = RESULTS / "latest.json"
    if not p.exists():
        return []
    try:
        data = json.loads(p.read_text())
    except ValueError:
        return []
    return data if isinstance(data, list) else []


def write_results(new: Sequence[Result], cases_run: Sequence[str], meta: dict) -> List[dict]:
    """Merge ``new`` into ``latest.json`` (rows of the cases just run are replaced, rows of
    other cases kept), write ``latest.md`` and ``meta.json``; returns the merged rows."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    kept = [r for r in load_results() if r.get("case") not in set(cases_run)]
    rows = kept + [r.as_dict() for r in new]
    order = {c: i for i, c in enumerate(CASE_ORDER)}
    rows.sort(key=lambda r: order.get(r.get("case"), 99))  # stable within a case
    (RESULTS / "latest.json").write_text(json.dumps(rows, indent=1) + "\n")
    meta_path = RESULTS / "meta.json"
    old_meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    runs = old_meta.get("cases", {})
    for c in cases_run:
        runs[c] = meta["date"] + (" (--quick)" if meta.get("quick") else "")
    meta = dict(meta, cases=runs)
    if meta.get("wall_seconds") is not None:  # an `all` run
        meta["full_run"] = {k: meta.get(k) for k in ("date", "command", "wall_seconds", "children_cpu_seconds",
                                                     "loadavg_start", "loadavg_end")}
    elif old_meta.get("full_run"):
        meta["full_run"] = old_meta["full_run"]
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    (RESULTS / "latest.md").write_text(markdown(rows, meta))
    return rows


CASE_ORDER = ("load", "decode", "policies", "transient", "multimethod", "sessions", "export")


def markdown(rows: List[dict], meta: dict) -> str:
    m = meta["machine"]
    v = meta.get("versions", {})
    lines = [
        "# lazykv benchmarks",
        "",
        f"Date: {meta['date']}  ",
        f"Machine: {m['nproc']} CPUs (`nproc`), {m['memory_gib']} GiB memory, {m['cpu']}, "
        f"Linux {m['kernel']}, Python {m['python']}  ",
        f"Versions: torch {v.get('torch')}, executorch {v.get('executorch')}  ",
        f"Last command: `{meta.get('command', 'python -m benchmarks all')}`",
    ]
    fr = meta.get("full_run")
    if fr:
        lines[-1] += "  "
        lines.append(f"Last full run: `{fr['command']}` on {fr['date']}, wall time "
                     f"{fr['wall_seconds'] / 60:.1f} min (first-time exports included if the "
                     f"cache was empty); CPU time of its subprocesses "
                     f"{(fr.get('children_cpu_seconds') or 0) / 60:.1f} min; 1-min load average "
                     f"{fr.get('loadavg_start') or 0:.1f} at start, {fr.get('loadavg_end') or 0:.1f} at end "
                     f"(above 2 means other work shared the 2 CPUs)")
    lines.append("")
    if meta.get("cases"):
        current = {meta["date"], (meta.get("full_run") or {}).get("date")}
        stale = {c: d for c, d in meta["cases"].items() if d not in current}
        if stale:
            lines += ["Rows of some cases come from other runs (date, --quick): "
                      + ", ".join(f"{c} ({d})" for c, d in sorted(stale.items())), ""]
    lines += [
        "| case | name | value | unit | target | holds | note |",
        "|---|---|---:|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.get('case', '')} | {r['name']} | {fmt_value(r['value'])} | {r['unit']} | "
            f"{r.get('target') or ''} | {_holds(r.get('holds'))} | {r.get('note', '')} |"
        )
    pngs = sorted(p.name for p in RESULTS.glob("*.png"))
    if pngs:
        lines += ["", "Plots: " + ", ".join(f"[{p}]({p})" for p in pngs)]
    with_target = [r for r in rows if r.get("target")]
    failed = [r for r in with_target if r.get("holds") is False]
    unknown = [r for r in with_target if r.get("holds") is None]
    lines += ["", f"{len(with_target) - len(failed) - len(unknown)} of {len(with_target)} targets "
              f"hold; {len(failed)} do not; {len(unknown)} not measured."]
    return "\n".join(lines) + "\n"


def print_table(rows: List[dict]) -> None:
    """The table on stdout, plain text."""
    cols = [("case", 11), ("name", max([len(r["name"]) for r in rows] + [4])), ("value", 12), ("unit", 9),
            ("target", 16), ("holds", 5), ("note", 4)]
    print("  ".join(n.ljust(w) for n, w in cols))
    print("  ".join("-" * w for _, w in cols))
    for r in rows:
        cells = [r.get("case", ""), r["name"], fmt_value(r["value"]), r["unit"], r.get("target") or "",
                 {True: "yes", False: "NO", None: ""}[r.get("holds")], r.get("note", "")]
        out = []
        for (n, w), c in zip(cols, cells):
            out.append(c.rjust(w) if n == "value" else c.ljust(w))
        print("  ".join(out).rstrip())
    with_target = [r for r in rows if r.get("target")]
    failed = [r for r in with_target if r.get("holds") is False]
    print(f"\n{len(with_target) - len(failed)} of {len(with_target)} targets hold"
          + (": failing " + "; ".join(r["name"] for r in failed) if failed else ""))


# ---------------------------------------------------------------------------- /proc


def meminfo() -> Dict[str, int]:
    """/proc/meminfo in bytes."""
    out = {}
    try:
        for line in open("/proc/meminfo"):
            k, _, v = line.partition(":")
            parts = v.split()
            if parts:
                out[k] = int(parts[0]) * (1024 if len(parts) > 1 else 1)
    except OSError:
        pass
    return out


def proc_status(pid: str = "self") -> Dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of a process, in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[k] = int(v.split()[0]) * 1024
    return out


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux ``clear_refs`` 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------- subprocesses


def child_env() -> dict:
    env = dict(os.environ)
    env.setdefault("LAZYKV_CACHE_DIR", str(CACHE / "lazykv"))
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONWARNINGS", "ignore")
    return env


@dataclasses.dataclass
class ChildRun:
    out: Any  # the JSON the child printed last
    wall_seconds: float
    peak_rss_bytes: int  # ru_maxrss of the child (wait4)
    stderr: str
    cpu_seconds: float = 0.0  # user + system time of the child (wait4)


def run_child(args: Sequence[str], timeout: float = 1800, cpus: Optional[set] = None) -> ChildRun:
    """Run ``python args...`` from the repo root; the last JSON line of stdout is the result.

    Wall time is the subprocess's; peak RSS is the child's own ``ru_maxrss`` from
    ``wait4``, exact and free of sampling.
    """
    import tempfile

    cmd = [sys.executable, *args]
    with tempfile.TemporaryFile("w+") as fo, tempfile.TemporaryFile("w+") as fe:
        t0 = time.perf_counter()
        env = child_env()
        pin = None
        if cpus:
            env["OMP_NUM_THREADS"] = str(len(cpus))
            pin = lambda: os.sched_setaffinity(0, cpus)  # noqa: E731
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fo, stderr=fe, text=True, preexec_fn=pin)
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - t0 > timeout:
                p.kill()
                os.wait4(p.pid, 0)
                raise RuntimeError(f"{' '.join(args[:4])}... timed out after {timeout:.0f} s")
            time.sleep(0.02)
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        fo.seek(0)
        fe.seek(0)
        stdout, stderr = fo.read(), fe.read()
    peak = ru.ru_maxrss * 1024
    if p.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd[1:5])} ...` exited {p.returncode}:\n{stderr[-4000:]}")
    out = None
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{") or line.startswith("["):
            out = json.loads(line)
            break
    if out is None:
        raise RuntimeError(f"no JSON from {' '.join(args[:4])}:\n{stdout[-2000:]}\n{stderr[-2000:]}")
    return ChildRun(out, wall, peak, stderr, ru.ru_utime + ru.ru_stime)


def worker(task: str, timeout: float = 1800, _cpus: Optional[set] = None, **kwargs) -> ChildRun:
    """Run one :mod:`benchmarks.worker` task in a fresh process (pinned to ``_cpus``)."""
    return run_child(["-m", "benchmarks.worker", task, json.dumps(kwargs)], timeout=timeout, cpus=_cpus)


def now() -> str:
    return _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
