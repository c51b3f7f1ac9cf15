"""``lazykv check`` on the command line: exit codes, table/JSON/JUnit output, TOML config.

Most tests run the ``check`` command with click's CliRunner (same exit codes, no extra
torch import); a few run real processes: the console entry's exit code, a fresh
interpreter showing that check without ``--runs`` never imports the ExecuTorch runtime,
and the pytest gate in ``examples/ci``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from click.testing import CliRunner

from lazykv.check import CheckConfigError, Rules, load_config, parse_size
from lazykv.cli.check_cmd import check

ROOT = Path(__file__).resolve().parents[1]
LAZYKV = str(Path(sys.executable).with_name("lazykv"))


def run(*args):
    # The command itself: the `lazykv` group around it sends fds 1/2 and sys.stdout to the
    # real terminal (it filters ExecuTorch's C++ logs), out of CliRunner's reach. The
    # group is exercised by the subprocess tests below.
    return CliRunner().invoke(check, list(map(str, args)), catch_exceptions=False)


@pytest.fixture(scope="module")
def files(llama_tiny_static, llama_tiny_lazy, tmp_path_factory):
    d = tmp_path_factory.mktemp("check_cli")
    garbage = d / "garbage.pte"
    garbage.write_bytes(b"\x00" * 4 + b"NOPE" + os.urandom(200))
    return {
        "good": str(llama_tiny_lazy[1].path),
        "bad": str(llama_tiny_static[1].path),
        "garbage": str(garbage),
        "missing": str(d / "does-not-exist.pte"),
    }


# -- sizes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text, n", [
    ("123", 123), (123, 123), ("64MiB", 64 * 2**20), ("1.5GB", 1_500_000_000),
    ("8,388,608", 8_388_608), ("8 KiB", 8192), ("2gib", 2 * 2**30), ("10kb", 10_000), ("7B", 7),
])
def test_parse_size(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("text, hint", [("64M", "ambiguous"), ("lots", "KiB/MiB/GiB"), ("-5", "size"),
                                        (True, "expected a size")])
def test_parse_size_refuses(text, hint):
    with pytest.raises(CheckConfigError, match=hint):
        parse_size(text)


# -- exit codes ----------------------------------------------------------------------------


def test_exit_0_when_every_rule_holds(files):
    r = run(files["good"], "--expect-lazy-kv", "--max-planned-bytes", "8MiB", "--methods", "forward")
    assert r.exit_code == 0, r.output
    rows = [ln.split() for ln in r.stdout.splitlines()[1:]]
    assert [row[1:3] for row in rows] == [["methods", "pass"], ["expect-lazy-kv", "pass"],
                                          ["max-planned-bytes", "pass"]]
    assert "3 of 3 rule checks passed" in r.stderr


def test_exit_1_names_the_offender(files):
    from lazykv.inspect import inspect_pte

    planned = inspect_pte(files["bad"])["planned_bytes"]
    r = run(files["good"], files["bad"], "--expect-lazy-kv", "--max-planned-bytes", "8MiB")
    assert r.exit_code == 1
    assert "failures:" in r.stdout
    fails = [ln.strip() for ln in r.stdout.split("failures:")[1].splitlines() if ln.strip()]
    assert len(fails) == 8 + 1  # 8 static KV buffers + the planned-bytes figure
    assert all(f.startswith(files["bad"] + ": ") for f in fails)
    assert any(f"forward: planned {planned:,} B > limit 8,388,608 B" in f for f in fails)
    assert "2 failed" in r.stderr


def test_exit_2_unreadable_file_and_the_others_still_reported(files):
    r = run(files["garbage"], files["good"], files["bad"], files["missing"], "--expect-lazy-kv", "--json")
    assert r.exit_code == 2
    doc = json.loads(r.stdout)  # stdout holds only the JSON document
    status = {Path(f["file"]).name: f["status"] for f in doc["files"]}
    assert status == {"garbage.pte": "error", Path(files["good"]).name: "pass",
                      Path(files["bad"]).name: "fail", "does-not-exist.pte": "error"}
    errors = {Path(f["file"]).name: f["error"] for f in doc["files"] if f["error"]}
    assert "not an ExecuTorch program" in errors["garbage.pte"]
    assert "no such file" in errors["does-not-exist.pte"]
    assert doc["exit_code"] == 2 and doc["summary"]["unreadable"] == 2
    # Without --json the reasons go to stderr and the table shows ERROR rows.
    r = run(files["garbage"], files["good"], "--expect-lazy-kv")
    assert r.exit_code == 2
    assert "ERROR" in r.stdout and "error: " in r.stderr and "not an ExecuTorch program" in r.stderr


def test_real_process_exit_codes(files):
    """The console script itself (one process: exit 2 wins over 1, files still checked)."""
    p = subprocess.run([LAZYKV, "check", files["garbage"], files["bad"], "--expect-lazy-kv"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr
    assert "not lazy" in p.stdout and "not an ExecuTorch program" in p.stderr


def test_no_rules_is_a_usage_error(files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no pyproject.toml here
    r = run(files["good"])
    assert r.exit_code == 2
    assert "no rules given" in r.stderr and "--expect-lazy-kv" in r.stderr


@pytest.mark.parametrize("args, message", [
    (["--max-planned-bytes", "64M"], "ambiguous"),
    (["--max-load-bytes", "a lot"], "cannot read 'a lot' as a size"),
    (["--methods", " , "], "at least one method name"),
])
def test_bad_option_values_exit_2(files, args, message):
    r = run(files["good"], *args)
    assert r.exit_code == 2 and message in r.stderr


def test_help_lists_exit_codes_and_rules():
    r = run("--help")
    assert r.exit_code == 0
    text = " ".join(r.output.split())
    for phrase in ("0 every rule holds", "1 at least one rule fails", "2 a file cannot be read",
                   "--expect-lazy-kv", "--max-planned-bytes", "--max-load-bytes",
                   "--max-kv-bytes-at-max-context", "--no-duplicate-constants", "--methods",
                   "--shared-kv", "--runs", "--config", "--json", "--junit-xml",
                   "at least these", "usage error", "[tool.lazykv.check]"):
        assert phrase in text, phrase


# -- JUnit ---------------------------------------------------------------------------------


def test_junit_one_testcase_per_rule_per_file(files, tmp_path):
    out = tmp_path / "check.xml"
    r = run(files["good"], files["bad"], files["garbage"], "--expect-lazy-kv", "--max-planned-bytes",
            "8MiB", "--max-kv-bytes-at-max-context", "16MiB", "--junit-xml", out)
    assert r.exit_code == 2
    root = ET.parse(out).getroot()
    cases = root.findall(".//testcase")
    assert len(cases) == 3 * 3
    assert {(Path(c.get("classname")).name, c.get("name")) for c in cases} == {
        (Path(f).name, rule) for f in (files["good"], files["bad"], files["garbage"])
        for rule in ("expect-lazy-kv", "max-planned-bytes", "max-kv-bytes-at-max-context")}
    by = {(c.get("classname"), c.get("name")): c for c in cases}
    assert by[(files["good"], "expect-lazy-kv")].find("failure") is None
    fail = by[(files["bad"], "max-planned-bytes")].find("failure")
    assert fail.get("message").startswith("forward: planned ") and "> limit 8,388,608 B" in fail.get("message")
    kv = by[(files["bad"], "expect-lazy-kv")].find("failure")
    assert len(kv.text.splitlines()) == 8 and "is not lazy" in kv.get("message")
    assert by[(files["bad"], "max-kv-bytes-at-max-context")].find("failure") is None
    for rule in ("expect-lazy-kv", "max-planned-bytes"):
        assert by[(files["garbage"], rule)].find("error") is not None
    suite = root.find("testsuite")
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("9", "2", "3")


# -- TOML ----------------------------------------------------------------------------------


def test_config_file_and_cli_override(files, tmp_path):
    cfg = tmp_path / "lazykv.toml"
    cfg.write_text(textwrap.dedent("""
        [check]
        expect_lazy_kv = true
        max-planned-bytes = "1KiB"
        methods = ["forward"]
    """))
    r = run(files["good"], "--config", cfg, "--json")
    assert r.exit_code == 1
    doc = json.loads(r.stdout)
    assert doc["config"] == f"{cfg} [check]"
    assert doc["enabled_rules"] == ["methods", "expect-lazy-kv", "max-planned-bytes"]
    (res,) = [x for x in doc["files"][0]["rules"] if not x["passed"]]
    assert res["rule"] == "max-planned-bytes" and "> limit 1,024 B" in res["failures"][0]
    # A flag overrides the file; "off" removes a file's limit.
    assert run(files["good"], "--config", cfg, "--max-planned-bytes", "8MiB").exit_code == 0
    r = run(files["good"], "--config", cfg, "--max-planned-bytes", "off", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["enabled_rules"] == ["methods", "expect-lazy-kv"]
    r = run(files["bad"], "--config", cfg, "--max-planned-bytes", "off", "--no-expect-lazy-kv")
    assert r.exit_code == 0


def test_config_tool_table_and_top_level_keys(tmp_path):
    a = tmp_path / "a.toml"
    a.write_text('[tool.lazykv.check]\nshared_kv = true\nmax_load_bytes = 1000\n')
    assert load_config(a) == ({"shared_kv": True, "max_load_bytes": 1000}, f"{a} [tool.lazykv.check]")
    b = tmp_path / "b.toml"
    b.write_text('runs = true\nmethods = "prefill, decode"\n')
    fields, _ = load_config(b)
    assert Rules(**fields).methods == ("prefill", "decode") and Rules(**fields).runs


@pytest.mark.parametrize("body, message", [
    ("[check]\nmax_planned = 5\n", "unknown key 'max_planned'; known keys: expect_lazy_kv"),
    ("[check]\nexpect_lazy_kv = 1\n", "expected true or false"),
    ("[check]\nmax_load_bytes = \"12 parsecs\"\n", "cannot read '12 parsecs' as a size"),
    ("[check\n", "not valid TOML"),
    ("[other]\nx = 1\n", "unknown key 'other'"),
    ("", "no rules found"),
])
def test_bad_config_exit_2(files, tmp_path, body, message):
    cfg = tmp_path / "lazykv.toml"
    cfg.write_text(body)
    r = run(files["good"], "--config", cfg)
    assert r.exit_code == 2 and message in r.stderr, r.stderr


def test_pyproject_section_when_no_config(files, tmp_path, monkeypatch):
    (tmp_path / "pyproject.toml").write_text(textwrap.dedent("""
        [project]
        name = "someone-elses-model"

        [tool.lazykv.check]
        expect_lazy_kv = true
        max_kv_bytes_at_max_context = "16MiB"
    """))
    monkeypatch.chdir(tmp_path)
    r = run(files["bad"])
    assert r.exit_code == 1
    assert f"rules from {tmp_path / 'pyproject.toml'} [tool.lazykv.check]" in r.stderr
    assert [ln.split()[1] for ln in r.stdout.splitlines()[1:3]] == ["expect-lazy-kv",
                                                                    "max-kv-bytes-at-max-context"]
    assert run(files["good"]).exit_code == 0
    # --config replaces the pyproject section entirely.
    cfg = tmp_path / "other.toml"
    cfg.write_text("[check]\nmethods = [\"forward\"]\n")
    assert run(files["bad"], "--config", cfg).exit_code == 0


# -- speed: no runtime without --runs ------------------------------------------------------


_NO_RUNTIME_SCRIPT = """
import sys, time, traceback, warnings
warnings.simplefilter("ignore")
HEAVY = ("executorch.extension.pybindings.portable_lib", "executorch.runtime",
         "executorch.exir.capture", "torch._dynamo")
culprits = {}

class Watch:  # records which lazykv line first imported a heavy module
    def find_spec(self, name, path=None, target=None):
        if name in HEAVY and name not in culprits:
            frames = [f for f in traceback.extract_stack() if ("/lazykv/" in f.filename
                      or "/cli/" in f.filename or "/runtime_shim/" in f.filename)
                      and f.name != "__getattr__"]  # check_cmd's deferred exir init
            culprits[name] = f"{frames[-1].filename}:{frames[-1].lineno} ({frames[-1].name})" if frames else "?"
        return None

sys.meta_path.insert(0, Watch())
t = time.perf_counter()
from click.testing import CliRunner
from lazykv.cli.main import cli
r = CliRunner().invoke(cli, ["check", sys.argv[1], "--expect-lazy-kv", "--max-planned-bytes", "64MiB",
                             "--no-duplicate-constants", "--shared-kv", "--max-load-bytes", "1GiB"])
assert r.exit_code in (0, 1), r.output
seconds = time.perf_counter() - t
assert not culprits, f"check without --runs imported: {culprits}"
assert "torch" not in sys.modules, "check without --runs imported torch"
heavy = [m for m in sys.modules if m.split(".")[0] == "executorch"]
assert not heavy, f"check without --runs imported ExecuTorch: {heavy[:5]}"
import executorch.exir.schema
from executorch.exir import to_edge, EdgeProgramManager
import executorch.exir as exir
assert exir.to_edge is to_edge and executorch.exir.schema.Tensor
from executorch.exir._serialize import _deserialize_pte_binary  # its __init__ was deferred too
import executorch.exir._serialize._program as program_module
assert _deserialize_pte_binary is program_module.deserialize_pte_binary
print(f"check in {seconds:.2f} s")
"""


@pytest.mark.parametrize("which", ["bad", "good"])  # static (no manifest), lazy (manifest)
def test_check_without_runs_imports_no_runtime_and_exir_stays_usable(files, which):
    """A fresh interpreter: check never imports the ExecuTorch runtime, the export stack
    that executorch.exir's __init__ pulls in, nor torch; and executorch.exir works after."""
    p = subprocess.run([sys.executable, "-c", _NO_RUNTIME_SCRIPT, files[which]],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "check in" in p.stdout


# -- examples/ci ---------------------------------------------------------------------------


def test_ci_workflow_uses_real_options():
    yaml = pytest.importorskip("yaml")
    from lazykv.cli.check_cmd import check
    from lazykv.cli.export_cmd import export

    wf = yaml.safe_load((ROOT / "examples/ci/lazykv-check.yml").read_text())
    steps = wf["jobs"]["export-and-check"]["steps"]
    script = "\n".join(s.get("run", "") for s in steps).replace("\\\n", " ")
    known = {"check": {o for p in check.params for o in p.opts + p.secondary_opts},
             "export": {o for p in export.params for o in p.opts + p.secondary_opts}}
    seen = set()
    for line in script.splitlines():
        words = line.split()
        if words[:1] == ["lazykv"]:
            seen.add(words[1])
            for w in words[2:]:
                if w.startswith("-"):
                    assert w in known[words[1]], f"{w} is not an option of lazykv {words[1]}"
    assert seen == {"export", "check"}
    fields, _ = load_config(ROOT / "examples/ci/lazykv.toml")
    assert Rules(**fields).enabled


@pytest.mark.slow
def test_ci_pytest_gate_example(example_lazy, example_static):
    """examples/ci/test_export_gate.py passes on a lazy export and fails on a static one."""
    gate = ROOT / "examples/ci/test_export_gate.py"
    base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(gate),
            "-k", "meets_memory_rules", "--rootdir", str(gate.parent)]
    env = dict(os.environ, LAZYKV_GATE_PTE=str(example_lazy[1].path))
    p = subprocess.run(base, capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:]
    env["LAZYKV_GATE_PTE"] = str(example_static[1].path)
    p = subprocess.run(base, capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 1
    assert "expect-lazy-kv: KV buffer" in p.stdout and "is not lazy" in p.stdout
