"""Fuzz: mutated and truncated real ``.pte`` files end in a lazykv error or a correct run.

Cases (seeded; :mod:`fuzz_worker` describes the mutations) run in two long-lived worker
subprocesses, so a crash of the ExecuTorch runtime (SIGSEGV, SIGABRT) or a hang (per-case
timeout) fails the test and names the case, its seed and its mutation, with the command
that reproduces it. ``LAZYKV_FUZZ_CASES`` (default 2,000) and ``LAZYKV_FUZZ_SEED``
(default 0) change the run; the outcome counts go to ``build/fuzz/last_run.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

import fuzz_worker

CASES = int(os.environ.get("LAZYKV_FUZZ_CASES", "2000"))
SEED = int(os.environ.get("LAZYKV_FUZZ_SEED", "0"))
WORKERS = int(os.environ.get("LAZYKV_FUZZ_WORKERS", "2"))
#: Seconds one case may take (a normal one takes 0.05-0.3 s; the machine may be loaded).
CASE_TIMEOUT = float(os.environ.get("LAZYKV_FUZZ_TIMEOUT", "60"))


def _vocab(cfg) -> int:
    from lazykv.examples.decoder import DecoderConfig

    return (cfg.example_config or DecoderConfig()).vocab_size


@pytest.fixture(scope="module")
def fuzz_run(example_static, example_lazy):
    bases = [str(example_static[1].path), str(example_lazy[1].path)]
    res = fuzz_worker.run_fuzz(
        bases, CASES, seed=SEED, workers=WORKERS, case_timeout=CASE_TIMEOUT,
        vocab=_vocab(example_static[0]),
    )
    out = Path("build") / "fuzz"
    out.mkdir(parents=True, exist_ok=True)
    (out / "last_run.json").write_text(json.dumps(
        {**dataclasses.asdict(res), "crashes": res.crashes, "hangs": res.hangs, "bases": bases},
        indent=1, default=str,
    ))
    print(res.summary())
    return res, bases


def _listing(failures, bases, limit=15) -> str:
    lines = [str(f).replace("<bases>", " ".join(bases)) for f in failures[:limit]]
    if len(failures) > limit:
        lines.append(f"... and {len(failures) - limit} more (build/fuzz/last_run.json)")
    return "\n".join(lines)


def test_fuzz_ran_every_case(fuzz_run):
    res, _ = fuzz_run
    assert sum(res.counts.values()) == CASES, res.summary()
    assert not [f for f in res.failures if f.kind in ("worker-start", "fuzzer-error")], res.summary()
    # The mutations reach both outcomes: most files are refused, some still load and run.
    assert res.counts.get("refused", 0) > CASES // 4, res.summary()
    assert res.counts.get("ok", 0) > CASES // 20, res.summary()


def test_fuzz_no_crash_no_hang(fuzz_run):
    res, bases = fuzz_run
    bad = [f for f in res.failures if f.kind in ("crash", "hang")]
    assert not bad, f"{len(bad)} crashes/hangs in {CASES} cases:\n{_listing(bad, bases)}"


def test_fuzz_errors_are_lazykv_errors(fuzz_run):
    res, bases = fuzz_run
    bad = [f for f in res.failures if f.kind == "wrong-error"]
    assert not bad, (
        f"{len(bad)} cases raised something other than a LazyKVError:\n{_listing(bad, bases)}"
    )
