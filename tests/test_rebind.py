"""The one rebinding path (``lazykv.format.rebind``), tested directly.

Its byte edit is compared with the same edit made on ExecuTorch's object model (the
test oracle, :mod:`pte_objects`); the rebound file keeps every segment byte and loads on
the stock runtime; every layout it cannot patch is an ``InvalidProgram`` naming what was
unexpected. Also the shim's prepared metadata (``PreparedProgram``) round trip.
"""

from __future__ import annotations

import copy
import dataclasses
import struct

import pytest

from lazykv.errors import InvalidProgram
from lazykv.format import schema as S
from lazykv.format.header import read_extended_header
from lazykv.format.pte import open_pte
from lazykv.format.rebind import rebind_region
from pte_objects import program_objects, with_segments


def _lazy_bytes(example_lazy) -> bytes:
    return open(example_lazy[1].path, "rb").read()


def _rebound_file(data: bytes) -> bytes:
    with open_pte(data) as pte:
        r = rebind_region(pte, pte.manifest)
        return r.region + data[pte.segment_base_offset:]


def test_byte_edit_equals_the_object_edit(example_lazy):
    from executorch.exir.schema import Tensor, TensorShapeDynamism

    data = _lazy_bytes(example_lazy)
    expected = copy.deepcopy(program_objects(data))
    with open_pte(data) as pte:
        manifest = pte.manifest
        order = [b.fqn for b in manifest.lazy_buffers]
        r = rebind_region(pte, manifest)
    for plan in expected.execution_plan:
        lazy = {v.val.extra_tensor_info.fully_qualified_name: i for i, v in enumerate(plan.values)
                if isinstance(v.val, Tensor)
                and v.val.shape_dynamism == TensorShapeDynamism.DYNAMIC_UNBOUND}
        for fqn in (f for f in order if f in lazy):
            plan.values[lazy[fqn]].val.shape_dynamism = TensorShapeDynamism.DYNAMIC_BOUND
            plan.inputs.append(lazy[fqn])
        assert r.appended[plan.name] == tuple(f for f in order if f in lazy)
    rebound = _rebound_file(data)
    assert program_objects(rebound) == expected
    assert sum(len(v) for v in r.appended.values()) == len(order) > 0


def test_rebound_file_keeps_segments_and_header_figures(example_lazy):
    data = _lazy_bytes(example_lazy)
    rebound = _rebound_file(data)
    src, dst = read_extended_header(data), read_extended_header(rebound)
    assert dst.segment_base_offset >= dst.program_size > src.program_size
    assert dst.segment_base_offset % 128 == 0
    assert dst.segment_data_size == len(data) - src.segment_base_offset
    assert rebound[dst.segment_base_offset:] == data[src.segment_base_offset:]
    with open_pte(rebound) as pte:
        assert [n.key for n in pte.program.named_data] == [
            n.key for n in open_pte(data).program.named_data]
        forward = pte.plan("forward")
        lazy = [forward.tensors[i] for i in forward.inputs[2:]]
        assert lazy and all(t.dynamism == S.DYNAMIC_BOUND and t.fqn for t in lazy)


def test_rebound_file_loads_on_the_stock_runtime(example_lazy, stock_runtime, tmp_path):
    import torch

    path = tmp_path / "rebound.pte"
    path.write_bytes(_rebound_file(_lazy_bytes(example_lazy)))
    method = stock_runtime.load_program(str(path)).load_method("forward")
    with open_pte(str(path)) as pte:
        plan = pte.plan("forward")
        kv = [torch.zeros([d if a != 1 else 8 for a, d in enumerate(plan.tensors[i].sizes)])
              for i in plan.inputs[2:]]
    out = method.execute([torch.tensor([[1, 2, 3]]), torch.tensor([0]), *kv])
    assert torch.isfinite(out[0]).all()


def _edited(data: bytes, edit) -> bytes:
    """``data`` with ``edit(program)`` applied to ExecuTorch's object model of it."""
    program = copy.deepcopy(program_objects(data))
    edit(program)
    return with_segments(program, data, read_extended_header(data).segment_base_offset)


def _first_lazy(program):
    from executorch.exir.schema import Tensor, TensorShapeDynamism

    for v in program.execution_plan[0].values:
        if isinstance(v.val, Tensor) and v.val.shape_dynamism == TensorShapeDynamism.DYNAMIC_UNBOUND:
            return v.val
    raise LookupError("a lazy tensor")


def _planned(program):
    from executorch.exir.schema import AllocationDetails

    _first_lazy(program).allocation_info = AllocationDetails(1, 0, 0)


def _nameless(program):
    _first_lazy(program).extra_tensor_info = None


def _resized(program):
    t = _first_lazy(program)
    t.sizes = [*t.sizes[:-1], t.sizes[-1] * 2]


def _unlisted(program):
    """An activation turned into a lazy tensor the manifest does not know."""
    from executorch.exir.schema import ExtraTensorInfo, Tensor, TensorShapeDynamism

    for v in program.execution_plan[0].values:
        t = v.val
        if isinstance(t, Tensor) and t.allocation_info is not None and t.data_buffer_idx == 0:
            t.shape_dynamism = TensorShapeDynamism.DYNAMIC_UNBOUND
            t.allocation_info = None
            t.extra_tensor_info = ExtraTensorInfo(fully_qualified_name="not.in.the.manifest")
            return
    raise LookupError("a planned tensor")


def _short_header(data: bytes) -> bytes:
    b = bytearray(data)
    struct.pack_into("<I", b, 12, 24)  # header length 24: no segment data size field
    return bytes(b)


@pytest.mark.parametrize("make, words", [
    (lambda d: _edited(d, _planned), "is DYNAMIC_UNBOUND but planned"),
    (lambda d: _edited(d, _nameless), "has no fully qualified name"),
    (lambda d: _edited(d, _resized), "but the manifest says"),
    (lambda d: _edited(d, _unlisted), "the lazykv manifest does not list"),
], ids=["planned", "nameless", "resized", "unlisted"])
def test_unsupported_layout_is_refused_by_name(example_lazy, make, words):
    data = make(_lazy_bytes(example_lazy))
    with open_pte(data) as pte:
        with pytest.raises(InvalidProgram, match=words):
            rebind_region(pte, pte.manifest)


def test_an_older_24_byte_header_keeps_its_length(example_lazy):
    """ExecuTorch's older extended header has no segment data size: the rebound one
    keeps 24 bytes and gets the new program size and segment base only (as the C++
    loader does), so the flatbuffer after it is not overwritten."""
    data = _short_header(_lazy_bytes(example_lazy))
    rebound = _rebound_file(data)
    h = read_extended_header(rebound)
    assert (h.length, h.segment_data_size) == (24, 0)
    assert h.program_size > read_extended_header(data).program_size
    assert rebound[32:40] == data[32:40]
    assert rebound[h.segment_base_offset:] == data[read_extended_header(data).segment_base_offset:]
    with open_pte(rebound) as pte:
        assert len(pte.plan("forward").inputs) > len(open_pte(data).plan("forward").inputs)


def test_load_refuses_an_unsupported_layout(example_lazy, tmp_path):
    from lazykv.runtime_shim import load

    path = tmp_path / "planned.pte"
    path.write_bytes(_edited(_lazy_bytes(example_lazy), _planned))
    with pytest.raises(InvalidProgram, match="is DYNAMIC_UNBOUND but planned"):
        load(str(path), cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*.bound.pte"))  # nothing entered the cache


def test_prepared_program_round_trip(example_lazy, example_static):
    from lazykv.runtime_shim import PreparedProgram, prepare
    from lazykv.runtime_shim.prepared import PREPARED_VERSION

    for _, rep in (example_lazy, example_static):
        p = prepare(str(rep.path))
        assert dataclasses.is_dataclass(p) and p.version == PREPARED_VERSION
        assert PreparedProgram.from_json(p.to_json(), "x") == p
        other = p.to_json().replace(f'"version": {PREPARED_VERSION}', '"version": 999')
        assert PreparedProgram.from_json(other, "x") is None
    lazy = prepare(str(example_lazy[1].path))
    forward = lazy.methods["forward"]
    assert lazy.lazy and forward.lazy_fqns == tuple(b.fqn for b in lazy.manifest.lazy_buffers)
    assert forward.positions == lazy.manifest.fill_rule("forward")
    assert forward.bound == lazy.manifest.lazy_buffers[0].max_positions
    assert forward.tokens == lazy.limits["forward"].token_inputs
