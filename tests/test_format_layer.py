"""The format layer (``lazykv.format``) against ExecuTorch itself.

* slot numbers and enums against the installed wheel's ``program.fbs`` (and XNNPACK's
  ``runtime_schema.fbs``), parsed here;
* the ScalarType table against ExecuTorch's enum, ``scalar_type.fbs`` and torch;
* the extended header against ExecuTorch's ``_ExtendedHeader``;
* the program model against ExecuTorch's object reader, field by field, on real exports;
* torch-free: ``inspect``'s whole path imports neither torch nor ExecuTorch.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from lazykv.format import schema as S
from lazykv.format.flatbuffer import FlatbufferError, Reader
from lazykv.format.header import ExtendedHeader, read_extended_header
from lazykv.format.pte import open_pte
from lazykv.format.scalar_type import BY_CODE, SCALAR_TYPES

ROOT = Path(__file__).resolve().parents[1]


def _executorch_dir() -> Path:
    import importlib.util

    return Path(importlib.util.find_spec("executorch").submodule_search_locations[0])


def parse_fbs(path: Path) -> dict:
    """``{"tables": {name: [fields]}, "unions": {name: [members]}, "enums": {name: {k: v}}}``
    of a flatbuffer schema; a union-typed field counts as two (``<name>_type``, ``<name>``)."""
    text = re.sub(r"//[^\n]*", "", path.read_text())
    unions = {m.group(1): [x.strip() for x in m.group(2).split(",") if x.strip()]
              for m in re.finditer(r"\bunion\s+(\w+)\s*\{([^}]*)\}", text)}
    enums = {}
    for m in re.finditer(r"\benum\s+(\w+)\s*:\s*\w+\s*\{([^}]*)\}", text):
        values, nxt = {}, 0
        for item in (x.strip() for x in m.group(2).split(",")):
            if not item:
                continue
            name, _, value = item.partition("=")
            nxt = int(value) if value.strip() else nxt
            values[name.strip()] = nxt
            nxt += 1
        enums[m.group(1)] = values
    tables = {}
    for m in re.finditer(r"\btable\s+(\w+)\s*\{([^}]*)\}", text):
        fields = []
        for decl in m.group(2).split(";"):
            decl = decl.strip()
            if not decl:
                continue
            name, _, typ = decl.partition(":")
            typ = typ.split("(")[0].split("=")[0].strip()
            name = name.strip()
            if typ in unions:
                fields.append(name + "_type")
            fields.append(name)
        tables[m.group(1)] = fields
    return {"tables": tables, "unions": unions, "enums": enums}


@pytest.fixture(scope="module")
def program_fbs():
    return parse_fbs(_executorch_dir() / "schema" / "program.fbs")


def test_program_slots_match_the_installed_schema(program_fbs):
    for name, slots in S.PROGRAM_FBS.items():
        theirs = program_fbs["tables"][name]
        assert theirs[: len(slots.fields)] == list(slots.fields), name
        for i, field in enumerate(slots.fields):
            assert getattr(slots, field) == 4 + 2 * i
    assert program_fbs["unions"] == {k: list(v) for k, v in S.UNIONS.items()}
    for name, values in S.ENUMS.items():
        assert program_fbs["enums"][name] == values, name


def test_xnnpack_slots_match_the_installed_schema():
    from lazykv.verify import xnnpack as X

    fbs = parse_fbs(_executorch_dir() / "backends" / "xnnpack" / "serialization" / "runtime_schema.fbs")
    for slots in (X.XNN_GRAPH, X.XVALUE, X.XNN_TENSOR_VALUE, X.XNN_QUANTIZED_TENSOR_VALUE,
                  X.CONSTANT_DATA_OFFSET, X.BUFFER):
        assert fbs["tables"][slots.__name__][: len(slots.fields)] == list(slots.fields)
    assert fbs["unions"]["XValueUnion"] == list(X.XVALUE_UNION)
    datatypes = fbs["enums"]["XNNDatatype"]
    assert set(X.XNN_BYTES) | {8, 10} <= set(datatypes.values())


def test_scalar_type_table_matches_executorch_and_torch():
    import torch
    from executorch.exir.scalar_type import ScalarType
    from executorch.exir.tensor import get_scalar_type, scalar_type_table

    assert {t.code: t.name for t in SCALAR_TYPES} == {s.value: s.name for s in ScalarType}
    fbs = parse_fbs(_executorch_dir() / "schema" / "scalar_type.fbs")["enums"]["ScalarType"]
    assert {v: k.upper() for k, v in fbs.items()} == {
        t.code: t.name.upper() for t in SCALAR_TYPES if t.code in fbs.values()}
    for t in SCALAR_TYPES:
        dtype = getattr(torch, t.dtype)
        assert isinstance(dtype, torch.dtype), t
        assert dtype.itemsize == t.itemsize, t
        assert t.integer == (not dtype.is_floating_point and not dtype.is_complex
                             and dtype != torch.bool and not t.name.startswith(("Q", "BITS"))), t
    for dtype, code in scalar_type_table.items():
        assert BY_CODE[int(code)].dtype == str(dtype).replace("torch.", ""), dtype
        assert get_scalar_type(code) is dtype


def test_extended_header_matches_executorch():
    from executorch.exir._serialize._program import _ExtendedHeader

    mine = ExtendedHeader(program_size=56704, segment_base_offset=56832, segment_data_size=123)
    theirs = _ExtendedHeader(program_size=56704, segment_base_offset=56832, segment_data_size=123)
    assert mine.to_bytes() == theirs.to_bytes()
    data = b"\0" * 8 + mine.to_bytes() + b"\0" * 24
    back = _ExtendedHeader.from_bytes(data[8:64])
    assert read_extended_header(data) == ExtendedHeader(
        back.program_size, back.segment_base_offset, back.segment_data_size, back.length)


def test_reader_refuses_reads_outside_the_buffer():
    r = Reader(b"\x08\x00\x00\x00\xff\xff\xff\x7f")
    with pytest.raises(FlatbufferError, match="outside"):
        r.u("I", 6)
    with pytest.raises(FlatbufferError, match="outside"):
        r.field(r.root(), 4)  # the vtable offset points far outside


def _same_program(path):
    """Every field of lazykv's model equals ExecuTorch's object reader's."""
    from executorch.exir import schema as ES

    from pte_objects import program_objects

    data = open(path, "rb").read()
    theirs = program_objects(data)
    with open_pte(path) as pte:
        mine = pte.program
        assert mine.version == theirs.version
        assert [(s.offset, s.size) for s in mine.segments] == [(s.offset, s.size) for s in theirs.segments]
        assert [(n.key, n.segment_index) for n in mine.named_data] == [
            (n.key, n.segment_index) for n in theirs.named_data]
        cs = theirs.constant_segment
        assert (mine.constant_segment.segment_index, mine.constant_segment.offsets) == (
            cs.segment_index, list(cs.offsets))
        assert [pte.region[s.start:s.start + s.size] for s in mine.constant_buffers] == [
            bytes(b.storage) for b in theirs.constant_buffer]
        assert [pte.region[s.start:s.start + s.size] for s in mine.inline_delegates] == [
            bytes(b.data) for b in theirs.backend_delegate_data]
        assert len(mine.plans) == len(theirs.execution_plan)
        for p, q in zip(mine.plans, theirs.execution_plan):
            assert (p.name, p.inputs, p.outputs, p.arenas) == (
                q.name, list(q.inputs), list(q.outputs), list(q.non_const_buffer_sizes))
            assert [o.full_name for o in p.operators] == [
                f"{o.name}.{o.overload}" if o.overload else o.name for o in q.operators]
            assert [tuple(d) for d in p.delegates] == [
                (d.id, int(d.processed.location), d.processed.index) for d in q.delegates]
            assert len(p.kinds) == len(q.values)
            for i, v in enumerate(q.values):
                val = v.val
                assert p.kinds[i] == type(val).__name__, i
                if isinstance(val, ES.Tensor):
                    t = p.tensors[i]
                    a = val.allocation_info
                    x = val.extra_tensor_info
                    assert (t.scalar_type, t.sizes, t.dim_order, t.data_buffer_idx, t.dynamism,
                            t.storage_offset) == (int(val.scalar_type), list(val.sizes),
                                                  list(val.dim_order), val.data_buffer_idx,
                                                  int(val.shape_dynamism), val.storage_offset), i
                    assert t.allocation == (None if a is None else (
                        a.memory_id, a.memory_offset_low, a.memory_offset_high)), i
                    assert t.fqn == (x.fully_qualified_name if x else None), i
                elif isinstance(val, ES.Int):
                    assert p.ints[i] == val.int_val
                elif isinstance(val, (ES.IntList, ES.TensorList, ES.OptionalTensorList)):
                    assert p.lists[i] == list(val.items)
                elif isinstance(val, ES.Double):
                    assert p.scalars[i] == val.double_val
                elif isinstance(val, ES.Bool):
                    assert p.scalars[i] == val.bool_val
            names = {ES.KernelCall: "kernel", ES.DelegateCall: "delegate", ES.MoveCall: "move",
                     ES.JumpFalseCall: "jump", ES.FreeCall: "free"}
            assert len(p.chains) == len(q.chains)
            for c, d in zip(p.chains, q.chains):
                assert (c.inputs, c.outputs) == (list(d.inputs), list(d.outputs))
                for ins, theirs_ins in zip(c.instructions, d.instructions, strict=True):
                    a = theirs_ins.instr_args
                    assert ins.kind == names[type(a)]
                    if ins.kind in ("kernel", "delegate"):
                        assert (ins.a, ins.b) == (a.op_index if ins.kind == "kernel"
                                                  else a.delegate_index, list(a.args))


def test_program_model_matches_executorch_reader(example_static, example_lazy):
    for _, rep in (example_static, example_lazy):
        _same_program(rep.path)


@pytest.mark.slow
def test_program_model_matches_executorch_reader_llama(llama_tiny_static, llama_tiny_lazy):
    for _, rep in (llama_tiny_static, llama_tiny_lazy):
        _same_program(rep.path)


def test_format_and_inspect_import_neither_torch_nor_executorch(example_lazy):
    code = (
        "import sys\n"
        "from lazykv.inspect import inspect_pte\n"
        "from lazykv.verify import check_program\n"
        "from lazykv.format.rebind import rebind_region\n"
        f"info = inspect_pte({str(example_lazy[1].path)!r})\n"
        "assert info['lazy_kv_bytes'] > 0\n"
        "from lazykv.cli.main import cli\n"
        f"cli(['inspect', '--json', {str(example_lazy[1].path)!r}], standalone_mode=False)\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'executorch'))\n"
        "assert not heavy, heavy\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
