"""lazykv's own small Llama-style decoder: the bundled example model.

A pre-norm decoder (RMSNorm, rotary embeddings, grouped-query attention, SwiGLU MLP)
whose KV cache is *sequence-major* (``[1, max_context, n_kv_heads, head_dim]``) and is
written with ExecuTorch's ``llama::update_cache`` and read with ``llama::custom_sdpa``
without a mask (causal by position), exactly the ops an ExecuTorch LLM export uses.
That is the shape of cache lazykv can make lazy: every read is bounded by
``start_pos + seq_len``.

Weights are random from a fixed seed (nothing can be downloaded here); the KV buffers are
created with ``torch.empty`` so an unused cache costs no resident pages at export time.

Forward signature: ``forward(tokens [1, S] int64, input_pos [1] int64) -> logits [1, S, vocab]``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
from torch import nn

from lazykv.context_limits import resolve_max_seq_len

# Registers torch.ops.llama.update_cache / custom_sdpa (ExecuTorch's custom LLM ops).
import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Size of the example decoder. ``max_context`` is the KV cache's upper bound."""

    vocab_size: int = 512
    dim: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    hidden_dim: int = 256
    max_context: int = 1024
    #: Longest prompt chunk per call; None: 64 capped at max_context (lazykv.context_limits).
    max_seq_len: Optional[int] = None
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"dim ({self.dim}) must divide by n_heads ({self.n_heads}) and n_heads by "
                f"n_kv_heads ({self.n_kv_heads})"
            )
        object.__setattr__(
            self, "max_seq_len", resolve_max_seq_len(self.max_context, self.max_seq_len, "example")
        )

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _rope_tables(cfg: DecoderConfig) -> tuple[torch.Tensor, torch.Tensor]:
    half = cfg.head_dim // 2
    freqs = 1.0 / (cfg.rope_theta ** (torch.arange(half, dtype=torch.float32) / half))
    angles = torch.outer(torch.arange(cfg.max_context, dtype=torch.float32), freqs)
    return torch.cos(angles), torch.sin(angles)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [1, S, H, D]; cos/sin: [S, D/2]. Rotate the two halves (GPT-NeoX layout).
    x1, x2 = x.chunk(2, dim=-1)
    cos = cos[None, :, None, :]
    sin = sin[None, :, None, :]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * hd, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=False)
        self.wo = nn.Linear(cfg.n_heads * hd, cfg.dim, bias=False)
        cache_shape = (1, cfg.max_context, cfg.n_kv_heads, hd)
        # torch.empty: the export never reads the initial values and untouched pages
        # stay non-resident. The runtime zero-initialises planned buffers anyway.
        self.register_buffer("k_cache", torch.empty(cache_shape), persistent=False)
        self.register_buffer("v_cache", torch.empty(cache_shape), persistent=False)

    def forward(self, x, start_pos: int, cos, sin):
        bsz, seqlen, _ = x.shape
        hd = self.cfg.head_dim
        q = self.wq(x).view(bsz, seqlen, self.cfg.n_heads, hd)
        k = self.wk(x).view(bsz, seqlen, self.cfg.n_kv_heads, hd)
        v = self.wv(x).view(bsz, seqlen, self.cfg.n_kv_heads, hd)
        q = _apply_rope(q, cos, sin)
        k = _apply_rope(k, cos, sin)
        torch.ops.llama.update_cache(k, self.k_cache, start_pos)
        torch.ops.llama.update_cache(v, self.v_cache, start_pos)
        # No mask: custom_sdpa reads only rows < start_pos + seqlen (causal by position).
        y = torch.ops.llama.custom_sdpa(q, self.k_cache, self.v_cache, start_pos, None, 0.0, True)
        return self.wo(y.reshape(bsz, seqlen, self.cfg.n_heads * hd))


class FeedForward(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)

    def forward(self, x):
        return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, start_pos, cos, sin):
        h = x + self.attention(self.attention_norm(x), start_pos, cos, sin)
        return h + self.feed_forward(self.ffn_norm(h))


class ExampleDecoder(nn.Module):
    """The example decoder. Call :meth:`example_inputs` for export inputs."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = _rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        seqlen = tokens.shape[1]
        start_pos = input_pos[0].item()
        torch._check_is_size(start_pos)
        torch._check(start_pos + seqlen <= self.cfg.max_context)
        cos = self.rope_cos.narrow(0, start_pos, seqlen)
        sin = self.rope_sin.narrow(0, start_pos, seqlen)
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, start_pos, cos, sin)
        return self.output(self.norm(h))

    def example_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.tensor([[1, 2, 3]], dtype=torch.long), torch.tensor([0], dtype=torch.long))

    def dynamic_shapes(self):
        seq = torch.export.Dim("seq_len", min=1, max=self.cfg.max_seq_len)
        return ({1: seq}, None)

    def reset_cache(self) -> None:
        """Zero the KV caches (eager use: the runtime starts from zeroed buffers)."""
        for layer in self.layers:
            layer.attention.k_cache.zero_()
            layer.attention.v_cache.zero_()


def build_example_decoder(cfg: DecoderConfig = DecoderConfig(), seed: int = 0) -> ExampleDecoder:
    """The example decoder with random weights drawn from ``seed`` (same seed, same weights).

    Linear and embedding weights are N(0, 1/sqrt(fan_in)); norm weights 1 + N(0, 0.02).
    """
    gen = torch.Generator().manual_seed(seed)
    model = ExampleDecoder(cfg)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.copy_(1.0 + 0.02 * noise)
            else:
                p.copy_(noise / math.sqrt(p.shape[-1]))
    model.reset_cache()
    return model.eval()
