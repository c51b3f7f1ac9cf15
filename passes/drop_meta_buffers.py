"""drop_unused_meta_buffers: remove buffers left on ``meta`` by ``no_causal_masks``.

:func:`lazykv.passes.no_causal_masks` creates the N x N causal masks on ``device="meta"``.
Custom SDPA without a mask never reads them, but depending on the export route an unused
mask can survive as a placeholder with no users (e.g. non-strict export without a
delegate), and ExecuTorch's emitter then fails on it with "NULL pointer access".

Contract: for each buffer / constant tensor of the ``ExportedProgram`` whose value is on
``meta``: no users -> removed from the graph, the signature and the state dict /
constants (like ExecuTorch's ``remove_unused_parameters_pass`` does for parameters);
used -> :class:`lazykv.errors.ExportRefused` naming the buffer and the node that reads it
(the model reads its mask, so attention reads the whole KV cache). Returns the names
removed; the program is changed in place.
"""

from __future__ import annotations

import copy
from typing import List

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

from lazykv import _et_compat
from lazykv.errors import ExportRefused


def drop_unused_meta_buffers(ep: ExportedProgram, method: str = "forward") -> List[str]:
    """Remove unused meta-device buffers of ``ep`` (see module docstring)."""
    placeholders = {n.name: n for n in ep.graph_module.graph.nodes if n.op == "placeholder"}
    doomed = []
    for spec in ep.graph_signature.input_specs:
        if spec.kind not in (InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            continue
        value = ep.state_dict.get(spec.target)
        if value is None:
            value = ep.constants.get(spec.target)
        if not isinstance(value, torch.Tensor) or value.device.type != "meta":
            continue
        node = placeholders.get(spec.arg.name)
        if node is None:
            continue
        if node.users:
            reader = next(iter(node.users))
            raise ExportRefused(
                f"method {method!r}: buffer {spec.target!r} was kept on the meta device by "
                f"no_causal_masks() but node {reader.name!r} reads it: the model reads its "
                f"causal mask, so attention reads the whole KV cache and the cache cannot be "
                f"lazy. Fix: export with llama::custom_sdpa without a mask (ExecuTorch Llama: "
                f"use_sdpa_with_kv_cache=True), or export it static (plain `to_executorch`; "
                f"on the command line, without --lazy-kv-cache)."
            )
        doomed.append((spec, node))
    if not doomed:
        return []
    signature = copy.deepcopy(ep.graph_signature)
    removed = []
    for spec, node in doomed:
        signature.input_specs.remove(next(s for s in signature.input_specs if s.arg.name == spec.arg.name))
        ep.graph_module.graph.erase_node(node)
        removed.append(spec.target)
    _et_compat.drop_program_state(ep, removed, signature)
    ep.graph_module.recompile()
    return removed
