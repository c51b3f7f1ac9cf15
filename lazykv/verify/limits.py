"""What a method's inputs must respect that the runtime does not check, read from its graph."""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

from lazykv.format.program import Plan


@dataclasses.dataclass(frozen=True)
class MethodLimits:
    """What a method's inputs must respect that the runtime does not check (or checks
    only by aborting), read from the program's graph.

    ``token_inputs``: ``(input index, vocabulary size)`` of every input that indexes an
    embedding table: its ids must lie in ``[0, vocab)``. ``position_input`` /
    ``position_index``: the input element that is the start position of a KV-cache write
    (``llama::update_cache``), or None; ``length_input`` / ``length_axis``: the input
    whose size along that axis is the number of positions written. ``max_positions``:
    the cache capacity (positions ``start + length`` must not pass it), or None.
    A negative start position makes ``update_cache`` write before the cache and
    ``custom_sdpa`` divide by zero (SIGFPE), so callers must check these in Python.
    """

    method: str
    token_inputs: Tuple[Tuple[int, int], ...] = ()
    position_input: Optional[int] = None
    position_index: int = 0
    length_input: Optional[int] = None
    length_axis: int = 1
    max_positions: Optional[int] = None

    def as_dict(self) -> dict:
        """A JSON-ready dict (:meth:`from_dict` reads it back)."""
        return {**dataclasses.asdict(self), "token_inputs": [list(t) for t in self.token_inputs]}

    @staticmethod
    def from_dict(d: dict) -> "MethodLimits":
        """The :class:`MethodLimits` of a dict made by :meth:`as_dict`."""
        return MethodLimits(**{**d, "token_inputs": tuple(tuple(t) for t in d.get("token_inputs", ()))})


#: Kernels whose argument 1 is a KV cache written at a position (argument 2).
CACHE_UPDATES = ("llama::update_cache", "llama::update_cache_with_indices")


def method_limits(plan: Plan) -> MethodLimits:
    """The :class:`MethodLimits` of ``plan`` (indices already verified)."""
    pos_of_input = {v: i for i, v in enumerate(plan.inputs)}
    writer = {}  # value index -> (operator, args) of the kernel whose result slot it is
    kernels = list(plan.kernel_calls())
    for op, args in kernels:
        if args:
            writer[args[-1]] = (op, args)
    tokens = []
    position = None
    max_positions = None
    # The kernels' argument kinds may be unverified here (``inspect`` and ``check`` do not
    # load operator schemas): read defensively, skip what does not fit.
    tensors = plan.tensors
    for op, args in kernels:
        key = (op.name, op.overload)
        if key == ("aten::embedding", "out") and len(args) > 1 and args[1] in pos_of_input:
            weight = tensors.get(args[0])
            if weight is not None and weight.sizes:
                tokens.append((pos_of_input[args[1]], weight.sizes[0]))
        if op.name in CACHE_UPDATES and len(args) > 2:
            cache = tensors.get(args[1])
            if cache is None or len(cache.sizes) < 2:
                continue
            cap = cache.sizes[1]
            max_positions = cap if max_positions is None else min(max_positions, cap)
            src = writer.get(args[2])
            if src and (src[0].name, src[0].overload) == ("aten::_local_scalar_dense", ""):
                sel = writer.get(src[1][0])
                if sel and (sel[0].name, sel[0].overload) == ("aten::select_copy", "int_out") \
                        and len(sel[1]) > 2:
                    x, dim, idx = sel[1][0], sel[1][1], sel[1][2]
                    if (x in pos_of_input and plan.ints.get(dim) == 0 and x in tensors
                            and len(tensors[x].sizes) == 1):
                        position = (pos_of_input[x], plan.ints.get(idx, 0))
    length_input = None
    if position is not None and len(tokens) == 1:
        t = tensors.get(plan.inputs[tokens[0][0]])
        if t is not None and len(t.sizes) == 2:
            length_input = tokens[0][0]
    return MethodLimits(
        method=plan.name,
        token_inputs=tuple(sorted(set(tokens))),
        position_input=None if position is None else position[0],
        position_index=0 if position is None else position[1],
        length_input=length_input,
        length_axis=1,
        max_positions=max_positions,
    )
