"""Every bad input of issue 9, table-driven: each ends in the right lazykv error, with a
message that names the problem, and leaves the session as it was.

Programs: the example decoder (vocab 512, max context 512, up to 64 tokens a call), lazy
and static, through ``lazykv.runtime_shim``. Rows that crashed the process before the
shim checked them (``isolate=True``: SIGFPE in ``custom_sdpa`` for a static program fed a
negative start position or zero tokens) run in a subprocess, so a crash fails that row only.

About 650 lines in one module on purpose: the table of rows is the list of every bad
input, read in one place; the tests below it are short.
"""

from __future__ import annotations

import dataclasses
import json
import re
import struct
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch

from lazykv import errors as E

VOCAB = 512
CONTEXT = 512
MAX_CALL = 64
HERE = Path(__file__).resolve().parent


def _tok(*ids):
    return torch.tensor([list(ids)], dtype=torch.long)


def _rand(n, seed=0):
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def _pos(p):
    return torch.tensor([p], dtype=torch.long)


def _fill(s, n, state):
    """Valid calls filling positions ``state['pos'] .. +n`` (at most MAX_CALL a call)."""
    while n > 0:
        k = min(n, MAX_CALL)
        s.run("forward", [_rand(k, seed=state["pos"]), _pos(state["pos"])])
        state["pos"] += k
        n -= k


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    program: str  # "lazy" or "static"
    bad: Callable  # (prog, session, state) -> None: the bad call
    error: type
    message: str  # regex the message must match (names the problem)
    setup: Optional[Callable] = None  # (prog, session, state): valid calls first
    isolate: bool = False  # crashed the process once: run in a subprocess


def _run(inputs, method="forward"):
    return lambda p, s, st: s.run(method, inputs() if callable(inputs) else inputs)


def _at(tokens, offset=0):
    """A call of ``tokens`` at the session's next position (+ ``offset``)."""
    return lambda p, s, st: s.run("forward", [tokens, _pos(st["pos"] + offset)])


ROWS = [
    # -- token ids outside the vocabulary ------------------------------------------------
    Row("token_id_eq_vocab", "lazy", _at(_tok(1, VOCAB)), E.InvalidInput,
        r"(?i)token.*512.*vocab|vocab.*512"),
    Row("token_id_negative", "lazy", _at(_tok(-1)), E.InvalidInput, r"(?i)token.*-1.*vocab"),
    Row("token_id_huge", "lazy", _at(_tok(2**40)), E.InvalidInput, r"(?i)token.*vocab"),
    Row("token_id_eq_vocab_static", "static", _at(_tok(VOCAB)), E.InvalidInput,
        r"(?i)token.*512.*vocab|vocab.*512"),
    # -- positions that skip or pass the bound -------------------------------------------
    Row("position_skips", "lazy", _at(_tok(1), offset=5), E.InvalidInput,
        r"starts at position 5 .* continue at 0"),
    Row("position_skips_after_fill", "lazy", _at(_tok(1), offset=3), E.InvalidInput,
        r"starts at position 13 .* continue at 10", setup=lambda p, s, st: _fill(s, 10, st)),
    Row("position_goes_back", "lazy", _at(_tok(1), offset=-4), E.InvalidInput,
        r"starts at position 6 .*trim\(4\)", setup=lambda p, s, st: _fill(s, 10, st)),
    Row("position_negative", "lazy", _at(_tok(1), offset=-1), E.InvalidInput, r"position -1"),
    Row("positions_pass_bound", "lazy", _at(_rand(3)), E.ContextOverflow,
        r"positions 510\.\.512 go past the exported bound of 512",
        setup=lambda p, s, st: _fill(s, CONTEXT - 2, st)),
    Row("position_at_bound", "lazy", _at(_tok(1)), E.ContextOverflow, r"exported bound of 512",
        setup=lambda p, s, st: _fill(s, CONTEXT, st)),
    Row("position_negative_static", "static", _at(_tok(1), offset=-1), E.InvalidInput,
        r"position -1", isolate=True),
    Row("positions_pass_bound_static", "static", _at(_rand(3)), E.ContextOverflow,
        r"positions 510\.\.512 go past the exported bound of 512",
        setup=lambda p, s, st: _fill(s, CONTEXT - 2, st)),
    Row("position_skips_static", "static", _at(_tok(1), offset=5), E.InvalidInput,
        r"starts at position 5"),
    Row("no_positions", "lazy", _at(torch.zeros((1, 0), dtype=torch.long)), E.InvalidInput,
        r"no positions \(length 0\)"),
    Row("no_positions_static", "static", _at(torch.zeros((1, 0), dtype=torch.long)),
        E.InvalidInput, r"(?i)length 0|no positions|zero", isolate=True),
    # -- wrong dtypes, shapes, layouts, counts ----------------------------------------------
    Row("tokens_int32", "lazy", _at(_tok(1, 2).to(torch.int32)), E.InvalidInput,
        r"input 0 must be int64.*got dtype torch.int32"),
    Row("tokens_float", "static", _at(_tok(1, 2).float()), E.InvalidInput,
        r"input 0 must be int64.*got dtype torch.float32"),
    Row("position_float", "lazy", _run(lambda: [_tok(1), torch.tensor([0.0])]), E.InvalidInput,
        r"input 1 must be int64.*dtype torch.float32"),
    Row("tokens_1d", "lazy", _run(lambda: [torch.tensor([1, 2]), _pos(0)]), E.InvalidInput,
        r"input 0 must have 2 dims .*got shape \[2\]"),
    Row("tokens_too_long", "lazy", _run(lambda: [_rand(MAX_CALL + 1), _pos(0)]), E.InvalidInput,
        r"input 0 must be int64\[1x64\].*got shape \[1, 65\]"),
    Row("tokens_batch_2", "lazy", _run(lambda: [torch.zeros((2, 3), dtype=torch.long), _pos(0)]),
        E.InvalidInput, r"got shape \[2, 3\]"),
    Row("position_shape", "lazy", _run(lambda: [_tok(1), torch.tensor([[0, 1]])]), E.InvalidInput,
        r"input 1 must have 1 dims"),
    Row("tokens_not_contiguous", "lazy",
        _run(lambda: [torch.zeros((4, 2), dtype=torch.long)[:, :1].t(), _pos(0)]),
        E.InvalidInput, r"input 0 must be contiguous"),
    Row("tokens_not_contiguous_static", "static",
        _run(lambda: [torch.zeros((4, 2), dtype=torch.long)[:, :1].t(), _pos(0)]),
        E.InvalidInput, r"input 0 must be contiguous"),
    Row("tokens_requires_grad", "static",
        _run(lambda: [_tok(1).float().requires_grad_(), _pos(0)]), E.InvalidInput,
        r"input 0 must be int64"),
    Row("tokens_python_list", "lazy", _run(lambda: [[[1, 2]], _pos(0)]), E.InvalidInput,
        r"input 0 must be a tensor .*got list"),
    Row("too_few_inputs", "lazy", _run(lambda: [_tok(1)]), E.InvalidInput,
        r"forward takes 2 input\(s\).*got 1"),
    Row("kv_cache_passed_by_user", "lazy",
        _run(lambda: [_tok(1), _pos(0)] + [torch.zeros(1, CONTEXT, 2, 32)] * 4), E.InvalidInput,
        r"got 6; pass the user inputs only, the session supplies the KV cache"),
    Row("inputs_not_a_list", "lazy", _run(lambda: _tok(1)), E.InvalidInput,
        r"inputs must be a list"),
    # -- unknown methods -----------------------------------------------------------------
    Row("unknown_method", "lazy", _run([_tok(1), _pos(0)], method="decode"), E.UnknownMethod,
        r"no method 'decode'; it has \['forward'\]"),
    Row("unknown_method_static", "static", _run([_tok(1), _pos(0)], method="prefill"),
        E.UnknownMethod, r"no method 'prefill'; it has \['forward'\]"),
    Row("unknown_constant_method", "static", lambda p, s, st: p.constant("get_vocab_size"),
        E.UnknownMethod, r"no method 'get_vocab_size'"),
]


def _decode(n):
    """Setup: ``n`` single-token steps, as a generation loop makes them. After the first,
    ``Session.run`` takes its fast path (``runtime_shim/inputs.py``, ``FastCall``), which must refuse
    everything the full checks refuse."""

    def setup(p, s, st):
        for _ in range(n):
            s.run("forward", [_tok(3), _pos(st["pos"])])
            st["pos"] += 1

    return setup


def _then(*setups):
    return lambda p, s, st: [f(p, s, st) for f in setups]


def _step(make):
    """A bad single-token call at the session's next position: ``make(position)``."""
    return lambda p, s, st: s.run("forward", make(st["pos"]))


ROWS += [
    Row(f"{name}_after_decode", "lazy", bad, error, message, setup=setup or _decode(3))
    for name, bad, error, message, setup in [
        ("token_id_eq_vocab", _at(_tok(VOCAB)), E.InvalidInput, r"token id 512, outside", None),
        ("token_id_negative", _at(_tok(-1)), E.InvalidInput, r"token id -1, outside", None),
        ("position_skips", _at(_tok(1), offset=1), E.InvalidInput,
         r"starts at position 4 .* continue at 3", None),
        ("position_repeats", _at(_tok(1), offset=-1), E.InvalidInput,
         r"starts at position 2 .*trim\(1\)", None),
        ("position_at_bound", _at(_tok(1)), E.ContextOverflow, r"positions 512\.\.512 go past",
         _then(lambda p, s, st: _fill(s, CONTEXT - 2, st), _decode(2))),
        ("tokens_int32", _at(_tok(1).to(torch.int32)), E.InvalidInput,
         r"input 0 must be int64.*got dtype torch.int32", None),
        ("tokens_float", _at(_tok(1).float()), E.InvalidInput,
         r"input 0 must be int64.*got dtype torch.float32", None),
        ("position_float", _step(lambda q: [_tok(1), torch.tensor([float(q)])]), E.InvalidInput,
         r"input 1 must be int64.*dtype torch.float32", None),
        ("position_int32", _step(lambda q: [_tok(1), _pos(q).int()]), E.InvalidInput,
         r"input 1 must be int64.*dtype torch.int32", None),
        ("tokens_1d", _step(lambda q: [torch.tensor([1]), _pos(q)]), E.InvalidInput,
         r"input 0 must have 2 dims .*got shape \[1\]", None),
        ("tokens_batch_2", _step(lambda q: [torch.zeros((2, 1), dtype=torch.long), _pos(q)]),
         E.InvalidInput, r"got shape \[2, 1\]", None),
        ("position_shape", _step(lambda q: [_tok(1), torch.tensor([[q]])]), E.InvalidInput,
         r"input 1 must have 1 dims", None),
        ("tokens_python_list", _step(lambda q: [[[1]], _pos(q)]), E.InvalidInput,
         r"input 0 must be a tensor .*got list", None),
        ("too_few_inputs", _step(lambda q: [_tok(1)]), E.InvalidInput,
         r"forward takes 2 input\(s\).*got 1", None),
        ("kv_cache_passed_by_user",
         _step(lambda q: [_tok(1), _pos(q)] + [torch.zeros(1, CONTEXT, 2, 32)] * 4),
         E.InvalidInput, r"got 6; pass the user inputs only", None),
        ("inputs_not_a_list", _run(lambda: _tok(1)), E.InvalidInput, r"inputs must be a list",
         None),
        ("unknown_method", _run([_tok(1), _pos(3)], "decode"),
         E.UnknownMethod, r"no method 'decode'", None),
    ]
]


# -- running a row ----------------------------------------------------------------------------


def _load(kind: str, paths: dict, cache_dir: str):
    from lazykv.runtime_shim import load

    return load(paths[kind], cache_dir=cache_dir)


def run_row(row: Row, prog) -> dict:
    """Run ``row`` on ``prog``; what happened, as a dict (also the subprocess protocol)."""
    state = {"pos": 0}
    s = prog.session()
    try:
        if row.setup:
            row.setup(prog, s, state)
        before = (s.offset, s.kv_bytes, {k: v.clone() for k, v in s.state.items()})
        try:
            row.bad(prog, s, state)
            return {"raised": None, "message": ""}
        except Exception as e:
            out = {"raised": type(e).__name__, "message": str(e),
                   "lazykv": isinstance(e, E.LazyKVError)}
        # The session is as it was, and still works.
        after = (s.offset, s.kv_bytes, s.state)
        out["intact"] = (
            before[0] == after[0] and before[1] == after[1]
            and all(torch.equal(before[2][k], after[2][k]) for k in before[2])
        )
        if state["pos"] < CONTEXT:
            s.run("forward", [_tok(7), _pos(state["pos"])])
            out["usable"] = True
        else:
            out["usable"] = s.trim(1).positions == 1
        return out
    finally:
        s.close()


def _row_in_subprocess(row: Row, paths: dict, cache_dir: str) -> dict:
    code = (
        "import json, sys; sys.path.insert(0, %r); import test_bad_inputs as T; "
        "row = {r.name: r for r in T.ROWS}[%r]; "
        "print('RESULT ' + json.dumps(T.run_row(row, T._load(row.program, %r, %r))))"
        % (str(HERE), row.name, paths, cache_dir)
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    sig = -p.returncode if p.returncode < 0 else None
    return {"raised": f"process died (signal {sig}, exit {p.returncode})",
            "message": p.stderr[-600:], "lazykv": False}


@pytest.fixture(scope="module")
def programs(example_static, example_lazy, tmp_path_factory):
    paths = {"static": str(example_static[1].path), "lazy": str(example_lazy[1].path)}
    cache = str(tmp_path_factory.mktemp("bad_inputs_cache"))
    return paths, cache, {k: _load(k, paths, cache) for k in paths}


# Rows run in a subprocess (they crashed the process once) cost ~10 s each: slow.
@pytest.mark.parametrize("row", [pytest.param(r, id=r.name, marks=[pytest.mark.slow] if r.isolate else [])
                                 for r in ROWS])
def test_bad_input(row: Row, programs):
    paths, cache, progs = programs
    res = _row_in_subprocess(row, paths, cache) if row.isolate else run_row(row, progs[row.program])
    assert res["raised"] is not None, f"{row.name}: no error raised"
    assert res["raised"] == row.error.__name__, (
        f"{row.name}: expected {row.error.__name__}, got {res['raised']}: {res['message'][:600]}"
    )
    assert re.search(row.message, res["message"]), (
        f"{row.name}: message does not name the problem ({row.message!r}):\n{res['message']}"
    )
    assert res["intact"], f"{row.name}: the session changed"
    assert res["usable"], f"{row.name}: the session is unusable afterwards"


# -- corrupt .pte files ----------------------------------------------------------------------------


def _broken_manifest(data: bytes) -> bytes:
    """``data`` (a lazy program) with its lazykv manifest no longer JSON (same length)."""
    from fuzz_mutations import layout_full

    lay = layout_full("lazy", data)
    s, e = lay.segments[lay.manifest_segment]
    return data[:s] + data[s:e].replace(b"{", b"x", 1) + data[e:]


#: name -> (program, what becomes of its bytes (None: the path is not a file), error, message).
PTE_ROWS = {
    "missing_file": ("lazy", None, E.InvalidProgram, r"no such file"),
    "directory": ("lazy", None, E.InvalidProgram, r"is a directory, expected a \.pte file"),
    "empty": ("lazy", lambda b: b"", E.InvalidProgram, r"file is empty"),
    "text_file": ("lazy", lambda b: b"not a program\n" * 20, E.InvalidProgram,
                  r"not an ExecuTorch program \(file identifier"),
    "gguf_file": ("static", lambda b: b"GGUF\x03\0\0\0" + b"\0" * 256, E.InvalidProgram,
                  r"not an ExecuTorch program"),
    "wrong_identifier": ("static", lambda b: b[:4] + b"XX99" + b[8:], E.InvalidProgram,
                         r"file identifier b'XX99', expected 'ETnn'"),
    "truncated_in_header": ("static", lambda b: b[:40], E.InvalidProgram,
                            r"header says the program is \d+ bytes but the file has 40"),
    "truncated_in_segments": ("lazy", lambda b: b[: len(b) // 2], E.InvalidProgram,
                              r"truncated"),
    "manifest_not_json": ("lazy", _broken_manifest, E.ManifestError,
                          r"the lazykv manifest is not valid JSON"),
}


@pytest.mark.parametrize("name", list(PTE_ROWS))
def test_corrupt_pte_refused(name, programs, tmp_path):
    """Refused by ``load`` with the error and a message naming the file and the problem
    (the fuzz test covers many more mutations; these are the plain ones)."""
    from lazykv.runtime_shim import load

    paths, _, _ = programs
    kind, mutate, error, message = PTE_ROWS[name]
    path = tmp_path / ("" if name == "directory" else f"{name}.pte")
    if mutate is not None:
        path.write_bytes(mutate(Path(paths[kind]).read_bytes()))
    with pytest.raises(error) as e:
        load(path, cache_dir=tmp_path / "cache")
    assert type(e.value) is error, f"{name}: {type(e.value).__name__}: {e.value}"
    assert re.search(message, str(e.value)), str(e.value)
    assert str(path) in str(e.value)


# -- sessions: closed, saved, restored -----------------------------------------------------------


def test_session_used_after_close(programs):
    _, _, progs = programs
    s = progs["lazy"].session()
    s.run("forward", [_tok(1, 2), _pos(0)])
    s.run("forward", [_tok(3), _pos(2)])  # a decode step: run's fast path from here on
    s.close()
    s.close()  # idempotent
    for what, call in [
        ("run", lambda: s.run("forward", [_tok(3), _pos(3)])),
        ("trim", lambda: s.trim(1)),
        ("reset", lambda: s.reset()),
        ("save", lambda: s.save("/nonexistent/never.kv")),
    ]:
        with pytest.raises(E.SessionClosed, match=r"closed; open a new one with program.session\(\)"):
            call()
    assert s.kv_bytes == 0


@pytest.fixture(scope="module")
def saved(programs, tmp_path_factory):
    """A session of 40 positions saved to a file, and its continuation's logits."""
    _, _, progs = programs
    prog = progs["lazy"]
    path = tmp_path_factory.mktemp("saved") / "chat.kv"
    with prog.session() as s:
        s.run("forward", [_rand(40, seed=3), _pos(0)])
        s.save(path)
        cont = s.run("forward", [_tok(9), _pos(40)])[0]
    return path, path.read_bytes(), cont


def _header_len(blob: bytes) -> int:
    return 16 + struct.unpack_from("<Q", blob, 8)[0]


def _saved_variant(kind: str, blob: bytes) -> bytes:
    h = _header_len(blob)
    if kind == "truncated_payload":
        return blob[:-100]
    if kind == "truncated_header":
        return blob[: h - 20]
    if kind == "truncated_magic":
        return blob[:10]
    if kind == "empty":
        return b""
    if kind == "corrupt_header_json":
        b = bytearray(blob)
        b[20] ^= 0xFF
        return bytes(b)
    if kind == "corrupt_header_length":
        return blob[:8] + struct.pack("<Q", 2**40) + blob[16:]
    if kind == "corrupt_payload":
        b = bytearray(blob)
        b[h + 1000] ^= 0x40
        return bytes(b)
    if kind == "foreign_file":
        return b"GGUF\x03\x00\x00\x00" + b"\x00" * 256
    if kind == "newer_version":
        return _patch_header(blob, lambda d: d.update(version=99))
    if kind == "positions_out_of_range":
        return _patch_header(blob, lambda d: d.update(positions_filled=10**6))
    if kind == "buffers_renamed":
        return _patch_header(blob, lambda d: d["buffers"][0].update(fqn="other.k_cache"))
    raise KeyError(kind)


def _patch_header(blob: bytes, fn) -> bytes:
    h = _header_len(blob)
    d = json.loads(blob[16:h])
    fn(d)
    raw = json.dumps(d, sort_keys=True).encode()
    return blob[:8] + struct.pack("<Q", len(raw)) + raw + blob[h:]


SAVED_ROWS = [
    ("truncated_payload", r"truncated session file"),
    ("truncated_header", r"header is corrupt or truncated"),
    ("truncated_magic", r"not a lazykv session file"),
    ("empty", r"not a lazykv session file"),
    ("corrupt_header_json", r"header is corrupt or truncated"),
    ("corrupt_header_length", r"corrupt or truncated"),
    ("corrupt_payload", r"session data is corrupt \(its sha256 does not match"),
    ("foreign_file", r"not a lazykv session file"),
    ("newer_version", r"version 99 is newer"),
    ("positions_out_of_range", r"positions_filled 1000000 is out of range"),
    ("buffers_renamed", r"buffers do not match the program"),
]


@pytest.mark.parametrize("kind, message", [pytest.param(k, m, id=k) for k, m in SAVED_ROWS])
def test_bad_session_file_refused(kind, message, saved, programs, tmp_path):
    path, blob, _ = saved
    bad = tmp_path / f"{kind}.kv"
    bad.write_bytes(_saved_variant(kind, blob))
    _, _, progs = programs
    with pytest.raises(E.SessionFileError) as e:
        progs["lazy"].restore(bad)
    assert re.search(message, str(e.value)), str(e.value)
    assert str(bad) in str(e.value)


def test_session_file_from_another_program(saved, programs, example_lazy, tmp_path):
    """Same model, another file (one byte appended): refused by name, with both programs."""
    from lazykv.runtime_shim import load

    path, _, _ = saved
    paths, cache, _ = programs
    other = tmp_path / "other.pte"
    other.write_bytes(Path(paths["lazy"]).read_bytes() + b"\0" * 128)
    prog2 = load(str(other), cache_dir=cache)
    with pytest.raises(E.SessionFileError, match=r"saved from a different program .* load that program"):
        prog2.restore(path)


def test_session_file_into_static_program(saved, programs):
    path, _, _ = saved
    _, _, progs = programs
    with pytest.raises(E.SessionFileError, match="different program"):
        progs["static"].restore(path)


def test_good_session_file_restores_exactly(saved, programs):
    path, _, cont = saved
    _, _, progs = programs
    with progs["lazy"].restore(path) as r:
        assert r.offset == 40
        got = r.run("forward", [_tok(9), _pos(40)])[0]
    assert torch.equal(got, cont)


# -- growth past max_bytes ---------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["doubling", "step:48", "hybrid:start=16,linear_after=64KiB,increment=16KiB"])
def test_growth_past_max_bytes_leaves_session_intact(policy, programs):
    from lazykv.runtime_shim import load

    paths, cache, progs = programs
    ref_prog = progs["lazy"]
    bpp = ref_prog.bytes_per_position
    budget = 100 * bpp
    prog = load(paths["lazy"], policy=policy, max_bytes=budget, cache_dir=cache)
    st = {"pos": 0}
    with prog.session() as s, ref_prog.session() as ref:
        st_ref = {"pos": 0}
        _fill(s, 90, st)
        _fill(ref, 90, st_ref)
        before = {k: v.clone() for k, v in s.state.items()}
        with pytest.raises(E.MemoryBudgetExceeded) as e:
            s.run("forward", [_rand(20, seed=5), _pos(90)])
        msg = str(e.value)
        assert f"max_bytes is {budget}" in msg and "holding 110 positions" in msg, msg
        assert "trim or reset" in msg
        assert s.offset == 90 and s.kv_bytes <= budget
        assert all(torch.equal(before[k], v) for k, v in s.state.items())
        # Up to the budget still works, bit-identical to a session without a budget.
        for i in range(10):
            t = _tok(11 + i)
            a = s.run("forward", [t, _pos(90 + i)])[0]
            b = ref.run("forward", [t, _pos(90 + i)])[0]
            assert torch.equal(a, b), f"step {i}"
        assert s.offset == 100 and s.kv_bytes == budget
        with pytest.raises(E.MemoryBudgetExceeded):
            s.run("forward", [_tok(1), _pos(100)])
        assert s.offset == 100


# -- acceptance: a 1,000-token generation hits max_bytes mid-way -------------------------------


@pytest.fixture(scope="module")
def example_lazy_2048(tmp_path_factory):
    """The example decoder, lazy, max context 2,048 (the shared fixture stops at 512)."""
    import warnings

    from lazykv.export import ExportConfig, export_model

    cfg = ExportConfig(model="example", max_context=2048, lazy_kv_cache=True)
    out = tmp_path_factory.mktemp("pte2048") / "example_lazy_2048.pte"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cfg, export_model(cfg, out)


def test_acceptance_1000_tokens_hit_max_bytes_then_trim(example_lazy_2048, tmp_path_factory):
    """Generate up to 1,000 tokens under a budget of 600 positions (+ half a position):
    the error arrives exactly when position 600 would be filled, the session is intact,
    and after ``trim`` it continues with logits bit-identical to a fresh session (no
    budget) fed the same tokens, up to the budget again."""
    from lazykv.runtime_shim import load

    path = example_lazy_2048[1].path
    cache = tmp_path_factory.mktemp("acceptance_cache")
    ref_prog = load(path, cache_dir=cache)
    bpp = ref_prog.bytes_per_position
    afford = 600
    budget = afford * bpp + bpp // 2
    prog = load(path, policy="doubling", max_bytes=budget, cache_dir=cache)
    assert prog.max_positions == 2048

    prompt = _rand(16, seed=42)
    fed = prompt[0].tolist()  # every token fed, in order
    s = prog.session()
    out = s.run("forward", [prompt, _pos(0)])[0]
    error = None
    before = None
    for _ in range(1000):
        tok = int(out[0, -1].argmax())
        pos = s.offset
        if pos >= afford - 1:
            before = {k: v.clone() for k, v in s.state.items()}
        try:
            out = s.run("forward", [_tok(tok), _pos(pos)])[0]
        except E.MemoryBudgetExceeded as e:
            error = (pos, str(e))
            break
        fed.append(tok)
    assert error is not None, "the budget was never hit"
    pos, msg = error
    assert pos == afford, f"the error arrived at position {pos}, expected {afford}"
    assert f"holding {afford + 1} positions" in msg and f"max_bytes is {budget}" in msg, msg
    # Intact: same positions, same bytes (within the budget), same contents.
    assert s.offset == afford and s.capacity == afford and s.kv_bytes == afford * bpp <= budget
    assert all(torch.equal(before[k], v) for k, v in s.state.items())
    assert len(fed) == afford

    # Trim 200 positions; continue greedily, checking every logit against a fresh session
    # fed the very same tokens the same way (prompt in one call, then one token a call).
    freed = s.trim(200)
    assert freed.positions == 200 and s.offset == 400 and freed.bytes > 0
    fresh = ref_prog.session()
    fresh.run("forward", [prompt, _pos(0)])
    for t in fed[16:400]:
        fresh.run("forward", [_tok(t), _pos(fresh.offset)])
    tok = fed[400]  # what the session generated at position 399 the first time
    regenerated = []
    max_diff = 0.0
    while s.offset < afford:
        a = s.run("forward", [_tok(tok), _pos(s.offset)])[0]
        b = fresh.run("forward", [_tok(tok), _pos(fresh.offset)])[0]
        max_diff = max(max_diff, (a - b).abs().max().item())
        assert torch.equal(a, b), f"logits differ at position {s.offset - 1}"
        regenerated.append(tok)
        tok = int(a[0, -1].argmax())
    assert max_diff == 0.0
    # Greedy decoding from the same prefix regenerates the same tokens.
    assert regenerated == fed[400:afford]
    with pytest.raises(E.MemoryBudgetExceeded):
        s.run("forward", [_tok(tok), _pos(afford)])
    assert s.offset == afford
    print(f"\nacceptance max_bytes: MemoryBudgetExceeded at position {pos} (expected {afford} = "
          f"max_bytes {budget} // {bpp} bytes a position) after {len(fed) - 16} of up to 1000 "
          f"generated tokens; kv_bytes then {afford * bpp}, state intact; trim(200) freed "
          f"{freed.bytes} bytes; {len(regenerated)} continued positions vs a fresh session: "
          f"max |diff| {max_diff}, tokens equal {regenerated == fed[400:afford]}; "
          f"budget hit again at {s.offset}")
    s.close()
    fresh.close()


# -- a failed allocation -------------------------------------------------------------------


class _FlakyAllocator:
    """The default allocator, failing (or misbehaving) on demand."""

    def __init__(self, mode=None):
        from lazykv.runtime_shim import TorchAllocator

        self.inner = TorchAllocator()
        self.mode = mode

    def _check(self, shape, dtype):
        if self.mode == "oom":
            raise MemoryError(f"cannot allocate {list(shape)}")
        if self.mode == "wrong_shape":
            return torch.empty([shape[0], shape[1], shape[2] * 2, shape[3] // 2], dtype=dtype)
        return None

    def allocate(self, shape, dtype, *, name=""):
        return self._check(shape, dtype) or self.inner.allocate(shape, dtype, name=name)

    def reallocate(self, old, shape, *, keep, axis, name=""):
        bad = self._check(shape, old.dtype)
        return bad if bad is not None else self.inner.reallocate(old, shape, keep=keep, axis=axis, name=name)

    def free(self, tensor, *, name=""):
        self.inner.free(tensor, name=name)


@pytest.mark.parametrize("mode, message", [
    ("oom", r"growing KV buffer '.*' to 32 positions \(\d+ bytes\) failed \(MemoryError: "
            r"cannot allocate .*\); the session is unchanged"),
    ("wrong_shape", r"the allocator _FlakyAllocator returned \(1, 32, 4, 16\) torch.float32 .*"
                    r"it must return a contiguous CPU tensor \(1, 32, 2, 32\)"),
])
def test_failed_allocation_leaves_session_intact(mode, message, programs):
    from lazykv.runtime_shim import DynamicAllocator, load

    DynamicAllocator.register(_FlakyAllocator)
    paths, cache, progs = programs
    alloc = _FlakyAllocator()
    prog = load(paths["lazy"], policy="doubling", allocator=alloc, cache_dir=cache)
    st = {"pos": 0}
    with prog.session() as s, progs["lazy"].session() as ref:
        st_ref = {"pos": 0}
        _fill(s, 16, st)  # exactly the first doubling step: the next token grows to 32
        _fill(ref, 16, st_ref)
        before = {k: v.clone() for k, v in s.state.items()}
        kv_bytes = s.kv_bytes
        alloc.mode = mode
        with pytest.raises(E.AllocationFailed) as e:
            s.run("forward", [_tok(5), _pos(16)])
        assert re.search(message, str(e.value)), str(e.value)
        assert s.offset == 16 and s.kv_bytes == kv_bytes and s.capacity == 16
        assert all(torch.equal(before[k], v) for k, v in s.state.items())
        alloc.mode = None  # memory is back: the same call works, bit-identical
        a = s.run("forward", [_tok(5), _pos(16)])[0]
        b = ref.run("forward", [_tok(5), _pos(16)])[0]
        assert torch.equal(a, b) and s.capacity == 32
