"""Partial marking on small hand-written models (real exports, no XNNPACK): caches the
proof accepts are lazy, the others stay planned with their cause and fix in the
manifest; ``strict=True`` refuses instead; buffers read by one attention node go
together; state written at a fixed offset is never a cache."""

from __future__ import annotations

import pytest
import torch
from torch.export import Dim, export

import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  (llama:: ops)
import executorch.kernels.quantized  # noqa: F401  (quantized_decomposed out variants)
from executorch.exir import to_edge

from lazykv.errors import ExportRefused
from lazykv.passes import LazyKVConfig, to_executorch_lazy
from lazykv.format.pte import open_pte

N, H, D, E = 64, 2, 8, 16


class TwoLayers(torch.nn.Module):
    """Layer a: update_cache + custom_sdpa without a mask (lazy). Layer b: the same
    caches read with a mask (whole read). Plus a state written at a fixed offset
    (rows [0, 1) of a [2, E] buffer, like ``conv_state[:batch_size]``)."""

    def __init__(self, masked_b: bool = True):
        super().__init__()
        self.masked_b = masked_b
        for n in ("ka", "va", "kb", "vb"):
            self.register_buffer(n, torch.zeros(1, N, H, D))
        self.register_buffer("mask", torch.zeros(N, N))
        self.register_buffer("state", torch.zeros(2, E))
        self.q = torch.nn.Linear(E, E)

    def forward(self, x, input_pos):
        pos = input_pos[0].item()
        s = x.shape[1]
        q = self.q(x).view(1, s, H, D)
        torch.ops.llama.update_cache(q, self.ka, pos)
        torch.ops.llama.update_cache(q, self.va, pos)
        torch.ops.llama.update_cache(q, self.kb, pos)
        torch.ops.llama.update_cache(q, self.vb, pos)
        a = torch.ops.llama.custom_sdpa(q, self.ka, self.va, pos, None, 0, True)
        if self.masked_b:
            m = self.mask.narrow(0, pos, s)
            b = torch.ops.llama.custom_sdpa(q, self.kb, self.vb, 0, m, 0, False)
        else:
            b = torch.ops.llama.custom_sdpa(q, self.kb, self.vb, pos, None, 0, True)
        out = (a + b).view(1, s, E)
        self.state[:1].copy_(torch.tanh(self.state[:1] + out[:, -1]))
        return out


def _edge(model):
    args = (torch.randn(1, 4, E), torch.tensor([0]))
    with torch.no_grad():
        ep = export(model, args, dynamic_shapes=({1: Dim("S", min=1, max=32)}, None), strict=False)
    return to_edge(ep)


@pytest.fixture(scope="session")
def partial_manifest():
    return open_pte(to_executorch_lazy(_edge(TwoLayers())).buffer).manifest


def test_partial_marks_what_the_proof_accepts(partial_manifest):
    m = partial_manifest
    assert sorted(b.fqn for b in m.lazy_buffers) == ["ka", "va"]
    planned = {u.fqn: u for u in m.unmarked_buffers}
    assert set(planned) == {"kb", "vb", "state"}
    for fqn in ("kb", "vb"):
        u = planned[fqn]
        assert (u.kind, u.cause, u.methods) == ("kv_cache", "mask", ("forward",))
        assert "custom_sdpa" in u.reason and "mask" in u.reason
        assert "without an attention mask" in u.fix


def test_state_at_a_fixed_offset_is_never_a_cache(partial_manifest):
    u = {u.fqn: u for u in partial_manifest.unmarked_buffers}["state"]
    # Written by a slice_scatter at the constant offset 0: state, by structure.
    assert (u.kind, u.cause) == ("state", "state")


def test_strict_refuses_what_partial_leaves_planned():
    with pytest.raises(ExportRefused) as ei:
        to_executorch_lazy(_edge(TwoLayers()), LazyKVConfig(strict=True))
    msg = str(ei.value)
    assert "--strict" in msg and "'kb'" in msg and "mask" in msg and "Fix:" in msg


def test_strict_accepts_a_fully_lazy_program():
    m = open_pte(to_executorch_lazy(_edge(TwoLayers(masked_b=False)),
                                    LazyKVConfig(strict=True)).buffer).manifest
    assert sorted(b.fqn for b in m.lazy_buffers) == ["ka", "kb", "va", "vb"]
    assert [(u.fqn, u.kind) for u in m.unmarked_buffers] == [("state", "state")]


class SharedReader(torch.nn.Module):
    """One custom_sdpa reads k and v; v is also summed as a whole (a full read), so k,
    read by the same attention node, stays planned with it."""

    def __init__(self):
        super().__init__()
        self.register_buffer("k", torch.zeros(1, N, H, D))
        self.register_buffer("v", torch.zeros(1, N, H, D))
        self.q = torch.nn.Linear(E, E)

    def forward(self, x, input_pos):
        pos = input_pos[0].item()
        s = x.shape[1]
        q = self.q(x).view(1, s, H, D)
        torch.ops.llama.update_cache(q, self.k, pos)
        torch.ops.llama.update_cache(q, self.v, pos)
        o = torch.ops.llama.custom_sdpa(q, self.k, self.v, pos, None, 0, True)
        return o.view(1, s, E) + self.v.sum()


def test_buffers_read_by_one_node_stay_planned_together():
    with pytest.raises(ExportRefused) as ei:  # nothing left lazy: refused, reasons listed
        to_executorch_lazy(_edge(SharedReader()))
    msg = str(ei.value)
    assert "'v'" in msg and "reads the whole cache" in msg
    assert "k (together)" in msg


class CastAndDequantize(torch.nn.Module):
    """Three caches updated at the input position: ``good`` read by custom SDPA (lazy),
    ``h16`` (fp16) converted to float32 as a whole before custom SDPA (what
    ExecuTorch's SDPACustom does for fp16), ``q8`` (int8) dequantized as a whole (a
    quantized KV cache returning float values)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("good", torch.zeros(1, N, H, D))
        self.register_buffer("h16", torch.zeros(1, N, H, D, dtype=torch.float16))
        self.register_buffer("q8", torch.zeros(1, N, H, D, dtype=torch.int8))
        self.q = torch.nn.Linear(E, E)

    def forward(self, x, input_pos):
        from torch.ao.quantization.fx._decomposed import quantized_decomposed_lib  # noqa: F401

        pos = input_pos[0].item()
        s = x.shape[1]
        q = self.q(x).view(1, s, H, D)
        torch.ops.llama.update_cache(q, self.good, pos)
        torch.ops.llama.update_cache(q.half(), self.h16, pos)
        torch.ops.llama.update_cache(q.to(torch.int8), self.q8, pos)
        deq = torch.ops.quantized_decomposed.dequantize_per_tensor(
            self.q8, 0.1, 0, -128, 127, torch.int8)
        a = torch.ops.llama.custom_sdpa(q, self.good, self.h16.to(torch.float32), pos, None, 0, True)
        return a.view(1, s, E) + deq.sum()


def test_each_refusal_names_the_fix_of_its_cause():
    m = open_pte(to_executorch_lazy(_edge(CastAndDequantize())).buffer).manifest
    assert [b.fqn for b in m.lazy_buffers] == ["good"]
    planned = {u.fqn: u for u in m.unmarked_buffers}
    assert planned["h16"].cause == "cast"
    assert "float16 to torch.float32" in planned["h16"].reason
    assert "dtype_override=fp32 or bf16" in planned["h16"].fix
    assert planned["q8"].cause == "dequantize"
    assert "custom_quantized_sdpa" in planned["q8"].fix
    for u in planned.values():
        assert "use_sdpa_with_kv_cache=True, i.e." not in u.fix  # not the generic fix
