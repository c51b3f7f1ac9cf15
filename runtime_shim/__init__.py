"""Run lazy ``.pte`` files on the stock ExecuTorch runtime.

``load(path, policy="doubling", max_bytes=None)`` verifies the program in Python, then
lazykv's C++ loader reads the original file (or the given ``bytes``, in place) with
each lazy KV buffer rebound as a trailing ``DYNAMIC_BOUND`` input in memory (DESIGN
fact 5): no copy of the program is written. Sessions then own growable KV storage::

    prog = load("model.pte", policy="step:256")
    with prog.session() as s:
        logits = s.run("forward", [tokens, torch.tensor([0])])[0]
        s.stats.current_bytes, s.trim(10), s.save("chat.kv")

A ``.pte`` without lazy buffers loads and runs unchanged through the same API.

The load in two steps: :func:`prepare` (read through :mod:`lazykv.format`, verified by
:mod:`lazykv.verify`: a :class:`PreparedProgram`, the metadata the disk cache keeps),
then :class:`LazyProgram`, a thin object over the C++ runtime engine
(:mod:`.native_engine`: ExecuTorch's ``Program``/``Method`` in this process, inputs
passed by pointer). Modules: ``prepared`` and ``loader`` (the load), ``program_cache``
(the metadata cache), ``native_engine`` (the engine), ``kernels`` (the kernel libraries
a program needs), ``inputs`` (one description of a method's inputs, full and fast
checks), ``session`` and ``session_file``, ``policy`` and ``allocator`` (growth),
``weight_cache`` and ``native`` (XNNPACK's weight cache, constants shared across
methods at run time), ``prompt_cache`` (prefixes kept within a budget),
``native_runtime`` (the C++ runtime's own sessions, and the library both load).

Importing this package is cheap: the names below are imported on first use (PEP 562),
so ``lazykv.runtime_shim.policy`` can check a policy string without torch, and the
runtime (torch, ExecuTorch) loads with the first ``load``. Nothing here imports
ExecuTorch's export stack: programs are read by :mod:`lazykv.format`.
"""

from __future__ import annotations

import importlib

#: Public name -> the submodule that defines it.
_EXPORTS = {
    "load": "program",
    "LazyProgram": "program",
    "prepare": "prepared",
    "PreparedProgram": "prepared",
    "MethodInfo": "inputs",
    "InputSpec": "inputs",
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
