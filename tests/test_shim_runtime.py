"""The runtime shim on the real ExecuTorch runtime (no mocks).

The lazy program is the project's own lazy export (conftest fixtures), never a stand-in.
The static program runs on the stock runtime as the reference: logits must match
bit for bit (max |diff| == 0.0).
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from lazykv.errors import (
    ContextOverflow,
    InvalidInput,
    MemoryBudgetExceeded,
    SessionClosed,
    SessionFileError,
    UnknownMethod,
)
from lazykv.format.pte import open_pte
from lazykv.runtime_shim import (
    Doubling,
    Hybrid,
    Preallocate,
    Step,
    load,
    parse_policy,
)
from lazykv.runtime_shim.policy import PolicyError

CONTEXT = 4096
VOCAB = 1024
POLICIES = ["doubling", "step:256", "step:48", "hybrid", "hybrid:start=16,linear_after=256KiB,increment=64KiB", "preallocate"]


def _report_path(r):
    return str(r[1].path if isinstance(r, tuple) else r.path)


@pytest.fixture(scope="session")
def shim_static_pte(llama_tiny_static):
    """Path of the static tiny Llama (the reference)."""
    return _report_path(llama_tiny_static)


@pytest.fixture(scope="session")
def shim_lazy_pte(llama_tiny_lazy):
    """Path of the lazy tiny Llama (same weights as the static one)."""
    p = _report_path(llama_tiny_lazy)
    assert open_pte(p).manifest is not None, "the lazy export carries no manifest"
    return p


@pytest.fixture(scope="session")
def shim_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("shim_cache"))


@pytest.fixture(scope="session")
def static_method(shim_static_pte):
    from lazykv.runtime_shim.program import _runtime

    return _runtime().load_program(shim_static_pte).load_method("forward")


@pytest.fixture(scope="session")
def lazy_prog(shim_lazy_pte, shim_cache):
    return load(shim_lazy_pte, policy="doubling", cache_dir=shim_cache)


def _pos(p):
    return torch.tensor([p], dtype=torch.long)


def _prompt(n, seed=0):
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def _last(logits):
    return int(logits.reshape(-1, logits.shape[-1])[-1].argmax())


# -- exactness ---------------------------------------------------------------------------


def _prompt_then_decode_exact(prog, static_method, toks, steps=200):
    """A prompt then ``steps`` greedy steps through ``prog``'s session, each call's logits
    equal bit for bit to the static program's on the stock runtime; the session's stats."""
    n = toks.shape[1]
    with prog.session() as s:
        ref = static_method.execute([toks, _pos(0)])[0]
        got = s.run("forward", [toks, _pos(0)])[0]
        assert torch.equal(ref, got) and (ref - got).abs().max().item() == 0.0
        nxt = _last(got)
        for i in range(steps):
            t = torch.tensor([[nxt]])
            ref = static_method.execute([t, _pos(n + i)])[0]
            got = s.run("forward", [t, _pos(n + i)])[0]
            assert (ref - got).abs().max().item() == 0.0, f"step {i}"
            assert not torch.isnan(got).any()
            nxt = _last(got)
        assert s.offset == n + steps
        st = s.stats
        assert st.positions_filled == n + steps and st.current_bytes == s.kv_bytes
        return st


@pytest.mark.parametrize("policy", POLICIES)
def test_bit_exact_prompt_then_decode(policy, shim_lazy_pte, shim_cache, static_method):
    """64-token prompt + 200 greedy decode steps: lazy via shim == static via stock runtime."""
    prog = load(shim_lazy_pte, policy=policy, cache_dir=shim_cache)
    st = _prompt_then_decode_exact(prog, static_method, _prompt(64, seed=1))
    if policy != "preallocate":
        assert st.grow_events >= 8  # at least the first allocation of 8 buffers


@pytest.fixture(scope="session")
def example_pair(example_static, example_lazy):
    """(lazy path, static method on the stock runtime) of the project's example decoder."""
    from lazykv.runtime_shim.program import _runtime

    static = _runtime().load_program(str(example_static[1].path)).load_method("forward")
    return str(example_lazy[1].path), static


@pytest.mark.parametrize("policy", POLICIES)
def test_example_model_bit_exact_prompt_then_decode(policy, example_pair, shim_cache):
    """The example decoder (vocab 512, context 512): the same 64 + 200 as the tiny Llama."""
    lazy_path, static_method = example_pair
    prog = load(lazy_path, policy=policy, cache_dir=shim_cache)
    toks = torch.randint(0, 512, (1, 64), generator=torch.Generator().manual_seed(4))
    _prompt_then_decode_exact(prog, static_method, toks)


def test_decode_steps_skip_the_full_checks_until_storage_changes(lazy_prog, monkeypatch):
    """A decode step whose storage already holds its position goes through
    ``inputs.FastCall`` (no ``MethodInfo`` full checks); the step that grows the storage, a
    prompt, and the first step after a trim that shrinks run the full checks. Positions
    re-run after a trim give the same logits as the first time."""
    from lazykv.runtime_shim.inputs import MethodInfo

    full = []
    real = MethodInfo._check_each
    monkeypatch.setattr(MethodInfo, "_check_each", lambda *a: (full.append(1), real(*a))[1])
    with lazy_prog.session() as s:
        first = _last(s.run("forward", [_prompt(10, seed=3), _pos(0)])[0])
        assert len(full) == 1
        grows, logits, tok = 0, [], first
        for i in range(100):
            cap = s.capacity
            out = s.run("forward", [torch.tensor([[tok]]), _pos(10 + i)])[0]
            logits.append(out.clone())
            tok = _last(out)
            grows += s.capacity != cap
        assert grows >= 2 and len(full) == 1 + grows, (grows, len(full))
        assert s.trim(30).positions == 30 and s.capacity >= 80  # doubling keeps 128
        tok = _last(logits[69])  # the token the first pass fed at position 80
        for i in range(80, 110):
            out = s.run("forward", [torch.tensor([[tok]]), _pos(i)])[0]
            assert torch.equal(out, logits[i - 10]), f"position {i}"
            tok = _last(out)
        assert len(full) == 1 + grows  # trim kept the storage: still the fast path
        s.trim(100)  # shrinks the storage: the next step runs the full checks again
        s.run("forward", [torch.tensor([[tok]]), _pos(s.offset)])
        assert len(full) == 2 + grows


def test_static_pte_runs_unchanged(shim_static_pte, static_method, shim_cache):
    prog = load(shim_static_pte, cache_dir=shim_cache)
    assert not prog.lazy and prog.runtime_path == shim_static_pte
    assert "forward" in prog.method_names and "get_vocab_size" in prog.method_names
    toks = _prompt(16, seed=2)
    with prog.session() as s:
        got = s.run("forward", [toks, _pos(0)])[0]
        ref = static_method.execute([toks, _pos(0)])[0]
        assert (ref - got).abs().max().item() == 0.0
        assert s.kv_bytes == 0
    assert int(prog.constant("get_vocab_size")) == VOCAB


# -- memory ------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["doubling", "step:256", "step:100", "hybrid", "preallocate"])
def test_memory_bounds_per_policy(policy, shim_lazy_pte, shim_cache):
    prog = load(shim_lazy_pte, policy=policy, cache_dir=shim_cache)
    pol = parse_policy(policy)
    bpp = prog.bytes_per_position
    bound = prog.max_positions
    with prog.session() as s:
        if isinstance(pol, Preallocate):
            assert s.kv_bytes == bound * bpp
        else:
            assert s.kv_bytes == 0
        n = 0
        for length in [5, 1, 1, 30, 127, 1, 1, 100, 127, 127, 3]:
            s.run("forward", [_prompt(length), _pos(n)])
            n += length
            cap = s.capacity
            assert cap >= n and s.kv_bytes == cap * bpp
            if isinstance(pol, Doubling):
                assert cap <= max(pol.initial_positions, 2 * n)
            elif isinstance(pol, Step):
                assert cap <= n + pol.step
            elif isinstance(pol, Preallocate):
                assert cap == bound
            elif isinstance(pol, Hybrid):
                assert cap <= max(pol.start, 2 * n)
            # Layers grow one at a time: transient <= committed + one buffer.
            one_buffer = s.kv_bytes // len(prog.buffers)
            assert s.stats.peak_bytes <= s.kv_bytes + one_buffer


def test_trim_reset_close_give_memory_back(shim_lazy_pte, shim_cache, static_method):
    prog = load(shim_lazy_pte, policy="step:64", cache_dir=shim_cache)
    s = prog.session()
    toks = _prompt(127, seed=3)
    s.run("forward", [toks, _pos(0)])
    s.run("forward", [toks[:, :73], _pos(127)])  # 200 positions -> 256 capacity
    assert s.capacity == 256
    freed = s.trim(150)
    assert freed.positions == 150 and s.offset == 50
    assert s.capacity == 64 and freed.bytes == (256 - 64) * prog.bytes_per_position
    # The prefix survives the shrink: continuing matches the static program fed alike.
    static_method.execute([toks, _pos(0)])
    static_method.execute([toks[:, :73], _pos(127)])
    t = torch.tensor([[7]])
    ref = static_method.execute([t, _pos(50)])[0]
    got = s.run("forward", [t, _pos(50)])[0]
    assert (ref - got).abs().max().item() == 0.0
    assert s.trim(10_000).positions == 51
    s.run("forward", [toks[:, :10], _pos(0)])
    freed = s.reset()
    assert freed.positions == 10 and s.kv_bytes == 0 and freed.bytes == 64 * prog.bytes_per_position
    s.close()
    s.close()  # idempotent
    with pytest.raises(SessionClosed):
        s.run("forward", [toks, _pos(0)])


def _status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _rss():
    return _status("VmRSS")


def test_close_returns_rss(shim_lazy_pte, shim_cache):
    prog = load(shim_lazy_pte, policy="preallocate", cache_dir=shim_cache)
    with prog.session() as warm:  # warm up the runtime's own allocations
        warm.run("forward", [_prompt(8), _pos(0)])
    base = _rss()
    s = prog.session()
    n = 0
    while n + 127 <= 3000:
        s.run("forward", [_prompt(127), _pos(n)])
        n += 127
    grown = _rss()
    kv_touched = n * prog.bytes_per_position
    assert grown - base >= 0.8 * kv_touched
    s.close()
    assert _rss() - base <= 0.05 * kv_touched + (1 << 20)


def test_grow_in_a_decode_step_frees_each_old_buffer_as_it_goes(shim_lazy_pte, shim_cache):
    """A decode step that doubles the storage (2048 -> 4096 positions) raises the
    process's peak RSS by at most one buffer's old + new storage above what stays
    committed: the old buffers die one at a time, in RSS and not only in the counters."""
    prog = load(shim_lazy_pte, policy="doubling", cache_dir=shim_cache)
    with prog.session() as s:
        while s.offset < 2047:
            n = min(127, 2047 - s.offset)
            s.run("forward", [_prompt(n, seed=s.offset), _pos(s.offset)])
        s.run("forward", [torch.tensor([[1]]), _pos(2047)])  # a decode step that fits
        assert s.capacity == 2048
        one_old = s.kv_bytes // len(prog.buffers)
        s.run("forward", [torch.tensor([[1]]), _pos(2048)])  # warms a call at this size
        s.trim(2)
        assert s.capacity == 2048  # doubling holds 2048 for 2047
        s.run("forward", [torch.tensor([[1]]), _pos(2047)])  # fits: the fast path again
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS
        except OSError:
            pytest.skip("cannot reset the peak RSS here (/proc/self/clear_refs)")
        s.run("forward", [torch.tensor([[1]]), _pos(2048)])  # grows to 4096
        assert s.capacity == 4096
        excess = _status("VmHWM") - _status("VmRSS")
        assert excess <= 3 * one_old + (1 << 20), (
            f"peak RSS {excess / 2**20:.1f} MiB above what stays; one buffer is "
            f"{one_old / 2**20:.1f} MiB old, {2 * one_old / 2**20:.1f} MiB new"
        )


def test_trim_and_reset_return_rss(shim_lazy_pte, shim_cache):
    """trim and reset give pages back to the OS, not only to a counter."""
    prog = load(shim_lazy_pte, policy="step:256", cache_dir=shim_cache)
    with prog.session() as warm:
        warm.run("forward", [_prompt(8), _pos(0)])
    base = _rss()
    with prog.session() as s:
        while s.offset + 127 <= 3000:
            s.run("forward", [_prompt(127), _pos(s.offset)])
        held = s.kv_bytes
        grown = _rss()
        assert grown - base >= 0.8 * held
        freed = s.trim(s.offset - 100)  # 100 positions left: one step of 256
        assert s.capacity == 256 and freed.bytes == held - 256 * prog.bytes_per_position
        assert grown - _rss() >= 0.8 * freed.bytes
        s.reset()
        assert s.kv_bytes == 0
        assert _rss() - base <= 0.05 * held + (1 << 20)


# -- errors leave the session usable ---------------------------------------------------------


def test_context_overflow_before_runtime(shim_lazy_pte, shim_cache):
    prog = load(shim_lazy_pte, policy="doubling", cache_dir=shim_cache)
    with prog.session() as s:
        n = 0
        while n + 127 <= CONTEXT - 4:
            s.run("forward", [_prompt(127), _pos(n)])
            n += 127
        rest = CONTEXT - n
        with pytest.raises(ContextOverflow, match="exported bound"):
            s.run("forward", [_prompt(rest + 1), _pos(n)])
        assert s.offset == n
        s.run("forward", [_prompt(rest), _pos(n)])  # exactly up to the bound: fine
        assert s.offset == CONTEXT and s.capacity == CONTEXT
        with pytest.raises(ContextOverflow):
            s.run("forward", [_prompt(1), _pos(CONTEXT)])
        s.trim(1)
        s.run("forward", [_prompt(1), _pos(CONTEXT - 1)])


def test_memory_budget_before_runtime(shim_lazy_pte, shim_cache, static_method):
    prog = load(shim_lazy_pte, policy="doubling", cache_dir=shim_cache)
    budget = 100 * prog.bytes_per_position
    prog_b = load(shim_lazy_pte, policy="doubling", max_bytes=budget, cache_dir=shim_cache)
    toks = _prompt(64, seed=4)
    with prog_b.session() as s:
        s.run("forward", [toks, _pos(0)])
        with pytest.raises(MemoryBudgetExceeded, match="max_bytes"):
            s.run("forward", [_prompt(40), _pos(64)])
        assert s.offset == 64 and s.kv_bytes <= budget
        # Doubling would want 128 positions; the budget clamps it to 100.
        t = torch.tensor([[3]])
        static_method.execute([toks, _pos(0)])  # the static cache holds positions 0..63 too
        ref = static_method.execute([t, _pos(64)])[0]
        got = s.run("forward", [t, _pos(64)])[0]
        assert (ref - got).abs().max().item() == 0.0
        assert s.capacity == 100 and s.kv_bytes == budget
    with pytest.raises(MemoryBudgetExceeded):
        load(shim_lazy_pte, policy="preallocate", max_bytes=budget, cache_dir=shim_cache).session()


def test_unknown_method_lists_names(lazy_prog):
    with lazy_prog.session() as s:
        with pytest.raises(UnknownMethod, match="forward"):
            s.run("decode", [_prompt(1), _pos(0)])


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda: [_prompt(4).to(torch.int32), _pos(0)], "dtype"),
        (lambda: [_prompt(4)[0], _pos(0)], "dims"),
        (lambda: [_prompt(200), _pos(0)], "shape"),
        (lambda: [torch.randint(0, 9, (8, 1))[::2].t(), _pos(0)], "contiguous"),
        (lambda: [_prompt(4)], "input"),
        (lambda: [_prompt(4), _pos(0)] + [torch.zeros(1, 4096, 4, 32)] * 8, "KV cache"),
        (lambda: [_prompt(4), _pos(3)], "continue at 0"),
        (lambda: [_prompt(4), torch.tensor([0.0])], "dtype"),
        (lambda: [_prompt(4), torch.tensor([[0, 1]])], "shape|dims"),
        (lambda: _prompt(4), "list"),
    ],
)
def test_bad_inputs_refused_without_crash(bad, match, lazy_prog, static_method):
    with lazy_prog.session() as s:
        with pytest.raises(InvalidInput, match=match):
            s.run("forward", bad())
        assert s.offset == 0 and s.kv_bytes == 0
        toks = _prompt(4)
        got = s.run("forward", [toks, _pos(0)])[0]
        ref = static_method.execute([toks, _pos(0)])[0]
        assert (ref - got).abs().max().item() == 0.0


def test_policy_strings():
    assert parse_policy("doubling") == Doubling()
    assert parse_policy("step") == Step(256)
    assert parse_policy("step:64") == Step(64)
    assert parse_policy("hybrid:start=128,linear_after=1MiB,increment=64KiB") == Hybrid(128, 1 << 20, 64 << 10)
    assert parse_policy("preallocate") == Preallocate()
    for p in [Doubling(), Step(64), Hybrid(), Preallocate()]:
        assert parse_policy(p.spec()) == p
    for bad in ["grow", "step:0", "step:x", "hybrid:foo=1"]:
        with pytest.raises(PolicyError):
            parse_policy(bad)
    h = Hybrid(start=256, linear_after=2 << 20, increment=1 << 19)
    # 4096 B/position: doubles 256 -> 512 (1 MiB < 2 MiB), then +128 positions (512 KiB) per step.
    assert h.capacity(300, 10_000, 4096) == 512
    assert h.capacity(600, 10_000, 4096) == 640
    assert h.capacity(9_999, 4096, 4096) == 4096


# -- sessions ------------------------------------------------------------------------------


def _greedy(session, prompt, steps, start_tokens=None):
    out = session.run("forward", [prompt, _pos(session.offset)])[0]
    toks = [_last(out)]
    for _ in range(steps):
        out = session.run("forward", [torch.tensor([[toks[-1]]]), _pos(session.offset)])[0]
        toks.append(_last(out))
    return toks


def test_two_interleaved_sessions_equal_solo(lazy_prog):
    pa, pb = _prompt(20, seed=10), _prompt(33, seed=11)
    with lazy_prog.session() as s:
        solo_a = _greedy(s, pa, 30)
    with lazy_prog.session() as s:
        solo_b = _greedy(s, pb, 30)
    a, b = lazy_prog.session(), lazy_prog.session()
    ta = [_last(a.run("forward", [pa, _pos(0)])[0])]
    tb = [_last(b.run("forward", [pb, _pos(0)])[0])]
    for _ in range(30):
        ta.append(_last(a.run("forward", [torch.tensor([[ta[-1]]]), _pos(a.offset)])[0]))
        tb.append(_last(b.run("forward", [torch.tensor([[tb[-1]]]), _pos(b.offset)])[0]))
    assert ta == solo_a and tb == solo_b
    assert a.kv_bytes + b.kv_bytes == a.capacity * lazy_prog.bytes_per_position * 1 + b.capacity * lazy_prog.bytes_per_position
    a.close()
    b.close()


def test_save_restore_round_trip(lazy_prog, shim_lazy_pte, shim_cache, tmp_path):
    path = tmp_path / "chat.kv"
    prompt = _prompt(40, seed=12)
    with lazy_prog.session() as s:
        first = _greedy(s, prompt, 5)
        size = s.save(path)
        assert size < 45 * lazy_prog.bytes_per_position + 4096  # only the filled prefix
        assert size >= 45 * lazy_prog.bytes_per_position
        cont = _greedy(s, torch.tensor([[first[-1]]]), 10)
    with lazy_prog.restore(path) as r:
        assert r.offset == 45
        assert _greedy(r, torch.tensor([[first[-1]]]), 10) == cont
    # Another program (here: a different file) refuses the session file.
    other = tmp_path / "other.pte"
    shutil.copyfile(shim_lazy_pte, other)
    with open(other, "ab") as f:
        f.write(b"\0" * 128)
    prog2 = load(str(other), cache_dir=shim_cache)
    with pytest.raises(SessionFileError, match="different program"):
        prog2.restore(path)
    junk = tmp_path / "junk.kv"
    junk.write_bytes(b"not a session")
    with pytest.raises(SessionFileError):
        lazy_prog.restore(junk)
    trunc = tmp_path / "trunc.kv"
    trunc.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(SessionFileError, match="truncated"):
        lazy_prog.restore(trunc)


# -- binding -------------------------------------------------------------------------------


def _files_under(*roots):
    return {os.path.join(d, f): os.path.getsize(os.path.join(d, f))
            for r in roots for d, _, fs in os.walk(r) for f in fs}


def test_load_writes_no_copy_of_the_program(shim_lazy_pte, tmp_path, monkeypatch):
    """A first load of a lazy .pte (a path never seen: it is hashed and verified) writes
    only small metadata under the cache folder, nothing else under HOME or TMPDIR; the
    program then runs from the original file, and the next load verifies nothing."""
    import tempfile

    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    tmp.mkdir()
    for var in ("LAZYKV_CACHE_DIR", "XDG_CACHE_HOME", "LAZYKV_CACHE_MAX_BYTES"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", None)  # tempfile reads TMPDIR once
    src = tmp_path / "model.pte"
    shutil.copyfile(shim_lazy_pte, src)
    prog = load(src)
    assert prog.lazy and prog.cache_hit is False and prog.runtime_path == str(src)
    assert len(prog.digest) == 64  # hashed by a thread, which then stores the metadata
    written = _files_under(home, tmp)
    cache = str(home / ".cache" / "lazykv")
    assert written and all(p.startswith(cache + os.sep) for p in written), written
    assert max(written.values()) < 1 << 20 and sum(written.values()) < 1 << 20, written
    with prog.session() as s:
        s.run("forward", [_prompt(5), _pos(0)])
    assert load(src).cache_hit is True
    assert _files_under(home, tmp) == written


def test_bytes_source_runs_from_the_callers_buffer(shim_lazy_pte, lazy_prog, tmp_path):
    """A program given as bytes is read in place (the bytes object is kept, not copied,
    no file is written but its metadata) and computes what the same file does."""
    data = open(shim_lazy_pte, "rb").read()
    prog = load(data, cache_dir=tmp_path)
    assert prog.source == "<bytes>" and prog.runtime_path is None and prog.lazy
    assert prog._engine._native.data is data
    assert prog.digest == lazy_prog.digest
    assert all(n < 1 << 20 for n in _files_under(tmp_path).values())
    toks = _prompt(9, seed=4)
    with prog.session() as a, lazy_prog.session() as b:
        x, y = a.run("forward", [toks, _pos(0)])[0], b.run("forward", [toks, _pos(0)])[0]
        assert torch.equal(x, y)
        for i in range(5):
            t = torch.tensor([[_last(x)]])
            x, y = a.run("forward", [t, _pos(9 + i)])[0], b.run("forward", [t, _pos(9 + i)])[0]
            assert torch.equal(x, y)
    from lazykv.runtime_shim.generate import kv_figures

    assert prog.footprint() == lazy_prog.footprint() and kv_figures(prog) == kv_figures(lazy_prog)


def test_missing_native_runtime_is_a_clear_error(shim_lazy_pte, shim_cache, tmp_path, monkeypatch):
    """Without lazykv's native runtime nothing loads, and the error names the fix."""
    from lazykv.errors import NativeRuntimeMissing
    from lazykv.runtime_shim import native_runtime

    monkeypatch.setattr(native_runtime, "_LIB", None)
    monkeypatch.setenv(native_runtime.ENV_LIBRARY, str(tmp_path / "liblazykv_native.so"))
    with pytest.raises(NativeRuntimeMissing, match=r"make venv") as e:
        load(shim_lazy_pte, cache_dir=shim_cache)
    assert str(tmp_path / "liblazykv_native.so") in str(e.value)


# -- CLI -----------------------------------------------------------------------------------


def test_cli_generate_json_and_plot(shim_lazy_pte, shim_cache, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from lazykv.cli.generate_cmd import generate

    monkeypatch.setenv("LAZYKV_CACHE_DIR", shim_cache)
    png = tmp_path / "mem.png"
    r = CliRunner().invoke(
        generate,
        [shim_lazy_pte, "--prompt-len", "20", "--new-tokens", "12", "--policy", "step:16",
         "--json", "--plot", str(png), "--sessions", "2"],
        obj={},
    )
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    t = d["totals"]
    for k in ("kv_bytes_after_load", "kv_bytes_after_prefill", "kv_bytes_end",
              "peak_kv_bytes", "decode_tokens_per_s"):
        assert k in t
    assert t["kv_bytes_after_load"] == 0
    assert len(d["sessions"]) == 2 and len(d["sessions"][0]["tokens"]) == 12
    assert t["kv_bytes_end"] == 2 * 32 * 4096
    assert png.stat().st_size > 1000
    assert "tokens/s" in r.stderr
