"""The constant-sharing pass: key every constant by its fully qualified name (FQN)
across the methods of a program.

One of lazykv's two export-time passes (the other makes KV caches lazy). Its records
travel in the manifest (``to_executorch_lazy(..., shared_constants=...)``); at run time
XNNPACK's weight cache (:mod:`lazykv.runtime_shim.weight_cache`) keeps one packed copy of
each shared weight, and ``lazykv check --no-duplicate-constants`` verifies both.

Run on the methods' ``ExportedProgram``s *before* lowering (``torch.export`` output or
``EdgeProgramManager`` programs before ``to_backend``): that is the last point where every
weight still carries the FQN its ``nn.Module`` gave it; after lowering, XNNPACK keeps its
weights under a sha256 of their bytes.

The contract:

* the same FQN with the same bytes in several methods is ONE constant: it is recorded as
  a :class:`lazykv.manifest.SharedConstant` (FQN, bytes, methods, and the key its bytes
  are stored under, the sha256 XNNPACK uses), so ``inspect`` shows names, not hashes,
  and the serializer, which stores identical bytes once, keeps one copy;
* the same FQN with different bytes in two methods fails the export with
  :class:`lazykv.errors.DivergentConstant` naming the FQN and the methods, unless
  ``allow_divergent=True`` (``--allow-divergent-constants``), in which case both copies
  are kept and recorded with ``stored_once=False``.

Mutable buffers (KV caches, state) are not constants and are skipped.
"""

from __future__ import annotations

import hashlib
from typing import Dict, List, Mapping, Tuple

import torch

from lazykv.errors import DivergentConstant
from lazykv.manifest import SharedConstant


def _sha256(t: torch.Tensor) -> str:
    t = t.detach().contiguous().cpu()
    if t.numel() == 0:
        return hashlib.sha256(b"").hexdigest()
    return hashlib.sha256(t.view(torch.uint8).numpy().tobytes() if t.dim() else
                          t.reshape(1).view(torch.uint8).numpy().tobytes()).hexdigest()


def _mutated_in_place(program) -> set:
    """FQNs of placeholders that an op writes in place (schema argument marked ``a!``).

    Custom ops such as ``llama::update_cache`` mutate a buffer without functionalization,
    so ``torch.export`` lifts the cache as a constant; it is state, not a weight.
    """
    sig = program.graph_signature
    placeholder_fqn = {}
    for spec in sig.input_specs:
        if spec.target is not None:
            placeholder_fqn[spec.arg.name] = spec.target
    out = set()
    for node in program.graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op != "call_function" or schema is None:
            continue
        for arg, sarg in zip(node.args, schema.arguments):
            if (getattr(arg, "op", None) == "placeholder" and sarg.alias_info is not None
                    and sarg.alias_info.is_write and arg.name in placeholder_fqn):
                out.add(placeholder_fqn[arg.name])
    return out


def _constants_of(program) -> Dict[str, torch.Tensor]:
    """FQN -> tensor for every parameter, buffer and lifted constant that is not mutated."""
    sig = program.graph_signature
    mutated = set(sig.buffers_to_mutate.values()) if hasattr(sig, "buffers_to_mutate") else set()
    mutated |= _mutated_in_place(program)
    out: Dict[str, torch.Tensor] = {}
    for fqn, t in list(program.state_dict.items()) + list(program.constants.items()):
        if fqn in mutated or not isinstance(t, torch.Tensor):
            continue
        out[fqn] = t
    return out


class ShareConstantsByFQN:
    """The constant-sharing pass: find the constants that several methods hold under one
    FQN; refuse divergent ones.

    Call it with ``{method_name: ExportedProgram}`` (before lowering); it returns the
    shared constants (FQNs used by two or more methods), in FQN order, as
    :class:`lazykv.manifest.SharedConstant` records for the manifest. ``exclude`` lists
    FQNs that are not constants in the runtime sense (e.g. KV caches lifted as constants
    because a custom op mutates them in place); they are never reported or compared.
    """

    def __init__(self, allow_divergent: bool = False, exclude: Tuple[str, ...] = ()) -> None:
        if not isinstance(allow_divergent, bool):
            raise TypeError(f"allow_divergent must be a bool, got {allow_divergent!r}")
        self.allow_divergent = allow_divergent
        self.exclude = frozenset(exclude)

    def __call__(self, programs: Mapping[str, object]) -> Tuple[SharedConstant, ...]:
        if len(programs) < 1:
            raise ValueError("programs must hold at least one method")
        by_fqn: Dict[str, List[Tuple[str, str, int]]] = {}
        for method, program in programs.items():
            for fqn, t in _constants_of(program).items():
                if fqn in self.exclude:
                    continue
                nbytes = t.numel() * t.element_size()
                by_fqn.setdefault(fqn, []).append((method, _sha256(t), nbytes))
        shared: List[SharedConstant] = []
        divergent: List[str] = []
        for fqn in sorted(by_fqn):
            uses = by_fqn[fqn]
            if len(uses) < 2:
                continue
            digests = {d for _, d, _ in uses}
            methods = tuple(m for m, _, _ in uses)
            if len(digests) > 1:
                groups: Dict[str, List[str]] = {}
                for m, d, _ in uses:
                    groups.setdefault(d, []).append(m)
                divergent.append(
                    f"{fqn!r}: " + " vs ".join(f"{'/'.join(ms)} (sha256 {d[:12]})"
                                                for d, ms in groups.items())
                )
                shared.append(SharedConstant(fqn=fqn, nbytes=uses[0][2], methods=methods,
                                             storage_key=None, stored_once=False))
                continue
            shared.append(SharedConstant(fqn=fqn, nbytes=uses[0][2], methods=methods,
                                         storage_key=uses[0][1], stored_once=True))
        if divergent and not self.allow_divergent:
            shown = "; ".join(divergent[:5]) + (f"; and {len(divergent) - 5} more" if len(divergent) > 5 else "")
            raise DivergentConstant(
                f"{len(divergent)} constant(s) have the same FQN but different bytes across "
                f"methods: {shown}. Methods that share a module must share its weights; export "
                f"them from one module, or pass --allow-divergent-constants "
                f"(allow_divergent=True) to store each method's copy."
            )
        return tuple(shared)


def share_constants_by_fqn(
    programs: Mapping[str, object], *, allow_divergent: bool = False, exclude: Tuple[str, ...] = ()
) -> Tuple[SharedConstant, ...]:
    """:class:`ShareConstantsByFQN` in one call: the shared constants of ``programs``
    (``{method: ExportedProgram}``), for ``to_executorch_lazy(shared_constants=...)``."""
    return ShareConstantsByFQN(allow_divergent=allow_divergent, exclude=exclude)(programs)
