"""lazykv.runtime_shim.weight_cache and its native helper: API, install build, fallbacks.

The option is process-wide, so everything that switches it runs in a fresh subprocess;
the in-process tests only read.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_python(script: str, *args: str, env: dict[str, str] | None = None) -> dict:
    """Run ``script`` in a fresh interpreter; it prints one JSON object as its last line."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        capture_output=True, text=True, env=full_env, timeout=300, check=False,
    )
    assert done.returncode == 0, (
        f"subprocess exited {done.returncode}\n"
        f"--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}"
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def tiny_pte(tmp_path_factory) -> Path:
    """Two methods over the same 2 x Linear(64, 64), lowered to XNNPACK."""
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)).eval()
    programs = {
        "prefill": torch.export.export(model, (torch.randn(4, 64),)),
        "decode": torch.export.export(model, (torch.randn(1, 64),)),
    }
    edge = to_edge_transform_and_lower(programs, partitioner=[XnnpackPartitioner()])
    path = tmp_path_factory.mktemp("weight_cache_api") / "tiny.pte"
    path.write_bytes(edge.to_executorch().buffer)
    return path


def test_install_built_the_helper():
    from lazykv.runtime_shim import native

    assert native.INSTALLED_LIBRARY.is_file(), (
        f"{native.INSTALLED_LIBRARY} was not built at install; reinstall with "
        "`LAZYKV_REQUIRE_NATIVE=1 .venv/bin/python -m pip install -e '.[test]'` to see why"
    )


def test_status_reads_without_switching():
    from lazykv.runtime_shim import weight_cache

    before = weight_cache.status()
    assert before.available, before.reason
    assert before.helper_origin == "install"
    assert weight_cache.is_available()
    assert weight_cache.is_enabled() == before.enabled


def test_enable_rejects_non_bool():
    from lazykv.runtime_shim import weight_cache

    with pytest.raises(TypeError, match="must be a bool"):
        weight_cache.enable(1)


def test_option_errors_name_the_backend_and_code():
    from lazykv.runtime_shim import native

    helper = native.load_helper()
    with pytest.raises(native.OptionError, match=r"'NoSuchBackend'.*NotFound"):
        helper.get_bool_option("NoSuchBackend", "weight_cache_enabled")
    # The XNNPACK backend refuses an int for this bool option, as fact 7 says.
    with pytest.raises(native.OptionError, match="InvalidArgument"):
        helper.set_int_option("XnnpackBackend", "weight_cache_enabled", 1)


_SWITCH = """
    import json, sys, torch
    from lazykv.runtime_shim import weight_cache
    from executorch.runtime import Runtime

    out = {"default": weight_cache.is_enabled()}
    out["on"] = weight_cache.enable(True)
    out["after_on"] = weight_cache.is_enabled()
    with weight_cache.enabled(False) as took:
        out["scoped_off"] = [took, weight_cache.is_enabled()]
    out["restored"] = weight_cache.is_enabled()
    prog = Runtime.get().load_program(sys.argv[1])
    x = torch.arange(64, dtype=torch.float32).reshape(1, 64) / 64
    on = prog.load_method("decode").execute([x])[0]
    out["off"] = weight_cache.enable(False)
    out["after_off"] = weight_cache.is_enabled()
    prog2 = Runtime.get().load_program(sys.argv[1])
    off = prog2.load_method("decode").execute([x])[0]
    out["bit_identical"] = bool(torch.equal(on, off))
    print(json.dumps(out))
"""


@pytest.mark.slow
def test_enable_switches_and_reads_back(tiny_pte):
    out = run_python(_SWITCH, str(tiny_pte))
    assert out == {
        "default": False,  # off by default in the wheel
        "on": True,
        "after_on": True,
        "scoped_off": [True, False],
        "restored": True,
        "off": True,
        "after_off": False,
        "bit_identical": True,
    }


_FALLBACK = """
    import json, sys, warnings, torch
    from pathlib import Path
    from lazykv.runtime_shim import native, weight_cache
    from executorch.runtime import Runtime

    native.INSTALLED_LIBRARY = Path(sys.argv[1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = weight_cache.enable(True)
        second = weight_cache.enable(True)
        off = weight_cache.enable(False)
    st = weight_cache.status()
    prog = Runtime.get().load_program(sys.argv[2])
    y = prog.load_method("decode").execute([torch.ones(1, 64)])[0]
    print(json.dumps({
        "first": first, "second": second, "off": off,
        "available": st.available, "origin": st.helper_origin, "reason": st.reason,
        "path": str(st.helper_path),
        "warnings": [[w.category.__name__, str(w.message)] for w in caught],
        "ran": list(y.shape),
    }))
"""


def _stale_helper(path: Path) -> Path:
    """A helper that claims another ExecuTorch version, as after an executorch upgrade."""
    from lazykv.runtime_shim.native import build

    real = build.find_executorch()
    build.compile_helper(path, build.ExecuTorchInstall(root=real.root, version="0.0.0-stale"))
    return path


@pytest.mark.parametrize("installed", ["missing", "stale", "garbage"])
def test_fallback_compiles_into_user_cache(tmp_path, monkeypatch, installed):
    # In-process: _load_uncached() loads a helper without touching any option, and each
    # case dlopens a file of its own (the loader never reuses a path across cases).
    from lazykv.runtime_shim import native

    lib = tmp_path / "installed" / "liblazykv_xnnpack_options.so"
    lib.parent.mkdir()
    if installed == "stale":
        _stale_helper(lib)
    elif installed == "garbage":
        lib.write_bytes(b"not an ELF file")
    cache = tmp_path / "cache"
    monkeypatch.setattr(native, "INSTALLED_LIBRARY", lib)
    monkeypatch.setenv("LAZYKV_CACHE_DIR", str(cache))
    helper = native._load_uncached()
    assert helper.info.origin == "user-cache"
    assert helper.info.path.is_file() and helper.info.path.is_relative_to(cache)
    assert helper.get_bool_option("XnnpackBackend", "weight_cache_enabled") in (False, True)
    # A second process finds the cached file and does not compile again.
    mtime = helper.info.path.stat().st_mtime_ns
    monkeypatch.setattr(native, "INSTALLED_LIBRARY", tmp_path / "absent.so")
    again = native._load_uncached()
    assert again.info.path == helper.info.path and again.info.path.stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_no_compiler_warns_once_and_runs_with_cache_off(tiny_pte, tmp_path):
    out = run_python(
        _FALLBACK, str(tmp_path / "absent.so"), str(tiny_pte),
        env={"LAZYKV_CACHE_DIR": str(tmp_path / "cache"), "CXX": "lazykv-no-such-compiler"},
    )
    assert (out["first"], out["second"], out["off"]) == (False, False, True)
    assert out["available"] is False and out["origin"] is None
    assert len(out["warnings"]) == 1, out["warnings"]
    category, message = out["warnings"][0]
    assert category == "WeightCacheUnavailableWarning"
    assert "lazykv-no-such-compiler" in message and "not built at install" in message
    assert out["ran"] == [1, 64]
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.so"))


@pytest.mark.slow  # a subprocess or an export of its own
def test_wheel_ships_helper_and_its_source(tmp_path):
    """A regular (non-editable) wheel carries the compiled helper and the fallback's source."""
    import shutil

    # Build from a copy: pip builds in-tree, and the work tree is shared.
    source = tmp_path / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", "*.so", "*.pte", "benchmarks"))
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--quiet", "-w", str(tmp_path), str(source)],
        capture_output=True, text=True, env={**os.environ, "LAZYKV_REQUIRE_NATIVE": "1"},
        timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = tmp_path.glob("lazykv-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("liblazykv_xnnpack_options.so", "__init__.py", "build.py", "xnnpack_options.cpp"):
        shipped = sorted(n for n in names if "runtime_shim/native" in n)
        assert f"lazykv/runtime_shim/native/{name}" in names, shipped
