"""Export ExecuTorch's own Llama with a lazy KV cache, using lazykv's Python passes.

A plain script to copy. It builds the model the way
``python -m executorch.extension.llm.export.export_llm`` does (``LlmConfig`` +
``_prepare_for_llama_export``) and changes two things:

1. the model is built inside ``lazykv.passes.no_causal_masks(max_context)``, so the
   per-layer N x N causal masks (never read by custom SDPA without a mask) are never
   materialised and the KV caches are untouched pages;
2. the edge program goes through ``lazykv.passes.to_executorch_lazy`` with the same
   ``ExecutorchBackendConfig`` that ``LLMEdgeManager.to_executorch()`` hard-codes.

By default the model is exported non-strict (``torch.export.export(..., strict=False)``),
which never touches the KV pages. ``--llm-edge-manager`` instead runs ExecuTorch's own
``LLMEdgeManager`` steps (``builder.export()``, ``to_edge_transform_and_lower``: strict
export, which copies the KV buffers once) and hands ``builder.edge_manager`` to lazykv.

Run (random tiny checkpoint, XNNPACK, max context 4096)::

    python examples/export_with_passes.py --max-context 4096 --out /tmp/tiny_lazy.pte

``--static`` exports the same model the stock way (LLMEdgeManager, no lazykv) for
comparison. The script prints one JSON line: planned bytes (``non_const_buffer_sizes``),
peak RSS and wall time.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max-context", type=int, default=4096)
    ap.add_argument("--max-seq-len", type=int, default=None,
                    help="longest prompt chunk per call (default: 128, at most --max-context)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--checkpoint-dir", type=Path, default=None,
                    help="params.json + checkpoint.pth (default: a random 'tiny' one)")
    ap.add_argument("--static", action="store_true", help="stock export, no lazy KV")
    ap.add_argument("--llm-edge-manager", action="store_true",
                    help="lower with ExecuTorch's LLMEdgeManager steps (strict export)")
    ap.add_argument("--no-xnnpack", action="store_true")
    ap.add_argument("--no-sdpa-with-kv-cache", action="store_true",
                    help="ExecuTorch's default attention (the cache written by index_put at "
                         "computed positions and read whole): lazykv refuses to make it lazy "
                         "(exit code 1, the reason on stderr)")
    args = ap.parse_args(argv)
    from lazykv.context_limits import resolve_max_seq_len
    from lazykv.errors import LazyKVError

    try:
        args.max_seq_len = resolve_max_seq_len(args.max_context, args.max_seq_len, "llama")
    except LazyKVError as e:
        ap.error(str(e))
    # The random checkpoint (when none is given) lives in a temporary folder that is
    # removed however the export ends.
    with tempfile.TemporaryDirectory(prefix="lazykv_tiny_") as scratch:
        try:
            return _export(args, Path(scratch))
        except LazyKVError as e:  # a refusal: one line that names the reason and the fix
            print(f"error: {e}", file=sys.stderr)
            return e.exit_code


def _export(args, scratch: Path) -> int:
    t0 = time.time()

    from executorch.examples.models.llama.export_llama_lib import (
        _get_xnnpack_partitioners,
        _prepare_for_llama_export,
    )
    from executorch.exir import ExecutorchBackendConfig
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass
    from executorch.extension.llm.export.config.llm_config import LlmConfig
    from executorch.backends.xnnpack._passes.convert_to_linear import ConvertToLinearPass

    from lazykv.passes import no_causal_masks, to_executorch_lazy

    ckpt = args.checkpoint_dir
    if ckpt is None:
        from lazykv.models.llama import PRESETS, write_random_checkpoint

        ckpt = scratch
        write_random_checkpoint(PRESETS["tiny"], ckpt)

    cfg = LlmConfig()
    cfg.base.params = str(ckpt / "params.json")
    cfg.base.checkpoint = str(ckpt / "checkpoint.pth")
    cfg.model.use_kv_cache = True
    cfg.model.use_sdpa_with_kv_cache = not args.no_sdpa_with_kv_cache
    cfg.backend.xnnpack.enabled = not args.no_xnnpack
    cfg.export.max_context_length = args.max_context
    cfg.export.max_seq_length = args.max_seq_len
    cfg.export.output_dir = str(args.out.parent)

    if args.static or args.no_sdpa_with_kv_cache:
        # ExecuTorch's default attention reads its N x N mask: it must exist (lazykv's
        # passes then refuse the cache, which that attention reads in full).
        builder = _prepare_for_llama_export(cfg)
    else:
        # Model construction + source transforms: no N x N masks, KV caches as empty.
        with no_causal_masks(args.max_context):
            builder = _prepare_for_llama_export(cfg)
    partitioners = _get_xnnpack_partitioners(cfg) if not args.no_xnnpack else None

    if args.static or args.llm_edge_manager:
        builder.export()
        builder.run_canonical_optimizations()
        builder.to_edge_transform_and_lower(partitioners)
        edge = builder.edge_manager
    else:
        # LLMEdgeManager.export() + to_edge_transform_and_lower(), non-strict.
        import torch
        from executorch.exir import to_edge_transform_and_lower
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def export_non_strict(module):
            with sdpa_kernel([SDPBackend.MATH]), torch.no_grad():
                return torch.export.export(
                    module,
                    builder.example_inputs,
                    kwargs=builder.example_kwarg_inputs,
                    dynamic_shapes=builder.dynamic_shapes,
                    strict=False,
                ).run_decompositions({})

        # LLMEdgeManager's canonical passes (RemoveRedundantTransposes) matter here:
        # without them custom SDPA reads the cache through a transpose pair that becomes
        # two full-size permute_copy ops, and lazykv rightly refuses the cache.
        gm = export_non_strict(builder.model).module()
        for p in builder.canonical_passes:
            gm = p(gm).graph_module
        ep = export_non_strict(gm)
        edge = to_edge_transform_and_lower(
            ep,
            partitioner=partitioners,
            compile_config=builder._get_edge_config(),
            constant_methods=builder.metadata,
        )

    if args.static:
        builder.to_executorch()
        et = builder.export_program
    else:
        # What LLMEdgeManager.to_executorch() does, with lazykv's wrapper around the
        # same config.
        edge.transform([ConvertToLinearPass()])
        et = to_executorch_lazy(
            edge,
            ExecutorchBackendConfig(
                extract_delegate_segments=True,
                do_quant_fusion_and_const_prop=True,
                memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
                sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass(),
            ),
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "wb") as f:
        et.write_to_file(f)
    plan = et.executorch_program.execution_plan[0]
    print(json.dumps({
        "out": str(args.out),
        "max_context": args.max_context,
        "lazy": not args.static,
        "route": "static" if args.static else ("llm_edge_manager" if args.llm_edge_manager else "non_strict"),
        "non_const_buffer_sizes": list(plan.non_const_buffer_sizes),
        "planned_bytes": sum(plan.non_const_buffer_sizes),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "wall_s": round(time.time() - t0, 1),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
