"""``lazykv export --config``: export_llm's own configurations, tiny random checkpoints.

A representative subset of the support table (``lazykv.support_table``), each export
made once per session. Most use ``backend.xnnpack.enabled=False`` to keep the suite
short; the byte-identity check uses the shipped XNNPACK configuration as it is
(8da4w, 4-bit embeddings). The whole matrix runs under ``pytest -m support_table``.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from lazykv.errors import ExportRefused
from lazykv.models import zoo

NO_XNNPACK = ("++backend.xnnpack.enabled=False",)


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="session")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("export_llm")


def _config(work, model_class, option, extra=()):
    from lazykv.llm_config import load_llm_config

    return load_llm_config(zoo.shipped_config(model_class),
                           zoo.tiny_overrides(model_class, option, work) + list(extra))


def _pair(work, model_class, option, extra=NO_XNNPACK):
    """(static path, lazy path) of one configuration, exported through export_llm's code."""
    from lazykv.export import export_llm_config
    from lazykv.passes import LazyKVConfig

    static, lazy = work / f"{model_class}-{option}-static.pte", work / f"{model_class}-{option}-lazy.pte"
    export_llm_config(_config(work, model_class, option, extra), static)
    export_llm_config(_config(work, model_class, option, extra), lazy, lazy=LazyKVConfig())
    return static, lazy


def test_validator_accepts_every_static_export(llama_shipped, quantized_kv, qwen3_5,
                                               local_global, attention_sink_static):
    """lazykv's validator (run by the shim before any C++ sees a program) accepts every
    static program export_llm made here, attention sink included."""
    from lazykv.verify import verify_pte

    for path in (llama_shipped[0], quantized_kv[0], qwen3_5[0], local_global[0],
                 attention_sink_static):
        verify_pte(str(path))


def _cli(*args):
    from lazykv.cli.main import cli

    r = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r.output


#: llama_xnnpack.yaml with its 4-bit embeddings, float32 linears, no XNNPACK (short; the
#: XNNPACK 8da4w programs are compared byte for byte by the support table's runs too).
EMBEDDING_4BIT = ("++quantization.qmode=null", "++quantization.embedding_quantize='4,32'",
                  *NO_XNNPACK)


@pytest.fixture(scope="session")
def llama_shipped(work):
    """llama_xnnpack.yaml with 4-bit embeddings: lazykv's static export through the CLI
    and export_llm's own, in a fresh process."""
    overrides = zoo.tiny_overrides("llama3_2", "shipped", work) + list(EMBEDDING_4BIT)
    yaml = str(zoo.shipped_config("llama3_2"))
    ours = work / "llama-shipped-lazykv.pte"
    _cli("export", "--config", yaml, *overrides, "-o", str(ours), "--quiet")
    theirs = work / "llama-shipped-export_llm.pte"
    r = subprocess.run(
        [sys.executable, "-m", "executorch.extension.llm.export.export_llm", "--config", yaml,
         *overrides, f"++export.output_name={theirs}"],
        cwd=work, capture_output=True, text=True, timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return ours, theirs


def test_static_config_export_is_byte_identical_to_export_llm(llama_shipped):
    ours, theirs = llama_shipped
    assert _sha(ours) == _sha(theirs)


def test_shim_loads_the_kernels_4bit_embeddings_need(llama_shipped):
    """A fresh process that imports nothing but lazykv runs the program (its
    quantized_decomposed::embedding_4bit needs executorch.kernels.quantized)."""
    from lazykv.format.pte import open_pte

    ours, _ = llama_shipped
    ops = {o.name for p in open_pte(str(ours)).program.plans for o in p.operators}
    assert "quantized_decomposed::embedding_4bit" in ops
    r = subprocess.run([sys.executable, "-m", "lazykv.cli.main", "generate", str(ours),
                        "--prompt-len", "4", "--new-tokens", "4", "--json"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(json.loads(r.stdout)["sessions"][0]["tokens"]) == 4


def test_missing_kernels_are_named():
    from lazykv.runtime_shim.kernels import missing_kernels_error, missing_operators

    assert missing_operators(["llama::update_cache.out", "aten::add.out"]) == []
    err = missing_kernels_error(None, "m.pte: loading method 'forward'",
                                operators=["llama::update_cache.out", "acme::warp.out"])
    assert "acme::warp.out" in str(err) and "'acme'" in str(err)
    assert "llama::update_cache" not in str(err)


@pytest.fixture(scope="session")
def quantized_kv(work):
    return _pair(work, "llama3_2", "quantize_kv_cache")


def test_quantized_kv_cache_lazy_with_scales_and_zero_points(quantized_kv):
    from lazykv.format.pte import open_pte

    _, lazy = quantized_kv
    m = open_pte(str(lazy)).manifest
    p = zoo.TINY_PARAMS["llama3_2"]
    heads, hd = p["n_kv_heads"], p["dim"] // p["n_heads"]
    # QuantizedSDPA holds the cache too: the FQN may go through either module.
    by = {(b.fqn.split(".")[1], b.fqn.rsplit(".", 1)[1]): b for b in m.lazy_buffers}
    expect = {"k_cache": ("int8", hd), "v_cache": ("int8", hd),
              "k_cache_scales": ("float32", 1), "v_cache_scales": ("float32", 1),
              "k_cache_zero_points": ("int8", 1), "v_cache_zero_points": ("int8", 1)}
    assert len(by) == p["n_layers"] * len(expect)
    for layer in range(p["n_layers"]):
        for name, (dtype, last) in expect.items():
            b = by[(str(layer), name)]
            assert (b.dtype, b.growth_axis) == (dtype, 1)
            assert b.max_shape == (1, zoo.MAX_CONTEXT, heads, last)
    assert len(m.fill_rules) == 1  # one fill rule: values, scales, zero points grow together
    assert not m.unmarked_buffers


def test_quantized_kv_cache_bit_exact(quantized_kv):
    from lazykv.support_table import compare_logits

    diff, calls = compare_logits(*quantized_kv)
    assert calls == 21 and diff == 0.0  # prompt (one call) + 20 decode steps


@pytest.fixture(scope="session")
def qwen3_5(work):
    return _pair(work, "qwen3_5_0_8b", "fp32")


def test_hybrid_recurrent_and_conv_state_are_not_kv_caches(qwen3_5):
    from lazykv.format.pte import open_pte

    m = open_pte(str(qwen3_5[1])).manifest
    assert sorted(b.fqn for b in m.lazy_buffers) == [
        "layers.3.attention.kv_cache.k_cache", "layers.3.attention.kv_cache.v_cache"]
    state = {u.fqn: (u.kind, u.cause) for u in m.unmarked_buffers}
    assert state == {f"layers.{i}.attention.{s}": ("state", "state")
                     for i in range(3) for s in ("conv_state", "recurrent_state")}


def test_hybrid_bit_exact(qwen3_5):
    from lazykv.support_table import compare_logits

    diff, calls = compare_logits(*qwen3_5)
    assert calls == 28 and diff == 0.0  # static [1, 1] tokens: 8 prompt calls + 20 steps


@pytest.fixture(scope="session")
def local_global(work):
    """llama3_2 with local_global_attention=[0,32]: layer 0 global, layer 1 a ring of
    64 slots. Static via the API, lazy via the CLI (its summary is checked)."""
    from lazykv.export import export_llm_config

    overrides = zoo.tiny_overrides("llama3_2", "local_global_attention", work) + list(NO_XNNPACK)
    static, lazy = work / "lg-static.pte", work / "lg-lazy.pte"
    export_llm_config(_config(work, "llama3_2", "local_global_attention", NO_XNNPACK), static)
    out = _cli("export", "--config", str(zoo.shipped_config("llama3_2")), *overrides,
               "--lazy-kv-cache", "-o", str(lazy))
    return static, lazy, out


def test_local_global_attention_partial(local_global):
    from lazykv.inspect import inspect_pte

    _, lazy, out = local_global
    info = inspect_pte(lazy)
    lazy_fqns = sorted(b["fqn"] for b in info["kv_buffers"] if b["lazy"])
    assert lazy_fqns == ["layers.0.attention.kv_cache.k_cache",
                         "layers.0.attention.kv_cache.v_cache"]
    rings = {u["fqn"]: u for u in info["unmarked_buffers"] if u["kind"] == "kv_cache"}
    assert set(rings) == {"layers.1.attention.kv_cache.k_cache",
                          "layers.1.attention.kv_cache.v_cache"}
    for u in rings.values():
        assert u["cause"] == "ring" and "update_cache_with_indices" in u["reason"]
        assert "local_global_attention" in u["fix"]
    planned = {b["fqn"]: b for b in info["mutable_buffers"] if b.get("planned_because")}
    assert planned["layers.1.attention.kv_cache.k_cache"]["arena"] == 1
    # The export summary lists them with the reason.
    assert "2 KV buffers left planned" in out and "(ring)" in out
    from lazykv.cli.inspect_cmd import render

    assert "planned (ring)" in render(info)


def test_local_global_attention_bit_exact_past_the_wrap(local_global):
    from lazykv.support_table import compare_logits

    static, lazy, _ = local_global
    diff, calls = compare_logits(static, lazy, prompt_len=8, steps=72)  # ring of 64 wraps
    assert calls == 73 and diff == 0.0


@pytest.fixture(scope="session")
def attention_sink_static(work):
    from lazykv.export import export_llm_config

    path = work / "sink-static.pte"
    export_llm_config(_config(work, "llama3_2", "attention_sink", NO_XNNPACK), path)
    return path


def test_validator_accepts_static_attention_sink(attention_sink_static):
    """The static attention-sink program (cache_positions initialised to -1: a planned
    buffer with data) passes lazykv's validator and runs through the shim."""
    import torch

    from lazykv import runtime_shim
    from lazykv.verify import verify_pte

    verify_pte(str(attention_sink_static))
    prog = runtime_shim.load(str(attention_sink_static))
    with prog.session() as s:
        out = s.run("forward", [torch.tensor([[1, 2, 3]]), torch.tensor([0])])[0]
    assert torch.isfinite(out).all()


def test_fp16_refused_with_the_cast_fix(work):
    from lazykv.export import export_llm_config
    from lazykv.passes import LazyKVConfig

    with pytest.raises(ExportRefused) as ei:
        export_llm_config(_config(work, "llama3_2", "fp16", NO_XNNPACK), work / "fp16.pte",
                          lazy=LazyKVConfig())
    msg = str(ei.value)
    assert "torch.float16 to torch.float32" in msg
    assert "model.dtype_override=fp32 or bf16" in msg
    assert "use_sdpa_with_kv_cache=True" not in msg  # already set: not the fix
    assert not (work / "fp16.pte").exists()


def test_config_errors_name_the_fix(tmp_path):
    from lazykv.llm_config import ConfigError, load_llm_config

    yaml = zoo.shipped_config("llama3_2")
    with pytest.raises(ConfigError, match=r"'\+' prefix.*\+base.model_class"):
        load_llm_config(yaml, ["base.model_class=llama3_2"])
    with pytest.raises(ConfigError, match="no such file"):
        load_llm_config(tmp_path / "missing.yaml", [])
    with pytest.raises(ConfigError, match="not KEY=VALUE"):
        load_llm_config(yaml, ["model.use_kv_cache"])
    cfg = load_llm_config(yaml, ["++export.max_context_length=256"])
    assert cfg.export.max_context_length == 256 and cfg.quantization.qmode == "8da4w"


def test_cli_rejects_demo_flags_with_config():
    from lazykv.cli.main import cli

    r = CliRunner().invoke(cli, ["export", "--config", str(zoo.shipped_config("llama3_2")),
                                 "--max-context", "64", "-o", "x.pte"])
    assert r.exit_code == 2 and "export.max_context_length" in r.output
    r = CliRunner().invoke(cli, ["export", "--model", "llama", "-o", "x.pte"])
    assert r.exit_code == 2 and "--max-context is required" in r.output


@pytest.mark.support_table
def test_support_table_full_matrix(tmp_path_factory):
    """Every (model class, option) of the support table, exported as shipped (XNNPACK):
    lazy or partial and bit-exact, or refused for a stated reason (fp16; attention sink,
    whose caches are all ring buffers). Writes the README's table."""
    from pathlib import Path

    from lazykv import support_table

    readme = Path(__file__).resolve().parents[1] / "README.md"
    cells = support_table.run_matrix(tmp_path_factory.mktemp("support"), readme=readme)
    for c in cells:
        if c.option == "fp16":
            assert c.status == "refused" and "float16" in c.reason, c
        elif c.option == "attention_sink":
            assert c.status == "refused" and "ring" in c.reason, c
        else:
            assert c.status in ("lazy", "partial") and c.max_abs_diff == 0.0, c
            assert c.static_valid, c
