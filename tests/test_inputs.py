"""The fast call's checks are a subset of the full checks, derived from one description.

:class:`lazykv.runtime_shim.inputs.FastCall` and :meth:`MethodInfo.check` are both built
from a :class:`MethodInfo`; here they see the same inputs (good calls and every kind of
bad one) and the fast path must never accept what the full checks refuse, nor count
positions differently, and must accept the plain decode step. No runtime is needed.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from lazykv.errors import LazyKVError
from lazykv.manifest import FillRule
from lazykv.runtime_shim.inputs import FastCall, InputSpec, MethodInfo

VOCAB, BOUND, MAX_CALL = 512, 64, 16


def _info(position_shape=(1,)):
    return MethodInfo(
        name="forward",
        inputs=(InputSpec(0, "tensor", torch.int64, (1, MAX_CALL), True),
                InputSpec(1, "tensor", torch.int64, position_shape, False)),
        lazy_fqns=("k", "v"),
        tokens=((0, VOCAB),),
        positions=FillRule("forward", 1, 0, 0, 1),
        bound=BOUND,
    )


class _ListSubclass(list):
    pass


def _calls(filled):
    """(name, inputs) of good and bad calls for a session that has filled ``filled``."""
    tok = torch.tensor([[5]])
    pos = torch.tensor([filled])
    yield "decode step", [tok, pos]
    yield "decode step (tuple)", (tok, pos)
    yield "prompt of 3", [torch.tensor([[1, 2, 3]]), pos]
    yield "prompt of 16", [torch.zeros((1, 16), dtype=torch.long), pos]
    yield "prompt too long", [torch.zeros((1, 17), dtype=torch.long), pos]
    yield "no tokens", [torch.zeros((1, 0), dtype=torch.long), pos]
    yield "token = vocab", [torch.tensor([[VOCAB]]), pos]
    yield "token = -1", [torch.tensor([[-1]]), pos]
    yield "prompt with a bad token", [torch.tensor([[1, VOCAB + 3]]), pos]
    yield "int32 tokens", [tok.int(), pos]
    yield "float tokens", [tok.float(), pos]
    yield "3-d tokens", [tok.reshape(1, 1, 1), pos]
    yield "non-contiguous", [torch.zeros((2, 2), dtype=torch.long).t()[:1], pos]
    yield "position skips", [tok, torch.tensor([filled + 1])]
    yield "position goes back", [tok, torch.tensor([max(0, filled - 1)])]
    yield "position [2]", [tok, torch.tensor([filled, filled])]
    yield "position float", [tok, torch.tensor([float(filled)])]
    yield "one input", [tok]
    yield "three inputs", [tok, pos, pos]
    yield "a tensor, not a list", torch.stack([tok.reshape(1), pos])
    yield "list subclass", _ListSubclass([tok, pos])
    yield "int position", [tok, filled]
    yield "past the bound", [torch.zeros((1, BOUND - filled + 1), dtype=torch.long)[:, :MAX_CALL], pos]


def _full(info, inputs, filled):
    try:
        return info.check(inputs, filled)[1]
    except LazyKVError:
        return None


@pytest.mark.parametrize("filled, capacity", [(0, 1), (0, 16), (7, 8), (7, 64), (60, 64), (63, 64)])
def test_fast_path_accepts_a_subset_of_the_full_checks(filled, capacity):
    info = _info()
    fast = FastCall.build(info, [torch.empty(0), torch.empty(0)], capacity, execute=list)
    assert fast is not None
    seen = 0
    for name, inputs in itertools.chain(_calls(filled), _calls(filled)):  # twice: learnt shapes
        got = fast.positions_after(inputs, filled)
        want = _full(info, inputs, filled)
        if got:
            seen += 1
            assert want == got, (name, got, want)
            assert got <= capacity, name
        if name == "decode step" and filled + 1 <= min(capacity, BOUND):
            assert got == filled + 1, "the decode step must take the fast path"
    if filled + 1 <= capacity:
        assert seen


def test_fast_path_not_built_for_what_it_does_not_cover():
    assert FastCall.build(_info(position_shape=(3,)), [], 8, list) is None  # cache_position style
    info = _info()
    no_lazy = MethodInfo(info.name, info.inputs, (), info.tokens, info.positions, info.bound)
    assert FastCall.build(no_lazy, [], 8, list) is None
    ints = MethodInfo(info.name, (InputSpec(0, "int"),) + info.inputs[1:], info.lazy_fqns,
                      (), info.positions, info.bound)
    assert FastCall.build(ints, [], 8, list) is None
