"""Foundation: the package layout, the exports, `inspect`, and logits of the stock runtime."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lazykv.errors import InvalidProgram
from lazykv.inspect import inspect_pte

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def _max_logit_diff(cfg, pte_path, runtime, prompt_len=16, decode_steps=6, vocab=None):
    """Greedy-decode with the eager model and the stock runtime side by side; max |diff|."""
    from lazykv.export import build_eager_model

    model = build_eager_model(cfg)
    method = runtime.load_program(str(pte_path)).load_method("forward")
    vocab = vocab or model(torch.tensor([[0]]), torch.tensor([0])).shape[-1]
    if hasattr(model, "reset_cache"):
        model.reset_cache()
    else:  # ExecuTorch Llama: rebuild for a clean cache
        model = build_eager_model(cfg)
    gen = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, vocab, (1, prompt_len), generator=gen)
    pos, worst = 0, 0.0
    with torch.no_grad():
        for _ in range(1 + decode_steps):
            ref = model(tokens, torch.tensor([pos]))
            out = method.execute([tokens, torch.tensor([pos])])[0]
            ref = ref.reshape(out.shape)
            worst = max(worst, (ref - out).abs().max().item())
            pos += tokens.shape[1]
            tokens = out.reshape(-1, out.shape[-1])[-1:].argmax(-1).reshape(1, 1)
    return worst


def test_one_package_nothing_top_level():
    import lazykv.cli
    import lazykv.examples
    import lazykv.passes
    import lazykv.runtime_shim

    site = Path(torch.__file__).resolve().parents[1]
    for name in ("passes", "cli", "runtime_shim", "examples"):
        assert not (site / name).exists(), f"{name} installed top-level in {site}"
    assert Path(lazykv.passes.__file__).parent.name == "passes"


@pytest.mark.slow
def test_cli_version_and_help_on_every_command():
    out = subprocess.run([PY, "-m", "lazykv.cli.main", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and "lazykv" in out.stdout
    from lazykv.cli.main import cli

    for name in cli.commands:
        r = subprocess.run([PY, "-m", "lazykv.cli.main", name, "--help"], capture_output=True,
                           text=True)
        assert r.returncode == 0, (name, r.stderr)
        assert "Usage:" in r.stdout


def test_llama_tiny_inspect_matches_exporter(llama_tiny_static):
    cfg, report = llama_tiny_static
    info = inspect_pte(report.path)
    # The exporter's "Required memory for activation in bytes" is non_const_buffer_sizes.
    assert info["planned_bytes"] == sum(report.non_const_buffer_sizes)
    kv = info["kv_buffers"]
    assert len(kv) == 8
    for b in kv:
        assert b["shape"] == [1, 4096, 4, 32] and b["dtype"] == "float32"
        assert b["lazy"] is False and b["methods"] == ["forward"]
    assert info["kv_bytes_at_max_context"] == 16_777_216
    assert info["constant_methods"]["get_max_context_len"] == 4096


def test_inspect_json_cli(llama_tiny_static):
    _, report = llama_tiny_static
    r = subprocess.run([PY, "-m", "lazykv.cli.main", "inspect", "--json", str(report.path)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    for key in ("planned_bytes", "methods", "kv_buffers", "kv_bytes_at_max_context"):
        assert key in info
    assert set(info["methods"]["forward"]) >= {"planned_bytes", "inputs", "outputs"}


def test_llama_logits_match_eager(llama_tiny_static, stock_runtime):
    cfg, report = llama_tiny_static
    assert _max_logit_diff(cfg, report.path, stock_runtime) < 1e-5


def test_example_logits_match_eager(example_static, stock_runtime):
    cfg, report = example_static
    assert _max_logit_diff(cfg, report.path, stock_runtime) < 1e-5


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b[:1000], "truncated"),
        (lambda b: b"", "empty"),
        (lambda b: b"\0" * 4 + b"XXXX" + b[8:], "not an ExecuTorch program"),
    ],
)
def test_inspect_refuses_bad_files(example_static, tmp_path, mutate, message):
    _, report = example_static
    bad = tmp_path / "bad.pte"
    bad.write_bytes(mutate(report.path.read_bytes()))
    with pytest.raises(InvalidProgram, match=message):
        inspect_pte(bad)
    r = subprocess.run([PY, "-m", "lazykv.cli.main", "inspect", str(bad)], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "error:" in r.stderr and "Traceback" not in r.stderr
