"""The shim's load, step one: everything it needs to know about a ``.pte``, as data.

:func:`prepare` reads a program through the format layer, verifies it
(:func:`lazykv.verify.verify_pte`: nothing reaches ExecuTorch's C++ unchecked) and
returns a :class:`PreparedProgram`: per method its input description
(:class:`lazykv.runtime_shim.inputs.MethodInfo`, with the lazy buffers appended after
the user's inputs) and its input limits, plus the manifest. It is small (a few KB of
JSON) and versioned: the disk cache stores it (:mod:`lazykv.runtime_shim.program_cache`)
so a second load of the same file neither parses nor verifies anything.

Step two, handing the bytes to the runtime, is separate: lazykv's C++ loader
(:mod:`lazykv.runtime_shim.native_engine`) rebinds the program in memory.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Dict, Optional, Tuple, Union

from lazykv.errors import ManifestError
from lazykv.format import schema as S
from lazykv.format.program import BOOL, DOUBLE, INT, TENSOR, Plan
from lazykv.format.pte import PteFile, open_pte
from lazykv.format.rebind import bound_inputs
from lazykv.manifest import FillRule, Manifest
from lazykv.runtime_shim.inputs import InputSpec, MethodInfo
from lazykv.verify import MethodLimits, Verified, verify_pte

#: Version of :meth:`PreparedProgram.to_json`; a stored document of another version is
#: prepared again, never half-read.
PREPARED_VERSION = 1

_KINDS = {INT: "int", DOUBLE: "float", BOOL: "bool"}


@dataclasses.dataclass(frozen=True)
class PreparedProgram:
    """What the shim knows about a verified ``.pte`` before loading it on the runtime.

    ``methods``: name -> :class:`MethodInfo` (user inputs, lazy buffers appended after
    them, token inputs, position rule, bound); ``limits``: name -> the
    :class:`lazykv.verify.MethodLimits` read from the graph; ``manifest``: the lazykv
    manifest, None for a program lazykv did not mark. ``lazy``: some buffer is lazy.
    """

    method_names: Tuple[str, ...]
    methods: Dict[str, MethodInfo]
    limits: Dict[str, MethodLimits]
    manifest: Optional[Manifest]
    version: int = PREPARED_VERSION

    @property
    def lazy(self) -> bool:
        """Some KV buffer is lazy (the loader rebinds it as an input)."""
        return self.manifest is not None and bool(self.manifest.lazy_buffers)

    def to_json(self) -> str:
        """The document the disk cache stores."""
        return json.dumps({
            "version": self.version,
            "method_names": list(self.method_names),
            "methods": {
                name: {"inputs": [s.as_dict() for s in m.inputs], "lazy_fqns": list(m.lazy_fqns)}
                for name, m in self.methods.items()
            },
            "limits": {k: v.as_dict() for k, v in self.limits.items()},
            "manifest": None if self.manifest is None else self.manifest.to_json(),
        }, sort_keys=True)

    @staticmethod
    def from_json(text: str, source: str) -> Optional["PreparedProgram"]:
        """A stored document back, or None if it is of another version or unreadable
        (then the program is prepared again)."""
        try:
            d = json.loads(text)
            if not isinstance(d, dict) or d.get("version") != PREPARED_VERSION:
                return None
            manifest = None if d["manifest"] is None else Manifest.from_bytes(
                d["manifest"].encode(), source)
            limits = {k: MethodLimits.from_dict(v) for k, v in d["limits"].items()}
            return _assemble(
                tuple(d["method_names"]),
                {name: (tuple(InputSpec.from_dict(s) for s in m["inputs"]), tuple(m["lazy_fqns"]))
                 for name, m in d["methods"].items()},
                limits, manifest,
            )
        except (ValueError, KeyError, TypeError, AttributeError, ManifestError):
            return None


def _assemble(method_names, inputs_and_lazy, limits, manifest) -> PreparedProgram:
    """A :class:`PreparedProgram` from each method's inputs and lazy buffers: the
    position rule and bound of each method come from the manifest (lazy) or its limits."""
    methods = {}
    for name, (specs, lazy_fqns) in inputs_and_lazy.items():
        lim = limits.get(name)
        if lazy_fqns:
            positions = manifest.fill_rule(name)
            bound = min(manifest.buffer(f).max_positions for f in lazy_fqns)
        elif lim is not None and lim.position_input is not None and lim.length_input is not None:
            positions = FillRule(name, lim.position_input, lim.position_index, lim.length_input,
                                 lim.length_axis)
            bound = lim.max_positions
        else:
            positions, bound = None, None
        methods[name] = MethodInfo(name, specs, lazy_fqns, lim.token_inputs if lim else (),
                                   positions, bound)
    return PreparedProgram(tuple(method_names), methods, limits, manifest)


def _input_spec(plan: Plan, i: int) -> InputSpec:
    import torch

    v = plan.inputs[i]
    kind = plan.kinds[v]
    if kind == TENSOR:
        t = plan.tensors[v]
        return InputSpec(i, "tensor", getattr(torch, t.dtype, None), tuple(t.sizes),
                         t.dynamism != S.STATIC)
    return InputSpec(i, _KINDS.get(kind, "other"))


def describe(pte: PteFile, verified: Verified) -> PreparedProgram:
    """The :class:`PreparedProgram` of an opened, verified program (no I/O)."""
    manifest = verified.manifest
    lazy = manifest is not None and bool(manifest.lazy_buffers)
    appended = {n: fqns for n, (fqns, _) in bound_inputs(pte, manifest).items()} if lazy else {}
    return _assemble(
        pte.method_names,
        {p.name: (tuple(_input_spec(p, i) for i in range(len(p.inputs))), appended.get(p.name, ()))
         for p in pte.program.plans},
        verified.limits, manifest,
    )


def prepare(source: Union[str, os.PathLike, bytes, bytearray, memoryview, PteFile]) -> PreparedProgram:
    """Open (unless given a :class:`PteFile`), verify and describe a ``.pte``.

    Raises :class:`lazykv.errors.InvalidProgram` (:class:`ManifestError`) naming the
    file and what is wrong."""
    if isinstance(source, PteFile):
        return describe(source, verify_pte(source))
    with open_pte(source) as pte:
        return describe(pte, verify_pte(pte))
