"""Sessions used from several threads: safe, never corrupt.

The shim holds one lock per program around loading a method and every execute (the
runtime's planned arenas are shared by a program's methods, DESIGN fact 6) and one lock
per session around each call, so threads interleave whole calls.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from lazykv.errors import InvalidInput
from lazykv.runtime_shim import load

VOCAB = 512
TOKENS = 200
THREADS = 4


def _greedy(prog, seed: int, steps: int, barrier=None, times=None):
    """Prompt of 8 tokens from ``seed``, then ``steps`` greedy tokens; tokens and last logits.
    ``times``: a list that gets the times the first and the last call ended."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, VOCAB, (1, 8), generator=g)
    with prog.session() as s:
        if barrier is not None:
            barrier.wait()
        out = s.run("forward", [prompt, torch.tensor([0])])[0]
        if times is not None:
            times.append(time.perf_counter())
        toks = [int(out[0, -1].argmax())]
        for _ in range(steps - 1):
            out = s.run("forward", [torch.tensor([[toks[-1]]]), torch.tensor([s.offset])])[0]
            toks.append(int(out[0, -1].argmax()))
        if times is not None:
            times.append(time.perf_counter())
        return toks, out.clone()


@pytest.fixture(scope="module")
def prog(example_lazy, tmp_path_factory):
    return load(example_lazy[1].path, cache_dir=tmp_path_factory.mktemp("threads_cache"))


def test_four_threads_four_sessions_equal_single_threaded(prog):
    t0 = time.perf_counter()
    solo = [_greedy(prog, seed, TOKENS) for seed in range(THREADS)]
    solo_s = time.perf_counter() - t0
    results = [None] * THREADS
    spans = [[] for _ in range(THREADS)]  # when each thread's first and last call ended
    errors = []
    barrier = threading.Barrier(THREADS)

    def work(k):
        try:
            results[k] = _greedy(prog, k, TOKENS, barrier, spans[k])
        except BaseException as e:  # reported below, with the thread
            errors.append((k, e))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(THREADS)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    threaded_s = time.perf_counter() - start
    assert not [t for t in threads if t.is_alive()], "a thread did not finish within 600 s"
    assert not errors, errors
    for k in range(THREADS):
        toks, logits = results[k]
        assert len(toks) == TOKENS
        assert toks == solo[k][0], f"session {k}: tokens differ from its single-threaded run"
        assert torch.equal(logits, solo[k][1]), f"session {k}: last logits differ"
    assert len({tuple(r[0]) for r in results}) == THREADS  # four different conversations
    # The four generations really interleaved: every one had made its first call before
    # any made its last.
    assert max(first for first, _ in spans) < min(last for _, last in spans), spans
    print(f"\nthreads: {THREADS} threads x {THREADS} sessions x {TOKENS} tokens, each session's "
          f"tokens and last logits equal to its single-threaded run; single-threaded "
          f"{solo_s:.1f} s, threaded {threaded_s:.1f} s; first/last call of each thread at "
          + ", ".join(f"{a - start:.1f}/{b - start:.1f}" for a, b in spans) + " s")


def test_one_session_from_two_threads_never_double_fills(prog):
    """Two threads race on one session, each sending the next position as it last saw
    it. Calls are serialized per session: a call that lost the race is refused (its
    position no longer continues the session); no position is ever filled twice."""
    s = prog.session()
    ok = []
    refused = []
    barrier = threading.Barrier(2)

    def work(k):
        barrier.wait()
        for i in range(60):
            pos = s.offset
            try:
                s.run("forward", [torch.tensor([[k * 100 + i]]), torch.tensor([pos])])
                ok.append(pos)
            except InvalidInput as e:
                assert "positions must continue at" in str(e)
                refused.append(pos)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    try:
        assert sorted(ok) == list(range(s.offset)), "a position was filled twice or skipped"
        assert len(ok) + len(refused) == 120
    finally:
        s.close()


def test_threads_load_a_method_once(example_lazy, tmp_path_factory):
    """First calls from several threads at once: the method is loaded once."""
    p = load(example_lazy[1].path, cache_dir=tmp_path_factory.mktemp("threads_once"))
    seen = []
    barrier = threading.Barrier(THREADS)

    def work():
        barrier.wait()
        seen.append(p._method("forward"))

    threads = [threading.Thread(target=work) for _ in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert len(seen) == THREADS and all(m is seen[0] for m in seen)
