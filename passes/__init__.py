"""lazykv.passes: export-time passes for lazy (pay-as-you-go) KV caches and for
constants shared across methods.

One call for any ``EdgeProgramManager``::

    from lazykv.passes import no_causal_masks, to_executorch_lazy
    with no_causal_masks(max_context):
        model = build_model(...)                       # no N x N masks materialised
    edge = to_edge_transform_and_lower(export(model, ...), partitioner=[...])
    et = to_executorch_lazy(edge, ExecutorchBackendConfig(...))

To compose your own config: :func:`lazy_kv_backend_config` (a copy of your
``ExecutorchBackendConfig`` whose memory planning is wrapped per method by
:class:`LazyKVMemoryPlanningPass`), or the passes themselves. The on-disk result is
described in ``docs/format.md``.

Constants shared across methods (a ``prefill`` and a ``decode`` over the same weights):
:class:`ShareConstantsByFQN` (or :func:`share_constants_by_fqn`) on the methods'
``ExportedProgram``s before lowering; pass its records to
``to_executorch_lazy(..., shared_constants=...)``.
"""

from lazykv.passes.drop_meta_buffers import drop_unused_meta_buffers
from lazykv.passes.fqn_select import pattern_matches, select_fqns
from lazykv.passes.kv_analysis import KVCache, MethodAnalysis, analyze_method
from lazykv.passes.lazy_kv_memory_planning import LazyKVMemoryPlanningPass, LazyKVProgramState
from lazykv.passes.mark_lazy_kv import MarkLazyKVPass
from lazykv.passes.no_causal_masks import no_causal_masks
from lazykv.passes.share_constants_by_fqn import ShareConstantsByFQN, share_constants_by_fqn
from lazykv.passes.to_executorch_lazy import LazyKVConfig, lazy_kv_backend_config, to_executorch_lazy
from lazykv.passes.untouched_buffers import untouched_buffers

__all__ = [
    "KVCache",
    "LazyKVConfig",
    "LazyKVMemoryPlanningPass",
    "LazyKVProgramState",
    "MarkLazyKVPass",
    "MethodAnalysis",
    "ShareConstantsByFQN",
    "analyze_method",
    "drop_unused_meta_buffers",
    "lazy_kv_backend_config",
    "no_causal_masks",
    "pattern_matches",
    "select_fqns",
    "share_constants_by_fqn",
    "to_executorch_lazy",
    "untouched_buffers",
]
