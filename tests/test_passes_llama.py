"""lazykv.passes on ExecuTorch's own Llama (examples/models/llama), small and without
XNNPACK so each export stays short. Real exports, no mocks."""

from __future__ import annotations

import pytest
import torch

from lazykv.errors import ExportRefused
from lazykv.manifest import FillRule
from lazykv.models.llama import LlamaShape, write_random_checkpoint
from lazykv.passes import no_causal_masks, to_executorch_lazy
from lazykv.format.pte import open_pte

N = 128
SHAPE = LlamaShape(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, vocab_size=128)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama_small")
    write_random_checkpoint(SHAPE, d)
    return d


def _builder(ckpt, sdpa_with_kv_cache: bool):
    from executorch.examples.models.llama.export_llama_lib import _prepare_for_llama_export
    from executorch.extension.llm.export.config.llm_config import LlmConfig

    cfg = LlmConfig()
    cfg.base.params = str(ckpt / "params.json")
    cfg.base.checkpoint = str(ckpt / "checkpoint.pth")
    cfg.model.use_kv_cache = True
    cfg.model.use_sdpa_with_kv_cache = sdpa_with_kv_cache
    cfg.export.max_context_length = N
    cfg.export.max_seq_length = 32
    return _prepare_for_llama_export(cfg)


def _export(builder, module=None):
    with torch.no_grad():
        return torch.export.export(
            module if module is not None else builder.model,
            builder.example_inputs,
            kwargs=builder.example_kwarg_inputs,
            dynamic_shapes=builder.dynamic_shapes,
            strict=False,
        ).run_decompositions({})


def _edge(builder, ep):
    from executorch.exir import to_edge_transform_and_lower

    return to_edge_transform_and_lower(ep, partitioner=[], compile_config=builder._get_edge_config())


@pytest.fixture(scope="session")
def lazy_llama(checkpoint, tmp_path_factory):
    with no_causal_masks(N) as mode:
        builder = _builder(checkpoint, sdpa_with_kv_cache=True)
    assert mode.masks_on_meta == SHAPE.n_layers
    gm = _export(builder).module()
    for p in builder.canonical_passes:  # what LLMEdgeManager.run_canonical_optimizations does
        gm = p(gm).graph_module
    et = to_executorch_lazy(_edge(builder, _export(builder, gm)))
    path = tmp_path_factory.mktemp("llama") / "llama_lazy.pte"
    path.write_bytes(et.buffer)
    return et, path


def test_llama_kv_caches_lazy(lazy_llama):
    et, path = lazy_llama
    m = open_pte(path).manifest
    head_dim = SHAPE.dim // SHAPE.n_heads
    names = sorted(b.fqn for b in m.lazy_buffers)
    assert names == sorted(
        f"layers.{i}.attention.kv_cache.{kv}_cache" for i in range(SHAPE.n_layers) for kv in "kv"
    )
    for b in m.lazy_buffers:
        assert b.max_shape == (1, N, SHAPE.n_kv_heads, head_dim) and b.growth_axis == 1
    # tokens [1, S], input_pos [1]
    assert m.fill_rules == (FillRule("forward", 1, 0, 0, 1),)
    assert m.kv_bytes_at_max_context == SHAPE.kv_bytes(N)
    plan = et.executorch_program.execution_plan[0]
    lazy_vals = [
        v.val for v in plan.values
        if getattr(v.val, "extra_tensor_info", None) is not None
        and v.val.extra_tensor_info.fully_qualified_name in names
    ]
    assert len(lazy_vals) == len(names)
    assert all(t.allocation_info is None for t in lazy_vals)


def test_llama_without_sdpa_with_kv_cache_refused(checkpoint):
    builder = _builder(checkpoint, sdpa_with_kv_cache=False)
    edge = _edge(builder, _export(builder))
    with pytest.raises(ExportRefused) as ei:
        to_executorch_lazy(edge)
    msg = str(ei.value)
    assert "layers.0.attention.kv_cache." in msg  # the buffer
    assert "node '" in msg  # the reading node
    assert "use_sdpa_with_kv_cache=True" in msg  # the fix


def test_llama_mask_read_under_no_causal_masks_refused(checkpoint):
    # The default attention reads its N x N mask: with the mask kept off the heap, the
    # read is refused by name at export instead of a device-mismatch error.
    with no_causal_masks(N):
        builder = _builder(checkpoint, sdpa_with_kv_cache=False)
        with pytest.raises(ExportRefused, match="reads its causal mask.*use_sdpa_with_kv_cache=True"):
            _export(builder)
