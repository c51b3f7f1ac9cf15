"""Regression cases for every crash the fuzzer found, rebuilt by structure (not by byte
offsets, so they survive re-exports).

Each recipe takes a real ``.pte`` (the example fixtures) and makes the one edit that
crashed the ExecuTorch runtime before lazykv learnt to refuse it (the crash, as observed,
is in ``RECIPES``). Two checks per recipe:

* in-process: :func:`lazykv.verify.validate_pte` and the shim's first load step
  (:func:`lazykv.runtime_shim.prepare`) refuse it with :class:`InvalidProgram` and a
  message that names the problem (pure Python: cannot crash);
* in a worker subprocess: ``runtime_shim.load`` + a run end in a lazykv error, not a crash.
"""

from __future__ import annotations

import copy
import json
import struct

import pytest

import fuzz_worker
from lazykv.errors import InvalidProgram, ManifestError
from lazykv.format.flatbuffer import Reader as _Fb
from lazykv.format.pte import open_pte
from lazykv.runtime_shim import prepare
from lazykv.verify import validate_pte
from pte_objects import program_objects, with_segments


def _program(data: bytes):
    """(the file opened by lazykv, ExecuTorch's object model of it, to edit)."""
    return open_pte(data), copy.deepcopy(program_objects(data))


def _reserialize(program, data: bytes, base: int) -> bytes:
    return with_segments(program, data, base)


def _kernel(plan, name, overload=None):
    from executorch.exir.schema import KernelCall

    for ins in plan.chains[0].instructions:
        a = ins.instr_args
        if isinstance(a, KernelCall):
            op = plan.operators[a.op_index]
            if op.name == name and (overload is None or op.overload == overload):
                return a
    raise LookupError(name)


def _first_value(plan, cls_name, pred=lambda i, v: True):
    for i, v in enumerate(plan.values):
        if type(v.val).__name__ == cls_name and pred(i, v.val):
            return i
    raise LookupError(cls_name)


def _constant_tensor(plan):
    return _first_value(plan, "Tensor", lambda i, t: t.data_buffer_idx > 0)


def _edit(fn):
    """A recipe that edits the parsed program of the static example."""

    def recipe(static: bytes, lazy: bytes) -> bytes:
        pte, prog = _program(static)
        fn(prog.execution_plan[0])
        return _reserialize(prog, static, pte.segment_base_offset)

    recipe.__name__ = fn.__name__
    return recipe


def _edit_program(fn):
    """A recipe that edits the whole parsed program of the static example."""

    def recipe(static: bytes, lazy: bytes) -> bytes:
        pte, prog = _program(static)
        fn(prog)
        return _reserialize(prog, static, pte.segment_base_offset)

    recipe.__name__ = fn.__name__
    return recipe


@_edit
def kernel_arg_wrong_type(plan):
    a = _kernel(plan, "executorch_prim::et_view")
    a.args[2] = _first_value(plan, "Int")  # its out tensor -> an Int


@_edit
def int_list_arg_wrong_type(plan):
    a = _kernel(plan, "executorch_prim::et_view")
    a.args[1] = a.args[0]  # the size list -> a Tensor


@_edit
def delegate_call_missing_arg(plan):
    from executorch.exir.schema import DelegateCall

    for ins in plan.chains[0].instructions:
        if isinstance(ins.instr_args, DelegateCall) and len(ins.instr_args.args) > 3:
            del ins.instr_args.args[len(ins.instr_args.args) // 2]
            return
    raise LookupError("delegate call")


@_edit
def delegate_output_into_constant(plan):
    from executorch.exir.schema import DelegateCall

    for ins in plan.chains[0].instructions:
        if isinstance(ins.instr_args, DelegateCall):
            ins.instr_args.args[-1] = _constant_tensor(plan)
            return


@_edit
def kernel_writes_constant(plan):
    a = _kernel(plan, "llama::update_cache")
    a.args[1] = _constant_tensor(plan)


@_edit
def tensor_without_memory(plan):
    a = _kernel(plan, "llama::custom_sdpa")
    plan.values[a.args[-1]].val.allocation_info = None  # its planned output


@_edit
def update_cache_dtype_mismatch(plan):
    from executorch.exir.scalar_type import ScalarType

    a = _kernel(plan, "llama::update_cache")
    plan.values[a.args[0]].val.scalar_type = ScalarType.HALF  # value fp16, cache fp32


@_edit
def sym_size_dim_out_of_range(plan):
    a = _kernel(plan, "aten::sym_size")
    plan.values[a.args[1]].val.int_val = 7


@_edit
def constant_as_input(plan):
    plan.inputs[0] = _constant_tensor(plan)


@_edit
def dim_order_permuted(plan):
    """An XNNPACK input whose dim order is a permutation ExecuTorch has no layout for."""
    a = _kernel(plan, "aten::unsqueeze_copy")
    plan.values[a.args[-1]].val.dim_order = [3, 1, 0, 2]


@_edit
def local_scalar_dense_of_float(plan):
    """The start position read from a float tensor: the result is a Double, and
    update_cache reads it as an Int."""
    a = _kernel(plan, "aten::_local_scalar_dense")
    a.args[0] = _first_value(plan, "Tensor", lambda i, t: int(t.scalar_type) == 6 and t.data_buffer_idx == 0
                             and t.allocation_info is not None)


@_edit
def unsqueeze_dim_changed(plan):
    """An unsqueeze of the RoPE table along another dim: a [64, 1, 16] tensor flows on."""
    a = _kernel(plan, "aten::unsqueeze_copy")
    plan.values[a.args[1]].val.int_val = -2


@_edit
def view_sizes_permuted(plan):
    """The query's view sizes rotated: custom_sdpa would see 1 query head for 2 KV heads."""
    a = _kernel(plan, "executorch_prim::et_view")
    items = plan.values[a.args[1]].val.items
    items[:] = items[1:] + items[:1]


@_edit
def arena_inflated(plan):
    """Arena 1 inflated to 16 GiB (below this machine's RAM): allocated and zeroed at load."""
    plan.non_const_buffer_sizes[1] = 1 << 34


@_edit
def arena_too_large(plan):
    """A tensor planned 64 TiB into arena 1, and the arena sized to hold it."""
    a = _kernel(plan, "llama::custom_sdpa")
    t = plan.values[a.args[-1]].val
    t.allocation_info.memory_offset_high = 1 << 14
    plan.non_const_buffer_sizes[1] = (1 << 46) + (1 << 20)


@_edit
def negative_tensor_size(plan):
    a = _kernel(plan, "llama::custom_sdpa")
    plan.values[a.args[-1]].val.sizes[1] = -3


def _xnnpack_blobs(data: bytes):
    """(blob start, flatbuffer start, flatbuffer size) of each XNNPACK delegate blob."""
    pte = open_pte(data)
    for d in pte.program.plans[0].delegates:
        seg = pte.program.segments[d.index]
        start = pte.segment_base_offset + seg.offset
        blob = data[start : start + seg.size]
        assert blob[4:8] == b"XH00"
        fo, fs = struct.unpack_from("<II", blob, 10)
        yield start, start + fo, fs


@_edit_program
def xnnpack_named_constant_truncated(prog):
    """A weight XNNPACK reads by key, its named-data segment cut to 153 bytes."""
    seg = prog.segments[prog.named_data[-1].segment_index]
    seg.size = 153


def xnnpack_external_flags_changed(static: bytes, lazy: bytes) -> bytes:
    """An XNNPACK graph output also flagged as an external input (flags 2 -> 3): the
    executor binds no input buffer to it. (Internal values store no flags field, so
    the fuzzer's variant, an internal value flagged external, cannot be rebuilt by
    patching in place; this exercises the same rule.)"""
    for _, fb, fs in _xnnpack_blobs(static):
        r = _Fb(static[fb : fb + fs])
        for xv in r.tables(r.u("I", 0), 8) or []:
            t = r.ref(xv, 6)
            at = r.field(t, 14)  # flags
            if r.scalar(xv, 4, "B") == 1 and at and r.u("I", at) == 2:
                b = bytearray(static)
                b[fb + at] = 3  # XNN_VALUE_FLAG_EXTERNAL_INPUT | _OUTPUT
                return bytes(b)
    raise LookupError("an XNNPACK output value")


def named_data_key_missing(static: bytes, lazy: bytes) -> bytes:
    """A named-data entry whose key field is absent (its vtable slot zeroed)."""
    pte = open_pte(static)
    r = _Fb(static[: pte.program_size])
    nd = r.tables(r.u("I", 0), 18)[0]
    vt = nd - r.u("i", nd)
    b = bytearray(static)
    b[vt + 4 : vt + 6] = b"\x00\x00"
    return bytes(b)


def xnnpack_identifier_not_utf8(static: bytes, lazy: bytes) -> bytes:
    _, fb, _ = next(_xnnpack_blobs(static))
    b = bytearray(static)
    b[fb + 4 : fb + 8] = b"\xc6\xff\xfe\x00"
    return bytes(b)


def xnnpack_constant_key_not_utf8(static: bytes, lazy: bytes) -> bytes:
    for _, fb, fs in _xnnpack_blobs(static):
        r = _Fb(static[fb : fb + fs])
        keys = [r.vector(k, 8, 1) for k in r.tables(r.u("I", 0), 20) or []]
        keys = [k for k in keys if k and k[1] > 0]  # entry 0 is a keyless placeholder
        if keys:
            b = bytearray(static)
            b[fb + keys[0][0]] = 0xC6  # first byte of the key: a lone UTF-8 lead byte
            return bytes(b)
    raise LookupError("an XNNPACK blob with named constants")


def null_union_value(static: bytes, lazy: bytes) -> bytes:
    """An EValue whose type says Tensor but whose table is absent (vtable slot zeroed)."""
    pte = open_pte(static)
    region = static[: pte.program_size]
    r = _Fb(region)
    root = r.u("I", 0)
    plan = r.tables(root, 6)[0]
    values = r.tables(plan, 8)
    for ev in values:
        if r.scalar(ev, 4, "B") == 5:  # Tensor
            vt = ev - r.u("i", ev)
            b = bytearray(static)
            b[vt + 6 : vt + 8] = b"\x00\x00"
            return bytes(b)
    raise LookupError("tensor value")


def manifest_fill_rule_swapped(static: bytes, lazy: bytes) -> bytes:
    """The manifest says the position comes from input 0 (the tokens), not input 1."""
    pte = open_pte(lazy)
    for nd in pte.program.named_data:
        if nd.key == "lazykv/manifest":
            seg = pte.program.segments[nd.segment_index]
            start = pte.segment_base_offset + seg.offset
            blob = lazy[start : start + seg.size]
            d = json.loads(blob)
            d["fill_rules"][0]["position_input"] = 0
            d["fill_rules"][0]["length_input"] = 1
            d["fill_rules"][0]["length_axis"] = 0
            new = json.dumps(d, sort_keys=True, separators=(",", ":")).encode()
            new = new.ljust(len(blob))  # same length: JSON ignores trailing spaces
            assert len(new) == len(blob)
            return lazy[:start] + new + lazy[start + seg.size :]
    raise LookupError("manifest")


#: recipe -> (error class, words the message must contain, what runtime_shim.load + a run
#: did before the validator existed, as observed on the example program).
RECIPES = {
    kernel_arg_wrong_type: (InvalidProgram, "a Int, where Tensor is required",
                            "SIGABRT: evalue.h toTensor(): EValue is not a Tensor"),
    int_list_arg_wrong_type: (InvalidProgram, "where IntList is required",
                              "SIGABRT: evalue.h toIntList(): EValue is not an Int List"),
    delegate_call_missing_arg: (InvalidProgram, "whose graph has",
                                "SIGSEGV in XNNPACK (argument span shorter than its graph's I/O)"),
    delegate_output_into_constant: (InvalidProgram, "a constant",
                                    "RuntimeError 0x1 here (shapes differ); same shape: a write "
                                    "into read-only pages"),
    kernel_writes_constant: (InvalidProgram, "writes into value",
                             "RuntimeError 0x12 here (shapes differ); same shape: a write into "
                             "read-only pages"),
    tensor_without_memory: (InvalidProgram, "has no memory",
                            "SIGSEGV: a kernel writes through a null data pointer (DESIGN fact 4)"),
    update_cache_dtype_mismatch: (InvalidProgram, "into a cache of scalar type",
                                  "SIGABRT: op_update_cache.cpp element size ET_CHECK"),
    sym_size_dim_out_of_range: (InvalidProgram, "asks for size 7",
                                "SIGABRT: tensor_impl.h size(): Dimension out of range"),
    constant_as_input: (InvalidProgram, "a constant",
                        "SIGSEGV when run: set_input copies into read-only constant pages"),
    dim_order_permuted: (InvalidProgram, "ExecuTorch supports only contiguous",
                         "SIGABRT: XNNPACK infers a [16, ...] output, op_update_cache.cpp "
                         "batch-size ET_CHECK (fuzz seed 0 case 1396)"),
    local_scalar_dense_of_float: (InvalidProgram, "a Double) into value",
                                  "SIGABRT: evalue.h toInt(): EValue is not an int (fuzz "
                                  "seed 0 case 15032)"),
    unsqueeze_dim_changed: (InvalidProgram, "outside its declared shape",
                            "SIGABRT: op_update_cache.cpp batch size (3) should be equal to "
                            "the cache batch size (1) (fuzz seed 0 case 11072)"),
    view_sizes_permuted: (InvalidProgram, "outside its declared shape",
                          "SIGABRT: op_sdpa_impl.h num kv heads > num query heads (fuzz "
                          "seed 0 case 12850)"),
    arena_inflated: (InvalidProgram, "but the tensors planned in it end at byte",
                     "a hang: 16-17 GB allocated and zeroed per load (fuzz seed 0 cases "
                     "10688, 19337; 17 GB peak RSS)"),
    arena_too_large: (InvalidProgram, "bytes of arenas", "MemoryError: std::bad_alloc at load"),
    negative_tensor_size: (InvalidProgram, "negative size", "RuntimeError 0x23 at load"),
    xnnpack_named_constant_truncated: (InvalidProgram, "but its constant data (named",
                                       "SIGBUS: XNNPACK reads 128 KiB from a 153-byte named "
                                       "segment (fuzz seed 1 case 1933)"),
    xnnpack_external_flags_changed: (InvalidProgram, "are not its declared inputs",
                                     "rule from fuzz seed 0 case 8347: an internal value "
                                     "flagged external, SIGSEGV in XNNPACK"),
    named_data_key_missing: (InvalidProgram, "the key of named data 0 is missing",
                             "AttributeError in inspect_pte; the runtime dereferences the "
                             "key (fuzz seed 0 case 3679)"),
    xnnpack_identifier_not_utf8: (InvalidProgram, "not an XNNPACK graph",
                                  "SIGABRT: terminate, pybind11 UnicodeDecodeError while "
                                  "logging the identifier ('%.4s')"),
    xnnpack_constant_key_not_utf8: (InvalidProgram, "XNNPACK blob of delegate data",
                                    "SIGABRT: terminate, pybind11 UnicodeDecodeError while "
                                    "logging the missing key (XNNCompiler.cpp:258)"),
    null_union_value: (InvalidProgram, "with no data",
                       "refused by the object parser only; the raw reader now catches it too"),
    manifest_fill_rule_swapped: (ManifestError, "KV-cache writes take them from input",
                                 "loaded; the shim would size KV storage from a token id"),
}
IDS = [r.__name__ for r in RECIPES]


@pytest.fixture(scope="module")
def recipe_files(example_static, example_lazy, tmp_path_factory):
    static = open(example_static[1].path, "rb").read()
    lazy = open(example_lazy[1].path, "rb").read()
    d = tmp_path_factory.mktemp("fuzz_regressions")
    paths = {}
    for recipe in RECIPES:
        p = d / f"{recipe.__name__}.pte"
        p.write_bytes(recipe(static, lazy))
        paths[recipe.__name__] = str(p)
    return paths


def test_fixtures_pass_validation(example_static, example_lazy, llama_tiny_static, llama_tiny_lazy):
    """No false alarms on the real exports."""
    for _, rep in (example_static, example_lazy, llama_tiny_static, llama_tiny_lazy):
        validate_pte(rep.path)
        prepare(rep.path).manifest


@pytest.mark.parametrize("recipe", list(RECIPES), ids=IDS)
def test_validator_refuses(recipe, recipe_files):
    err, words, _ = RECIPES[recipe]
    path = recipe_files[recipe.__name__]
    with pytest.raises(err, match=None) as e:
        validate_pte(path)
    assert words in str(e.value), str(e.value)
    assert path in str(e.value)
    with pytest.raises(err) as e2:
        prepare(path).manifest
    assert words in str(e2.value), str(e2.value)


@pytest.mark.slow
def test_load_refuses_without_crash(recipe_files):
    files = [recipe_files[r.__name__] for r in RECIPES]
    res = fuzz_worker.run_fuzz([], 0, files=files, workers=2, case_timeout=120)
    problems = []
    for i, recipe in enumerate(RECIPES):
        result, detail = res.outcomes.get(i, ("missing", ""))
        if result != "refused":
            problems.append(f"{recipe.__name__}: {result}: {detail.strip()[-400:]}")
    crashes = [str(f) for f in res.failures if f.kind in ("crash", "hang")]
    assert not problems and not crashes, "\n".join(problems + crashes)
