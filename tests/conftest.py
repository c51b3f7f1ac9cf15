"""Shared, session-scoped exports: each model is exported once per test run.

Exports are real (ExecuTorch's Llama ``tiny`` preset and the bundled example decoder,
random weights from a fixed seed) and take 15-60 s each, so every test module uses these
fixtures instead of exporting its own copy.
"""

from __future__ import annotations

import os
import warnings

import pytest

# Generated checkpoints and rewritten programs go to a per-run cache unless the caller
# chose one (CI keeps nothing between runs anyway).
os.environ.setdefault("LAZYKV_CACHE_DIR", os.path.join(os.getcwd(), "build", "test-cache"))

LLAMA_CONTEXT = 4096
EXAMPLE_CONTEXT = 512

#: Fixtures that cost tens of seconds or more (exports of ExecuTorch's Llama or of
#: several programs, the fuzzer, memory measurements in subprocesses): every test that
#: uses one is marked ``slow``, so ``pytest -m "not slow"`` (``make quick``) skips it.
SLOW_FIXTURES = frozenset({
    "llama_tiny_static", "llama_tiny_lazy", "checkpoint", "lazy_llama", "fuzz_run",
    "example_lazy_2048", "example_mm_lazy", "example_mm_static", "measurements", "toys",
    # export_llm configurations (tests/test_export_llm_configs.py): an export_llm run each
    "work",
})


def _export(tmp_path_factory, name, **kw):
    from lazykv.export import ExportConfig, export_model

    cfg = ExportConfig(**kw)
    out = tmp_path_factory.mktemp("pte") / f"{name}.pte"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = export_model(cfg, out)
    return cfg, report


@pytest.fixture(scope="session")
def llama_tiny_static(tmp_path_factory):
    """(ExportConfig, ExportReport) of ExecuTorch Llama tiny, XNNPACK, static KV."""
    return _export(tmp_path_factory, "llama_tiny_static", model="llama", max_context=LLAMA_CONTEXT)


@pytest.fixture(scope="session")
def llama_tiny_lazy(tmp_path_factory):
    """(ExportConfig, ExportReport) of ExecuTorch Llama tiny, XNNPACK, lazy KV."""
    return _export(tmp_path_factory, "llama_tiny_lazy", model="llama", max_context=LLAMA_CONTEXT,
                   lazy_kv_cache=True)


@pytest.fixture(scope="session")
def example_static(tmp_path_factory):
    """(ExportConfig, ExportReport) of the example decoder, XNNPACK, static KV."""
    return _export(tmp_path_factory, "example_static", model="example",
                   max_context=EXAMPLE_CONTEXT)


@pytest.fixture(scope="session")
def example_lazy(tmp_path_factory):
    """(ExportConfig, ExportReport) of the example decoder, XNNPACK, lazy KV."""
    return _export(tmp_path_factory, "example_lazy", model="example",
                   max_context=EXAMPLE_CONTEXT, lazy_kv_cache=True)


@pytest.fixture(scope="session")
def example_mm_lazy(tmp_path_factory):
    """(ExportConfig, ExportReport) of the example decoder with ``prefill`` and ``decode``
    methods over the same lazy KV buffers."""
    return _export(tmp_path_factory, "example_mm_lazy", model="example",
                   max_context=EXAMPLE_CONTEXT, lazy_kv_cache=True, methods=("prefill", "decode"))


@pytest.fixture(scope="session")
def example_mm_static(tmp_path_factory):
    """(ExportConfig, ExportReport) of the example decoder with prefill + decode, static KV."""
    return _export(tmp_path_factory, "example_mm_static", model="example",
                   max_context=EXAMPLE_CONTEXT, methods=("prefill", "decode"))


@pytest.fixture(scope="session")
def stock_runtime():
    """ExecuTorch's stock Python runtime with the LLM custom ops registered (fact 3)."""
    from executorch.extension.pybindings import portable_lib  # noqa: F401
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401
    from executorch.runtime import Runtime

    return Runtime.get()


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "support_table: the full support-table matrix of export_llm's models (tens of "
        "minutes); runs only when selected with -m support_table",
    )


def pytest_collection_modifyitems(config, items):
    """Tests using a :data:`SLOW_FIXTURES` fixture are ``slow``; the support-table matrix
    runs only when selected (``-m support_table``)."""
    selected = "support_table" in (config.getoption("markexpr") or "")
    skip = pytest.mark.skip(reason="full matrix: run with `pytest -m support_table`")
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
        if "support_table" in item.keywords and not selected:
            item.add_marker(skip)
