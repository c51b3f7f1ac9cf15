"""Run ExecuTorch's own ``export_llm`` export on an ``LlmConfig``, static or lazy.

Static: exactly ``export_llama(llm_config)``, the function
``python -m executorch.extension.llm.export.export_llm`` calls, so the file is
byte-identical to export_llm's with the same configuration. Only where the file goes is
changed (``export.output_dir`` / ``export.output_name``: a temporary name next to the
destination, renamed at the end).

Lazy: the same call, with three hooks held for its duration (:func:`_lazy_hooks`):

1. model construction and source transforms (export_llm's private
   ``_prepare_for_llama_export``, wrapped through :mod:`lazykv._et_compat`) run inside
   :func:`lazykv.passes.no_causal_masks`: no N x N causal masks are built and the KV
   caches are untouched pages;
2. :class:`lazykv.passes.untouched_buffers` keeps those pages untouched through the
   rest of the export (``torch.export``'s strict mode clones every buffer it traces);
3. ``EdgeProgramManager.to_executorch(config)`` becomes
   ``to_executorch_lazy(edge_manager, lazy_config, backend_config=config)``: the
   ``ExecutorchBackendConfig`` export_llm builds (its passes, memory planning options,
   external constants) is kept and wrapped, for every ``base.model_class``, backend,
   quantizer and the multi-method export alike.

``LLMEdgeManager.to_executorch`` builds its ``ExecutorchBackendConfig`` inside and
cannot be given another, and export_llm offers no hook after lowering: patching these
two names for the length of one call is the one way to keep export_llm's own code path
(rather than a copy of ``_export_llama`` that would drift from it).
"""

from __future__ import annotations

import contextlib
import copy
import os
import threading
import time
from pathlib import Path
from typing import Callable, Dict, Optional

from lazykv import _et_compat
from lazykv.errors import LazyKVError

ProgressFn = Callable[[str, float], None]

#: LLMEdgeManager steps timed as export stages (method name -> stage).
_STAGE_OF = {
    "export": "export",
    "pt2e_quantize": "lower",
    "export_to_edge": "lower",
    "to_backend": "lower",
    "to_edge_transform_and_lower": "lower",
    "to_executorch": "plan",
    "save_to_pte": "serialize",
}

_HOOK_LOCK = threading.Lock()


def export_llm_pte(
    llm_config,
    out: os.PathLike,
    *,
    lazy=None,
    progress: Optional[ProgressFn] = None,
) -> Dict[str, float]:
    """Export ``llm_config`` (an ExecuTorch ``LlmConfig``) to the ``.pte`` file ``out``.

    ``lazy``: None for the static program export_llm writes, or a
    :class:`lazykv.passes.LazyKVConfig` for lazy KV caches (marked at
    ``to_executorch``; unmarked caches are reported in the manifest). ``progress(stage,
    seconds)`` is called as the stages ``build``, ``export``, ``lower``, ``plan``,
    ``serialize`` end. Returns the seconds per stage. The file is written under a
    temporary name and renamed: ``out`` is the whole new program or untouched.

    Raises :class:`lazykv.errors.ExportRefused` (lazy KV caches refused),
    :class:`lazykv.errors.LazyKVError` naming a config that cannot be exported here
    (e.g. ``export.export_only``).
    """
    from executorch.examples.models.llama import export_llama_lib

    cfg = copy.deepcopy(llm_config)
    if cfg.export.export_only:
        raise LazyKVError(
            "export.export_only=True stops export_llm before a .pte exists (it saves a "
            ".pt2 and exits); drop it to write a program"
        )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}.pte")
    cfg.export.output_dir = str(out.parent)
    cfg.export.output_name = str(tmp.resolve())
    seconds: Dict[str, float] = {}
    try:
        with _timed_stages(seconds, progress), (
            _lazy_hooks(lazy, cfg) if lazy is not None else contextlib.nullcontext()
        ):
            written = export_llama_lib.export_llama(cfg)
        if Path(written).resolve() != tmp.resolve():  # pragma: no cover - export_llm changed
            raise AssertionError(f"export_llm wrote {written}, expected {tmp}")
        tmp.replace(out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return seconds


@contextlib.contextmanager
def _timed_stages(seconds: Dict[str, float], progress: Optional[ProgressFn]):
    """Time export_llm's LLMEdgeManager steps (and model construction) as stages;
    ``progress(stage, seconds)`` once per stage, when the next one starts or at the end."""
    from executorch.extension.llm.export.builder import LLMEdgeManager

    depth = [0]
    current = [None]

    def report_done(upto=None):
        if current[0] is not None and current[0] != upto and progress:
            progress(current[0], seconds[current[0]])

    def timed(stage, fn):
        def wrapper(*args, **kwargs):
            if depth[0]:
                return fn(*args, **kwargs)
            report_done(stage)
            current[0] = stage
            depth[0] += 1
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                depth[0] -= 1
                seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - t

        return wrapper

    with _HOOK_LOCK, contextlib.ExitStack() as stack:
        stack.enter_context(_et_compat.wrapped_prepare_for_llama_export(
            lambda prepare: timed("build", prepare)))
        for name, stage in _STAGE_OF.items():
            stack.enter_context(_patched(
                LLMEdgeManager, name, timed(stage, getattr(LLMEdgeManager, name))
            ))
        yield
    report_done()


@contextlib.contextmanager
def _patched(owner, name: str, value):
    """Set ``owner.name`` to ``value`` for the duration of the block."""
    original = owner.__dict__[name] if name in owner.__dict__ else getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield original
    finally:
        setattr(owner, name, original)


@contextlib.contextmanager
def _lazy_hooks(lazy, cfg):
    """The three hooks of a lazy export (module docstring)."""
    from executorch.exir import EdgeProgramManager

    from lazykv.passes import no_causal_masks, to_executorch_lazy, untouched_buffers

    max_context = int(cfg.export.max_context_length)
    keep = untouched_buffers()

    def without_masks(prepare):
        def prepare_without_masks(llm_config):
            with no_causal_masks(max_context, on_empty=keep.track):
                builder = prepare(llm_config)
            _check_parameters(builder.model, keep, max_context)
            return builder

        return prepare_without_masks

    inside = threading.local()
    original_to_executorch = EdgeProgramManager.to_executorch

    def to_executorch(self, config=None):
        if getattr(inside, "active", False):
            return original_to_executorch(self, config)
        inside.active = True
        try:
            return to_executorch_lazy(self, lazy, backend_config=config)
        finally:
            inside.active = False

    with contextlib.ExitStack() as stack:
        # export_llm's model construction, where masks and KV caches are made.
        stack.enter_context(_et_compat.wrapped_prepare_for_llama_export(without_masks))
        stack.enter_context(_patched(EdgeProgramManager, "to_executorch", to_executorch))
        stack.enter_context(keep)
        yield


def _check_parameters(model, keep, max_context: int) -> None:
    """no_causal_masks() recognises masks and KV caches by their size (the max context):
    a weight that happens to have that size must not have been taken for one."""
    import torch

    suspects = list(model.named_parameters()) + [
        (n, b) for n, b in model.named_buffers()
        if b.device.type == "meta" and not (b.dtype == torch.bool or b.is_floating_point())
    ]
    for name, p in suspects:
        if p.device.type == "meta" or keep.tracked(p):
            raise LazyKVError(
                f"parameter {name!r} {tuple(p.shape)} was created with the size of the max "
                f"context ({max_context}), which a lazy export reserves for causal masks "
                f"and KV caches: its values would be lost. Fix: set "
                f"export.max_context_length to a value that is no dimension of the model's "
                f"weights (e.g. {max_context + 64})"
            )
