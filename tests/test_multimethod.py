"""Multi-method programs: prefill + decode share KV state and weights (by FQN)."""

from __future__ import annotations

import pytest
import torch

from lazykv.errors import DivergentConstant
from lazykv.inspect import inspect_pte

# example_mm_lazy and example_mm_static are session fixtures in conftest.py.


def _greedy_reference(method, prompt, steps):
    """Single-method static program, step by step on the stock runtime."""
    outs = [method.execute([prompt, torch.tensor([0])])[0]]
    pos = prompt.shape[1]
    tok = outs[-1].reshape(-1, outs[-1].shape[-1])[-1].argmax().reshape(1, 1)
    for _ in range(steps):
        outs.append(method.execute([tok, torch.tensor([pos])])[0])
        pos += 1
        tok = outs[-1].reshape(-1, outs[-1].shape[-1])[-1].argmax().reshape(1, 1)
    return outs


def _prompt(n=24):
    return torch.randint(0, 512, (1, n), generator=torch.Generator().manual_seed(7))


def test_lazy_prefill_decode_bit_identical_to_single_method(example_mm_lazy, example_static,
                                                            stock_runtime, tmp_path):
    from lazykv import runtime_shim

    ref_method = stock_runtime.load_program(str(example_static[1].path)).load_method("forward")
    prompt, steps = _prompt(), 40
    ref = _greedy_reference(ref_method, prompt, steps)
    prog = runtime_shim.load(example_mm_lazy[1].path, cache_dir=tmp_path)
    assert set(prog.method_names) >= {"prefill", "decode"}
    with prog.session() as s:
        outs = [s.run("prefill", [prompt, torch.tensor([0])])[0]]
        pos = prompt.shape[1]
        for i in range(steps):
            tok = outs[-1].reshape(-1, outs[-1].shape[-1])[-1].argmax().reshape(1, 1)
            outs.append(s.run("decode", [tok, torch.tensor([pos])])[0])
            pos += 1
        # One KV storage serves both methods: it holds the filled prefix, not two copies.
        assert s.stats.positions_filled == prompt.shape[1] + steps
        assert s.kv_bytes <= 2 * pos * prog.bytes_per_position
    for a, b in zip(ref, outs):
        assert torch.equal(a.reshape(b.shape), b)


def test_static_prefill_decode_share_kv(example_mm_static, example_static, stock_runtime):
    ref_method = stock_runtime.load_program(str(example_static[1].path)).load_method("forward")
    prompt, steps = _prompt(), 10
    ref = _greedy_reference(ref_method, prompt, steps)
    prog = stock_runtime.load_program(str(example_mm_static[1].path))
    prefill, decode = prog.load_method("prefill"), prog.load_method("decode")
    outs = [prefill.execute([prompt, torch.tensor([0])])[0]]
    pos = prompt.shape[1]
    for _ in range(steps):
        tok = outs[-1].reshape(-1, outs[-1].shape[-1])[-1].argmax().reshape(1, 1)
        outs.append(decode.execute([tok, torch.tensor([pos])])[0])
        pos += 1
    for a, b in zip(ref, outs):
        assert torch.equal(a.reshape(b.shape), b)
    info = inspect_pte(example_mm_static[1].path)
    kv = info["kv_buffers"]
    assert len(kv) == 4 and all(sorted(b["methods"]) == ["decode", "prefill"] for b in kv)


def test_inspect_names_shared_constants(example_mm_lazy):
    info = inspect_pte(example_mm_lazy[1].path)
    shared = {c["fqn"]: c for c in info["shared_constants"]}
    assert "output.weight" in shared and "layers.0.attention.wq.weight" in shared
    assert all(sorted(c["methods"]) == ["decode", "prefill"] for c in shared.values())
    assert all(c["stored_once"] for c in shared.values())
    # XNNPACK stores delegated weights under the sha256 of their bytes: we name them.
    assert shared["layers.0.attention.wq.weight"]["stored_in"] == "named_data"
    assert info["shared_constant_bytes_saved"] == sum(c["nbytes"] for c in shared.values())
    # The file holds each weight once: named blobs are unique keys.
    assert info["constants"]["named_data_count"] == len(
        {c["storage_key"] for c in shared.values() if c["stored_in"] == "named_data"})


def test_divergent_constants_refused_by_name():
    from lazykv.examples.decoder import DecoderConfig, build_example_decoder
    from lazykv.passes.share_constants_by_fqn import ShareConstantsByFQN

    cfg = DecoderConfig(max_context=64, max_seq_len=8, n_layers=1)
    one = (torch.tensor([[1]]), torch.tensor([0]))
    a = torch.export.export(build_example_decoder(cfg, seed=0), one, strict=False)
    b = torch.export.export(build_example_decoder(cfg, seed=1), one, strict=False)
    with pytest.raises(DivergentConstant, match=r"'layers\.0\.attention\.wq\.weight'.*prefill.*decode"
                       r".*--allow-divergent-constants"):
        ShareConstantsByFQN()({"prefill": a, "decode": b})
    shared = ShareConstantsByFQN(allow_divergent=True)({"prefill": a, "decode": b})
    assert shared and not any(c.stored_once for c in shared if c.fqn.endswith("wq.weight"))
    # KV caches mutated in place by llama::update_cache are state, not constants.
    assert not any("cache" in c.fqn for c in shared)
