"""ExecuTorch's own Llama (``executorch.examples.models.llama``) with random weights.

No weights can be downloaded, so :func:`write_random_checkpoint` writes a checkpoint
file with a fixed seed and the model is then built through the same loading code that
``python -m executorch.extension.llm.export.export_llm`` uses (``Llama2Model`` reading
``params.json`` + a checkpoint). Without a checkpoint that path leaves RMSNorm weights
and RoPE tables uninitialised and the logits are NaN (DESIGN fact 1).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Optional

import torch

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LlamaShape:
    """The size of a Llama: what ``params.json`` holds."""

    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    hidden_dim: Optional[int] = None
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("n_layers", "dim", "n_heads", "n_kv_heads", "vocab_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.dim % self.n_heads:
            raise ValueError(
                f"dim ({self.dim}) must be a multiple of n_heads ({self.n_heads})"
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads "
                f"({self.n_kv_heads})"
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def params(self) -> dict:
        """The ``params.json`` dict that ``Llama2Model`` reads."""
        p = {
            "dim": self.dim,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "vocab_size": self.vocab_size,
            "norm_eps": self.norm_eps,
            "multiple_of": 32,
        }
        if self.hidden_dim is not None:
            p["hidden_dim"] = self.hidden_dim
        return p

    def kv_bytes(self, max_context: int, dtype_bytes: int = 4) -> int:
        """Bytes of all K and V caches at ``max_context`` positions."""
        return 2 * self.n_layers * max_context * self.n_kv_heads * self.head_dim * dtype_bytes


PRESETS = {
    "tiny": LlamaShape(n_layers=4, dim=256, n_heads=8, n_kv_heads=4, vocab_size=1024),
    "stories110m": LlamaShape(
        n_layers=12, dim=768, n_heads=12, n_kv_heads=12, vocab_size=32000
    ),
}


def write_random_checkpoint(shape: LlamaShape, directory: Path, seed: int = 0) -> tuple[Path, Path]:
    """Write ``params.json`` and a random ``checkpoint.pth`` for ``shape`` into ``directory``.

    Same as :func:`write_random_params_checkpoint` with ``shape.params()``.
    """
    return write_random_params_checkpoint(shape.params(), directory, seed=seed)


def write_random_params_checkpoint(
    params: dict, directory: Path, seed: int = 0
) -> tuple[Path, Path]:
    """Write ``params`` as ``params.json`` and a random ``checkpoint.pth`` into ``directory``.

    ``params`` is what ExecuTorch's ``Llama2Model`` reads (any ``ModelArgs`` field:
    hybrid layer types, qk norms, partial RoPE...). Weights are drawn from a
    ``torch.Generator`` seeded with ``seed``: the same (params, seed) always gives the
    same bytes. Every parameter the model declares is written, in sorted name order:
    N(0, 0.02), and 1 + N(0, 0.02) for norm weights so no channel is dead. Returns
    ``(params_path, checkpoint_path)``. The file names never contain ``8da4w`` or
    ``int8`` (``Llama2Model`` takes such a checkpoint for a pre-quantized one).
    """
    from executorch.examples.models.llama.llama_transformer import construct_transformer
    from executorch.examples.models.llama.model_args import ModelArgs

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    params_path = directory / "params.json"
    params_path.write_text(json.dumps(params, indent=1, sort_keys=True))

    # Build on meta only to learn the parameter names and shapes the loader expects.
    with torch.device("meta"):
        model = construct_transformer(ModelArgs(max_seq_len=8, max_context_len=8, **params))
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, p in sorted(model.named_parameters()):
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32) * 0.02
        state[name] = (noise + 1.0) if "norm" in name else noise
    ckpt_path = directory / "checkpoint.pth"
    torch.save(state, ckpt_path)
    return params_path, ckpt_path
