"""Fuzzing ``.pte`` files in worker subprocesses: the worker and the driver.

A *case* is ``(seed, index)``: :func:`fuzz_mutations.build_case` turns it,
deterministically, into one mutation of one base ``.pte`` (truncation, bit flips and
byte overwrites in the program flatbuffer or in a segment, extended-header field edits,
lazykv-manifest edits, or a structure-aware edit of one field of the parsed program;
see :mod:`fuzz_mutations`). A worker applies it, writes
the file and checks that lazykv either refuses it with a :class:`lazykv.errors.LazyKVError`
or loads and runs it (``inspect_pte``, ``runtime_shim.load``, a session, ``forward``
on a valid input, then one more position).

Workers are long-lived subprocesses (importing torch costs seconds) that take case
indices on stdin and answer on a dedicated pipe; the driver (:func:`run_fuzz`) restarts
a worker after a crash or a hang (per-case timeout) and records the case, its seed and
its mutation. This module imports only the standard library at the top so the driver
(pytest's process) stays light; the worker imports torch and lazykv when it starts.

Reproduce one case::

    python tests/fuzz_worker.py repro --seed 0 --case 123 static.pte lazy.pte

Run many (the local 20,000-case measurement)::

    python tests/fuzz_worker.py run --cases 20000 --workers 2 static.pte lazy.pte
"""

from __future__ import annotations

import dataclasses
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional, Sequence, Tuple

from fuzz_mutations import build_case, layout_full  # standard library only at import, too

# -- checking a case (worker side) -------------------------------------------------------------


def _valid_inputs(prog, method: str, n_tokens: int, pos: int, vocab: int):
    """Valid user inputs for a (tokens, position) decoder method, else None."""
    import torch

    info = prog.method_info(method)
    if len(info.inputs) != 2 or any(s.kind != "tensor" for s in info.inputs):
        return None
    tok_i, pos_i = 0, 1
    rule = prog.manifest.fill_rule(method) if prog.manifest is not None else None
    if rule is not None:
        tok_i, pos_i = rule.length_input, rule.position_input
        if {tok_i, pos_i} != {0, 1}:
            return None
    ts, ps = info.inputs[tok_i], info.inputs[pos_i]
    if len(ts.sizes) != 2 or ts.dtype not in (torch.long, torch.int32):
        return None
    cap = ts.sizes[1]
    n = min(n_tokens, cap) if ts.dynamic else cap
    if n < 1:
        return None
    gen = torch.Generator().manual_seed(pos)
    tokens = torch.randint(0, max(1, vocab), (1, n), generator=gen, dtype=ts.dtype)
    if ps.dtype is None or len(ps.sizes) != 1:
        return None
    if ps.sizes[0] == 1 and not ps.dynamic:
        p = torch.tensor([pos], dtype=ps.dtype)
    else:
        p = torch.arange(pos, pos + n, dtype=ps.dtype)
        if tuple(p.shape) != tuple(ps.sizes) and not ps.dynamic:
            return None
    out = [None, None]
    out[tok_i], out[pos_i] = tokens, p
    return out


def _spec_inputs(info) -> list:
    """Zeros shaped and typed as the method's input specs say (upper-bound sizes)."""
    import torch

    out = []
    for spec in info.inputs:
        if spec.kind == "tensor":
            out.append(torch.zeros(spec.sizes, dtype=spec.dtype or torch.float32))
        else:
            out.append({"int": 0, "float": 0.0, "bool": False}.get(spec.kind))
    return out


def check_file(path: str, cache_dir: str, vocab: int) -> str:
    """Run everything a user would on ``path``. Returns ``"ok ..."`` or
    ``"refused <ErrorType>"``; raises anything that is not a LazyKVError."""
    from lazykv.errors import LazyKVError
    from lazykv.inspect import inspect_pte
    from lazykv.runtime_shim import load

    notes = []
    try:
        inspect_pte(path)
        notes.append("inspect")
    except LazyKVError as e:
        notes.append(f"inspect refused {type(e).__name__}")
    try:
        prog = load(path, cache_dir=cache_dir)
    except LazyKVError as e:
        return f"refused {type(e).__name__}: {str(e)[:160]}"
    ran = 0
    for method in prog.method_names:
        info = prog.method_info(method)
        if not info.inputs:
            try:
                prog.constant(method)
            except LazyKVError:
                pass
            continue
        try:
            inputs = _valid_inputs(prog, method, 3, 0, vocab)
            if inputs is None:
                # Not a (tokens, position) decoder: inputs that match the method's specs.
                inputs = _spec_inputs(prog.method_info(method))
                with prog.session() as s:
                    s.run(method, inputs)
                ran += 1
                continue
            with prog.session() as s:
                out = s.run(method, inputs)
                assert isinstance(out, list)
                more = _valid_inputs(prog, method, 1, s.offset if prog.lazy else 3, vocab)
                if more is not None and prog.lazy:
                    s.run(method, more)
            ran += 1
        except LazyKVError as e:
            return f"refused-at-run {type(e).__name__}: {str(e)[:160]}"
    return "ok " + ",".join(notes) + f" ran={ran}"


def worker_main(argv: Sequence[str]) -> int:
    """``fuzz_worker.py worker FD SEED VOCAB BASE...``: answer cases read from stdin on FD."""
    fd, seed, vocab = int(argv[0]), int(argv[1]), int(argv[2])
    paths = list(argv[3:])
    out = os.fdopen(fd, "w", buffering=1)
    import torch  # noqa: F401  (the expensive import, once)

    torch.set_num_threads(1)
    from lazykv.errors import LazyKVError

    bases = []
    for p in paths:
        data = open(p, "rb").read()
        bases.append((os.path.basename(p), data, layout_full(os.path.basename(p), data)))
    work = tempfile.mkdtemp(prefix="lazykv-fuzz-")
    out.write(json.dumps({"ready": True, "pid": os.getpid()}) + "\n")
    try:
        for line in sys.stdin:
            line = line.strip()
            if not line:
                continue
            t0 = time.perf_counter()
            if line.startswith("F:"):  # a prepared file (regression cases)
                given = line[2:]
                index, name, desc = -1, os.path.basename(given), f"file: {given}"
                data = open(given, "rb").read()
            else:
                index = int(line)
                try:
                    name, desc, data = build_case(seed, index, bases)
                except Exception as e:  # a bug in the fuzzer itself
                    out.write(json.dumps({"case": index, "result": "fuzzer-error",
                                          "detail": f"{type(e).__name__}: {e}"}) + "\n")
                    continue
            out.write(json.dumps({"start": index, "base": name, "desc": desc}) + "\n")
            case_dir = tempfile.mkdtemp(prefix="c", dir=work)
            path = os.path.join(case_dir, f"case{index}.pte")
            with open(path, "wb") as f:
                f.write(data)
            try:
                res = check_file(path, os.path.join(case_dir, "cache"), vocab)
                result, detail = ("ok" if res.startswith("ok") else "refused"), res
            except LazyKVError as e:  # pragma: no cover - check_file catches these
                result, detail = "refused", f"{type(e).__name__}: {e}"
            except BaseException as e:
                import traceback

                tb = traceback.format_exc(limit=6)
                result, detail = "wrong-error", f"{type(e).__name__}: {str(e)[:300]}\n{tb[-1500:]}"
            finally:
                shutil.rmtree(case_dir, ignore_errors=True)
            out.write(json.dumps({"case": index, "base": name, "desc": desc, "result": result,
                                  "detail": detail,
                                  "seconds": round(time.perf_counter() - t0, 4)}) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


# -- the driver (parent side: standard library only) ---------------------------------------------


@dataclasses.dataclass
class Failure:
    """A case that crashed, hung, or raised something other than a LazyKVError."""

    kind: str  # "crash", "hang", "wrong-error", "fuzzer-error", "worker-start"
    case: int
    seed: int
    base: str
    desc: str
    detail: str

    def __str__(self) -> str:
        return (f"[{self.kind}] case {self.case} seed {self.seed} base {self.base}: {self.desc}\n"
                f"    {self.detail.strip()[:1200]}\n"
                f"    reproduce: python tests/fuzz_worker.py repro --seed {self.seed} "
                f"--case {self.case} <bases>")


@dataclasses.dataclass
class FuzzResult:
    cases: int
    seed: int
    seconds: float
    counts: Dict[str, int]
    failures: List[Failure]
    by_kind: Dict[str, Dict[str, int]]
    worker_starts: int
    slowest: List[Tuple[float, int, str]]
    #: ``files`` mode only: item index -> (result, detail) of every item.
    outcomes: Dict[int, Tuple[str, str]] = dataclasses.field(default_factory=dict)
    #: Outcome classes (:func:`outcome_class`): which error refused a file, or how it ran.
    by_error: Dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def crashes(self) -> int:
        return sum(1 for f in self.failures if f.kind == "crash")

    @property
    def hangs(self) -> int:
        return sum(1 for f in self.failures if f.kind == "hang")

    def summary(self) -> str:
        lines = [f"{self.cases} cases (seed {self.seed}) in {self.seconds:.1f} s, "
                 f"{self.worker_starts} worker starts; crashes {self.crashes}, hangs "
                 f"{self.hangs}, wrong errors "
                 f"{sum(1 for f in self.failures if f.kind == 'wrong-error')}",
                 "outcomes: " + json.dumps(self.counts, sort_keys=True)]
        for k, v in sorted(self.by_kind.items()):
            lines.append(f"  {k}: {json.dumps(v, sort_keys=True)}")
        lines.append("outcome classes:")
        for k, v in sorted(self.by_error.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"  {v:6d}  {k}")
        lines.append("slowest: " + "; ".join(f"case {c} {s:.2f} s" for s, c, _ in self.slowest))
        return "\n".join(lines)


def outcome_class(result: str, detail: str) -> str:
    """``result`` refined by its detail: ``"refused ProgramRejected"``, ``"refused-at-run
    MemoryBudgetExceeded"``, ``"ok ran=2"``, ``"wrong-error TypeError"``, ``"crash"``..."""
    head = detail.split(":", 1)[0].strip()
    if result == "refused" and head.startswith("refused"):
        return head
    if result == "ok":
        ran = [w for w in detail.split() if w.startswith("ran=")]
        refused = " (inspect refused)" if "inspect refused" in detail else ""
        return f"ok {ran[0] if ran else ''}{refused}".strip()
    if result == "wrong-error" and head:
        return f"wrong-error {head}"
    return result


class _Worker:
    def __init__(self, seed: int, vocab: int, bases: Sequence[str], log_dir: str, n: int) -> None:
        r, w = os.pipe()
        self.stderr_path = os.path.join(log_dir, f"worker{n}.stderr")
        self.stderr = open(self.stderr_path, "ab")
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "worker", str(w), str(seed), str(vocab),
             *bases],
            stdin=subprocess.PIPE, stdout=self.stderr, stderr=self.stderr,
            pass_fds=(w,), env=env, text=True,
        )
        os.close(w)
        self.rfd = r
        self.buf = b""

    def read_line(self, timeout: float) -> Optional[dict]:
        """The next JSON line, None on EOF; raises TimeoutError."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            sel = selectors.DefaultSelector()
            sel.register(self.rfd, selectors.EVENT_READ)
            ready = sel.select(left)
            sel.close()
            if not ready:
                raise TimeoutError
            chunk = os.read(self.rfd, 65536)
            if not chunk:
                return None
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return json.loads(line)

    def send(self, item) -> bool:
        try:
            self.proc.stdin.write(f"{item}\n")
            self.proc.stdin.flush()
            return True
        except (BrokenPipeError, OSError):
            return False

    def stderr_tail(self, n: int = 1500) -> str:
        try:
            self.stderr.flush()
            with open(self.stderr_path, "rb") as f:
                f.seek(0, 2)
                size = f.tell()
                f.seek(max(0, size - n))
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.close()

    def close(self) -> None:
        for x in (self.proc.stdin,):
            try:
                x.close()
            except OSError:
                pass
        try:
            os.close(self.rfd)
        except OSError:
            pass
        self.stderr.close()


def _signal_name(rc: int) -> str:
    if rc is not None and rc < 0:
        try:
            return signal.Signals(-rc).name
        except ValueError:
            return f"signal {-rc}"
    return f"exit code {rc}"


def run_fuzz(
    bases: Sequence[str],
    cases: int,
    seed: int = 0,
    workers: int = 2,
    case_timeout: float = 30.0,
    start_timeout: float = 300.0,
    vocab: int = 512,
    first_case: int = 0,
    progress=None,
    files: Optional[Sequence[str]] = None,
) -> FuzzResult:
    """Run cases ``first_case .. first_case + cases - 1`` over ``workers`` subprocesses,
    or, with ``files``, check each of those files (``cases`` is then ignored)."""
    t0 = time.perf_counter()
    log_dir = tempfile.mkdtemp(prefix="lazykv-fuzz-logs-")
    lock = threading.Lock()
    if files is not None:
        cases, first_case = len(files), 0
    next_case = [first_case]
    end = first_case + cases
    counts: Dict[str, int] = {}
    by_kind: Dict[str, Dict[str, int]] = {}
    by_error: Dict[str, int] = {}
    failures: List[Failure] = []
    starts = [0]
    slowest: List[Tuple[float, int, str]] = []
    done = [0]

    def take() -> Optional[int]:
        with lock:
            if next_case[0] >= end:
                return None
            i = next_case[0]
            next_case[0] += 1
            return i

    outcomes: Dict[int, Tuple[str, str]] = {}

    def record(result: str, desc: str, failure: Optional[Failure] = None,
               seconds: float = 0.0, case: int = -1, detail: str = "") -> None:
        kind = desc.split(":", 1)[0]
        with lock:
            if files is not None:
                outcomes[case] = (result, detail or (failure.detail if failure else ""))
            counts[result] = counts.get(result, 0) + 1
            k = by_kind.setdefault(kind, {})
            k[result] = k.get(result, 0) + 1
            cls = outcome_class(result, detail)
            by_error[cls] = by_error.get(cls, 0) + 1
            if failure is not None:
                failures.append(failure)
            slowest.append((seconds, case, desc))
            slowest.sort(reverse=True)
            del slowest[5:]
            done[0] += 1
            if progress:
                progress(done[0], cases, counts)

    def start(n: int) -> Optional[_Worker]:
        w = _Worker(seed, vocab, bases, log_dir, n)
        with lock:
            starts[0] += 1
        try:
            msg = w.read_line(start_timeout)
        except TimeoutError:
            msg = None
        if not msg or not msg.get("ready"):
            tail = w.stderr_tail()
            w.kill()
            with lock:
                failures.append(Failure("worker-start", -1, seed, "", "worker did not start",
                                        tail))
            return None
        return w

    def loop(n: int) -> None:
        w = start(n)
        if w is None:
            return
        try:
            while True:
                i = take()
                if i is None:
                    return
                item = f"F:{files[i]}" if files is not None else i
                if not w.send(item):
                    w.kill()
                    w = start(n)
                    if w is None or not w.send(item):
                        return
                base, desc = "", f"file: {files[i]}" if files is not None else "(not started)"
                try:
                    msg = w.read_line(case_timeout)
                    if msg is not None and "start" in msg:
                        base, desc = msg["base"], msg["desc"]
                        msg = w.read_line(case_timeout)
                except TimeoutError:
                    tail = w.stderr_tail()
                    w.kill()
                    record("hang", desc, Failure("hang", i, seed, base, desc,
                                                 f"no answer within {case_timeout} s\n{tail}"),
                           case_timeout, i)
                    w = start(n)
                    if w is None:
                        return
                    continue
                if msg is None:  # the worker died in this case
                    rc = w.proc.wait()
                    tail = w.stderr_tail()
                    w.close()
                    record("crash", desc, Failure("crash", i, seed, base, desc,
                                                  f"worker died: {_signal_name(rc)}\n{tail}"), 0, i)
                    w = start(n)
                    if w is None:
                        return
                    continue
                res = msg["result"]
                fail = None
                if res in ("wrong-error", "fuzzer-error"):
                    fail = Failure(res, i, seed, msg.get("base", base), msg.get("desc", desc),
                                   msg.get("detail", ""))
                record(res, msg.get("desc", desc), fail, msg.get("seconds", 0.0), i,
                       msg.get("detail", ""))
        finally:
            if w is not None:
                try:
                    w.proc.stdin.close()
                except OSError:
                    pass
                try:
                    w.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    pass
                w.kill()

    threads = [threading.Thread(target=loop, args=(n,), daemon=True) for n in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    shutil.rmtree(log_dir, ignore_errors=True)
    failures.sort(key=lambda f: f.case)
    return FuzzResult(cases, seed, time.perf_counter() - t0, counts, failures, by_kind,
                      starts[0], slowest, outcomes, by_error)


def _repro(seed: int, index: int, paths: Sequence[str], out: Optional[str]) -> int:
    bases = []
    for p in paths:
        data = open(p, "rb").read()
        bases.append((os.path.basename(p), data, layout_full(os.path.basename(p), data)))
    name, desc, data = build_case(seed, index, bases)
    print(f"case {index} seed {seed} base {name}: {desc}", flush=True)
    d = tempfile.mkdtemp()
    path = out or os.path.join(d, "case.pte")
    with open(path, "wb") as f:
        f.write(data)
    print("wrote", path, flush=True)
    print(check_file(path, os.path.join(d, "cache"), 512), flush=True)
    return 0


def main(argv: Sequence[str]) -> int:
    import argparse

    if argv and argv[0] == "worker":
        return worker_main(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--cases", type=int, default=int(os.environ.get("LAZYKV_FUZZ_CASES", 2000)))
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--first-case", type=int, default=0)
    r.add_argument("--workers", type=int, default=2)
    r.add_argument("--timeout", type=float, default=30.0)
    r.add_argument("--json", help="write the result here")
    r.add_argument("bases", nargs="+")
    p = sub.add_parser("repro")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--case", type=int, required=True)
    p.add_argument("--out")
    p.add_argument("bases", nargs="+")
    a = ap.parse_args(argv)
    if a.cmd == "repro":
        return _repro(a.seed, a.case, a.bases, a.out)

    last = [0.0]

    def progress(done, total, counts):
        now = time.perf_counter()
        if now - last[0] > 30 or done == total:
            last[0] = now
            print(f"{done}/{total} {json.dumps(counts, sort_keys=True)}", file=sys.stderr, flush=True)

    res = run_fuzz(a.bases, a.cases, seed=a.seed, workers=a.workers, case_timeout=a.timeout,
                   first_case=a.first_case, progress=progress)
    print(res.summary())
    for f in res.failures:
        print(f)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({**dataclasses.asdict(res), "crashes": res.crashes, "hangs": res.hangs}, f,
                      indent=1, default=str)
    return 1 if res.failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
