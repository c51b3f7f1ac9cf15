"""Shared pieces: paths, results, machine description, /proc readers, subprocess runner.

Nothing here imports torch or executorch, so the parent process stays light; the
measurements run in subprocesses (:mod:`benchmarks.worker`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

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


def write_results(new: Sequence[Result], cases_run: Sequence[str], meta: dict) -> Tuple[List[dict], dict]:
    """Merge ``new`` into ``latest.json`` (rows of the cases just run are replaced, rows of
    other cases kept), write ``latest.md`` and ``meta.json``; returns the merged rows and
    the merged meta."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    kept = [r for r in load_results() if r.get("case") not in set(cases_run)]
    rows = kept + [r.as_dict() for r in new]
    order = {c: i for i, c in enumerate(CASE_ORDER)}
    rows.sort(key=lambda r: order.get(r.get("case"), 99))  # stable within a case
    (RESULTS / "latest.json").write_text(json.dumps(rows, indent=1) + "\n")
    meta_path = RESULTS / "meta.json"
    old_meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    meta = _merge_meta(meta, old_meta, cases_run)
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    (RESULTS / "latest.md").write_text(markdown(rows, meta))
    return rows, meta


_FULL_RUN_KEYS = ("date", "command", "wall_seconds", "children_cpu_seconds", "loadavg_start", "loadavg_end",
                  "case_seconds", "export_phase_seconds", "export_cache", "fork_server")


def _merge_meta(meta: dict, old: dict, cases_run: Sequence[str]) -> dict:
    """This run's meta, with what older runs said about the cases it did not run: their
    dates (``cases``), run times (``last_case_seconds``) and export records (``exports``)."""
    runs = dict(old.get("cases", {}))
    for c in cases_run:
        runs[c] = meta["date"] + (" (--quick)" if meta.get("quick") else "")
    seconds = dict(old.get("last_case_seconds", {}), **(meta.get("case_seconds") or {}))
    exports = dict(old.get("exports", {}), **(meta.get("exports") or {}))
    out = dict(meta, cases=runs, last_case_seconds=seconds, exports=exports)
    if meta.get("wall_seconds") is not None:  # an `all` run
        out["full_run"] = {k: meta.get(k) for k in _FULL_RUN_KEYS}
    elif old.get("full_run"):
        out["full_run"] = old["full_run"]
    return out


CASE_ORDER = ("load", "decode", "policies", "transient", "multimethod", "sessions", "serving", "export", "native")


def _machine_line(meta: dict) -> str:
    m, v = meta["machine"], meta.get("versions", {})
    return (f"{m['nproc']} CPUs (`nproc`), {m['memory_gib']} GiB memory, {m['cpu']}, Linux {m['kernel']}, "
            f"Python {m['python']}; torch {v.get('torch')}, executorch {v.get('executorch')}")


def _run_line(r: dict) -> str:
    """One sentence on a run (``meta`` or its ``full_run``): command, export cache, time
    per case, wall time of an `all` run."""
    cache = r.get("export_cache") or {}
    if cache.get("state") == "warm":
        how = f"warm export cache: all {cache.get('programs')} programs cached"
    elif cache.get("state") == "cold":
        how = (f"cold export cache: {len(cache.get('exported_now', []))} of {cache.get('programs')} "
               f"programs exported in the run, {(r.get('export_phase_seconds') or 0) / 60:.1f} min")
    else:
        how = "export cache state not recorded: first-time exports included if it was empty"
    out = f"`{r.get('command', 'python -m benchmarks all')}` on {r['date']}"
    if r.get("wall_seconds") is not None:
        out += f": wall time {r['wall_seconds'] / 60:.1f} min"
    out += f" ({how})"
    per_case = ", ".join(f"{c} {s:.0f} s" for c, s in (r.get("case_seconds") or {}).items())
    if per_case:
        out += f"; measurements: {per_case}"
    if r.get("wall_seconds") is not None:
        out += (f"; CPU time of its subprocesses {(r.get('children_cpu_seconds') or 0) / 60:.1f} min; 1-min load "
                f"average {r.get('loadavg_start') or 0:.1f} at start, {r.get('loadavg_end') or 0:.1f} at end "
                f"(above 2 means other work shared the 2 CPUs)")
    return out


def _stale_note(meta: dict) -> List[str]:
    current = {meta["date"], (meta.get("full_run") or {}).get("date")}
    stale = {c: d for c, d in (meta.get("cases") or {}).items() if d not in current}
    if not stale:
        return []
    return ["Rows of some cases come from other runs (date, --quick): "
            + ", ".join(f"{c} ({d})" for c, d in sorted(stale.items())), ""]


def _md_table(rows: List[dict], note: bool = True) -> List[str]:
    head = "| case | name | value | unit | target | holds |" + (" note |" if note else "")
    lines = [head, "|---|---|---:|---|---|---|" + ("---|" if note else "")]
    for r in rows:
        lines.append(
            f"| {r.get('case', '')} | {r['name']} | {fmt_value(r['value'])} | {r['unit']} | "
            f"{r.get('target') or ''} | {_holds(r.get('holds'))} |" + (f" {r.get('note', '')} |" if note else "")
        )
    return lines


def _summary(rows: List[dict]) -> str:
    with_target = [r for r in rows if r.get("target")]
    failed = [r for r in with_target if r.get("holds") is False]
    unknown = [r for r in with_target if r.get("holds") is None]
    return (f"{len(with_target) - len(failed) - len(unknown)} of {len(with_target)} targets "
            f"hold; {len(failed)} do not; {len(unknown)} not measured.")


def _export_table(exports: Dict[str, dict]) -> List[str]:
    """What each cached program cost to export (its record): a cold cache pays all of it."""
    if not exports:
        return []
    lines = ["| program | wall (s) | CPU (s) | peak RSS (GiB) | built | conditions |", "|---|---:|---:|---:|---|---|"]
    for label, r in sorted(exports.items(), key=lambda kv: -kv[1].get("cpu_seconds", 0)):
        where = "pinned to 1 CPU beside another export" if r.get("cpus") else "alone, unpinned"
        lines.append(f"| {label} | {r['wall_seconds']:.0f} | {r.get('cpu_seconds', 0):.0f} | "
                     f"{r['peak_rss_bytes'] / GIB:.2f} | {r.get('built', '')} | {where}, load average after "
                     f"{r.get('loadavg_after', 0):.1f} |")
    cpu = sum(r.get("cpu_seconds", 0) for r in exports.values())
    wall = sum(r["wall_seconds"] for r in exports.values())
    lines += ["", f"All {len(exports)}: {cpu / 60:.1f} min of CPU, {wall / 60:.1f} min of wall time one after "
              f"another; `python -m benchmarks` runs them in two lanes, one per CPU, so a cold cache adds "
              f"roughly half the CPU total to a run on a quiet machine (more when other work shares the CPUs)."]
    return lines


def markdown(rows: List[dict], meta: dict) -> str:
    lines = [
        "# lazykv benchmarks",
        "",
        f"Date: {meta['date']}  ",
        f"Machine: {_machine_line(meta)}  ",
    ]
    fr = meta.get("full_run")
    if not fr or fr.get("date") != meta["date"]:
        lines.append("Last command: " + _run_line(dict(meta, wall_seconds=None)) + ("  " if fr else ""))
    if fr:
        lines.append("Last full run: " + _run_line(fr))
    lines.append("")
    lines += _stale_note(meta)
    lines += _md_table(rows)
    pngs = sorted(p.name for p in RESULTS.glob("*.png"))
    if pngs:
        lines += ["", "Plots: " + ", ".join(f"[{p}]({p})" for p in pngs)]
    lines += ["", _summary(rows)]
    secs = meta.get("last_case_seconds") or {}
    if secs:
        lines += ["", "## Run time per case", "",
                  "Wall time of each case's measurements when it last ran (programs already exported):", "",
                  "| case | seconds | run |", "|---|---:|---|"]
        lines += [f"| {c} | {secs[c]:.0f} | {(meta.get('cases') or {}).get(c, '')} |" for c in CASE_ORDER if c in secs]
    if meta.get("exports"):
        lines += ["", "## Export cache: what a cold cache costs", "",
                  "Each program is exported once, in a subprocess of its own, and cached in "
                  "`benchmarks/cache/` under a hash of its settings and sources; these are the "
                  "records of the cached exports (wall and CPU time, peak RSS from `wait4`).", ""]
        lines += _export_table(meta["exports"])
    return "\n".join(lines) + "\n"


README_START, README_END = "<!-- bench:start -->", "<!-- bench:end -->"


def readme_block(rows: List[dict], meta: dict) -> str:
    """The README's benchmark block: date, machine, the rows with a target, the plots."""
    fr = meta.get("full_run")
    lines = [README_START,
             "<!-- written by `python -m benchmarks` (benchmarks/common.py: readme_block); edits here are "
             "overwritten -->",
             "",
             f"Latest results, {meta['date']}, on {_machine_line(meta)}."
             + (f" Last full run: {_run_line(fr)}." if fr else ""),
             ""]
    lines += _stale_note(meta)
    lines += _md_table([r for r in rows if r.get("target")], note=False)
    lines += ["", _summary(rows) + " Every row, with the figures behind these ratios: "
              "[benchmarks/results/latest.md](benchmarks/results/latest.md).", ""]
    order = {c: i for i, c in enumerate(CASE_ORDER)}
    for p in sorted(RESULTS.glob("*.png"), key=lambda p: (order.get(p.stem, 99), p.stem)):
        lines.append(f"![{p.stem}](benchmarks/results/{p.name})")
    lines.append(README_END)
    return "\n".join(lines)


def write_readme(rows: List[dict], meta: dict) -> bool:
    """Replace the block between the README's bench markers; False if it has none."""
    p = ROOT / "README.md"
    text = p.read_text() if p.exists() else ""
    i, j = text.find(README_START), text.find(README_END)
    if i < 0 or j < i:
        log(f"README.md has no {README_START} ... {README_END} block: not updated")
        return False
    p.write_text(text[:i] + readme_block(rows, meta) + text[j + len(README_END):])
    return True


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
    # The warm cache holds several stories110m programs (~0.5 GiB each): above the default
    # cap, least-recently-used eviction would turn "cached" loads into first loads.
    env.setdefault("LAZYKV_CACHE_MAX_BYTES", "64GiB")
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


class ForkServer:
    """A ``benchmarks.worker serve`` process: imports torch, executorch and the shim once,
    then runs each task in a child forked from that state (see :mod:`benchmarks.worker`).
    Started in a session of its own, so a timeout kills it and its child together."""

    def __init__(self, timeout: float = 600) -> None:
        import tempfile

        self._err = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.worker", "serve"], cwd=ROOT, env=child_env(),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err, text=True,
            start_new_session=True,
        )
        self._reply("start", timeout)

    def _stderr_tail(self) -> str:
        self._err.seek(0)
        return self._err.read()[-3000:]

    def _reply(self, what: str, timeout: float) -> dict:
        import select

        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.close(kill=True)
            raise RuntimeError(f"fork server: {what} timed out after {timeout:.0f} s")
        line = self.proc.stdout.readline()
        if not line:
            tail = self._stderr_tail()
            self.close(kill=True)
            raise RuntimeError(f"fork server exited ({what}):\n{tail}")
        return json.loads(line)

    def run(self, task: str, timeout: float, **kwargs) -> ChildRun:
        self.proc.stdin.write(json.dumps({"task": task, "args": kwargs}) + "\n")
        self.proc.stdin.flush()
        res = self._reply(task, timeout)
        if "error" in res:
            raise RuntimeError(f"{task} (forked child) failed:\n{res['error'][-4000:]}\n"
                               f"server stderr:\n{self._stderr_tail()[-1500:]}")
        # peak RSS of a forked child (wait4) starts from the server's: measurements use
        # VmHWM inside the task instead.
        return ChildRun(res["out"], res["wall"], 0, "", res["cpu"])

    def close(self, kill: bool = False) -> None:
        if self.proc.poll() is None:
            if kill:
                os.killpg(self.proc.pid, 9)
            else:
                self.proc.stdin.close()
            self.proc.wait()
        self._err.close()


_SERVER: Optional[ForkServer] = None
_SERVE = False  # inside fork_server(): start one on the first measurement


@contextlib.contextmanager
def fork_server(enabled: bool = True):
    """While active, :func:`worker` runs measurement tasks in children of one fork server
    (started on first use) instead of fresh interpreters; exports always get a fresh
    process."""
    global _SERVER, _SERVE
    _SERVE = enabled
    try:
        yield
    finally:
        _SERVE = False
        if _SERVER is not None:
            _SERVER.close()
            _SERVER = None


def worker(task: str, timeout: float = 1800, _cpus: Optional[set] = None, _fresh: bool = False,
           **kwargs) -> ChildRun:
    """Run one :mod:`benchmarks.worker` task in a process of its own: a child of the fork
    server inside :func:`fork_server` (measurements), else (or with ``_fresh``) a fresh
    interpreter (pinned to ``_cpus``)."""
    global _SERVER
    if _SERVE and not _fresh and task not in ("export", "checkpoints"):
        if _SERVER is None or _SERVER.proc.poll() is not None:  # first use, or it died
            log("starting the fork server (imports torch + executorch once for every measurement) ...")
            _SERVER = ForkServer()
        return _SERVER.run(task, timeout, **kwargs)
    return run_child(["-m", "benchmarks.worker", task, json.dumps(kwargs)], timeout=timeout, cpus=_cpus)


def now() -> str:
    return _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
