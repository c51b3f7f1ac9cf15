"""runtime_shim.native_runtime: the C++ loader and sessions from Python (ctypes over the
C ABI), in the same process as ExecuTorch's stock runtime."""

from __future__ import annotations

import os

import pytest
import torch

from lazykv import errors
from lazykv.runtime_shim import load
from lazykv.runtime_shim.native_runtime import NativeProgram


def _tok(t, pos):
    return [torch.tensor([t], dtype=torch.long).reshape(1, -1), torch.tensor([pos], dtype=torch.long)]


@pytest.fixture(scope="module")
def native_lazy(llama_tiny_lazy):
    return NativeProgram(llama_tiny_lazy[1].path, policy="step:8")


def test_native_session_bit_exact_against_stock(native_lazy, llama_tiny_static, stock_runtime, tmp_path):
    """Prefill + 20 greedy steps: tokens and logits equal the static program's on the
    stock runtime (max |diff| 0.0); KV bytes 0 after load; nothing written to disk."""
    cache = os.environ["LAZYKV_CACHE_DIR"]
    before = sorted(os.listdir(cache)) if os.path.isdir(cache) else []
    prog = NativeProgram(native_lazy.source)
    assert (sorted(os.listdir(cache)) if os.path.isdir(cache) else []) == before
    assert 0 < prog.region_bytes < 1 << 20
    sm = stock_runtime.load_program(str(llama_tiny_static[1].path)).load_method("forward")
    prompt = torch.arange(3, 19).reshape(1, 16)
    with prog.session() as s:
        assert s.kv_bytes == 0
        got = s.run("forward", [prompt, torch.tensor([0])])[0]
        want = sm.execute([prompt, torch.tensor([0])])[0]
        diff = float((got - want).abs().max())
        tok = int(want.reshape(-1)[-1024:].argmax()) if want.numel() >= 1024 else int(want.argmax())
        for i in range(20):
            g = s.run("forward", _tok(tok, 16 + i))[0]
            w = sm.execute(_tok(tok, 16 + i))[0]
            diff = max(diff, float((g - w).abs().max()))
            tok = int(w.argmax())
        assert diff == 0.0
        assert s.stats["positions_filled"] == 36 and s.kv_bytes > 0


def test_native_refusals_are_lazykv_errors(native_lazy):
    with native_lazy.session() as s:
        with pytest.raises(errors.InvalidInput, match="continue at 0"):
            s.run("forward", _tok(1, 5))
        with pytest.raises(errors.InvalidInput, match="vocabulary"):
            s.run("forward", _tok(10**6, 0))
        with pytest.raises(errors.UnknownMethod):
            s.run("nope", _tok(1, 0))
        with pytest.raises(errors.InvalidInput, match="dtype"):
            s.run("forward", [torch.zeros((1, 1)), torch.tensor([0])])
        s.run("forward", _tok(1, 0))  # still usable
        assert s.offset == 1
    with pytest.raises(errors.InvalidProgram):
        NativeProgram("/nonexistent.pte")
    with pytest.raises(errors.LazyKVError, match="unknown growth policy"):
        NativeProgram(native_lazy.source, policy="fib")


def test_native_and_python_session_files_interchange(native_lazy, llama_tiny_lazy, tmp_path):
    py = load(llama_tiny_lazy[1].path)
    with native_lazy.session() as s:
        s.run("forward", [torch.arange(1, 11).reshape(1, 10), torch.tensor([0])])
        s.save(tmp_path / "n.kv")
        want = s.run("forward", _tok(7, 10))[0]
    with py.restore(tmp_path / "n.kv") as r:
        assert torch.equal(r.run("forward", _tok(7, 10))[0], want)
    with py.session() as p:
        p.run("forward", [torch.arange(1, 11).reshape(1, 10), torch.tensor([0])])
        p.save(tmp_path / "p.kv")
    with native_lazy.restore(tmp_path / "p.kv") as r:
        assert r.offset == 10
        assert torch.equal(r.run("forward", _tok(7, 10))[0], want)
    assert native_lazy.digest == py.digest


from test_multimethod import _greedy_reference, _prompt  # noqa: E402


def test_native_prefill_decode_on_one_session(example_mm_lazy, example_static, stock_runtime):
    """A two-method program (loaded with XNNPACK's weight cache on): prefill and decode
    on one session's storage, bit-identical to the single-method static program."""
    ref_method = stock_runtime.load_program(str(example_static[1].path)).load_method("forward")
    prompt, steps = _prompt(), 24
    ref = _greedy_reference(ref_method, prompt, steps)
    prog = NativeProgram(example_mm_lazy[1].path)
    with prog.session() as s:
        outs = [s.run("prefill", [prompt, torch.tensor([0])])[0]]
        pos = prompt.shape[1]
        for _ in range(steps):
            tok = outs[-1].reshape(-1, outs[-1].shape[-1])[-1].argmax().reshape(1, 1)
            outs.append(s.run("decode", [tok, torch.tensor([pos])])[0])
            pos += 1
        assert s.offset == prompt.shape[1] + steps
        with pytest.raises(errors.InvalidInput):
            s.run("decode", [torch.zeros((1, 2), dtype=torch.long), torch.tensor([pos])])  # decode takes one token
    for a, b in zip(ref, outs):
        assert torch.equal(a.reshape(b.shape), b)
