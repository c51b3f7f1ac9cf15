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

The load in two steps: :func:`prepare` (read through :mod:`lazykv.format`, verified by
:mod:`lazykv.verify`: a :class:`PreparedProgram`, the metadata the disk cache keeps),
then :class:`LazyProgram`, a thin object over ``executorch.runtime``. Modules:
``prepare`` and ``loader`` (the load), ``program_cache`` and ``rebound_file`` (the disk
cache), ``inputs`` (one description of a method's inputs, full and fast checks),
``session`` and ``session_file``, ``policy`` and ``allocator`` (growth), ``weight_cache``
and ``native`` (XNNPACK's weight cache, constants shared across methods at run time).
"""

from lazykv.runtime_shim.allocator import (
    AllocEvent,
    DynamicAllocator,
    TorchAllocator,
    TrackingAllocator,
)
from lazykv.runtime_shim.policy import (
    POLICIES,
    Doubling,
    GrowthPolicy,
    Hybrid,
    PolicyError,
    Preallocate,
    Step,
    parse_policy,
)
from lazykv.runtime_shim.inputs import InputSpec, MethodInfo
from lazykv.runtime_shim.prepare import PreparedProgram, prepare
from lazykv.runtime_shim.program import LazyProgram, load
from lazykv.runtime_shim.prompt_cache import PromptCache, PromptCacheStats
from lazykv.runtime_shim.session import Freed, Session, SessionStats

__all__ = [
    "load",
    "prepare",
    "PreparedProgram",
    "LazyProgram",
    "MethodInfo",
    "InputSpec",
    "Session",
    "SessionStats",
    "Freed",
    "PromptCache",
    "PromptCacheStats",
    "DynamicAllocator",
    "TorchAllocator",
    "TrackingAllocator",
    "AllocEvent",
    "GrowthPolicy",
    "Doubling",
    "Step",
    "Hybrid",
    "Preallocate",
    "POLICIES",
    "PolicyError",
    "parse_policy",
]
