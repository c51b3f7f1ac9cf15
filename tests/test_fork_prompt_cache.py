"""Many conversations over one program: ``Session.fork``, ``PromptCache``, allocation
failures under a real address-space limit. All on the real runtime (tiny Llama, lazy).

Exactness is checked against a fresh session fed the same tokens: logits equal bit for
bit (``torch.equal``).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from lazykv.errors import (
    InvalidInput,
    LazyKVError,
    MemoryBudgetExceeded,
    SessionClosed,
    SessionFileError,
)
from lazykv.runtime_shim import PromptCache, load

VOCAB = 1024
POLICIES = ["doubling", "step:48", "hybrid:start=16,linear_after=256KiB,increment=64KiB", "preallocate"]


@pytest.fixture(scope="session")
def tiny_pte(llama_tiny_lazy):
    return str(llama_tiny_lazy[1].path)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("fork_cache"))


@pytest.fixture(scope="session")
def prog(tiny_pte, cache_dir):
    return load(tiny_pte, policy="doubling", cache_dir=cache_dir)


def _prompt(n, seed):
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def _feed(s, toks, chunk=127):
    """Feed ``toks`` ([1, S]) from the session's offset, ``chunk`` at a time; the last
    logits. XNNPACK may round a position's KV differently inside a longer call (about
    1e-6 for the tiny model), so references feed the same calls: a cached prefix that
    ends inside a call is exact only against positions computed one call per token."""
    out = None
    for i in range(0, toks.shape[1], chunk):
        piece = toks[:, i:i + chunk].contiguous()
        out = s.run("forward", [piece, torch.tensor([s.offset])])[0]
    return out


def _last(logits):
    return int(logits.reshape(-1, logits.shape[-1])[-1].argmax())


def _decode(s, first, steps):
    """Greedy steps from token ``first``: every call's logits."""
    outs, tok = [], first
    for _ in range(steps):
        out = s.run("forward", [torch.tensor([[tok]]), torch.tensor([s.offset])])[0]
        outs.append(out)
        tok = _last(out)
    return outs


def _fresh(prog, prefix, first, steps):
    with prog.session() as r:
        _feed(r, prefix)
        return _decode(r, first, steps)


# -- fork ------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
def test_fork_is_a_bit_exact_independent_copy(policy, tiny_pte, cache_dir):
    """After a 100-token prompt, the session and its fork decode different tokens for 20
    steps, interleaved: each equals a fresh session fed its tokens. The fork holds the
    policy's capacity, copied only the prefix, and the source did not change."""
    prog = load(tiny_pte, policy=policy, cache_dir=cache_dir)
    bpp = prog.bytes_per_position
    prompt = _prompt(100, seed=1)
    with prog.session() as a:
        _feed(a, prompt)
        before = (a.offset, a.capacity, a.kv_bytes, a.stats.bytes_copied)
        with a.fork() as b:
            assert (a.offset, a.capacity, a.kv_bytes, a.stats.bytes_copied) == before
            want = prog.policy.capacity(100, prog.max_positions, bpp)
            assert b.offset == 100 and b.capacity == want and b.kv_bytes == want * bpp
            assert b.stats.bytes_copied == 100 * bpp
            assert b.allocator.current_bytes == b.kv_bytes
            outs_a, outs_b, ta, tb = [], [], 5, 9
            for _ in range(20):
                outs_a += _decode(a, ta, 1)
                outs_b += _decode(b, tb, 1)
                ta, tb = _last(outs_a[-1]), _last(outs_b[-1])
    for first, outs in ((5, outs_a), (9, outs_b)):
        ref = _fresh(prog, prompt, first, 20)
        assert all(torch.equal(x, y) for x, y in zip(ref, outs))


def test_fork_of_a_prefix_and_of_nothing(prog):
    prompt = _prompt(80, seed=2)
    with prog.session() as a:
        _feed(a, prompt, chunk=30)  # the fork below ends where a call ended
        with a.fork(positions=30) as b:
            assert b.offset == 30 and b.stats.bytes_copied == 30 * prog.bytes_per_position
            got = _decode(b, 7, 5)
        assert got and all(torch.equal(x, y) for x, y in zip(_fresh(prog, prompt[:, :30], 7, 5), got))
        with a.fork(positions=0) as c:
            assert c.offset == 0 and c.kv_bytes == 0
        for bad in (81, -1, 1.5, True):
            with pytest.raises(InvalidInput, match="positions must be an int from 0 to the 80"):
                a.fork(positions=bad)
    with pytest.raises(SessionClosed):
        a.fork()


def test_fork_respects_max_bytes(tiny_pte, cache_dir):
    """A fork is a session like any other: the per-session cap clamps its capacity."""
    prog = load(tiny_pte, policy="doubling", max_bytes=100 * 4096, cache_dir=cache_dir)
    with prog.session() as a:
        _feed(a, _prompt(70, seed=3))  # doubling wants 128 positions; 100 are affordable
        with a.fork() as b:
            assert b.capacity == 100 and b.kv_bytes <= prog.max_bytes


def test_fork_continues_a_prefill_decode_program(example_mm_lazy, tmp_path):
    """prefill/decode methods over shared lazy buffers: a fork taken after ``prefill``
    decodes with ``decode`` exactly as the session it came from."""
    prog = load(example_mm_lazy[1].path, cache_dir=tmp_path)
    prompt = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(7))

    def steps(s, n):
        outs, tok = [], 3
        for _ in range(n):
            out = s.run("decode", [torch.tensor([[tok]]), torch.tensor([s.offset])])[0]
            outs.append(out)
            tok = _last(out)
        return outs

    with prog.session() as a:
        a.run("prefill", [prompt, torch.tensor([0])])
        with a.fork() as b:
            from_fork = steps(b, 10)
        from_source = steps(a, 10)
    assert all(torch.equal(x, y) for x, y in zip(from_source, from_fork))


def test_fork_refused_for_a_static_program(llama_tiny_static, cache_dir):
    prog = load(str(llama_tiny_static[1].path), cache_dir=cache_dir)
    with prog.session() as s:
        with pytest.raises(LazyKVError, match="cannot be forked; export it with lazykv"):
            s.fork()
    with pytest.raises(LazyKVError, match="prompt cache needs sessions it can fork"):
        PromptCache(prog, 1 << 20)


# -- prompt cache ----------------------------------------------------------------------------


class _LRU:
    """The cache's documented rules, as a reference: insert refreshes a known key,
    drops cached prefixes of the new key, evicts least recently used first; a hit
    refreshes the entry it forked from."""

    def __init__(self, budget, bpp):
        self.keys, self.budget, self.bpp, self.evicted = [], budget, bpp, []

    def insert(self, key):
        if key in self.keys:
            self.keys.remove(key)
            self.keys.append(key)
            return
        self.keys = [k for k in self.keys if not key[:len(k)] == k]
        while sum(len(k) for k in self.keys) * self.bpp + len(key) * self.bpp > self.budget:
            self.evicted.append(self.keys.pop(0))
        self.keys.append(key)

    def fetch(self, key, leave=1):
        best, n = None, 0
        for k in reversed(self.keys):
            c = next((i for i, (x, y) in enumerate(zip(k, key)) if x != y), min(len(k), len(key)))
            if c > n:
                best, n = k, c
        n = min(n, len(key) - leave)
        if n > 0:
            self.keys.remove(best)
            self.keys.append(best)
        return max(n, 0)


def test_prompt_cache_budget_lru_and_exactness(prog):
    """max_bytes = 3 prefixes' worth; 10 inserts and 20 fetches in a seeded order. After
    every call: bytes held <= max_bytes and the entries (in LRU order) are the
    reference's; fetched sessions continue bit-identically to a recomputation (every
    position computed by a call of its own, so that any prefix is one the reference
    computes alike)."""
    bpp = prog.bytes_per_position
    rng = random.Random(18)
    system = _prompt(24, seed=100)[0].tolist()  # a shared system prompt
    prompts = [system + _prompt(rng.randint(8, 40), seed=200 + i)[0].tolist() for i in range(10)]
    longest = max(len(p) for p in prompts)
    cache = PromptCache(prog, 3 * longest * bpp)
    ref = _LRU(cache.max_bytes, bpp)
    inserted, fetches, seen_hit, seen_miss = [], 0, 0, 0

    def check():
        st = cache.stats
        assert st.bytes <= cache.max_bytes and st.bytes == sum(len(k) for k in cache.keys()) * bpp
        assert cache.keys() == ref.keys

    ops = ["i"] * 10 + ["f"] * 20
    rng.shuffle(ops)
    ops.insert(0, ops.pop(ops.index("i")))  # something to fetch from
    for op in ops:
        if op == "i":
            p = prompts[len(inserted)]
            with prog.session() as s:
                _feed(s, torch.tensor([p]), chunk=1)
                assert cache.insert(s, p) == len(p) * bpp
                assert s.offset == len(p)  # the session is unchanged
            ref.insert(tuple(p))
            inserted.append(p)
            check()
            continue
        fetches += 1
        kind = rng.choice(["again", "extend", "system", "miss"])
        base = rng.choice(inserted)
        q = {"again": base, "extend": base + [rng.randrange(VOCAB) for _ in range(5)],
             "system": system + [rng.randrange(VOCAB) for _ in range(6)],
             "miss": [rng.randrange(VOCAB) for _ in range(12)]}[kind]
        want = ref.fetch(tuple(q))
        s, reused = cache.fetch(q)
        with s:
            assert reused == want and s.offset == reused
            check()
            seen_hit += reused > 0
            seen_miss += reused == 0
            got = _feed(s, torch.tensor([q[reused:]]), chunk=1)
        with prog.session() as r:
            assert torch.equal(_feed(r, torch.tensor([q]), chunk=1), got), (kind, reused)
    st = cache.stats
    assert st.inserts == 10 and st.hits + st.misses == fetches == 20
    assert st.hits == seen_hit and st.misses == seen_miss and seen_hit and seen_miss
    assert st.evictions == len(ref.evicted) > 0
    assert st.positions_reused > 0
    cache.clear()
    assert cache.bytes == 0 and len(cache) == 0


def test_prompt_cache_insert_rules(prog, tiny_pte, cache_dir, tmp_path):
    bpp = prog.bytes_per_position
    p = _prompt(40, seed=5)[0].tolist()
    cache = PromptCache(prog, 60 * bpp)
    with prog.session() as s:
        _feed(s, torch.tensor([p]))
        cache.insert(s, p[:20])
        assert cache.insert(s, p[:20]) == 20 * bpp and len(cache) == 1  # known: refreshed
        cache.insert(s, p)  # extends the cached prefix: replaces it
        assert cache.keys() == [tuple(p)] and cache.stats.replaced == 1
        with pytest.raises(MemoryBudgetExceeded, match="raise max_bytes or cache a shorter prefix"):
            PromptCache(prog, 10 * bpp).insert(s, p)
        with pytest.raises(InvalidInput, match="filled only 40 positions"):
            cache.insert(s, p + [1])
        with pytest.raises(InvalidInput, match="tokens is empty"):
            cache.insert(s, [])
        with pytest.raises(InvalidInput, match="int token ids"):
            cache.insert(s, [1.0, 2.0])
        other = load(tiny_pte, cache_dir=cache_dir, policy="step:64")  # a second program object
        with other.session() as o:
            _feed(o, torch.tensor([p]))
            with pytest.raises(InvalidInput, match="use one cache per program"):
                cache.insert(o, p)
    # A whole-query hit leaves `leave` tokens to compute; leave=0 reuses all of them.
    s, n = cache.fetch(torch.tensor([p]))
    assert n == 39
    s.close()
    s, n = cache.fetch(p, leave=0)
    assert n == 40
    s.close()
    assert cache.fetch(p[:1])[1] == 0  # nothing left to reuse once one token is left
    assert cache.stats.entries == 1 and cache.bytes == 40 * bpp


def test_prompt_cache_save_load(prog, tiny_pte, cache_dir, tmp_path):
    bpp = prog.bytes_per_position
    prompts = [_prompt(n, seed=300 + n)[0].tolist() for n in (30, 20, 25)]
    cache = PromptCache(prog, 80 * bpp)
    for p in prompts:
        with prog.session() as s:
            _feed(s, torch.tensor([p]))
            cache.insert(s, p)
    d = tmp_path / "pc"
    assert cache.save(d) >= 75 * bpp
    back = PromptCache.load(prog, d)
    assert back.keys() == cache.keys() and back.bytes == cache.bytes == 75 * bpp
    q = prompts[0] + [11, 12]
    s1, n1 = cache.fetch(q)
    s2, n2 = back.fetch(q)
    with s1, s2:
        assert n1 == n2 == 30
        assert torch.equal(_feed(s1, torch.tensor([q[30:]])), _feed(s2, torch.tensor([q[30:]])))
    # A smaller budget keeps the most recently used entries that fit.
    small = PromptCache.load(prog, d, max_bytes=50 * bpp)
    assert small.keys() == [tuple(prompts[1]), tuple(prompts[2])]
    # Saving fewer entries removes the files of the earlier save.
    small.save(d)
    assert sorted(f.name for f in d.iterdir()) == ["entry-00000.kv", "entry-00001.kv", "index.json"]
    # Another program refuses it by name; a corrupt index or entry is refused.
    other = tmp_path / "other.pte"
    shutil.copyfile(tiny_pte, other)
    with open(other, "ab") as f:
        f.write(b"\0" * 128)
    with pytest.raises(SessionFileError, match="prompt cache index was saved from a different program"):
        PromptCache.load(load(str(other), cache_dir=cache_dir), d)
    index = json.loads((d / "index.json").read_text())
    index["entries"][0]["tokens"][0] += 1
    (d / "index.json").write_text(json.dumps(index))
    with pytest.raises(SessionFileError, match="entries do not match their sha256"):
        PromptCache.load(prog, d)
    small.save(d)
    entry = d / "entry-00001.kv"
    entry.write_bytes(entry.read_bytes()[:-8])
    with pytest.raises(SessionFileError, match="truncated"):
        PromptCache.load(prog, d)
    with pytest.raises(SessionFileError, match="cannot read the prompt cache index"):
        PromptCache.load(prog, tmp_path / "nowhere")


# -- a real allocation failure -----------------------------------------------------------------

_UNDER_LIMIT = textwrap.dedent(
    """
    import gc, json, resource, sys
    import torch
    from lazykv import runtime_shim
    from lazykv.errors import AllocationFailed

    path, cache = sys.argv[1:3]
    prog = runtime_shim.load(path, policy="doubling", cache_dir=cache)
    toks = torch.randint(0, 1024, (1, 2048), generator=torch.Generator().manual_seed(0))

    def feed(s, t):  # calls of 125: position 1000 ends one (see _feed)
        for i in range(0, t.shape[1], 125):
            s.run("forward", [t[:, i:i + 125].contiguous(), torch.tensor([s.offset])])

    def steps(s, n):
        outs, tok = [], 3
        for _ in range(n):
            out = s.run("forward", [torch.tensor([[tok]]), torch.tensor([s.offset])])[0]
            outs.append(out)
            tok = int(out.reshape(-1, out.shape[-1])[-1].argmax())
        return outs

    with prog.session() as r:  # the reference, computed before any limit
        feed(r, toks[:, :1000])
        ref = steps(r, 20)
    s = prog.session()
    feed(s, toks)  # 2048 positions: capacity 2048, a full doubling step
    assert s.capacity == 2048
    gc.collect()
    vm = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize:")][0]
    one = 2048 * prog.bytes_per_position // len(prog.buffers)  # one buffer now: 1 MiB
    # Room for about 3.5 of the 8 buffers' growth (each needs 2 MiB new, then frees 1).
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (vm + int(5.5 * one), hard))
    out = {"bpp": prog.bytes_per_position}
    try:
        steps(s, 1)  # position 2048: the storage must grow to 4096
        out["grew"] = True
    except AllocationFailed as e:
        out["error"] = str(e)
    out["after_failure"] = [s.offset, s.capacity, s.kv_bytes]
    try:
        s.fork()
    except AllocationFailed as e:
        out["fork_error"] = str(e)
    out["after_fork"] = [s.offset, s.capacity, s.kv_bytes]
    freed = s.trim(s.offset - 1000)
    out["trim"] = [freed.positions, freed.bytes, s.offset, s.capacity]
    got = steps(s, 20)  # still under the limit: fits in the trimmed storage
    out["exact"] = all(torch.equal(a, b) for a, b in zip(ref, got))
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    feed(s, toks[:, s.offset:])  # the limit lifted: grows again
    out["end"] = [s.offset, s.capacity]
    print(json.dumps(out))
    """
)


def test_allocation_failure_under_an_address_space_limit(tiny_pte, cache_dir):
    """A real out-of-memory, not a stand-in: a child process limits its own address
    space (RLIMIT_AS, what ``prlimit --as`` sets) just above what it maps, then a decode
    step must grow the KV storage. The step raises AllocationFailed, and so does a fork;
    the process lives, the session keeps its positions, and after ``trim`` it continues
    bit-identically to a session that never hit the limit."""
    r = subprocess.run([sys.executable, "-c", _UNDER_LIMIT, tiny_pte, cache_dir],
                       capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    bpp = out["bpp"]
    assert "grew" not in out, "the limit did not stop the growth; the test's margin is off"
    assert "growing KV buffer" in out["error"] and "the session is unchanged" in out["error"]
    offset, capacity, kv = out["after_failure"]
    assert offset == 2048 and capacity == 2048  # positions kept; some buffers may have grown
    assert 2048 * bpp <= kv < 4096 * bpp
    assert out["fork_error"].startswith("fork of 2048 positions: ")
    assert out["after_fork"] == out["after_failure"]
    assert out["trim"][0] == 1048 and out["trim"][2:] == [1000, 1024]
    assert out["exact"] is True
    assert out["end"] == [2048, 2048]


# -- generate --shared-prefix -----------------------------------------------------------------


def test_generate_shared_prefix_equals_sessions_computing_it(prog, tiny_pte, cache_dir, monkeypatch):
    """K sessions whose prompts share P tokens: computed once and forked, each session
    generates what a session of its own computes from the same calls (prefix, then the
    rest); the CLI's JSON reports the prefix's time and what the forks saved."""
    from click.testing import CliRunner

    from lazykv.cli.generate_cmd import generate
    from lazykv.runtime_shim.generate import greedy_generate

    r = greedy_generate(prog, 150, 6, sessions=3, shared_prefix=130, seed=4)
    assert all(p[:130] == r.prompts[0][:130] for p in r.prompts)
    assert len({tuple(p[130:]) for p in r.prompts}) == 3
    for p, toks in zip(r.prompts, r.tokens):
        with prog.session() as s:
            _feed(s, torch.tensor([p[:130]]))
            out = _feed(s, torch.tensor([p[130:]]))
            assert [_last(out)] + [_last(o) for o in _decode(s, _last(out), 5)] == toks
    sp = r.shared_prefix
    bpp = prog.bytes_per_position
    assert sp["positions"] == 130 and sp["bytes_copied"] == sp["bytes_saved"] == 2 * 130 * bpp
    assert sp["positions_saved"] == 260 and sp["fork_seconds"] < sp["prefill_seconds"]
    monkeypatch.setenv("LAZYKV_CACHE_DIR", cache_dir)
    cli = CliRunner().invoke(generate, [tiny_pte, "--prompt-len", "40", "--new-tokens", "4",
                                        "--sessions", "2", "--shared-prefix", "32", "--json"], obj={})
    assert cli.exit_code == 0, cli.output
    d = json.loads(cli.stdout)["shared_prefix"]
    assert d["positions"] == 32 and d["bytes_saved"] == 32 * bpp and d["prefill_seconds"] > 0
    bad = CliRunner().invoke(generate, [tiny_pte, "--prompt-len", "8", "--shared-prefix", "9"], obj={})
    assert bad.exit_code == 2 and "longer than --prompt-len" in bad.output


# -- memory estimate ---------------------------------------------------------------------------

_MEASURE = textwrap.dedent(
    """
    import gc, json, sys
    import torch
    from lazykv.runtime_shim.program import _runtime
    from lazykv import runtime_shim

    def rss():  # (RSS, resident bytes of the shared libraries' mappings) from smaps
        gc.collect()
        total = libs = 0
        lib = False
        for line in open("/proc/self/smaps"):
            head = line.split()
            if "-" in head[0] and len(head) >= 5:  # a mapping's first line
                lib = len(head) > 5 and ".so" in head[5]
            elif head[0] == "Rss:":
                total += int(head[1]) * 1024
                libs += int(head[1]) * 1024 if lib else 0
        return total, libs

    _runtime()
    base = rss()
    prog = runtime_shim.load(sys.argv[1], cache_dir=sys.argv[2])
    out, ss = {}, []
    for n in (1, 2):
        s = prog.session()
        for i in range(0, 1024, 127):
            k = min(127, 1024 - i)
            s.run("forward", [torch.randint(0, 1024, (1, k)), torch.tensor([i])])
        ss.append(s)
        now = rss()
        out[n] = [now[0] - base[0], now[1] - base[1], prog.estimate(1024, n)]
    print(json.dumps(out))
    """
)


def test_estimate_matches_resident_memory_and_inspect(prog, tiny_pte, cache_dir):
    """A fresh process's RSS growth (load + 1 and 2 sessions of 1024 positions) against
    the estimate: without the shared libraries' code pages, within 10 % of the estimate
    without its runtime constant; those pages at most 3x that constant (they vary with
    the page cache). inspect reports the same figures."""
    from click.testing import CliRunner

    from lazykv.cli.inspect_cmd import inspect
    from lazykv.estimate import RUNTIME_BYTES

    r = subprocess.run([sys.executable, "-c", _MEASURE, tiny_pte, cache_dir], capture_output=True,
                       text=True, timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 0, r.stderr[-3000:]
    for n, (measured, libs, est) in json.loads(r.stdout.strip().splitlines()[-1]).items():
        own, own_est = measured - libs, est - RUNTIME_BYTES
        assert abs(own_est - own) <= 0.10 * own, (n, own, own_est)
        # Code pages: how many the kernel maps around each fault depends on what the page
        # cache holds (8-12 MiB long after install, ~25 MiB right after it): only a sanity
        # bound here; the benchmark's serving case compares the totals.
        assert 0 < libs <= 3 * RUNTIME_BYTES, (n, libs)
    fp = prog.footprint()
    bpp = prog.bytes_per_position
    assert fp.bytes_per_position == bpp and fp.max_positions == prog.max_positions
    assert prog.estimate(1000, 3) == fp.fixed_bytes + 3 * 1024 * bpp  # doubling holds 1024
    assert fp.fixed_bytes == fp.weights_bytes + fp.planned_bytes + RUNTIME_BYTES
    budget = fp.fixed_bytes + 5 * 1024 * bpp + 1
    assert prog.capacity(budget, 1000) == 5 and prog.capacity(fp.fixed_bytes - 1, 10) == 0
    with pytest.raises(LazyKVError, match="past the exported bound of 4096"):
        prog.estimate(5000)
    with pytest.raises(InvalidInput, match="sessions must be an int >= 0"):
        prog.estimate(10, -1)
    d = json.loads(CliRunner().invoke(inspect, [tiny_pte, "--json"]).output)["memory_estimate"]
    assert d["fixed_bytes"] == fp.fixed_bytes and d["kv_bytes_per_position"] == bpp
    assert d["kv_bytes_per_session_at_max_context"] == bpp * prog.max_positions
    text = CliRunner().invoke(inspect, [tiny_pte]).output
    assert "memory estimate" in text and f"{bpp:,} B per position" in text
