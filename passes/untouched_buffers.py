"""untouched_buffers(): keep never-written KV buffers as untouched pages through export.

:func:`lazykv.passes.no_causal_masks` builds the KV caches with ``torch.empty`` so their
pages are never touched and cost no resident memory. ``torch.export`` in strict mode (the
mode ``export_llm``'s ``LLMEdgeManager`` uses) then clones every buffer it traces into
Dynamo's real-value cache (``torch._dynamo.utils.clone_input``: ``x.clone()`` copied into
a fresh ``torch.empty``), which writes every page: stories110m at a 131072 context held
its 9.7 GB of KV caches twice while exporting.

Inside this context manager (a ``TorchFunctionMode``), for a tensor registered with
:meth:`track` (or a clone of one):

- ``clone`` returns ``torch.empty_like`` (untouched pages), itself tracked;
- ``dst.copy_(src)`` returns ``dst`` without copying.

The contents of these buffers are meaningless by construction (uninitialised memory,
and ExecuTorch serializes only the shape and dtype of a mutable buffer), so skipping the
copy changes no result; every other tensor is left alone. Tracking is by storage, held
through weak references: a tracked tensor's storage address is forgotten when the tensor
is freed, so a later allocation at the same address is never mistaken for it.
"""

from __future__ import annotations

import weakref

import torch
from torch.overrides import TorchFunctionMode

_CLONES = {torch.Tensor.clone, torch.clone}


class untouched_buffers(TorchFunctionMode):
    """Context manager: clones and copies of tracked tensors leave their pages untouched.

    Attributes after use: ``clones_elided`` and ``copies_elided`` count what was skipped.
    """

    def __init__(self) -> None:
        super().__init__()
        self._by_storage: "weakref.WeakValueDictionary[int, torch.Tensor]" = (
            weakref.WeakValueDictionary()
        )
        self.clones_elided = 0
        self.copies_elided = 0

    def track(self, tensor: torch.Tensor) -> None:
        """Register ``tensor`` (a never-written buffer) whose pages must stay untouched."""
        key = _storage_key(tensor)
        if key is None:
            raise ValueError(f"cannot track a {type(tensor).__name__} on {tensor.device}")
        self._by_storage[key] = tensor

    def tracked(self, tensor) -> bool:
        """Whether ``tensor`` shares the storage of a tracked tensor."""
        key = _storage_key(tensor)
        return key is not None and key in self._by_storage

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _CLONES and args and self.tracked(args[0]):
            fmt = kwargs.get("memory_format", torch.preserve_format)
            out = torch.empty_like(args[0], memory_format=fmt)
            self.track(out)
            self.clones_elided += 1
            return out
        if func is torch.Tensor.copy_ and len(args) >= 2 and self.tracked(args[1]):
            dst, src = args[0], args[1]
            if isinstance(dst, torch.Tensor) and dst.shape == src.shape and dst.dtype == src.dtype:
                self.copies_elided += 1
                return dst
        return func(*args, **kwargs)


def _storage_key(tensor):
    """The storage address of a plain dense CPU tensor, else None (fake, meta, sparse)."""
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter, torch.nn.Buffer):
        return None
    if tensor.device.type != "cpu" or tensor.layout != torch.strided:
        return None
    try:
        ptr = tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None
    return ptr or None
