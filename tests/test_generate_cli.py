"""``lazykv generate`` as a newcomer runs it (issue 17, items 4, 5 and 11): prefill/decode
exports run with no extra flag, static programs report the KV bytes they plan, and
``--json`` has one schema whatever ``--sessions`` is."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from lazykv.inspect import inspect_pte


def _generate(*args):
    from lazykv.cli.generate_cmd import generate

    r = CliRunner().invoke(generate, [str(a) for a in args], obj={})
    assert r.exit_code == 0, r.output
    return r


def _json(*args):
    return json.loads(_generate(*args, "--json", "--quiet").stdout)


@pytest.fixture
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv("LAZYKV_CACHE_DIR", str(tmp_path / "cache"))


def test_prefill_decode_export_runs_without_a_flag(example_mm_lazy, example_lazy, cache):
    """`lazykv generate pd.pte`: the prompt through prefill, new tokens through decode; the
    same greedy tokens as the single-method export of the same weights."""
    r = _generate(example_mm_lazy[1].path, "--new-tokens", "6")
    assert "prompt through 'prefill', new tokens through 'decode'" in r.stderr
    pd = _json(example_mm_lazy[1].path, "--new-tokens", "6")
    fw = _json(example_lazy[1].path, "--new-tokens", "6")
    assert pd["methods"] == {"prefill": "prefill", "decode": "decode"}
    assert fw["methods"] == {"prefill": "forward", "decode": "forward"}
    assert pd["sessions"][0]["tokens"] == fw["sessions"][0]["tokens"]
    # One method for both: decode takes the prompt one token at a time.
    one = _json(example_mm_lazy[1].path, "--new-tokens", "6", "--method", "decode")
    assert one["methods"] == {"prefill": "decode", "decode": "decode"}
    assert one["sessions"][0]["tokens"] == fw["sessions"][0]["tokens"]


def test_static_program_reports_its_planned_kv(example_static, cache):
    info = inspect_pte(example_static[1].path)
    planned = info["kv_bytes_at_max_context"] - info["lazy_kv_bytes"]
    assert planned > 0
    d = _json(example_static[1].path, "--new-tokens", "4", "--sessions", "2")
    assert d["planned_kv_bytes"] == planned and d["lazy"] is False
    t = d["totals"]
    assert t["kv_bytes_after_load"] == t["kv_bytes_end"] == t["peak_kv_bytes"] == planned
    r = _generate(example_static[1].path, "--new-tokens", "4")
    assert f"KV bytes: after load {planned:,}" in r.stderr
    assert "of which planned" in r.stderr


def test_json_schema_is_the_same_for_one_and_two_sessions(example_lazy, cache):
    one = _json(example_lazy[1].path, "--prompt-len", "10", "--new-tokens", "12", "--policy", "step:16")
    two = _json(example_lazy[1].path, "--prompt-len", "10", "--new-tokens", "12", "--policy", "step:16",
                "--sessions", "2")

    def shape(d):
        if isinstance(d, dict):
            return {k: shape(v) for k, v in d.items()}
        if isinstance(d, list):
            return [shape(d[0])] if d else []
        return type(d).__name__

    assert shape(one) == shape(two)
    assert one["schema"] == "lazykv-generate" and one["version"] == 1
    assert [s["index"] for s in two["sessions"]] == [0, 1]
    assert two["sessions"][0]["tokens"] == one["sessions"][0]["tokens"]
    bpp = two["bytes_per_position"]
    for d, n in ((one, 1), (two, 2)):
        t = d["totals"]
        assert t["sessions"] == n and len(d["sessions"]) == n
        assert t["kv_bytes_end"] == d["planned_kv_bytes"] + sum(s["kv_bytes_end"] for s in d["sessions"])
        assert t["grows"] == sum(s["grows"] for s in d["sessions"])
        assert t["decode_tokens"] == 11 * n
        for s in d["sessions"]:
            # 21 positions under step:16: two grows (16, then 32) of the whole storage,
            # one allocator event per buffer each time (4 buffers).
            assert s["positions_filled"] == 21 and s["kv_bytes_end"] == 32 * bpp
            assert s["grows"] == 2 and s["buffer_grow_events"] == 2 * 4


def test_too_long_for_a_static_program_is_refused_before_running(example_static, cache):
    from lazykv.cli.generate_cmd import generate

    r = CliRunner().invoke(generate, [str(example_static[1].path), "--prompt-len", "500",
                                      "--new-tokens", "64"], obj={})
    assert r.exit_code != 0
    assert "needs 563 positions" in str(r.exception) and "at most 512" in str(r.exception)
