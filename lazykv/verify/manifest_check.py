"""The lazykv manifest against the program it sits in: methods, inputs, lazy tensors."""

from __future__ import annotations

from lazykv.errors import ManifestError
from lazykv.format import schema as S
from lazykv.format.program import Program
from lazykv.format.scalar_type import BY_CODE, BY_DTYPE
from lazykv.manifest import Manifest
from lazykv.verify.limits import method_limits
from lazykv.verify.structure import numel


def check_manifest(program: Program, manifest: Manifest, source: str) -> None:
    """Raise :class:`ManifestError` (naming ``source``) if ``manifest`` does not describe
    ``program``: a fill rule for a missing method or a non-tensor input, a position read
    from elsewhere than the KV-cache writes read it, a lazy buffer that is not exactly
    one lazy tensor of each method using it, or whose shape or dtype disagrees."""
    plans = {p.name: p for p in program.plans}
    for r in manifest.fill_rules:
        plan = plans.get(r.method)
        if plan is None:
            raise ManifestError(
                f"{source}: the lazykv manifest has a fill rule for method {r.method!r}, which "
                f"the program does not have ({sorted(plans)}); re-export with lazykv"
            )
        for what, k in (("position", r.position_input), ("length", r.length_input)):
            if k >= len(plan.inputs) or plan.inputs[k] not in plan.tensors:
                raise ManifestError(
                    f"{source}: the fill rule of {r.method!r} reads its {what} from input {k}, "
                    f"but the method's input {k} is not a tensor (it takes {len(plan.inputs)} "
                    f"inputs); re-export with lazykv"
                )
        pos = plan.tensors[plan.inputs[r.position_input]]
        n = numel(pos)
        if not BY_CODE[pos.scalar_type].integer or r.position_index >= n:
            raise ManifestError(
                f"{source}: the fill rule of {r.method!r} reads position element "
                f"{r.position_index} of input {r.position_input}, which has {n} "
                f"elements of scalar type {pos.scalar_type}; re-export with lazykv"
            )
        derived = method_limits(plan)
        if derived.position_input is not None and (
            (r.position_input, r.position_index) != (derived.position_input, derived.position_index)
            or (derived.length_input is not None and r.length_input != derived.length_input)
        ):
            raise ManifestError(
                f"{source}: the fill rule of {r.method!r} reads the start position from input "
                f"{r.position_input}[{r.position_index}] and the length from input "
                f"{r.length_input}, but the program's KV-cache writes take them from input "
                f"{derived.position_input}[{derived.position_index}] and input "
                f"{derived.length_input}; re-export with lazykv"
            )
        length = plan.tensors[plan.inputs[r.length_input]]
        if r.length_axis >= len(length.sizes):
            raise ManifestError(
                f"{source}: the fill rule of {r.method!r} counts positions along axis "
                f"{r.length_axis} of input {r.length_input}, which has {len(length.sizes)} "
                f"dims; re-export with lazykv"
            )
    for b in manifest.lazy_buffers:
        for meth in b.methods:
            plan = plans.get(meth)
            if plan is None:
                raise ManifestError(
                    f"{source}: lazy buffer {b.fqn!r} is used by method {meth!r}, which the "
                    f"program does not have; re-export with lazykv"
                )
            # As exported (DYNAMIC_UNBOUND), or as the shim rebinds it (a DYNAMIC_BOUND input).
            found = [
                t for i, t in plan.tensors.items()
                if t.fqn == b.fqn and (t.dynamism == S.DYNAMIC_UNBOUND
                                       or (t.dynamism == S.DYNAMIC_BOUND and i in plan.inputs))
            ]
            if len(found) != 1:
                raise ManifestError(
                    f"{source}: lazy buffer {b.fqn!r} should be one lazy (DYNAMIC_UNBOUND) "
                    f"tensor of {meth!r}; found {len(found)}; re-export with lazykv"
                )
            t = found[0]
            if tuple(t.sizes) != tuple(b.max_shape) or (
                    BY_CODE[t.scalar_type].itemsize != BY_DTYPE[b.dtype].itemsize):
                raise ManifestError(
                    f"{source}: lazy buffer {b.fqn!r} in {meth!r} is {list(t.sizes)} (scalar "
                    f"type {t.scalar_type}) but the manifest says {list(b.max_shape)} "
                    f"{b.dtype}; re-export with lazykv"
                )
