"""A pytest gate for an export: the build fails when the exported ``.pte`` breaks a rule.

Copy next to your tests and adapt ``RULES`` and ``export``. Run with ``pytest
examples/ci/test_export_gate.py``. It exports the bundled example decoder with a lazy KV
cache (about a minute on a laptop CPU), or checks an existing file when
``LAZYKV_GATE_PTE=path/to/model.pte`` is set.

The assertion message lists every failure, each naming the buffer, method or constant
and its figure against the limit, e.g.::

    model.pte: max-planned-bytes: forward: planned 18,354,112 B > limit 8,388,608 B
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lazykv.check import Rules, check_files

RULES = Rules(
    expect_lazy_kv=True,
    max_planned_bytes="8MiB",
    max_kv_bytes_at_max_context="64MiB",
    no_duplicate_constants=True,
    methods=("forward",),
)


@pytest.fixture(scope="module")
def exported_pte(tmp_path_factory) -> Path:
    given = os.environ.get("LAZYKV_GATE_PTE")
    if given:
        return Path(given)
    from lazykv.export import ExportConfig, export_model

    out = tmp_path_factory.mktemp("gate") / "model.pte"
    export_model(ExportConfig(model="example", max_context=2048, lazy_kv_cache=True), out)
    return out


def test_export_meets_memory_rules(exported_pte):
    report = check_files([exported_pte], RULES)
    assert report.return_code == 0, "\n".join(report.failure_lines())


def test_export_runs(exported_pte):
    # Loads the ExecuTorch runtime: kept apart so the fast rules report on their own.
    report = check_files([exported_pte], Rules(runs=True))
    assert report.return_code == 0, "\n".join(report.failure_lines())
