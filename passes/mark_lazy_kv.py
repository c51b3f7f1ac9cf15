"""MarkLazyKVPass: mark a method's KV-cache buffers DYNAMIC_UNBOUND.

Contract (``docs/format.md``, DESIGN "The contract of a lazy KV buffer"):

- **requires**: the graph has tensor specs (``node.meta["spec"]``) as built by
  ExecuTorch's ``SpecPropPass``, i.e. the pass runs inside ``to_executorch`` at the
  memory-planning slot. Marks made in ``ExecutorchBackendConfig.passes`` are lost,
  because ``SpecPropPass`` runs after them and rebuilds every spec; use
  :class:`lazykv.passes.LazyKVMemoryPlanningPass`, which runs this pass and then
  ExecuTorch's planning.
- **does**: finds position-indexed caches by graph structure (:mod:`.kv_analysis`),
  proves every reader reads a prefix bounded by the current position, and sets
  ``spec.shape_dynamism = TensorShapeDynamism.DYNAMIC_UNBOUND`` on each one's spec. A
  cache read in full (or a ring buffer) is left planned and listed, with its cause and
  fix, in ``analysis.unmarked``; with ``strict=True`` it raises
  :class:`lazykv.errors.ExportRefused` (buffer, node, fix) instead. Recurrent state,
  counters and other mutable buffers are never marked.
- **ensures**: every marked spec is DYNAMIC_UNBOUND and carries no ``mem_id`` /
  ``mem_offset`` (ExecuTorch's planner skips DYNAMIC_UNBOUND specs, so after planning
  "marked = unplanned").

``call()`` returns ``PassResult(graph_module, modified=<any spec marked>)``. The
analysis of the last run is kept in :attr:`analysis` (FQNs, shapes, fill rule).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

from executorch.exir.pass_base import PassBase, PassResult
from executorch.exir.tensor import TensorSpec
from executorch.exir.schema import TensorShapeDynamism
from torch.export.graph_signature import ExportGraphSignature
from torch.fx import GraphModule

from lazykv.passes.fqn_select import normalize_patterns, select_fqns
from lazykv.passes.kv_analysis import MethodAnalysis, analyze_method


class MarkLazyKVPass(PassBase):
    """Mark the KV caches of one method DYNAMIC_UNBOUND (see module docstring).

    Args:
        method: name of the method (recorded in the fill rule).
        graph_signature: the method's signature as ``to_executorch`` passes it to memory
            planning (``run(gm, signature)`` also accepts it per call).
        buffers: ``None`` to mark every KV cache found, or exact FQNs / ``"re:"``
            regexes; a pattern matching no mutable buffer of this method raises
            :class:`lazykv.errors.NoMatchingBuffer` (unless ``selected`` is given).
        selected: FQNs already resolved across all methods of a program (used by
            :class:`LazyKVMemoryPlanningPass`; then ``buffers`` must be None).
        strict: refuse a KV cache the proof does not accept instead of leaving it
            planned (the analysis lists those in ``unmarked``).
    """

    def __init__(
        self,
        method: str = "forward",
        graph_signature: Optional[ExportGraphSignature] = None,
        *,
        buffers: Optional[Union[str, Sequence[str]]] = None,
        selected: Optional[Sequence[str]] = None,
        strict: bool = False,
    ) -> None:
        if not isinstance(method, str) or not method:
            raise ValueError(f"method must be a non-empty string, got {method!r}")
        if buffers is not None and selected is not None:
            raise ValueError("give buffers= (patterns) or selected= (resolved FQNs), not both")
        self.method = method
        self.graph_signature = graph_signature
        self.patterns = normalize_patterns(buffers)
        self.selected = None if selected is None else frozenset(selected)
        self.strict = strict
        self.analysis: Optional[MethodAnalysis] = None

    def requires(self, graph_module: GraphModule) -> None:
        for node in graph_module.graph.nodes:
            if node.op == "placeholder" and "val" in node.meta:
                if not isinstance(node.meta.get("spec"), TensorSpec) and hasattr(
                    node.meta["val"], "shape"
                ):
                    raise RuntimeError(
                        f"MarkLazyKVPass needs tensor specs (placeholder {node.name!r} has "
                        f"none): run it from the memory-planning slot "
                        f"(LazyKVMemoryPlanningPass), after ExecuTorch's SpecPropPass"
                    )
                return

    def run(
        self, graph_module: GraphModule, graph_signature: Optional[ExportGraphSignature] = None
    ) -> PassResult:
        """Like :meth:`call`, with the signature given per call (as memory planning gets it)."""
        if graph_signature is not None:
            self.graph_signature = graph_signature
        return self(graph_module)

    def call(self, graph_module: GraphModule) -> PassResult:
        sig = self.graph_signature
        if sig is None:
            raise ValueError(
                "MarkLazyKVPass needs the method's graph signature to tell buffers from "
                "inputs: pass graph_signature= or call run(graph_module, graph_signature)"
            )
        selected = self.selected
        if self.patterns is not None:
            mutated = [s.target for s in sig.input_specs if s.target in set(sig.buffers_to_mutate.values())]
            selected = frozenset(select_fqns(self.patterns, mutated))
        self.analysis = analyze_method(graph_module, sig, self.method, selected, self.strict)
        n = 0
        for cache in self.analysis.caches:
            spec = cache.placeholder.meta["spec"]
            if spec.shape_dynamism != TensorShapeDynamism.DYNAMIC_UNBOUND:
                spec.shape_dynamism = TensorShapeDynamism.DYNAMIC_UNBOUND
                n += 1
        return PassResult(graph_module, n > 0)

    def ensures(self, graph_module: GraphModule) -> None:
        if self.analysis is None:
            return
        for cache in self.analysis.caches:
            spec = cache.placeholder.meta["spec"]
            if spec.shape_dynamism != TensorShapeDynamism.DYNAMIC_UNBOUND:
                raise AssertionError(f"lazykv bug: {cache.fqn} was not marked")
            if getattr(spec, "mem_id", None) is not None or getattr(spec, "mem_offset", None) is not None:
                raise AssertionError(
                    f"lazykv bug: {cache.fqn} already has memory (mem_id={spec.mem_id}, "
                    f"mem_offset={spec.mem_offset}) before planning"
                )
