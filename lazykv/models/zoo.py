"""Tiny random-weight versions of the models ``export_llm`` ships configurations for.

No weights can be downloaded, so each of export_llm's model classes gets a small
``params.json`` with the architecture flags of its real configuration kept (Hugging
Face RoPE, q/k norms, qkv bias, explicit head dim, partial rotary, LongRoPE factors,
hybrid layer types, gated attention, linear-attention dims) and the sizes shrunk, plus
a random checkpoint with a fixed seed written through the real loading code
(:func:`lazykv.models.llama.write_random_params_checkpoint`). The configuration file is
the one the ExecuTorch wheel ships for the model (``SHIPPED_CONFIGS``), with overrides
in export_llm's own syntax (Hydra's ``++key=value``: set, whether the file has the key
or not).

Used by the tests, the support table (``python -m lazykv.models.support_table``) and
anyone who wants to try ``lazykv export --config`` without a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Dict, List, Tuple

#: Architecture flags kept from each model's real params; sizes shrunk.
TINY_PARAMS: Dict[str, dict] = {
    "llama3_2": {
        "dim": 128, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 320,
        "ffn_dim_multiplier": 1.5, "multiple_of": 32, "norm_eps": 1e-5,
        "rope_theta": 500000.0, "use_scaled_rope": True,
    },
    "qwen3_0_6b": {
        "dim": 128, "hidden_dim": 320, "n_heads": 4, "head_dim": 64, "n_kv_heads": 2,
        "n_layers": 2, "norm_eps": 1e-6, "rope_theta": 1000000.0, "use_scaled_rope": False,
        "vocab_size": 320, "use_hf_rope": True, "attention_qkv_bias": False,
        "use_qk_norm": True, "qk_norm_before_rope": True,
    },
    "qwen2_5_0_5b": {
        "dim": 128, "hidden_dim": 320, "n_heads": 4, "n_kv_heads": 2, "n_layers": 2,
        "norm_eps": 1e-6, "rope_theta": 1000000.0, "use_scaled_rope": False,
        "vocab_size": 320, "use_hf_rope": True, "attention_qkv_bias": True,
    },
    "phi_4_mini": {
        "dim": 128, "hidden_dim": 320, "n_heads": 4, "n_kv_heads": 2, "n_layers": 2,
        "norm_eps": 1e-5, "rope_theta": 10000.0, "use_scaled_rope": False,
        "vocab_size": 320, "use_hf_rope": True, "partial_rotary_factor": 0.75,
        "attention_qkv_bias": False, "original_max_position_embeddings": 4096,
        "max_position_embeddings": 131072,
        # head_dim 32 x 0.75 = 24 rotary dims: 12 factors each.
        "rope_scaling_short_factor": [1.0] * 12,
        "rope_scaling_long_factor": [1.0 + 0.5 * i for i in range(12)],
    },
    "smollm2": {
        "dim": 96, "hidden_dim": 320, "n_heads": 3, "n_kv_heads": 1, "n_layers": 2,
        "norm_eps": 1e-5, "rope_theta": 100000.0, "use_scaled_rope": False,
        "vocab_size": 320, "use_hf_rope": False, "attention_qkv_bias": False,
    },
    "lfm2_350m": {
        "dim": 128, "hidden_dim": 320, "n_heads": 4, "n_kv_heads": 2, "n_layers": 4,
        "norm_eps": 1e-5, "rope_theta": 1000000.0, "use_scaled_rope": False,
        "vocab_size": 320, "use_hf_rope": True, "use_qk_norm": True,
        "qk_norm_before_rope": True, "ffn_dim_multiplier": 1,
        "layer_types": ["conv", "full_attention", "conv", "full_attention"],
    },
    "qwen3_5_0_8b": {
        "dim": 128, "hidden_dim": 320, "n_heads": 4, "head_dim": 64, "n_kv_heads": 2,
        "n_layers": 4, "norm_eps": 1e-6, "rope_theta": 10000000.0, "use_scaled_rope": False,
        "vocab_size": 320, "use_hf_rope": True, "partial_rotary_factor": 0.25,
        "attention_qkv_bias": False, "use_qk_norm": True, "qk_norm_before_rope": True,
        "attention_type": "mha", "use_q_gate": True, "rms_norm_add_unit_offset": True,
        "linear_conv_kernel_dim": 4, "linear_key_head_dim": 32, "linear_value_head_dim": 32,
        "linear_num_key_heads": 4, "linear_num_value_heads": 4,
        "layer_types": ["linear_attention", "linear_attention", "linear_attention",
                        "full_attention"],
    },
}

#: The configuration the ExecuTorch wheel ships for each model (relative to the
#: ``executorch`` package). smollm2 ships none: it uses the Llama one.
SHIPPED_CONFIGS: Dict[str, str] = {
    "llama3_2": "examples/models/llama/config/llama_xnnpack.yaml",
    "qwen3_0_6b": "examples/models/qwen3/config/qwen3_xnnpack_q8da4w.yaml",
    "qwen2_5_0_5b": "examples/models/qwen2_5/config/qwen2_5_xnnpack_q8da4w.yaml",
    "phi_4_mini": "examples/models/phi_4_mini/config/phi_4_mini_xnnpack.yaml",
    "smollm2": "examples/models/llama/config/llama_xnnpack.yaml",
    "lfm2_350m": "examples/models/lfm2/config/lfm2_xnnpack_fp32.yaml",
    "qwen3_5_0_8b": "examples/models/qwen3_5/config/qwen3_5_xnnpack_fp32.yaml",
}

#: Export options as export_llm overrides, applied after the shipped file's settings.
#: ``fp32``: weights and caches in float32, no quantization.
OPTIONS: Dict[str, Tuple[str, ...]] = {
    "shipped": (),  # the file's own quantization and dtype
    "fp32": ("++quantization.qmode=null", "++quantization.embedding_quantize=null",
             "++model.dtype_override=fp32"),
    "8da4w": ("++quantization.qmode=8da4w", "++quantization.group_size=32",
              "++quantization.embedding_quantize='4,32'", "++model.dtype_override=fp32"),
    "bf16": ("++quantization.qmode=null", "++quantization.embedding_quantize=null",
             "++model.dtype_override=bf16"),
    "fp16": ("++quantization.qmode=null", "++quantization.embedding_quantize=null",
             "++model.dtype_override=fp16"),
    "quantize_kv_cache": ("++quantization.qmode=null", "++quantization.embedding_quantize=null",
                          "++model.dtype_override=fp32", "++model.quantize_kv_cache=True"),
    "attention_sink": ("++quantization.qmode=null", "++quantization.embedding_quantize=null",
                       "++model.dtype_override=fp32", "++model.use_attention_sink='4,32'"),
    "local_global_attention": ("++quantization.qmode=null",
                               "++quantization.embedding_quantize=null",
                               "++model.dtype_override=fp32",
                               "++model.local_global_attention=[0,32]"),
}

#: Max context and max prompt chunk of the tiny exports. The context differs from every
#: model dimension above (no_causal_masks() recognises the KV caches by that size), and
#: the chunk fits the attention-sink ring (export_llm needs max_seq_length <= ring size).
MAX_CONTEXT = 192
MAX_SEQ_LEN = 32


def executorch_dir() -> Path:
    """The installed ``executorch`` package folder."""
    import executorch

    return Path(executorch.__path__[0])


def shipped_config(model_class: str) -> Path:
    """The YAML the ExecuTorch wheel ships for ``model_class`` (``KeyError`` if unknown)."""
    return executorch_dir() / SHIPPED_CONFIGS[model_class]


def random_checkpoint(params: dict, seed: int, root: os.PathLike) -> Tuple[Path, Path]:
    """``(params.json, checkpoint.pth)`` for ``params`` with random weights (``seed``),
    written once under ``root`` (keyed by params and seed) and reused; safe when several
    processes race to write it."""
    from lazykv.models.llama import write_random_params_checkpoint

    key = hashlib.sha256(json.dumps([params, seed, 1], sort_keys=True).encode()).hexdigest()[:16]
    d = Path(root) / "checkpoints" / key
    params_path, ckpt = d / "params.json", d / "checkpoint.pth"
    if not (params_path.exists() and ckpt.exists()):
        tmp = d.with_name(d.name + f".tmp{os.getpid()}")
        write_random_params_checkpoint(params, tmp, seed=seed)
        try:
            tmp.replace(d)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    return params_path, ckpt


def tiny_overrides(
    model_class: str,
    option: str,
    root: os.PathLike,
    *,
    seed: int = 0,
    max_context: int = MAX_CONTEXT,
    max_seq_len: int = MAX_SEQ_LEN,
) -> List[str]:
    """export_llm overrides that turn ``shipped_config(model_class)`` into a tiny random
    model with export option ``option`` (a key of :data:`OPTIONS`)."""
    params, ckpt = random_checkpoint(TINY_PARAMS[model_class], seed, root)
    return [
        f"++base.model_class={model_class}",
        f"++base.params={params}",
        f"++base.checkpoint={ckpt}",
        f"++export.max_context_length={max_context}",
        f"++export.max_seq_length={max_seq_len}",
        *OPTIONS[option],
    ]
