"""One call: ``to_executorch`` with lazy KV caches, for any ``EdgeProgramManager``.

::

    from lazykv.passes import to_executorch_lazy
    et = to_executorch_lazy(edge_manager)                    # ExecutorchProgramManager
    et.write_to_file(open("model.pte", "wb"))

``edge_manager`` may come from any exporter, after lowering (``to_edge``,
``to_edge_transform_and_lower``, ``LLMEdgeManager.edge_manager``...). Your own
``ExecutorchBackendConfig`` is kept (copied with ``dataclasses.replace``): only its
``memory_planning_pass`` is wrapped (per method) by
:class:`lazykv.passes.LazyKVMemoryPlanningPass` around the pass you gave, and
``emit_mutable_buffer_names`` is switched on (the KV tensors are identified by FQN).

ExecuTorch's own LLM flow (``export_llm`` / ``LLMEdgeManager``):
``LLMEdgeManager.to_executorch()`` builds its ``ExecutorchBackendConfig`` inside, so
call this function on ``builder.edge_manager`` instead, after
``builder.to_edge_transform_and_lower(partitioners)``, and build the model inside
:func:`lazykv.passes.no_causal_masks` (see ``docs/format.md``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Union

from executorch.exir import EdgeProgramManager, ExecutorchBackendConfig, ExecutorchProgramManager
from executorch.exir.passes import MemoryPlanningPass

from lazykv import _et_compat
from lazykv.errors import ExportRefused
from lazykv.passes.drop_meta_buffers import drop_unused_meta_buffers
from lazykv.passes.fqn_select import normalize_patterns, select_fqns
from lazykv.passes.lazy_kv_memory_planning import LazyKVMemoryPlanningPass, LazyKVProgramState


@dataclasses.dataclass(frozen=True)
class LazyKVConfig:
    """lazykv's options for :func:`to_executorch_lazy`.

    ``buffers``: ``None`` marks every KV cache found by graph structure that the proof
    accepts; otherwise exact FQNs or ``"re:"`` regexes (no substring matching; a pattern
    matching no mutable buffer raises :class:`lazykv.errors.NoMatchingBuffer`).
    ``require_kv``: refuse a program in which no KV cache can be lazy (the caller asked
    for lazy KV; silently doing nothing would hide a mistake). ``strict``: refuse a KV
    cache the proof does not accept (ring buffer, masked, cast or dequantized read...)
    instead of leaving it planned and listing it, with its reason, in the manifest's
    ``unmarked_buffers`` (partial marking, the default).
    """

    buffers: Optional[tuple] = None
    require_kv: bool = True
    strict: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "buffers", normalize_patterns(self.buffers))


def _mutable_buffer_fqns(edge_manager: EdgeProgramManager) -> List[str]:
    fqns: List[str] = []
    for name in edge_manager.methods:
        sig = edge_manager.exported_program(name).graph_signature
        for fqn in sig.buffers_to_mutate.values():
            if fqn not in fqns:
                fqns.append(fqn)
    return fqns


def lazy_kv_backend_config(
    edge_manager: EdgeProgramManager,
    backend_config: Optional[ExecutorchBackendConfig] = None,
    *,
    buffers: Optional[Union[str, Sequence[str]]] = None,
    require_kv: bool = True,
    named_data_store: Any = None,
    shared_constants: Sequence[Any] = (),
    strict: bool = False,
) -> ExecutorchBackendConfig:
    """A copy of ``backend_config`` that makes the KV caches of ``edge_manager`` lazy.

    For people who call ``edge_manager.to_executorch(config)`` themselves. The manifest
    is added to ``named_data_store`` (default: ``edge_manager``'s own store, so calling
    ``to_executorch`` twice on one manager carries it along; :func:`to_executorch_lazy`
    avoids that). Refuses (``ExportRefused``) a config it cannot honour.
    """
    if not isinstance(edge_manager, EdgeProgramManager):
        raise TypeError(
            f"expected an executorch.exir.EdgeProgramManager, got {type(edge_manager).__name__}"
            " (for LLMEdgeManager pass builder.edge_manager)"
        )
    if backend_config is None:
        backend_config = ExecutorchBackendConfig()
    if not isinstance(backend_config, ExecutorchBackendConfig):
        raise TypeError(
            f"backend_config must be an ExecutorchBackendConfig, got {type(backend_config).__name__}"
        )
    patterns = normalize_patterns(buffers)
    methods = list(edge_manager.methods)
    selected = None
    if patterns is not None:
        selected = select_fqns(patterns, _mutable_buffer_fqns(edge_manager))
    if named_data_store is None:
        named_data_store = _et_compat.named_data_store(edge_manager)
    state = LazyKVProgramState(
        methods,
        selected=selected,
        named_data_store=named_data_store,
        require_kv=require_kv,
        shared_constants=shared_constants,
        strict=strict,
    )
    user_mp = backend_config.memory_planning_pass
    default_mp = ExecutorchBackendConfig.__dataclass_fields__["memory_planning_pass"].default
    wrapped: Dict[str, LazyKVMemoryPlanningPass] = {}
    for m in methods:
        inner = user_mp.get(m) if isinstance(user_mp, dict) else user_mp
        if inner is None or inner is default_mp:
            # ExecuTorch's default is one shared instance (a class-level default): use a
            # fresh one so its state never leaks between programs.
            inner = MemoryPlanningPass()
        if isinstance(inner, LazyKVMemoryPlanningPass):
            raise ExportRefused(
                f"method {m!r}: the config's memory_planning_pass is already a "
                f"LazyKVMemoryPlanningPass; pass the plain config to lazykv"
            )
        wrapped[m] = LazyKVMemoryPlanningPass(inner, method=m, state=state)
    return dataclasses.replace(
        backend_config, memory_planning_pass=wrapped, emit_mutable_buffer_names=True
    )


def to_executorch_lazy(
    edge_manager: EdgeProgramManager,
    config: Optional[Union[ExecutorchBackendConfig, LazyKVConfig]] = None,
    backend_config: Optional[ExecutorchBackendConfig] = None,
    *,
    buffers: Optional[Union[str, Sequence[str]]] = None,
    shared_constants: Sequence[Any] = (),
) -> ExecutorchProgramManager:
    """``edge_manager.to_executorch(...)`` with its KV caches lazy (see module docstring).

    Args:
        edge_manager: any ``EdgeProgramManager``, after lowering.
        config: your ``ExecutorchBackendConfig`` (or a :class:`LazyKVConfig`).
        backend_config: your ``ExecutorchBackendConfig`` when ``config`` is a
            :class:`LazyKVConfig`.
        buffers: FQN patterns (exact or ``"re:"``); default: every KV cache found.
        shared_constants: ``SharedConstant`` records (constant-sharing pass) written
            into the same manifest.

    Returns the ``ExecutorchProgramManager``; the manifest is in its named data under
    :data:`lazykv.manifest.MANIFEST_KEY`. Unused buffers left on ``meta`` by
    :func:`no_causal_masks` are removed first (:func:`drop_unused_meta_buffers`).
    ``to_executorch`` consumes ``edge_manager`` (ExecuTorch rewrites its programs in
    place); its named-data store is left as it was.

    Raises :class:`lazykv.errors.ExportRefused` (a cache read in full, no cache found, an
    incompatible config) and :class:`lazykv.errors.NoMatchingBuffer`.
    """
    lazy_cfg = LazyKVConfig()
    if isinstance(config, LazyKVConfig):
        lazy_cfg = config
    elif isinstance(config, ExecutorchBackendConfig):
        if backend_config is not None:
            raise ValueError(
                "two ExecutorchBackendConfigs given (config= and backend_config=); give one"
            )
        backend_config = config
    elif config is not None:
        raise TypeError(
            f"config must be an ExecutorchBackendConfig or a LazyKVConfig, got "
            f"{type(config).__name__}"
        )
    if buffers is not None:
        if lazy_cfg.buffers is not None:
            raise ValueError("buffers given twice (buffers= and LazyKVConfig.buffers)")
        lazy_cfg = dataclasses.replace(lazy_cfg, buffers=buffers)
    # The manifest goes into a copy of the edge manager's named-data store, so it does not
    # stay behind in edge_manager (a later static to_executorch must not carry it).
    with _et_compat.private_named_data_store(edge_manager) as store:
        et_config = lazy_kv_backend_config(
            edge_manager,
            backend_config,
            buffers=lazy_cfg.buffers,
            require_kv=lazy_cfg.require_kv,
            named_data_store=store,
            shared_constants=shared_constants,
            strict=lazy_cfg.strict,
        )
        for name in edge_manager.methods:
            # Masks that no_causal_masks() kept on meta must not reach the emitter.
            drop_unused_meta_buffers(edge_manager.exported_program(name), name)
        return edge_manager.to_executorch(et_config)
