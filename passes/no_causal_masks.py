"""no_causal_masks(max_context): build a model without materialising N x N masks.

ExecuTorch's Llama (``examples/models/llama/attention.py``) builds, in every attention
layer, ``torch.tril(torch.ones(N, N, dtype=torch.bool, device="cpu"))`` with N the max
context: 16 GiB per layer at N=131072, never read by ``llama::custom_sdpa`` without a mask
(DESIGN facts 1 and 10). Inside this context manager (a ``TorchFunctionMode``):

- ``torch.ones``/``zeros``/``full``/``empty`` of shape ``(N, N)`` (any trailing
  leading dims of size 1 allowed, i.e. ``(..., N, N)``) are created on ``device="meta"``;
  ops on meta tensors (``tril``, ``masked_fill``...) stay meta. Nothing N x N is allocated.
- ``torch.zeros``/``ones`` of 3 or more dimensions, one of them N, of any dtype but
  bool (the KV caches, which cannot be meta: ``llama::update_cache`` needs a real tensor
  at export; and a quantized cache's int8 values, scales and zero points) become
  ``torch.empty``: the pages are never touched, so they cost no resident memory. A
  mutable buffer's initial contents are not serialized by ExecuTorch anyway (only
  shape and dtype). ``on_empty(tensor)`` is called with each such tensor
  (:class:`lazykv.passes.untouched_buffers` keeps them untouched through export).

Use it around model construction and source transforms (it may also stay active around
a non-strict ``torch.export``). A model that does read its mask (plain SDPA, custom SDPA
with a mask) reads the whole KV cache and cannot have a lazy one: if that read happens
while the context is active, :class:`lazykv.errors.ExportRefused` says so (op, shapes,
fix); if it happens later, export fails with torch's "Tensor on device meta is not on the
expected device cpu". Export such a model without ``--lazy-kv-cache`` (and without this
context manager).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch.overrides import TorchFunctionMode

from lazykv import _et_compat
from lazykv.errors import ExportRefused

_FACTORIES = {torch.ones, torch.zeros, torch.full, torch.empty}


def _shape_of(func: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Tuple[int, ...]:
    size = kwargs.get("size")
    if size is None and args:
        first = args[0]
        if isinstance(first, (tuple, list, torch.Size)):
            size = first
        elif func is not torch.full:
            size = tuple(a for a in args if isinstance(a, int))
    try:
        return tuple(int(d) for d in (size or ()))
    except (TypeError, ValueError):
        return ()


class no_causal_masks(TorchFunctionMode):
    """Context manager: N x N factory tensors go to ``meta``, KV zeros become ``empty``.

    Args:
        max_context: N, the exported max context length (must be > 1).
        empty_kv: also turn ``zeros``/``ones`` of rank >= 3 with a dimension N into ``empty``.
        on_empty: called with every tensor made ``empty`` that way.

    Attributes after use: ``masks_on_meta`` and ``zeros_made_empty`` count what was
    redirected (0 masks for a model that builds none is not an error).
    """

    def __init__(
        self, max_context: int, *, empty_kv: bool = True, on_empty: Optional[Callable] = None
    ) -> None:
        super().__init__()
        if not isinstance(max_context, int) or isinstance(max_context, bool) or max_context < 2:
            raise ValueError(f"max_context must be an int >= 2, got {max_context!r}")
        self.max_context = max_context
        self.empty_kv = empty_kv
        self.on_empty = on_empty
        self.masks_on_meta = 0
        self.zeros_made_empty = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in _FACTORIES:
            n = self.max_context
            shape = _shape_of(func, args, kwargs)
            if len(shape) >= 2 and shape[-1] == n and shape[-2] == n and all(
                d == 1 for d in shape[:-2]
            ):
                kwargs["device"] = "meta"
                self.masks_on_meta += 1
                return func(*args, **kwargs)
            dtype = kwargs.get("dtype") or torch.get_default_dtype()
            if (
                self.empty_kv
                and func in (torch.zeros, torch.ones)
                and n in shape
                and len(shape) >= 3
                and dtype != torch.bool
                and str(kwargs.get("device", "cpu")) != "meta"
            ):
                self.zeros_made_empty += 1
                out = torch.empty(*args, **kwargs)
                if self.on_empty is not None:
                    self.on_empty(out)
                return out
        elif self.masks_on_meta:
            self._refuse_mask_reads(func, args, kwargs)
        return func(*args, **kwargs)

    def _refuse_mask_reads(self, func, args, kwargs) -> None:
        """An N-wide meta tensor (a mask we kept off the heap) mixed with real tensors."""
        n = self.max_context
        masks, real = [], False
        for t in _et_compat.tree_flatten((args, kwargs)):
            if not isinstance(t, torch.Tensor):
                continue
            if t.device.type == "meta":
                if t.dim() >= 1 and t.shape[-1] == n:
                    masks.append(t)
            elif t.dim() > 0:
                real = True
        if masks and real:
            name = getattr(func, "__name__", str(func))
            raise ExportRefused(
                f"the model reads its causal mask ({name} on a mask of shape "
                f"{list(masks[0].shape)}, max context {n}): attention with a mask reads the "
                f"whole KV cache, so the cache cannot be lazy and no_causal_masks() cannot "
                f"keep the N x N mask off the heap. Fix: export with llama::custom_sdpa "
                f"without a mask (ExecuTorch Llama: use_sdpa_with_kv_cache=True), or export "
                f"it static without no_causal_masks (plain `to_executorch`; on the command "
                f"line, without --lazy-kv-cache)."
            )
