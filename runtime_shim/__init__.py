"""Run lazy ``.pte`` files on the stock ExecuTorch runtime.

``load(path, policy="doubling", max_bytes=None)`` rewrites only the program flatbuffer
(each lazy KV buffer becomes a trailing ``DYNAMIC_BOUND`` input, DESIGN fact 5), caches
the rewritten file by the source's sha256 and loads it from its path; sessions then
own growable KV storage::

    prog = load("model.pte", policy="step:256")
    with prog.session() as s:
        logits = s.run("forward", [tokens, torch.tensor([0])])[0]
        s.stats.current_bytes, s.trim(10), s.save("chat.kv")

A ``.pte`` without lazy buffers loads and runs unchanged through the same API.

Importing this package is cheap: the names below are imported on first use (PEP 562),
so ``lazykv.runtime_shim.policy`` can check a policy string without torch, and the
runtime (torch, ExecuTorch) loads with the first ``load``. ExecuTorch's ``exir`` and
``exir._serialize`` packages are registered without their ``__init__`` (which imports
the whole export stack and torchao: seconds, and warnings about CUDA kernels): the shim
needs only their torch-free submodules. Any later use of the full packages runs their
real ``__init__`` (:mod:`lazykv._light_imports`).
"""

from __future__ import annotations

import importlib

from lazykv._light_imports import defer_executorch_package_inits

defer_executorch_package_inits()

#: Public name -> the submodule that defines it.
_EXPORTS = {
    "load": "program",
    "LazyProgram": "program",
    "Session": "session",
    "SessionStats": "session",
    "Freed": "session",
    "PromptCache": "prompt_cache",
    "PromptCacheStats": "prompt_cache",
    "DynamicAllocator": "allocator",
    "TorchAllocator": "allocator",
    "TrackingAllocator": "allocator",
    "AllocEvent": "allocator",
    "GrowthPolicy": "policy",
    "Doubling": "policy",
    "Step": "policy",
    "Hybrid": "policy",
    "Preallocate": "policy",
    "POLICIES": "policy",
    "PolicyError": "policy",
    "parse_policy": "policy",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
