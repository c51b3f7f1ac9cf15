"""LazyKVMemoryPlanningPass: mark KV caches, then run ExecuTorch's own memory planning.

Why a memory-planning wrapper (DESIGN fact 10): ``EdgeProgramManager.to_executorch`` runs
``config.passes``, then ``SpecPropPass``, which rebuilds every tensor spec, so a mark
made in ``config.passes`` is lost. ``config.memory_planning_pass`` is the one user hook
that runs after it and is given the method's graph signature. This pass, per method:

1. runs :class:`lazykv.passes.MarkLazyKVPass` (find KV caches by graph structure, prove
   every reader reads a bounded prefix, set their specs ``DYNAMIC_UNBOUND``; refuse with
   :class:`lazykv.errors.ExportRefused` otherwise);
2. runs the wrapped ExecuTorch ``MemoryPlanningPass`` unchanged (all its options
   kept), which skips ``DYNAMIC_UNBOUND`` specs
   (``collect_specs_from_nodes(..., ignore_dynamic_unbound_tensor=True)``).

After all methods are planned, ``to_executorch`` calls :meth:`run_multimethod`; the last
wrapper of a program to be called builds the :class:`lazykv.manifest.Manifest` and adds it
as named data under :data:`lazykv.manifest.MANIFEST_KEY` (before
``ExecutorchProgramManager`` serializes the program).

The ``.pte`` then has, for each KV buffer: ``shape_dynamism = DYNAMIC_UNBOUND``, no
``allocation_info``, its FQN in ``extra_tensor_info`` (needs
``ExecutorchBackendConfig(emit_mutable_buffer_names=True)``), and no bytes in
``non_const_buffer_sizes``. Build configs with :func:`lazykv.passes.lazy_kv_backend_config`
or use :func:`lazykv.passes.to_executorch_lazy`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Dict, List, Optional, Sequence, Set

from executorch.exir.pass_base import PassBase, PassResult
from executorch.exir.passes import MemoryPlanningPass
from executorch.exir.schema import TensorShapeDynamism
from torch.export.graph_signature import ExportGraphSignature
from torch.fx import GraphModule

from lazykv import _et_compat
from lazykv.errors import ExportRefused, NoMatchingBuffer
from lazykv.format.scalar_type import BY_DTYPE, nbytes
from lazykv.manifest import (
    MANIFEST_KEY,
    FillRule,
    LazyBuffer,
    Manifest,
    UnmarkedBuffer,
    producer_string,
)
from lazykv.passes.kv_analysis import MethodAnalysis
from lazykv.passes.mark_lazy_kv import MarkLazyKVPass

logger = logging.getLogger(__name__)


class LazyKVProgramState:
    """What the per-method wrappers of one program share until the manifest is written.

    Args:
        methods: every method name of the program, in program order.
        selected: FQNs to make lazy (resolved from the user's patterns), or None for all
            KV caches found.
        named_data_store: where the manifest goes (``EdgeProgramManager._named_data_store``,
            or an object with ``add_named_data(key, bytes)``); None keeps the manifest in
            :attr:`manifest` only.
        require_kv: refuse a program in which no KV cache can be lazy.
        shared_constants: :class:`lazykv.manifest.SharedConstant` records (from the
            constant-sharing pass) to carry in the same manifest.
        strict: refuse (``ExportRefused``) a KV cache the proof does not accept instead
            of leaving it planned and recording it in the manifest's
            ``unmarked_buffers``.
    """

    def __init__(
        self,
        methods: Sequence[str],
        *,
        selected: Optional[Sequence[str]] = None,
        named_data_store: Any = None,
        require_kv: bool = True,
        shared_constants: Sequence[Any] = (),
        strict: bool = False,
    ) -> None:
        if not methods:
            raise ValueError("methods must name at least one method")
        self.methods = list(methods)
        self.selected = None if selected is None else list(selected)
        self.named_data_store = named_data_store
        self.require_kv = require_kv
        self.strict = strict
        self.shared_constants = tuple(shared_constants)
        self.analyses: Dict[str, MethodAnalysis] = {}
        self._multimethod_done: Set[str] = set()
        self._inner_done: Set[int] = set()
        self.manifest: Optional[Manifest] = None

    def _unmarked(self, lazy: Dict[str, Any]) -> List[UnmarkedBuffer]:
        """Every mutable buffer left planned, with its reason (caches first)."""
        out: Dict[str, UnmarkedBuffer] = {}
        for method in self.methods:
            a = self.analyses.get(method)
            if a is None:
                continue
            rows = [(f, "kv_cache", u.cause, u.reason, u.fix) for f, u in a.unmarked.items()]
            rows += [
                (f, "state", "state", r, "none needed: not a KV cache")
                for f, r in a.kept.items()
                if r.startswith("state:")
            ]
            for fqn, kind, cause, reason, fix in rows:
                if fqn in lazy:
                    continue
                prev = out.get(fqn)
                if prev is None:
                    out[fqn] = UnmarkedBuffer(fqn, kind, cause, reason, fix, (method,))
                elif method not in prev.methods:
                    out[fqn] = dataclasses.replace(prev, methods=prev.methods + (method,))
        return sorted(out.values(), key=lambda u: (u.kind != "kv_cache",))

    def build_manifest(self) -> Manifest:
        """The manifest of every method analysed so far; refuses inconsistent methods."""
        buffers: Dict[str, LazyBuffer] = {}
        rules: List[FillRule] = []
        for method in self.methods:
            a = self.analyses.get(method)
            if a is None:
                continue
            if a.fill_rule is not None:
                rules.append(a.fill_rule)
            for c in a.caches:
                prev = buffers.get(c.fqn)
                if prev is None:
                    buffers[c.fqn] = LazyBuffer(c.fqn, c.dtype, c.max_shape, c.growth_axis, (method,))
                    continue
                if (prev.dtype, prev.max_shape, prev.growth_axis) != (c.dtype, c.max_shape, c.growth_axis):
                    raise ExportRefused(
                        f"KV buffer {c.fqn!r} has dtype/shape/growth axis "
                        f"{prev.dtype} {list(prev.max_shape)} axis {prev.growth_axis} in method "
                        f"{prev.methods[0]!r} but {c.dtype} {list(c.max_shape)} axis "
                        f"{c.growth_axis} in {method!r}"
                    )
                buffers[c.fqn] = LazyBuffer(
                    prev.fqn, prev.dtype, prev.max_shape, prev.growth_axis, prev.methods + (method,)
                )
        for method, a in self.analyses.items():
            for fqn in a.mutable_fqns:
                if fqn in buffers and method not in buffers[fqn].methods:
                    raise ExportRefused(
                        f"KV buffer {fqn!r} is lazy in method(s) {list(buffers[fqn].methods)} "
                        f"but stays planned in {method!r} ({_why_planned(a, fqn)}); "
                        f"a buffer shared by methods must be lazy in all of them. Leave it out "
                        f"of `buffers=` or make every method update it with llama::update_cache."
                    )
        if self.selected is not None:
            seen = {f for a in self.analyses.values() for f in a.mutable_fqns}
            missing = [f for f in self.selected if f not in seen]
            if missing:
                raise NoMatchingBuffer(
                    f"selected buffers {missing} are not mutable buffers of any method; "
                    f"mutable buffers seen: {sorted(seen)}"
                )
        unmarked = self._unmarked(buffers)
        if self.require_kv and not buffers:
            caches = [u for u in unmarked if u.kind == "kv_cache"]
            if caches:
                first = caches[0]
                same = [u.fqn for u in caches[1:] if u.cause == first.cause]
                other = [f"{u.fqn} ({u.cause})" for u in caches[1:] if u.cause != first.cause]
                raise ExportRefused(
                    "no KV cache can be lazy, so the program would not "
                    "change (export it static: plain `to_executorch`; on the command line, without "
                    "--lazy-kv-cache). "
                    f"Buffer {first.fqn!r} (method {first.methods[0]!r}) {first.reason}. "
                    f"Fix: {first.fix}."
                    + (f" The same holds for {same}." if same else "")
                    + (f" Also left planned: {other}." if other else "")
                )
            seen = {f: r for a in self.analyses.values() for f, r in a.kept.items()}
            raise ExportRefused(
                "lazy KV cache requested, but no position-indexed KV cache was found in methods "
                f"{list(self.analyses)} (mutable buffers seen: "
                f"{ {f: r for f, r in seen.items()} or 'none'}). A KV cache is a mutable buffer "
                "written at a position along one axis, e.g. by llama::update_cache. Export "
                "it static (plain `to_executorch`; on the command line, without --lazy-kv-cache)."
            )
        manifest = Manifest(
            lazy_buffers=tuple(buffers.values()),
            fill_rules=tuple(rules),
            shared_constants=self.shared_constants,
            unmarked_buffers=tuple(unmarked),
            producer=producer_string(),
        )
        manifest.validate("the exported program")
        return manifest


class LazyKVMemoryPlanningPass(PassBase):
    """ExecuTorch memory planning that leaves one method's KV caches unplanned.

    Args:
        inner: the ``MemoryPlanningPass`` to run after marking (the user's own, with all
            its options). Default: ``MemoryPlanningPass(**memory_planning_kwargs)``.
        method: the method this instance plans (``to_executorch`` does not tell a
            memory-planning pass which method it is given, so use one instance per
            method in a ``{method: pass}`` dict, as :func:`lazy_kv_backend_config` does).
        state: a :class:`LazyKVProgramState` shared by the wrappers of one program;
            default: a single-method program with no named-data store.
        buffers: FQN patterns (exact or ``"re:"``) when used alone; with ``state`` give
            the selection to the state instead.
        **memory_planning_kwargs: ``MemoryPlanningPass`` options when ``inner`` is None.
    """

    def __init__(
        self,
        inner: Optional[MemoryPlanningPass] = None,
        *,
        method: str = "forward",
        state: Optional[LazyKVProgramState] = None,
        buffers: Optional[Sequence[str]] = None,
        **memory_planning_kwargs: Any,
    ) -> None:
        if inner is not None and memory_planning_kwargs:
            raise ValueError(
                f"give either inner= or MemoryPlanningPass options "
                f"{sorted(memory_planning_kwargs)}, not both (set them on your inner pass)"
            )
        if inner is None:
            inner = MemoryPlanningPass(**memory_planning_kwargs)
        if isinstance(inner, LazyKVMemoryPlanningPass):
            raise ValueError("inner is already a LazyKVMemoryPlanningPass; do not wrap twice")
        if not callable(getattr(inner, "run", None)):
            raise ExportRefused(
                f"memory_planning_pass {type(inner).__name__} has no run(graph_module, "
                f"graph_signature) method, so it cannot be told which placeholders are "
                f"buffers; lazykv needs a MemoryPlanningPass (or subclass) there"
            )
        if getattr(inner, "alloc_mutable_buffers", True) is False:
            raise ExportRefused(
                "memory_planning_pass has alloc_mutable_buffers=False: every mutable buffer "
                "would be left unplanned, and the stock runtime crashes on an unplanned, "
                "unmarked buffer (DESIGN fact 4). Use alloc_mutable_buffers=True; lazykv "
                "leaves only the proven KV caches unplanned."
            )
        if state is not None and buffers is not None:
            raise ValueError("give buffers= to the LazyKVProgramState, not to each pass")
        self.inner = inner
        self.method = method
        self.state = state if state is not None else LazyKVProgramState([method])
        self._mark = MarkLazyKVPass(
            method,
            buffers=buffers if state is None else None,
            selected=self.state.selected if state is not None else None,
            strict=self.state.strict,
        )

    # ExecuTorch sets this attribute on the pass it is given; forward it to the planner.
    @property
    def enable_non_cpu_memory_planning(self) -> bool:
        return getattr(self.inner, "enable_non_cpu_memory_planning", False)

    @enable_non_cpu_memory_planning.setter
    def enable_non_cpu_memory_planning(self, value: bool) -> None:
        if hasattr(self.inner, "enable_non_cpu_memory_planning"):
            self.inner.enable_non_cpu_memory_planning = value

    @property
    def analysis(self) -> Optional[MethodAnalysis]:
        return self.state.analyses.get(self.method)

    def call(self, graph_module: GraphModule) -> PassResult:
        raise ValueError(
            "LazyKVMemoryPlanningPass needs the graph signature: ExecuTorch calls "
            "run(graph_module, graph_signature); call that"
        )

    def run(
        self, graph_module: GraphModule, graph_signature: Optional[ExportGraphSignature] = None
    ) -> PassResult:
        """Mark this method's KV caches, then plan everything else with ``inner``."""
        if graph_signature is None:
            raise ValueError(
                f"method {self.method!r}: memory planning was called without a graph "
                f"signature (deprecated ExecuTorch path); lazykv needs EdgeProgramManager."
                f"to_executorch"
            )
        marked = self._mark.run(graph_module, graph_signature)
        analysis = self._mark.analysis
        self.state.analyses[self.method] = analysis
        res = self.inner.run(graph_module, graph_signature)
        lazy = {c.fqn for c in analysis.caches}
        # With share_mutable_buffers=True, ExecuTorch's run_multimethod puts every
        # mutable buffer it recorded on memory id 2 regardless of dynamism: forget ours.
        _et_compat.forget_mutable_buffers(self.inner, lazy)
        for c in analysis.caches:
            spec = c.placeholder.meta["spec"]
            if (
                spec.shape_dynamism != TensorShapeDynamism.DYNAMIC_UNBOUND
                or spec.mem_id is not None
                or spec.mem_offset is not None
            ):
                raise AssertionError(
                    f"lazykv bug: {c.fqn} was planned (mem_id={spec.mem_id}, "
                    f"offset={spec.mem_offset}) despite the mark"
                )
        if lazy:
            logger.info(
                "method %s: %d KV buffers lazy (%d bytes no longer planned)",
                self.method,
                len(lazy),
                sum(_nbytes(c.max_shape, c.dtype) for c in analysis.caches),
            )
        return PassResult(res.graph_module, res.modified or marked.modified)

    def run_multimethod(self) -> None:
        """Cross-method planning of ``inner`` (once), then the manifest (last wrapper)."""
        st = self.state
        st._multimethod_done.add(self.method)
        if id(self.inner) not in st._inner_done:
            st._inner_done.add(id(self.inner))
            if hasattr(self.inner, "run_multimethod"):
                self.inner.run_multimethod()
        pending = [m for m in st.methods if m not in st._multimethod_done]
        if pending:
            return
        st.manifest = st.build_manifest()
        if st.named_data_store is not None:
            st.named_data_store.add_named_data(MANIFEST_KEY, st.manifest.to_bytes())


def _nbytes(shape, dtype: str) -> int:
    return nbytes(BY_DTYPE[dtype].code, shape)


def _why_planned(analysis: MethodAnalysis, fqn: str) -> str:
    if fqn in analysis.unmarked:
        return analysis.unmarked[fqn].reason
    return analysis.kept.get(fqn, "not a cache there")
