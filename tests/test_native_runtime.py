"""runtime_shim.native_runtime: the C++ loader and sessions from Python (ctypes over the
C ABI), in the same process as ExecuTorch's stock runtime."""

from __future__ import annotations

import os

import pytest
import torch

from lazykv import errors
from lazykv.runtime_shim import load
from lazykv.runtime_shim.native_runtime import NativeProgram, NativeSession


def _tok(t, pos):
    return [torch.tensor([t], dtype=torch.long).reshape(1, -1), torch.tensor([pos], dtype=torch.long)]


@pytest.fixture(scope="module")
def native_lazy(llama_tiny_lazy):
    return NativeProgram(llama_tiny_lazy[1].path, policy="step:8")


def test_native_session_bit_exact_against_stock(native_lazy, llama_tiny_static, stock_runtime, tmp_path):
    """Prefill + 20 greedy steps: tokens and logits equal the static program's on the
    stock runtime (max |diff| 0.0); KV bytes 0 after load; nothing written to disk."""
    cache = os.environ["LAZYKV_CACHE_DIR"]
    before = sorted(os.listdir(cache)) if os.path.isdir(cache) else []
    prog = NativeProgram(native_lazy.source)
    assert (sorted(os.listdir(cache)) if os.path.isdir(cache) else []) == before
    assert 0 < prog.region_bytes < 1 << 20
    sm = stock_runtime.load_program(str(llama_tiny_static[1].path)).load_method("forward")
    prompt = torch.arange(3, 19).reshape(1, 16)
    with prog.session() as s:
        assert s.kv_bytes == 0
        got = s.run("forward", [prompt, torch.tensor([0])])[0]
        want = sm.execute([prompt, torch.tensor([0])])[0]
        diff = float((got - want).abs().max())
        tok = int(want.reshape(-1)[-1024:].argmax()) if want.numel() >= 1024 else int(want.argmax())
        for i in range(20):
            g = s.run("forward", _tok(tok, 16 + i))[0]
            w = sm.execute(_tok(tok, 16 + i))[0]
            diff = max(diff, float((g - w).abs().max()))
            tok = int(w.argmax())
        assert diff == 0.0
        assert s.stats["positions_filled"] == 36 and s.kv_bytes > 0


def test_native_refusals_are_lazykv_errors(native_lazy):
    with native_lazy.session() as s:
        with pytest.raises(errors.InvalidInput, match="continue at 0"):
            s.run("forward", _tok(1, 5))
        with pytest.raises(errors.InvalidInput, match="vocabulary"):
            s.run("forward", _tok(10**6, 0))
        with pytest.raises(errors.UnknownMethod):
            s.run("nope", _tok(1, 0))
        with pytest.raises(errors.InvalidInput, match="dtype"):
            s.run("forward", [torch.zeros((1, 1)), torch.tensor([0])])
        s.run("forward", _tok(1, 0))  # still usable
        assert s.offset == 1
    with pytest.raises(errors.InvalidProgram):
        NativeProgram("/nonexistent.pte")
    with pytest.raises(errors.LazyKVError, match="unknown growth policy"):
        NativeProgram(native_lazy.source, policy="fib")


def test_native_and_python_session_files_interchange(native_lazy, llama_tiny_lazy, tmp_path):
    py = load(llama_tiny_lazy[1].path)
    with native_lazy.session() as s:
        s.run("forward", [torch.arange(1, 11).reshape(1, 10), torch.tensor([0])])
        s.save(tmp_path / "n.kv")
        want = s.run("forward", _tok(7, 10))[0]
    with py.restore(tmp_path / "n.kv") as r:
        assert torch.equal(r.run("forward", _tok(7, 10))[0], want)
    with py.session() as p:
        p.run("forward", [torch.arange(1, 11).reshape(1, 10), torch.tensor([0])])
        p.save(tmp_path / "p.kv")
    with native_lazy.restore(tmp_path / "p.kv") as r:
        assert r.offset == 10
        assert torch.equal(r.run("forward", _tok(7, 10))[0], want)
    assert native_lazy.digest == py.digest


from test_multimethod import _greedy_reference, _prompt  # noqa: E402


def test_native_prefill_decode_on_one_session(example_mm_lazy, example_static, stock_runtime):
    """A two-method program (loaded with XNNPACK's weight cache on): prefill and decode
    on one session's storage, bit-identical to the single-method static program."""
    ref_method = stock_runtime.load_program(str(example_static[1].path)).load_method("forward")
    prompt, steps = _prompt(), 24
    ref = _greedy_reference(ref_method, prompt, steps)
    prog = NativeProgram(example_mm_lazy[1].path)
    with prog.session() as s:
        outs = [s.run("prefill", [prompt, torch.tensor([0])])[0]]
        pos = prompt.shape[1]
        for _ in range(steps):
            tok = outs[-1].reshape(-1, outs[-1].shape[-1])[-1].argmax().reshape(1, 1)
            outs.append(s.run("decode", [tok, torch.tensor([pos])])[0])
            pos += 1
        assert s.offset == prompt.shape[1] + steps
        with pytest.raises(errors.InvalidInput):
            s.run("decode", [torch.zeros((1, 2), dtype=torch.long), torch.tensor([pos])])  # decode takes one token
    for a, b in zip(ref, outs):
        assert torch.equal(a.reshape(b.shape), b)


# -- fork, statistics and KV figures against Python's shim -------------------------------------

from test_fork_prompt_cache import POLICIES, _decode, _feed, _last  # noqa: E402
from test_fork_prompt_cache import _prompt as _tokens  # noqa: E402


def _stats(session) -> dict:
    """A session's counters as a dict of NativeSession's keys (either shim)."""
    st = session.stats
    return dict(st) if isinstance(st, dict) else {k: getattr(st, k) for k in NativeSession._STATS}


@pytest.mark.parametrize("policy", POLICIES)
def test_native_fork_is_bit_exact_and_counts_like_python(policy, llama_tiny_lazy):
    """`NativeSession.fork` (C++ `Session::fork`), as tests/test_fork_prompt_cache.py tests
    Python's: after a 100-token prompt the session and its fork decode different tokens
    for 20 steps, interleaved; each equals a fresh session fed its tokens, bit for bit.
    The fork holds the policy's capacity and copied only the prefix; the source did not
    change. The same calls through Python's shim give the same logits and leave both
    sessions with the same statistics (grows, grow events, bytes copied, capacity, peak)."""
    pte = llama_tiny_lazy[1].path
    prompt = _tokens(100, seed=1)
    runs = {}
    for side, prog in (("native", NativeProgram(pte, policy=policy)), ("python", load(pte, policy=policy))):
        with prog.session() as a:
            _feed(a, prompt)
            before = _stats(a)
            with a.fork() as b:
                forked = _stats(b)
                assert _stats(a) == before
                outs_a, outs_b, ta, tb = [], [], 5, 9
                for _ in range(20):
                    outs_a += _decode(a, ta, 1)
                    outs_b += _decode(b, tb, 1)
                    ta, tb = _last(outs_a[-1]), _last(outs_b[-1])
                runs[side] = (outs_a, outs_b, forked, _stats(a), _stats(b))
    nat_a, nat_b, forked, *nat_stats = runs["native"]
    py_a, py_b, py_forked, *py_stats = runs["python"]
    bpp, bound = forked["bytes_per_position"], forked["max_positions"]
    assert forked["positions_filled"] == 100 and forked["bytes_copied"] == 100 * bpp
    assert forked["capacity_positions"] == NativeProgram(pte, policy=policy).policy.capacity(100, bound, bpp)
    assert forked["current_bytes"] == forked["capacity_positions"] * bpp
    assert (forked, nat_stats) == (py_forked, py_stats)
    assert all(torch.equal(x, y) for x, y in zip(nat_a + nat_b, py_a + py_b))
    prog = NativeProgram(pte, policy=policy)
    for first, outs in ((5, nat_a), (9, nat_b)):
        with prog.session() as r:
            _feed(r, prompt)
            ref = _decode(r, first, 20)
        assert all(torch.equal(x, y) for x, y in zip(ref, outs))


def test_native_fork_of_a_prefix_nothing_and_refusals(native_lazy, llama_tiny_static):
    prompt = _tokens(80, seed=2)
    with native_lazy.session() as a:
        _feed(a, prompt, chunk=30)  # the fork below ends where a call ended
        bpp = a.stats["bytes_per_position"]
        with a.fork(positions=30) as b:
            assert b.offset == 30 and b.stats["bytes_copied"] == 30 * bpp
            got = _decode(b, 7, 5)
        with native_lazy.session() as r:
            _feed(r, prompt[:, :30])
            assert all(torch.equal(x, y) for x, y in zip(_decode(r, 7, 5), got))
        with a.fork(positions=0) as c:
            assert c.offset == 0 and c.kv_bytes == 0
        for bad in (81, -1, 1.5, True):
            with pytest.raises(errors.InvalidInput, match="positions must be an int from 0 to the 80"):
                a.fork(positions=bad)
        assert a.offset == 80
    with pytest.raises(errors.SessionClosed):
        a.fork()
    with NativeProgram(llama_tiny_static[1].path).session() as s:
        with pytest.raises(errors.LazyKVError, match="cannot be forked; export it with lazykv"):
            s.fork()
    capped = NativeProgram(native_lazy.source, policy="doubling", max_bytes=100 * bpp)
    with capped.session() as a:
        _feed(a, _tokens(70, seed=3))  # doubling wants 128 positions; 100 are affordable
        with a.fork() as b:
            assert b.capacity == 100 and b.kv_bytes <= 100 * bpp


def test_native_fork_continues_a_prefill_decode_program(example_mm_lazy):
    """A fork taken after `prefill` decodes with `decode` exactly as its source."""
    prog = NativeProgram(example_mm_lazy[1].path)

    def steps(s, n):
        outs, tok = [], 3
        for _ in range(n):
            outs.append(s.run("decode", [torch.tensor([[tok]]), torch.tensor([s.offset])])[0])
            tok = _last(outs[-1])
        return outs

    with prog.session() as a:
        a.run("prefill", [_prompt(), torch.tensor([0])])
        with a.fork() as b:
            from_fork = steps(b, 10)
        from_source = steps(a, 10)
    assert all(torch.equal(x, y) for x, y in zip(from_source, from_fork))


@pytest.mark.slow  # a subprocess or an export of its own
@pytest.mark.parametrize("fixture", ["llama_tiny_lazy", "llama_tiny_static", "example_mm_lazy",
                                     "example_mm_static"])
def test_native_kv_figures_equal_inspect(request, fixture):
    """The C++ reader counts a program's KV bytes as `lazykv inspect` does: planned (the
    static caches the cache-update kernels write) and at max context."""
    from lazykv.inspect import inspect_pte
    from lazykv.runtime_shim.generate import kv_figures

    path = request.getfixturevalue(fixture)[1].path
    info = inspect_pte(path)
    got = NativeProgram(path).kv_figures
    assert got == {"planned_bytes": info["kv_bytes_at_max_context"] - info["lazy_kv_bytes"],
                   "at_max_context": info["kv_bytes_at_max_context"]}
    py = kv_figures(load(path))
    assert (got["planned_bytes"], got["at_max_context"]) == (py.planned_bytes, py.at_max_context)
    assert (got["planned_bytes"] > 0) is fixture.endswith("static") and got["at_max_context"] > 0
