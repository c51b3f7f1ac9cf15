"""A session's per-call fast path: the checks of a repeated call, precomputed.

A generation loop calls one method thousands of times with inputs of the same shapes.
:meth:`Session.run`'s full checks cost about 20 us of Python per call once the runtime
has left the CPU caches cold, and any Python between two runtime calls also lets
XNNPACK's thread pool fall asleep (about 20 us more to wake it): together 10 % of a
small model's decode step (benchmarks, ``decode`` case). A :class:`FastCall` holds, for
one method of one session, exactly what those checks compare against, so a call that
matches goes straight to the runtime.

It only ever accepts a subset of what the full checks accept: anything it is not sure
of (a shape it has not seen, a call that needs the storage to grow, a token id out of
range, a position that does not continue the session, a subclass of list, tuple or
tensor) makes :meth:`FastCall.positions_after` return 0, and the session runs the full
checks, which raise the errors with their messages. It changes nothing before the
runtime is called, so falling back is always safe. The session drops its fast paths
whenever its KV storage changes (grow, shrink, close): the storage list and the capacity
held here are only valid until then.
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Set, Tuple

import torch

_Tensor = torch.Tensor
_INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
#: Shapes remembered per dynamic input (a decode step and a few prefill lengths).
_MAX_SHAPES = 64


class FastCall:
    """The precomputed checks and runtime arguments of one (session, method)."""

    __slots__ = (
        "kv", "limit", "execute", "_dtypes", "_shapes", "_bounds", "_tokens",
        "_pos_input", "_len_input", "_len_axis", "_n",
    )

    def __init__(self, kv: List[_Tensor], limit: int, execute: Callable[[list], list], dtypes,
                 shapes, bounds, tokens, pos_input: int, len_input: int, len_axis: int) -> None:
        self.kv = kv
        self.limit = limit
        self.execute = execute
        self._dtypes: Tuple[torch.dtype, ...] = dtypes
        self._shapes: Tuple[Set[Tuple[int, ...]], ...] = shapes
        self._bounds: Tuple[Optional[Tuple[int, ...]], ...] = bounds
        self._tokens: Tuple[Tuple[int, int], ...] = tokens
        self._pos_input = pos_input
        self._len_input = len_input
        self._len_axis = len_axis
        self._n = len(dtypes)

    @staticmethod
    def build(info, rule, bound: int, limits, kv: List[_Tensor], capacity: int,
              execute: Callable[[list], list]) -> Optional["FastCall"]:
        """The fast path of a lazy method, or None if its inputs are of a kind it does not
        cover: a non-tensor input, an input of unknown dtype, or a start position that
        is not the only element of an integer tensor of static shape.

        ``kv``: the session's storage for ``info.lazy_fqns``, in order; ``capacity``:
        the positions all of it holds now; ``bound``/``rule``: ``program.fill_plan``;
        ``limits``: ``program.limits.get(method)`` (token inputs), or None;
        ``execute``: runs the loaded method on a list of all its inputs and returns its
        outputs (the caller holds the program's lock around it and turns its errors
        into lazykv's).
        """
        if rule is None or not info.lazy_fqns:
            return None
        dtypes, shapes, bounds = [], [], []
        for spec in info.inputs:
            if spec.kind != "tensor" or spec.dtype is None:
                return None
            dtypes.append(spec.dtype)
            shapes.append(set() if spec.dynamic else {tuple(spec.sizes)})
            bounds.append(tuple(spec.sizes) if spec.dynamic else None)
        pos_spec = info.inputs[rule.position_input] if rule.position_input < len(info.inputs) else None
        if (pos_spec is None or pos_spec.dynamic or pos_spec.dtype not in _INTEGER_DTYPES
                or math.prod(pos_spec.sizes) != 1 or rule.position_index != 0
                or rule.length_input >= len(info.inputs)
                or rule.length_axis >= len(info.inputs[rule.length_input].sizes)):
            return None
        tokens = tuple(limits.token_inputs) if limits is not None else ()
        if any(i >= len(info.inputs) for i, _ in tokens):
            return None
        return FastCall(
            list(kv), min(capacity, bound), execute, tuple(dtypes), tuple(shapes), tuple(bounds),
            tokens, rule.position_input, rule.length_input, rule.length_axis,
        )

    def positions_after(self, inputs, filled: int) -> int:
        """Positions filled after running on ``inputs`` if every check passes and the
        storage already holds them; 0 if the full checks must decide."""
        cls = inputs.__class__
        if (cls is not list and cls is not tuple) or len(inputs) != self._n:
            return 0
        dtypes, shapes = self._dtypes, self._shapes
        i = 0
        for x in inputs:  # the checks of session._validate, in cheap form
            if (x.__class__ is not _Tensor or x.dtype is not dtypes[i] or x.requires_grad
                    or not x.is_cpu or not x.is_contiguous()):
                return 0
            shape = x.shape
            if shape not in shapes[i] and not self._learn_shape(i, shape):
                return 0
            i += 1
        for i, vocab in self._tokens:  # session._check_tokens for a single token
            t = inputs[i]
            if t.numel() != 1:
                return 0  # a prompt: the full checks scan it
            v = t.item()
            if v < 0 or v >= vocab:
                return 0
        if inputs[self._pos_input].item() != filled:  # Session._check_positions
            return 0
        length = inputs[self._len_input].shape[self._len_axis]
        need = filled + length
        if length < 1 or need > self.limit:
            return 0
        return need

    def _learn_shape(self, i: int, shape) -> bool:
        """Whether ``shape`` fits dynamic input ``i``'s bounds (remembered if so)."""
        bound = self._bounds[i]
        if bound is None or len(shape) != len(bound) or any(d > m for d, m in zip(shape, bound)):
            return False
        if len(self._shapes[i]) < _MAX_SHAPES:
            self._shapes[i].add(tuple(shape))
        return True
