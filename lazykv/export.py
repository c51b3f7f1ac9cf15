"""Export a model to ``.pte``, static or with a lazy KV cache, in named stages.

One call, :func:`export_model`, with an :class:`ExportConfig`. Stages run in order and
each reports its wall time through ``progress(stage, seconds)``:

``build``     construct the model (random weights from a fixed seed, real loading path)
``export``    ``torch.export``
``lower``     to Edge dialect and (optionally) XNNPACK
``plan``      ``to_executorch``: memory planning (and, with ``lazy_kv_cache``, marking)
``serialize`` write the ``.pte``

ExecuTorch's Llama is one ``export_llm`` configuration (:func:`llama_llm_config`: its
``LlmConfig`` with a random checkpoint) exported through export_llm's own code
(:func:`export_llm_config`, the route of ``lazykv export --config``), so a static export
here is the program ``export_llm`` writes. Only the two-method ``prefill``/``decode``
export, which export_llm does not make, builds on its ``LLMEdgeManager`` stage by stage.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import resource
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from lazykv import _et_compat, disk_cache
from lazykv.context_limits import resolve_max_seq_len
from lazykv.disk_cache import cache_dir  # the one cache folder (checkpoints live there)
from lazykv.errors import LazyKVError
from lazykv.models.llama import PRESETS, LlamaShape, write_random_checkpoint
from lazykv.output_path import OutputPathError, atomic_write, check_output_path

logger = logging.getLogger(__name__)

STAGES = ("build", "export", "lower", "plan", "serialize")
MODELS = ("llama", "example")
METHOD_SETS = (("forward",), ("prefill", "decode"))

ProgressFn = Callable[[str, float], None]


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """What to export. ``model`` is ``"llama"`` (ExecuTorch's Llama) or ``"example"``.

    For ``llama``, ``shape`` gives the size (default: the ``tiny`` preset). For
    ``example``, ``example_config`` (a :class:`lazykv.examples.decoder.DecoderConfig`)
    does; its ``max_context`` is overridden by ``max_context``.
    """

    model: str = "llama"
    max_context: int = 4096
    #: Longest prompt chunk per call; None: the model's default capped at max_context
    #: (the rule of :mod:`lazykv.context_limits`).
    max_seq_len: Optional[int] = None
    shape: Optional[LlamaShape] = None
    example_config: Optional[object] = None
    lazy_kv_cache: bool = False
    xnnpack: bool = True
    seed: int = 0
    #: ``("forward",)``, or ``("prefill", "decode")``: prefill takes a dynamic number of
    #: tokens, decode exactly one; both read and write the same KV buffers.
    methods: tuple = ("forward",)
    #: Accept the same FQN holding different bytes in two methods (stored twice).
    allow_divergent_constants: bool = False

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise LazyKVError(f"unknown model {self.model!r}; choose one of {list(MODELS)}")
        if tuple(self.methods) not in METHOD_SETS:
            raise LazyKVError(
                f"--methods {','.join(self.methods)}: choose one of "
                f"{[','.join(m) for m in METHOD_SETS]}"
            )
        object.__setattr__(
            self, "max_seq_len", resolve_max_seq_len(self.max_context, self.max_seq_len, self.model)
        )

    @property
    def llama_shape(self) -> LlamaShape:
        return self.shape or PRESETS["tiny"]


@dataclasses.dataclass
class ExportReport:
    """What an export produced: the file, per-stage seconds and the memory figures.

    ``unmarked``: the mutable buffers a lazy export left planned, as in ``lazykv
    inspect --json``'s ``unmarked_buffers`` ({fqn, kind, cause, reason, fix, methods}).
    """

    path: Path
    stage_seconds: dict
    planned_bytes: int
    non_const_buffer_sizes: list
    kv_bytes_at_max_context: int
    lazy_buffers: int
    file_bytes: int
    peak_rss_bytes: int
    unmarked: list = dataclasses.field(default_factory=list)

    @property
    def total_seconds(self) -> float:
        return sum(self.stage_seconds.values())


class _Stages:
    def __init__(self, progress: Optional[ProgressFn]) -> None:
        self.progress = progress
        self.seconds: dict = {}

    def run(self, name: str, fn, *args, **kwargs):
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        self.seconds[name] = time.perf_counter() - t
        if self.progress:
            self.progress(name, self.seconds[name])
        return out


def _backend_config(lazy: bool, multi_method: bool = False):
    """The ExecutorchBackendConfig ``LLMEdgeManager.to_executorch`` uses, plus the mutable
    buffer names a lazy export needs; with several methods, static KV buffers are shared
    across them (``share_mutable_buffers``: one copy on memory id 2)."""
    from executorch.exir import ExecutorchBackendConfig
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass

    return ExecutorchBackendConfig(
        extract_delegate_segments=True,
        do_quant_fusion_and_const_prop=True,
        memory_planning_pass=MemoryPlanningPass(
            alloc_graph_input=False, share_mutable_buffers=multi_method and not lazy
        ),
        sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass(),
        emit_mutable_buffer_names=lazy or multi_method,
    )


def _to_executorch(edge_manager, lazy: bool, shared_constants=()):
    """``to_executorch`` (lazy or static); ``shared_constants`` go into the manifest."""
    from lazykv.manifest import MANIFEST_KEY, Manifest, producer_string

    multi = len(edge_manager.methods) > 1
    if lazy:
        from lazykv.passes import to_executorch_lazy

        return to_executorch_lazy(
            edge_manager, config=_backend_config(True, multi), shared_constants=shared_constants
        )
    if shared_constants:
        manifest = Manifest(shared_constants=tuple(shared_constants), producer=producer_string())
        _et_compat.named_data_store(edge_manager).add_named_data(MANIFEST_KEY, manifest.to_bytes())
    return edge_manager.to_executorch(_backend_config(False, multi))


def _share_constants(cfg: "ExportConfig", programs: dict):
    """Shared constants of a multi-method export (refuses divergent FQNs)."""
    if len(programs) < 2:
        return ()
    from lazykv.passes import share_constants_by_fqn

    return share_constants_by_fqn(programs, allow_divergent=cfg.allow_divergent_constants)


def checkpoint_for(shape: LlamaShape, seed: int) -> tuple[Path, Path]:
    """``(params.json, checkpoint.pth)`` of a random-weight Llama of ``shape`` (fixed
    ``seed``), written once under :func:`cache_dir` and reused by every later export
    (safe when several processes race to write it)."""
    key = hashlib.sha256(repr((shape, seed, 1)).encode()).hexdigest()[:16]
    d = cache_dir() / "checkpoints" / key
    params, ckpt = d / "params.json", d / "checkpoint.pth"
    if not (params.exists() and ckpt.exists()):
        import shutil

        disk_cache.ensure_writable(d.parent)
        tmp = d.with_name(d.name + f".tmp{os.getpid()}")
        try:
            write_random_checkpoint(shape, tmp, seed=seed)
            tmp.replace(d) if not d.exists() else None
        except OSError as e:  # e.g. a full disk: no half-written checkpoint is left
            raise OutputPathError(
                f"cannot write a random checkpoint to lazykv's cache folder {d.parent}: "
                f"{e.strerror or e}; {disk_cache.FIX}"
            ) from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # left only if another process won the race
        disk_cache.evict(keep=(key,))  # the cache stays under its cap
    else:
        disk_cache.touch(d)  # used now (least-recently-used eviction)
    return params, ckpt


def llama_llm_config(cfg: ExportConfig):
    """The export_llm ``LlmConfig`` of ExecuTorch's Llama for ``cfg``: a random
    checkpoint of ``cfg.llama_shape`` (seed ``cfg.seed``), KV cache with custom SDPA,
    XNNPACK or not, ``cfg``'s max context and max sequence length."""
    from executorch.extension.llm.export.config.llm_config import LlmConfig

    params, ckpt = checkpoint_for(cfg.llama_shape, cfg.seed)
    llm = LlmConfig()
    llm.base.params = str(params)
    llm.base.checkpoint = str(ckpt)
    llm.model.use_kv_cache = True
    llm.model.use_sdpa_with_kv_cache = True
    llm.backend.xnnpack.enabled = cfg.xnnpack
    llm.export.max_context_length = cfg.max_context
    llm.export.max_seq_length = cfg.max_seq_len
    llm.export.output_dir = str(cache_dir() / "export_llm_out")
    return llm


def _llama_builder(cfg: ExportConfig):
    """``(LlmConfig, LLMEdgeManager)`` for ExecuTorch's Llama, built the way export_llm does
    (:func:`lazykv._et_compat.prepare_llama_export`)."""
    llm = llama_llm_config(cfg)
    return llm, _et_compat.prepare_llama_export(llm)


def _example_model(cfg: ExportConfig):
    from lazykv.examples.decoder import DecoderConfig, build_example_decoder

    base = cfg.example_config or DecoderConfig()
    dc = dataclasses.replace(base, max_context=cfg.max_context, max_seq_len=cfg.max_seq_len)
    return build_example_decoder(dc, seed=cfg.seed)


class _PositionalLlama(torch.nn.Module):
    """ExecuTorch's Llama takes ``(tokens, {"input_pos": pos})`` in eager mode; the
    exported program takes ``(tokens, input_pos)``. This adapter gives eager the same."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        return self.model(tokens, {"input_pos": input_pos})


def build_eager_model(cfg: ExportConfig) -> torch.nn.Module:
    """The eager ``torch.nn.Module`` that :func:`export_model` would export for ``cfg``.

    Same weights (same seed, same checkpoint), same source transforms, fresh zeroed KV
    cache: the reference for checking an exported program's logits. Its forward is
    ``(tokens [1, S], input_pos [1]) -> logits``.
    """
    if cfg.model == "llama":
        _, builder = _llama_builder(dataclasses.replace(cfg, lazy_kv_cache=False))
        return _PositionalLlama(builder.model).eval()
    return _example_model(cfg)



def _mask_free(cfg: ExportConfig):
    """Context that keeps N x N causal masks off the heap (lazy exports only)."""
    import contextlib

    if not cfg.lazy_kv_cache:
        return contextlib.nullcontext()
    from lazykv.passes import no_causal_masks

    return no_causal_masks(cfg.max_context)


def _export_llama(cfg: ExportConfig, stages: _Stages):
    def build():
        with _mask_free(cfg):
            return _llama_builder(cfg)

    llm, builder = stages.run("build", build)

    def export():
        with _mask_free(cfg):
            builder.export()
            builder.run_canonical_optimizations()
            if cfg.methods == ("forward",):
                return {}
            # prefill: the dynamic-length program export_llm makes; decode: one token.
            from torch.nn.attention import SDPBackend, sdpa_kernel

            gm = builder.pre_autograd_graph_module
            with sdpa_kernel([SDPBackend.MATH]), torch.no_grad():
                prefill = _et_compat.export_with_builder(builder, gm)
                # Same calling convention as prefill's example inputs: (tokens,
                # {"input_pos": pos}) positionally, or tokens plus kwargs.
                tok = torch.zeros((1, 1), dtype=builder.example_inputs[0].dtype)
                pos = torch.zeros((1,), dtype=tok.dtype)
                if len(builder.example_inputs) > 1:
                    args, kwargs = (tok, {"input_pos": pos}), None
                else:
                    args, kwargs = (tok,), {"input_pos": pos}
                decode = torch.export.export(
                    gm, args, kwargs=kwargs, strict=True
                ).run_decompositions({})
            return {"prefill": prefill, "decode": decode}

    programs = stages.run("export", export)
    shared = _share_constants(cfg, programs)

    def lower():
        parts = _et_compat.llama_xnnpack_partitioners(llm) if cfg.xnnpack else None
        with _mask_free(cfg):
            if not programs:
                builder.to_edge_transform_and_lower(parts)
                return builder.edge_manager
            from executorch.exir import to_edge_transform_and_lower

            return to_edge_transform_and_lower(
                programs,
                partitioner=parts,
                compile_config=_et_compat.builder_edge_config(builder),
                constant_methods=builder.metadata,
            )

    edge = stages.run("lower", lower)

    def plan():
        # Same as LLMEdgeManager.to_executorch, whose config cannot be changed.
        edge.transform([_et_compat.convert_to_linear_pass()])
        return _to_executorch(edge, cfg.lazy_kv_cache, shared)

    return stages.run("plan", plan)


def _export_example(cfg: ExportConfig, stages: _Stages):
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    def build():
        return _example_model(cfg)

    model = stages.run("build", build)

    def export():
        with torch.no_grad():
            prefill = torch.export.export(
                model, model.example_inputs(), dynamic_shapes=model.dynamic_shapes(), strict=False
            )
            if cfg.methods == ("forward",):
                return {"forward": prefill}
            one = (torch.tensor([[1]], dtype=torch.long), torch.tensor([0], dtype=torch.long))
            return {"prefill": prefill, "decode": torch.export.export(model, one, strict=False)}

    programs = stages.run("export", export)
    shared = _share_constants(cfg, programs)

    def lower():
        parts = []
        if cfg.xnnpack:
            from executorch.backends.xnnpack.partition.xnnpack_partitioner import (
                XnnpackPartitioner,
            )

            parts = [XnnpackPartitioner()]
        return to_edge_transform_and_lower(
            programs, partitioner=parts, compile_config=EdgeCompileConfig(_check_ir_validity=False)
        )

    edge = stages.run("lower", lower)
    return stages.run("plan", _to_executorch, edge, cfg.lazy_kv_cache, shared)


def export_model(
    cfg: ExportConfig, out: os.PathLike, progress: Optional[ProgressFn] = None
) -> ExportReport:
    """Export ``cfg`` to the ``.pte`` file ``out`` and report what it holds.

    ``out`` is checked before any work (:func:`lazykv.output_path.check_output_path`:
    a regular file or nothing, in a writable folder) and written atomically, so it is
    either the complete new program or untouched. ``progress(stage, seconds)`` is called
    after each stage of :data:`STAGES`. ``--model llama`` with one method is
    :func:`export_llm_config` of :func:`llama_llm_config`.
    """
    out = _check_out(out)
    if cfg.model == "llama" and cfg.methods == ("forward",):
        from lazykv.passes import LazyKVConfig

        lazy = LazyKVConfig() if cfg.lazy_kv_cache else None
        return export_llm_config(llama_llm_config(cfg), out, lazy=lazy, progress=progress)
    stages = _Stages(progress)
    if cfg.model == "llama":
        et = _export_llama(cfg, stages)
    else:
        et = _export_example(cfg, stages)

    def serialize():
        with atomic_write(out, "the .pte (-o)") as f:
            et.write_to_file(f)

    stages.run("serialize", serialize)
    return _report(out, stages.seconds)


def export_llm_config(
    llm_config, out: os.PathLike, *, lazy=None, progress: Optional[ProgressFn] = None
) -> ExportReport:
    """Export an export_llm ``LlmConfig`` to ``out`` through export_llm's own code.

    ``lazy``: None for the static program (byte-identical to ``python -m
    executorch.extension.llm.export.export_llm`` with the same configuration), or a
    :class:`lazykv.passes.LazyKVConfig` (KV caches the proof accepts lazy; the others
    left planned and listed in :attr:`ExportReport.unmarked`, or refused with
    ``strict=True``). See :mod:`lazykv.llm_export`.
    """
    from lazykv.llm_export import export_llm_pte

    out = _check_out(out)
    seconds = export_llm_pte(llm_config, out, lazy=lazy, progress=progress)
    return _report(out, seconds)


def _check_out(out: os.PathLike) -> Path:
    return Path(check_output_path(out, "the .pte (-o)"))


def _report(out: Path, seconds: dict) -> ExportReport:
    from lazykv.inspect import inspect_pte

    info = inspect_pte(out)
    first = next(iter(info["methods"].values()), None)
    return ExportReport(
        path=out,
        stage_seconds=seconds,
        planned_bytes=info["planned_bytes"],
        non_const_buffer_sizes=[0] + list(first["arenas"]) if first else [],
        kv_bytes_at_max_context=info["kv_bytes_at_max_context"],
        lazy_buffers=sum(1 for b in info["kv_buffers"] if b["lazy"]),
        file_bytes=out.stat().st_size,
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        unmarked=info["unmarked_buffers"],
    )
