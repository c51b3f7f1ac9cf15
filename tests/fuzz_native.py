"""The ``.pte`` fuzz of :mod:`fuzz_worker`, through the C++ loader.

The same cases (``fuzz_mutations.build_case``: seeded mutations of real ``.pte`` files) are
written to disk and handed to a long-lived C++ worker (``lazykv_native_tests
fuzz-worker``), which loads each with ``lazykv::Program::load`` and runs every method
once (then one more position), and prints one result line. A crash is caught by a signal
handler in the worker that names the object holding the faulting frame: the worker
executable itself holds lazykv's code (``liblazykv.a``); ``libexecutorch*.so`` and the
kernel libraries are ExecuTorch's. The driver restarts the worker after a crash or a hang
and, for a crash inside ExecuTorch, checks that the Python shim refuses the same file
(``fuzz_worker.check_file`` in a subprocess).

Run many (the 20,000-case measurement)::

    python tests/fuzz_native.py --cases 20000 static.pte lazy.pte
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import selectors
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fuzz_mutations  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class NativeFuzzResult:
    cases: int
    counts: Dict[str, int]
    crashes: List[dict]  # {"case", "desc", "object", "symbol", "signal", "python"}
    hangs: List[dict]
    seconds: float

    @property
    def lazykv_crashes(self) -> List[dict]:
        """Crashes whose faulting frame is in lazykv's code (the worker executable)."""
        return [c for c in self.crashes if c["owner"] == "lazykv"]

    def summary(self) -> str:
        return (f"{self.cases} cases through the C++ loader in {self.seconds:.0f} s: {self.counts}; "
                f"crashes {len(self.crashes)} (in lazykv: {len(self.lazykv_crashes)}), hangs {len(self.hangs)}")


def _exe() -> Path:
    from lazykv.runtime_shim.native.build import CMAKE_PROJECT

    return CMAKE_PROJECT / "lazykv_native_tests"


class _Worker:
    def __init__(self, vocab: int) -> None:
        self.proc = subprocess.Popen([str(_exe()), "fuzz-worker", str(vocab)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1,
                                     errors="replace")  # messages may quote corrupt bytes
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.proc.stdout, selectors.EVENT_READ)
        line = self.read(60)
        if line != "ready":
            raise RuntimeError(f"the C++ fuzz worker did not start: {line!r}")

    def read(self, timeout: float) -> Optional[str]:
        if not self.sel.select(timeout):
            return None
        line = self.proc.stdout.readline()
        return line.rstrip("\n") if line else ""

    def kill(self) -> None:
        try:
            self.proc.kill()
        except OSError:
            pass
        self.proc.wait()


def _owner(obj: str) -> str:
    name = os.path.basename(obj)
    if name == "lazykv_native_tests":
        return "lazykv"
    if "executorch" in obj or "custom_ops" in name or "_C.cpython" in name:
        return "executorch"
    return "other"


_VERDICT_SCRIPT = """
import sys, tempfile, fuzz_worker
vocab = int(sys.argv[1])
for path in sys.stdin:
    print(path.strip(), fuzz_worker.check_file(path.strip(), tempfile.mkdtemp(), vocab), flush=True)
"""


def python_verdicts(paths: Sequence[str], vocab: int) -> Dict[str, str]:
    """What the Python shim does with each file (``fuzz_worker.check_file``), in one
    subprocess (it imports torch once); a file that kills it is recorded as such and
    the rest go to a new one."""
    out: Dict[str, str] = {}
    todo = list(paths)
    while todo:
        done = subprocess.run([sys.executable, "-c", _VERDICT_SCRIPT, str(vocab)], input="\n".join(todo) + "\n",
                              capture_output=True, text=True, timeout=600 + 60 * len(todo),
                              cwd=os.path.dirname(os.path.abspath(__file__)))
        for line in done.stdout.splitlines():
            path, _, verdict = line.partition(" ")
            out[path] = verdict
        todo = [p for p in todo if p not in out]
        if todo:  # the first unanswered file ended the process
            out[todo.pop(0)] = f"python crashed (exit {done.returncode})"
    return out


def run_native_fuzz(bases: Sequence[str], cases: int, seed: int = 0, vocab: int = 512,
                    case_timeout: float = 60.0, progress=None, start: int = 0) -> NativeFuzzResult:
    """Run fuzz cases ``start .. cases - 1`` through the C++ loader (see the module doc)."""
    loaded = []
    for p in bases:
        data = open(p, "rb").read()
        loaded.append((os.path.basename(p), data, fuzz_mutations.layout_full(os.path.basename(p), data)))
    work = tempfile.mkdtemp(prefix="lazykv-native-fuzz-")
    counts: Dict[str, int] = {}
    crashes, hangs = [], []
    t0 = time.time()
    worker = _Worker(vocab)
    try:
        for i in range(start, cases):
            name, desc, data = fuzz_mutations.build_case(seed, i, loaded)
            path = os.path.join(work, f"case-{i % 4}.pte")
            with open(path, "wb") as f:
                f.write(data)
            worker.proc.stdin.write(path + "\n")
            worker.proc.stdin.flush()
            line = worker.read(case_timeout)
            if line is None or line == "" or line.startswith("crash"):
                if line is None:
                    hangs.append({"case": i, "desc": desc})
                    counts["hang"] = counts.get("hang", 0) + 1
                else:
                    fields = dict(x.split("=", 1) for x in line.split()[1:] if "=" in x) if line else {}
                    obj = fields.get("object", "unknown")
                    keep = os.path.join(work, f"crash-{i}.pte")
                    os.replace(path, keep)
                    crash = {"case": i, "base": name, "desc": desc, "signal": fields.get("signal"),
                             "object": obj, "symbol": fields.get("symbol"), "owner": _owner(obj), "file": keep}
                    crashes.append(crash)
                    if progress:
                        print(f"crash: case {i} ({desc[:100]}) in {os.path.basename(obj)} "
                              f"{fields.get('symbol')}", file=sys.stderr, flush=True)
                    counts["crash"] = counts.get("crash", 0) + 1
                worker.kill()
                worker = _Worker(vocab)
                continue
            kind = line.split()[0]
            counts[kind] = counts.get(kind, 0) + 1
            if progress and (i + 1) % 250 == 0:
                progress(i + 1, cases, counts)
    finally:
        worker.kill()
    verdicts = python_verdicts([c["file"] for c in crashes], vocab) if crashes else {}
    for c in crashes:
        c["python"] = verdicts.get(c["file"], "?")
    return NativeFuzzResult(cases - start, counts, crashes, hangs, time.time() - t0)


def main(argv: Sequence[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bases", nargs="+")
    ap.add_argument("--cases", type=int, default=2000)
    ap.add_argument("--start", type=int, default=0, help="first case index (to resume a run)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--out", default=str(ROOT / "build" / "fuzz" / "native_last_run.json"))
    args = ap.parse_args(argv)
    res = run_native_fuzz(args.bases, args.cases, args.seed, args.vocab, start=args.start,
                          progress=lambda d, t, c: print(f"{d}/{t} {c}", file=sys.stderr, flush=True))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({**dataclasses.asdict(res), "bases": list(args.bases)}, indent=1))
    print(res.summary())
    for c in res.crashes:
        print(json.dumps(c))
    return 0 if not res.lazykv_crashes and not res.hangs else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
