"""The fuzz of test_fuzz_pte.py through the C++ loader (tests/fuzz_native.py).

``LAZYKV_NATIVE_FUZZ_CASES`` (default 300 here; the 20,000-case measurement runs
``python tests/fuzz_native.py --cases 20000 ...``) and ``LAZYKV_FUZZ_SEED`` change the
run; the outcome goes to ``build/fuzz/native_last_run.json``. A crash inside lazykv's
code fails; a crash inside ExecuTorch's own loader is counted, and the same file must be
refused by the Python shim (which validates programs before ExecuTorch sees them).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

import fuzz_native

CASES = int(os.environ.get("LAZYKV_NATIVE_FUZZ_CASES", "300"))
SEED = int(os.environ.get("LAZYKV_FUZZ_SEED", "0"))


@pytest.fixture(scope="module")
def native_fuzz(example_static, example_lazy):
    from lazykv.examples.decoder import DecoderConfig

    vocab = (example_static[0].example_config or DecoderConfig()).vocab_size
    bases = [str(example_static[1].path), str(example_lazy[1].path)]
    res = fuzz_native.run_native_fuzz(bases, CASES, seed=SEED, vocab=vocab)
    out = Path("build") / "fuzz"
    out.mkdir(parents=True, exist_ok=True)
    (out / "native_last_run.json").write_text(json.dumps({**dataclasses.asdict(res), "bases": bases}, indent=1))
    print(res.summary())
    return res


def test_native_fuzz_ran_every_case(native_fuzz):
    assert sum(native_fuzz.counts.values()) == CASES, native_fuzz.summary()
    assert native_fuzz.counts.get("refused", 0) > CASES // 5, native_fuzz.summary()
    assert native_fuzz.counts.get("ok", 0) > CASES // 20, native_fuzz.summary()


def test_native_fuzz_no_crash_in_lazykv_no_hang(native_fuzz):
    assert not native_fuzz.lazykv_crashes, native_fuzz.lazykv_crashes[:5]
    assert not native_fuzz.hangs, native_fuzz.hangs[:5]


def test_native_fuzz_executorch_crashes_refused_by_python(native_fuzz):
    bad = [c for c in native_fuzz.crashes if not c["python"].startswith("refused")]
    assert not bad, bad[:5]
