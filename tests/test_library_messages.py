"""What the Python API says to a newcomer (issue 17, items 8, 9 and 12): trim and position
errors that fit the case, budgets that cannot hold a position refused at load, messages
that name Python settings (not only CLI flags), one rule for max context vs max prompt
chunk, and the example scripts' refusals without tracebacks or leftovers."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from lazykv.errors import InvalidInput, LazyKVError

ROOT = Path(__file__).resolve().parents[1]
LAZYKV = str(Path(sys.executable).with_name("lazykv"))


@pytest.fixture
def prog(example_lazy, tmp_path):
    from lazykv.runtime_shim import load

    return load(example_lazy[1].path, cache_dir=tmp_path)


def _tokens(n):
    return torch.arange(1, n + 1).reshape(1, n)


def test_position_errors_fit_the_case(prog):
    with prog.session() as s:
        with pytest.raises(InvalidInput, match=r"filled nothing yet; .*start this call at 0") as e:
            s.run("forward", [_tokens(2), torch.tensor([1])])
        assert "trim(" not in str(e.value)
        with pytest.raises(InvalidInput, match="positions are >= 0") as e:
            s.run("forward", [_tokens(2), torch.tensor([-1])])
        assert "trim(" not in str(e.value)
        s.run("forward", [_tokens(5), torch.tensor([0])])
        with pytest.raises(InvalidInput, match=r"redo from position 3, call trim\(2\) first"):
            s.run("forward", [_tokens(1), torch.tensor([3])])
        with pytest.raises(InvalidInput, match="start this call at 5"):
            s.run("forward", [_tokens(1), torch.tensor([7])])


def test_trim_refuses_negatives_and_says_when_it_clamps(prog):
    with prog.session() as s:
        s.run("forward", [_tokens(5), torch.tensor([0])])
        with pytest.raises(InvalidInput, match="int >= 0"):
            s.trim(-1)
        with pytest.raises(InvalidInput, match="int >= 0"):
            s.trim(1.5)
        assert s.offset == 5
        with pytest.warns(UserWarning, match=r"trim\(5000\): only 5 positions are filled"):
            freed = s.trim(5000)
        assert freed.positions == 5 and s.offset == 0
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert s.trim(0).positions == 0


def test_max_bytes_below_one_position_is_refused_at_load(example_lazy, tmp_path):
    from lazykv.runtime_shim import load

    bpp = load(example_lazy[1].path, cache_dir=tmp_path).bytes_per_position
    with pytest.raises(InvalidInput, match=f"cannot hold one position .*{bpp:,} bytes each"):
        load(example_lazy[1].path, max_bytes=bpp - 1, cache_dir=tmp_path)
    assert load(example_lazy[1].path, max_bytes=bpp, cache_dir=tmp_path).max_bytes == bpp


def test_library_messages_name_python_settings():
    """A Python user is not told to pass a CLI flag only: runtime failures point at
    ExecuTorch's log (not `--debug`), export refusals name the Python API too."""
    from executorch.exir import to_edge
    from torch.export import export

    from lazykv.errors import ExportRefused, runtime_error
    from lazykv.passes import to_executorch_lazy
    from test_passes_toy import E, StateOnly, Toy, _edge

    for text in ("Failed to load method forward: error 0x23", "method->execute() failed: error 0x12"):
        assert "--debug" not in str(runtime_error(RuntimeError(text), "m.pte"))
    with torch.no_grad():
        state_only = to_edge(export(StateOnly(), (torch.randn(1, 3, E),), strict=False))
    for edge in (_edge(Toy(mask=True, state=False)), state_only):
        with pytest.raises(ExportRefused) as e:
            to_executorch_lazy(edge)
        assert "to_executorch" in str(e.value), str(e.value)
        assert not str(e.value).startswith("--")


# -- max context vs max prompt chunk (item 8) ----------------------------------------------


def test_one_rule_for_context_and_chunk():
    from lazykv.context_limits import ContextLimitError, resolve_max_seq_len
    from lazykv.examples.decoder import DecoderConfig
    from lazykv.export import ExportConfig

    assert resolve_max_seq_len(64, None, "llama") == 64
    assert resolve_max_seq_len(4096, None, "llama") == 128
    assert resolve_max_seq_len(32, None, "example") == 32
    for make in (lambda: resolve_max_seq_len(64, 128, "llama"),
                 lambda: ExportConfig(model="llama", max_context=64, max_seq_len=128),
                 lambda: DecoderConfig(max_context=32, max_seq_len=64)):
        with pytest.raises(ContextLimitError, match=r"--max-seq-len.*--max-context") as e:
            make()
        assert isinstance(e.value, LazyKVError) and e.value.exit_code == 2
    assert DecoderConfig(max_context=32).max_seq_len == 32  # was a ValueError
    assert ExportConfig(model="example", max_context=64).max_seq_len == 64


def test_example_model_honours_max_seq_len():
    from lazykv.export import ExportConfig, build_eager_model

    model = build_eager_model(ExportConfig(model="example", max_context=128, max_seq_len=16))
    assert model.cfg.max_seq_len == 16  # was silently 64


def test_export_refuses_a_chunk_longer_than_the_context_at_once(tmp_path):
    for model in ("llama", "example"):
        r = subprocess.run([LAZYKV, "export", "--model", model, "--max-context", "64",
                            "--max-seq-len", "128", "-o", str(tmp_path / "m.pte")],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, r.stderr
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and "--max-seq-len" in lines[0] and "--max-context" in lines[0]
    assert os.listdir(tmp_path) == []


@pytest.mark.slow  # a subprocess or an export of its own
def test_export_example_script_applies_the_same_rule(tmp_path):
    script = ROOT / "examples" / "export_example.py"
    r = subprocess.run([sys.executable, str(script), "--max-context", "32", "--max-seq-len", "64",
                        "-o", str(tmp_path / "e.pte")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "--max-seq-len" in r.stderr and "--max-context" in r.stderr
    assert "must fit in the KV cache" in r.stderr  # the shared rule's message, not argparse's


# -- export_with_passes.py (item 9) --------------------------------------------------------


@pytest.mark.slow  # a subprocess or an export of its own
def test_export_with_passes_refuses_default_attention_cleanly(tmp_path):
    """--no-sdpa-with-kv-cache: lazykv's refusal (the cache is not a growing prefix), exit code 1,
    no traceback, and no random checkpoint left in the temporary folder."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    script = ROOT / "examples" / "export_with_passes.py"
    r = subprocess.run(
        [sys.executable, str(script), "--max-context", "128", "--no-sdpa-with-kv-cache",
         "--no-xnnpack", "--out", str(tmp_path / "x.pte")],  # the refusal is the same, sooner
        capture_output=True, text=True, timeout=900,
        env=dict(os.environ, TMPDIR=str(tmp), LAZYKV_CACHE_DIR=str(tmp_path / "cache")),
    )
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "device meta" not in r.stderr
    error = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(error) == 1 and "no KV cache can be lazy" in error[0], r.stderr[-3000:]
    assert "k_cache" in error[0] and "Fix:" in error[0]
    assert [p for p in os.listdir(tmp) if p.startswith("lazykv_tiny_")] == []
    assert not (tmp_path / "x.pte").exists()
