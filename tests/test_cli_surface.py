"""The command line's surface (issue 17, items 10, 12 and 13): fast help without torch, exit
codes in every --help, --debug anywhere, bad options refused before loading, ExecuTorch's
log only when it explains a failure, quiet imports, readable ``inspect`` and demo output."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

LAZYKV = str(Path(sys.executable).with_name("lazykv"))


def _cli_in_fresh_process(args, env=None):
    """Run ``lazykv ARGS`` in a fresh interpreter; returns (exit code, CPU seconds of the
    child, whether torch was imported, stdout, stderr)."""
    code = textwrap.dedent(f"""
        import sys
        from lazykv.cli.main import cli
        try:
            cli({list(args)!r})
        except SystemExit as e:
            code = e.code or 0
        else:
            code = 0
        sys.stderr.write(f"\\nRESULT {{code}} {{'torch' in sys.modules}}\\n")
    """)
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, **(env or {})))
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    last = [ln for ln in r.stderr.splitlines() if ln.startswith("RESULT ")][-1].split()
    return int(last[1]), cpu, last[2] == "True", r.stdout, r.stderr


@pytest.mark.parametrize("command", ["export", "inspect", "generate", "check", "cache"])
def test_help_is_fast_lists_exit_codes_and_imports_no_torch(command):
    code, cpu, torch_imported, out, _ = _cli_in_fresh_process([command, "--help"])
    assert code == 0 and "Exit codes" in out
    assert not torch_imported
    assert cpu < 0.5, f"{command} --help took {cpu:.2f} s of CPU"


def test_policy_help_gives_units():
    _, _, _, out, _ = _cli_in_fresh_process(["generate", "--help"])
    text = " ".join(out.split())
    assert "chunks of N positions" in text and "A position is one token of KV cache" in text
    assert "linear_after bytes" in text


def test_bad_policy_and_size_are_refused_before_loading(example_lazy):
    for args in (["--policy", "bogus"], ["--policy", "step:0"], ["--max-bytes", "64M"]):
        code, _, torch_imported, _, err = _cli_in_fresh_process(
            ["generate", str(example_lazy[1].path), *args])
        assert code == 2, err
        assert not torch_imported, f"{args}: the runtime was imported before the usage error"


def test_debug_works_after_the_command_name(tmp_path):
    bad = tmp_path / "bad.pte"
    bad.write_bytes(b"not a program at all" * 10)
    plain = subprocess.run([LAZYKV, "inspect", str(bad)], capture_output=True, text=True)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    for args in (["--debug", "inspect", str(bad)], ["inspect", str(bad), "--debug"]):
        r = subprocess.run([LAZYKV, *args], capture_output=True, text=True)
        assert "Traceback" in r.stderr and "InvalidProgram" in r.stderr, args


def test_a_lazykv_refusal_after_loading_prints_one_line(example_lazy, tmp_path):
    """No "ExecuTorch's log:" and no cpuinfo probes in front of a refusal that lazykv made
    in Python (here: more positions than the program holds)."""
    r = subprocess.run([LAZYKV, "generate", str(example_lazy[1].path), "--prompt-len", "600"],
                       capture_output=True, text=True, env=dict(os.environ, LAZYKV_CACHE_DIR=str(tmp_path)))
    assert r.returncode == 1
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("error: a prompt of 600 + 64 new tokens needs 663 positions")
    assert "ExecuTorch's log" not in r.stderr and "cpuinfo" not in r.stderr
    assert all(ln.startswith(("loaded ", "error: ")) for ln in lines), lines


def test_executorch_log_is_replayed_when_the_runtime_failed():
    """A failure the runtime reported (ExecutionFailed) replays ExecuTorch's log lines,
    minus start-up probes; a refusal made in Python replays nothing."""
    code = textwrap.dedent("""
        import os
        from lazykv.cli._quiet import native_output_captured
        from lazykv.errors import ExecutionFailed, InvalidInput
        for exc in (InvalidInput("python check"), ExecutionFailed("runtime failed")):
            try:
                with native_output_captured():
                    os.write(2, b"[cpuinfo_utils.cpp:109] Failed to open midr file\\n")
                    os.write(2, b"[op_update_cache.cpp:42] start_pos + seq_len > cache size\\n")
                    raise exc
            except Exception as e:
                os.write(2, f"caught {type(e).__name__}\\n".encode())
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stderr.splitlines() == [
        "caught InvalidInput",
        "ExecuTorch's log:",
        "[op_update_cache.cpp:42] start_pos + seq_len > cache size",
        "caught ExecutionFailed",
    ], r.stderr


def test_importing_the_runtime_shim_is_quiet(example_lazy, tmp_path):
    code = textwrap.dedent(f"""
        import sys
        from lazykv import runtime_shim
        print("torch" in sys.modules, any(m.startswith("torchao") for m in sys.modules))
        prog = runtime_shim.load({str(example_lazy[1].path)!r}, cache_dir={str(tmp_path)!r})
        print(any(m.startswith("torchao") for m in sys.modules))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "False", "False"]
    assert "Failed to load" not in r.stderr and "torchao" not in r.stderr
    assert "register_constant" not in r.stderr


def test_inspect_prints_arenas_as_figures(example_lazy):
    from lazykv.cli.inspect_cmd import render
    from lazykv.inspect import inspect_pte

    info = inspect_pte(example_lazy[1].path)
    line = next(ln for ln in render(info).splitlines() if "per arena" in ln)
    assert "['" not in line and line.endswith(f"per arena: {info['arena_bytes'][0]:,} B")


@pytest.mark.slow  # a subprocess or an export of its own
def test_demo_numbers_each_step_once(tmp_path):
    from click.testing import CliRunner

    from lazykv.cli.demo import main

    r = CliRunner().invoke(main, ["--out-dir", str(tmp_path), "--max-context", "64",
                                  "--prompt-len", "4", "--new-tokens", "3"])
    assert r.exit_code == 0, r.output
    steps = [ln.split()[0] for ln in r.stderr.splitlines() if re.match(r"\[\d/\d\] ", ln)]
    assert steps == ["[1/4]", "[2/4]", "[3/4]", "[4/4]"]
    assert "bit-identical" in r.stdout and (tmp_path / "kv_bytes.png").stat().st_size > 1000
