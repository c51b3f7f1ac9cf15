"""The native (C++) runtime: its tests, lazykv_run, session files across languages, and
one run of the C++ tests under AddressSanitizer + UndefinedBehaviorSanitizer.

The executables are the ones ``make venv`` built (``runtime_shim/native/build.py``:
``build_runtime``); the sanitized build goes to ``build/native-asan``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lazykv.runtime_shim.native import build as native_build

NATIVE = Path(native_build.CMAKE_PROJECT)
TESTS_EXE = NATIVE / "lazykv_native_tests"
RUNNER = NATIVE / "lazykv_run"
ROOT = Path(__file__).resolve().parents[1]


def _run(argv, **kw):
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=600, **kw)


def python_blas_env() -> dict:
    """The environment that makes a host C++ process compute like Python's ExecuTorch.

    ExecuTorch's optimized kernels (libexecutorch_kernels_optimized.so) export their own
    BLAS (sgemm_, sgemv_, ...); in a Python process libtorch_cpu.so, loaded first,
    exports the same names and the dynamic linker binds ExecuTorch's calls to torch's
    BLAS. The two round differently (7e-7 on the tiny Llama's logits). Preloading
    libtorch_cpu.so gives the C++ process Python's binding: then both agree bit for bit.
    """
    torch_lib = Path(torch.__file__).resolve().parent / "lib" / "libtorch_cpu.so"
    return {**os.environ, "LD_PRELOAD": str(torch_lib)}


def _failures(out: str):
    return [line for line in out.splitlines() if line.startswith("FAIL")]


@pytest.fixture(scope="module")
def built():
    if not TESTS_EXE.is_file() or not RUNNER.is_file():
        pytest.fail(f"the native runtime was not built ({TESTS_EXE}); run `make venv` (LAZYKV_REQUIRE_NATIVE=1)")
    return TESTS_EXE


def test_slots_match_program_fbs():
    """The C++ reader's vtable slots, union codes and dtype table are lazykv's format
    layer's (``lazykv.format.schema``, ``lazykv.format.scalar_type``), which
    ``tests/test_format_layer.py`` checks against the installed wheel's ``program.fbs``,
    ``scalar_type.fbs`` and ExecuTorch's enums: the two readers cannot drift apart."""
    from lazykv.format import schema as S
    from lazykv.format.scalar_type import BY_DTYPE
    from lazykv.manifest import LAZY_DTYPES

    header = (NATIVE / "src" / "pte_format.h").read_text()
    block = header.split("SLOTS-BEGIN")[1].split("SLOTS-END")[0]
    seen = 0
    for m in re.finditer(r"constexpr uint16_t k(\w+?)_(\w+) = (\d+);", block):
        table, field, value = m.group(1), m.group(2), int(m.group(3))
        assert table in S.PROGRAM_FBS, f"{table} is not a table of program.fbs"
        assert getattr(S.PROGRAM_FBS[table], field, None) == value, (table, field, value)
        seen += 1
    assert seen >= 25
    for union, codes in (("KernelTypes", S.KERNEL_TYPES), ("InstructionArguments", S.INSTRUCTION_ARGUMENTS)):
        for m in re.finditer(rf"constexpr uint8_t k{union}_(\w+) = (\d+);", header):
            assert codes[int(m.group(2))] == m.group(1), (union, m.group(1))
    dynamism = {"kStatic": S.STATIC, "kDynamicBound": S.DYNAMIC_BOUND, "kDynamicUnbound": S.DYNAMIC_UNBOUND}
    for name, value in dynamism.items():
        assert f"constexpr uint8_t {name} = {value};" in header, name
    dtypes = re.findall(r'\{"(\w+)", (\d+), (\d+)\}', (NATIVE / "src" / "rebind.cpp").read_text())
    assert {name for name, _, _ in dtypes} == set(LAZY_DTYPES)
    for name, code, size in dtypes:
        assert (BY_DTYPE[name].code, BY_DTYPE[name].itemsize) == (int(code), int(size)), name


def test_native_unit_tests(built):
    done = _run([built, "unit"])
    assert done.returncode == 0 and not _failures(done.stdout), done.stdout + done.stderr
    assert done.stdout.count("\nok ") >= 15


def test_native_model_tests_bit_exact(built, llama_tiny_lazy, llama_tiny_static):
    """Every policy: the lazy program through the C++ runtime gives the tokens and logits
    (max |diff| 0.0) of the static program on ExecuTorch's own C++ Module; refusals leave
    the session usable; trim, reset, two interleaved sessions, max_bytes."""
    done = _run([built, "model", llama_tiny_lazy[1].path, llama_tiny_static[1].path])
    assert done.returncode == 0 and not _failures(done.stdout), done.stdout + done.stderr[-3000:]
    assert done.stdout.count("equal the static program's") == 4


def test_policy_arithmetic_matches_python(built):
    from lazykv.runtime_shim.policy import parse_policy

    specs = ["doubling", "doubling:3", "step:256", "step:7", "hybrid", "preallocate",
             "hybrid:start=4,linear_after=1KiB,increment=512", "hybrid:start=1,linear_after=0,increment=1"]
    cases = [(s, n, b, bpp) for s in specs for n in (0, 1, 5, 16, 17, 255, 257, 4000, 4096)
             for b in (16, 4096) for bpp in (1, 512, 4096, 100000)]
    stdin = "\n".join(f"{s} {n} {b} {bpp}" for s, n, b, bpp in cases) + "\n"
    done = _run([built, "policy"], input=stdin)
    lines = done.stdout.splitlines()
    assert len(lines) == len(cases), done.stderr
    for (s, n, b, bpp), line in zip(cases, lines):
        cap, spec = line.split()
        policy = parse_policy(s)
        assert int(cap) == policy.capacity(n, b, bpp), (s, n, b, bpp)
        assert spec == policy.spec()
    bad = _run([built, "policy"], input="step:0 1 1 1\nfib 1 1 1\nhybrid:increment=0 1 1 1\n")
    assert bad.stdout.split() == ["error", "PolicyError"] * 3


def test_sizes_read_like_python(built):
    """`lazykv_run --max-bytes` and the hybrid policy's sizes read as `lazykv generate`'s:
    one parser's rules (lazykv.units.parse_size: MB = 10^6, MiB = 2^20, 64M refused)."""
    from lazykv.units import SizeError, parse_size

    cases = ["123", "8,388,608", "1_000", "64MiB", "64mib", "64MB", "1.5GB", "0.5KiB", ".5KiB", "7B",
             " 12 kib ", "64 MiB", "3TiB", "2tb", "1.0001KB", "1.25KiB", "64M", "64k", "-5", "1.5", "1e3",
             "", "abc", "1.", "12XB", "1 0"]
    done = _run([built, "bytes"], input="\n".join(cases) + "\n")
    lines = done.stdout.splitlines()
    assert len(lines) == len(cases), done.stderr
    for case, line in zip(cases, lines):
        try:
            want = str(parse_size(case))
        except SizeError:
            want = "error PolicyError"
        assert line == want, case


def _schema(doc):
    """The keys and value types of a JSON document, recursively (a list: its items')."""
    if isinstance(doc, dict):
        return {k: _schema(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [_schema(v) for v in doc[:1]]
    return type(doc).__name__


#: Keys of ``generate --json`` that are measured times, not figures both sides compute.
_TIMES = {"prefill_seconds", "decode_seconds", "decode_tokens_per_s", "fork_seconds",
          "prefill_seconds_unshared_estimate", "seconds_saved"}


def _figures(doc):
    """``doc`` without its measured times."""
    if isinstance(doc, dict):
        return {k: _figures(v) for k, v in doc.items() if k not in _TIMES}
    if isinstance(doc, list):
        return [_figures(v) for v in doc]
    return doc


PROMPT = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3]

# (fixture, policy, sessions, shared prefix): a lazy program with two sessions, a shared
# prefix forked into three (preallocate: fork keeps the bound), a static program (its
# planned KV), a prefill/decode program (chosen without --method).
RUN_CASES = [
    ("llama_tiny_lazy", "step:8", 2, 0),
    ("llama_tiny_lazy", "preallocate", 3, 10),
    ("llama_tiny_static", "doubling", 1, 0),
    ("example_mm_lazy", "hybrid:start=4,linear_after=16KiB,increment=8KiB", 2, 0),
]


@pytest.mark.slow  # a subprocess or an export of its own
@pytest.mark.parametrize("fixture,policy,sessions,shared", RUN_CASES,
                         ids=["lazy-2-sessions", "shared-prefix", "static", "prefill-decode"])
def test_lazykv_run_prints_python_generate_json(built, request, fixture, policy, sessions, shared):
    """`lazykv_run --json` and Python's generate print the same document (schema
    "lazykv-generate" version 1): the same keys with the same types at every level, the
    same tokens, and the same byte figures (planned and lazy KV, per session and in
    total, grows, copies, the shared prefix's); only measured times differ."""
    from lazykv.runtime_shim import load
    from lazykv.runtime_shim.generate import greedy_generate

    pte = str(request.getfixturevalue(fixture)[1].path)
    args = ["--prompt-tokens", ",".join(map(str, PROMPT)), "--new-tokens", "24", "--policy", policy,
            "--sessions", str(sessions), "--shared-prefix", str(shared)]
    done = _run([RUNNER, pte, *args, "--json", "--quiet"], env=python_blas_env())
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    want = greedy_generate(load(pte, policy=policy), 0, 24, sessions=sessions, shared_prefix=shared,
                           prompt_tokens=PROMPT).as_json()
    assert _schema(got) == _schema(want)
    assert _figures(got) == _figures(want)
    assert len(got["sessions"]) == sessions and got["sessions"][0]["tokens"]
    lazy = fixture != "llama_tiny_static"
    assert got["lazy"] is lazy and (got["planned_kv_bytes"] > 0) is not lazy
    assert got["methods"] == ({"prefill": "prefill", "decode": "decode"} if fixture == "example_mm_lazy"
                              else {"prefill": "forward", "decode": "forward"})
    if lazy and policy != "preallocate":
        assert got["totals"]["kv_bytes_after_load"] == 0
    if shared:
        assert got["shared_prefix"]["bytes_copied"] == (sessions - 1) * shared * got["bytes_per_position"]
    else:
        assert got["shared_prefix"] is None
    # The Python CLI prints the same document.
    cli = _run([Path(sys.executable).with_name("lazykv"), "generate", pte, *args, "--json", "--quiet"])
    assert cli.returncode == 0, cli.stderr
    assert _figures(json.loads(cli.stdout)) == _figures(got)


def test_lazykv_run_help_documents_the_schema(built, llama_tiny_lazy):
    """Every key of the document (Python's, with a shared prefix: all keys present) is
    named in `lazykv_run --help`, with the schema's name and version."""
    from lazykv.runtime_shim import load
    from lazykv.runtime_shim.generate import greedy_generate

    doc = greedy_generate(load(llama_tiny_lazy[1].path), 4, 2, sessions=2, shared_prefix=2).as_json()
    done = _run([RUNNER, "--help"])
    assert done.returncode == 0

    def keys(d):
        for k, v in d.items():
            yield k
            for inner in ([v] if isinstance(v, dict) else v if isinstance(v, list) else []):
                if isinstance(inner, dict):
                    yield from keys(inner)

    missing = [k for k in keys(doc) if not re.search(rf"\b{k}\b", done.stdout)]
    assert not missing, missing
    assert f'"{doc["schema"]}"' in done.stdout and f"version {doc['version']}" in done.stdout


def test_lazykv_run_refusals(built, llama_tiny_lazy, llama_tiny_static):
    bad_policy = _run([RUNNER, llama_tiny_lazy[1].path, "--policy", "fib"])
    assert bad_policy.returncode == 2 and "unknown growth policy" in bad_policy.stderr
    too_long = _run([RUNNER, llama_tiny_lazy[1].path, "--prompt-len", "4000", "--new-tokens", "200", "--quiet"])
    assert too_long.returncode == 1 and "ContextOverflow" in too_long.stderr
    budget = _run([RUNNER, llama_tiny_lazy[1].path, "--max-bytes", "4KiB", "--quiet"])
    assert budget.returncode == 1 and "MemoryBudgetExceeded" in budget.stderr
    missing = _run([RUNNER, "/nonexistent.pte"])
    assert missing.returncode == 1 and "InvalidProgram" in missing.stderr
    # Methods: an unknown one names those the program has; a malformed list is a usage error.
    unknown = _run([RUNNER, llama_tiny_lazy[1].path, "--method", "decode", "--quiet"])
    assert unknown.returncode == 1 and "UnknownMethod" in unknown.stderr
    assert "no method 'decode'; it has [" in unknown.stderr and "'forward'" in unknown.stderr
    malformed = _run([RUNNER, llama_tiny_lazy[1].path, "--method", "a,b,c"])
    assert malformed.returncode == 2 and "PREFILL,DECODE" in malformed.stderr
    # A shared prefix: no longer than the prompt (usage), only for lazy programs (refused).
    too_long = _run([RUNNER, llama_tiny_lazy[1].path, "--prompt-len", "4", "--shared-prefix", "5"])
    assert too_long.returncode == 2 and "--shared-prefix 5 is longer than --prompt-len 4" in too_long.stderr
    static = _run([RUNNER, llama_tiny_static[1].path, "--shared-prefix", "2", "--sessions", "2", "--quiet"])
    assert static.returncode == 1 and "cannot be forked" in static.stderr


def test_lazykv_run_prefill_decode_program_names_its_methods(built, example_mm_lazy):
    """A prefill/decode program runs without --method; --method forward names what it has."""
    auto = _run([RUNNER, example_mm_lazy[1].path, "--new-tokens", "3"])
    assert auto.returncode == 0, auto.stderr
    assert "prompt through 'prefill', new tokens through 'decode'" in auto.stderr
    refused = _run([RUNNER, example_mm_lazy[1].path, "--method", "forward", "--quiet"])
    assert refused.returncode == 1 and "no method 'forward'; it has ['decode', 'prefill']" in refused.stderr


def _logits(out: str):
    line = [x for x in out.splitlines() if x.startswith("logits")]
    assert line, out
    return torch.tensor([float(v) for v in line[0].split()[1:]])


def test_session_files_cross_languages(built, llama_tiny_lazy, tmp_path):
    """A session saved by C++ restores in Python with identical next-step logits, and
    the reverse (the C++ side binds Python's BLAS: :func:`python_blas_env`)."""
    from lazykv.runtime_shim import load

    pte = str(llama_tiny_lazy[1].path)
    prog = load(pte)
    # C++ -> Python.
    cpp_file = tmp_path / "cpp.kv"
    saved = _run([built, "save", pte, cpp_file, 12], env=python_blas_env())
    assert saved.returncode == 0, saved.stdout + saved.stderr
    cpp_next = _logits(saved.stdout)
    with prog.restore(cpp_file) as s:
        assert s.offset == 12
        py_next = s.run("forward", [torch.tensor([[7]]), torch.tensor([12])])[0].reshape(-1)
    assert torch.equal(py_next, cpp_next)
    # Python -> C++.
    py_file = tmp_path / "py.kv"
    with prog.session() as s:
        s.run("forward", [torch.arange(1, 13).reshape(1, 12), torch.tensor([0])])
        s.save(py_file)
        want = s.run("forward", [torch.tensor([[7]]), torch.tensor([12])])[0].reshape(-1)
    restored = _run([built, "restore", pte, py_file, 7], env=python_blas_env())
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert torch.equal(_logits(restored.stdout), want)
    # A file for another program is refused by C++ too.
    other = tmp_path / "other.pte"
    other.write_bytes(Path(pte).read_bytes() + b"\0")
    refused = _run([built, "restore", other, py_file, 7], env=python_blas_env())
    assert refused.returncode == 1 and "different program" in refused.stdout


@pytest.mark.slow
def test_native_tests_under_asan_ubsan(llama_tiny_lazy, llama_tiny_static):
    """The C++ tests, built with -fsanitize=address,undefined, run with no report and no
    leak (leaks inside the host's libtorch/libpython, which the custom-op library pulls
    in, are suppressed by name: runtime_shim/native/tests/lsan.supp)."""
    build_dir = ROOT / "build" / "native-asan"
    out_dir = build_dir / "bin"
    try:
        native_build.build_runtime(out_dir, build_dir, sanitize=True, targets=("lazykv_native_tests",))
    except native_build.NativeBuildError as e:
        pytest.fail(str(e))
    env = dict(os.environ)
    env["ASAN_OPTIONS"] = "detect_leaks=1:abort_on_error=0:exitcode=99:detect_odr_violation=0"
    env["LSAN_OPTIONS"] = f"suppressions={NATIVE / 'tests' / 'lsan.supp'}:print_suppressions=0"
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1:exitcode=98"
    exe = out_dir / "lazykv_native_tests"
    for argv in (["unit"], ["model", llama_tiny_lazy[1].path, llama_tiny_static[1].path]):
        done = _run([exe, *argv], env=env)
        report = done.stderr
        assert done.returncode == 0 and not _failures(done.stdout), (done.returncode, done.stdout[-2000:], report[-4000:])
        assert "ERROR: AddressSanitizer" not in report and "runtime error:" not in report, report[-4000:]
        assert "ERROR: LeakSanitizer" not in report, report[-4000:]


def test_lazykv_run_every_policy_equals_static_on_stock(built, llama_tiny_lazy, llama_tiny_static, stock_runtime,
                                                        tmp_path):
    """Acceptance: 64-token prompt + 200 decode steps through `lazykv_run`, every policy:
    the static program's tokens and logits (max |diff| 0.0) on ExecuTorch's own C++
    Module, and on the stock Python runtime (the C++ side binding Python's BLAS); KV
    bytes after load 0 (preallocate: the bound)."""
    import numpy as np

    prompt = [(i * 7 + 3) % 1000 for i in range(64)]
    csv = ",".join(map(str, prompt))
    ref = _run([built, "reference", llama_tiny_static[1].path, csv, 199, tmp_path / "module.bin"])
    assert ref.returncode == 0, ref.stdout + ref.stderr
    module_tokens = [int(t) for t in ref.stdout.split("tokens")[1].split()]
    module_logits = np.fromfile(tmp_path / "module.bin", dtype=np.float32)
    # The stock Python runtime on the static program.
    sm = stock_runtime.load_program(str(llama_tiny_static[1].path)).load_method("forward")
    out = sm.execute([torch.tensor([prompt]), torch.tensor([0])])[0]
    py_logits, py_tokens = [out.reshape(-1).clone()], [int(out.argmax())]
    for i in range(199):
        out = sm.execute([torch.tensor([[py_tokens[-1]]]), torch.tensor([64 + i])])[0]
        py_logits.append(out.reshape(-1).clone())
        py_tokens.append(int(out.argmax()))
    py_logits = torch.cat(py_logits).numpy()
    bound = 4096 * 8 * 512  # 8 buffers [1, 4096, 4, 32] float32
    for policy in ("doubling", "step:256", "hybrid", "preallocate"):
        for env, want_tokens, want_logits, who in ((None, module_tokens, module_logits, "Module"),
                                                   (python_blas_env(), py_tokens, py_logits, "Python")):
            got = _run([RUNNER, llama_tiny_lazy[1].path, "--prompt-tokens", csv, "--new-tokens", "200",
                        "--policy", policy, "--json", "--quiet", "--logits", tmp_path / "run.bin"], env=env)
            assert got.returncode == 0, got.stderr
            j = json.loads(got.stdout)
            assert j["sessions"][0]["tokens"] == want_tokens, (policy, who)
            logits = np.fromfile(tmp_path / "run.bin", dtype=np.float32)
            assert logits.shape == want_logits.shape
            assert float(np.abs(logits - want_logits).max()) == 0.0, (policy, who)
            assert j["totals"]["kv_bytes_after_load"] == (bound if policy == "preallocate" else 0), policy
