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
from lazykv.runtime_shim.program import LazyProgram, load
from lazykv.runtime_shim.prompt_cache import PromptCache, PromptCacheStats
from lazykv.runtime_shim.session import Freed, Session, SessionStats

__all__ = [
    "load",
    "LazyProgram",
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
