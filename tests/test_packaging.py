"""The built wheel installs one import package, ``lazykv``, and nothing else top-level.

``test_foundation.test_one_package_nothing_top_level`` checks the installed tree, which
under an editable install (``make venv``) cannot show a stray top-level package; this
builds the real wheel from the source tree and lists what it would install.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installs_only_lazykv(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=900,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    (wheel,) = tmp_path.glob("lazykv-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = sorted({n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")})
    print(f"{wheel.name}: {len(names)} files; top level: {top}")
    assert top == ["lazykv"], top
    # Every module of the source folders is in it (pyproject.toml lists the packages by
    # hand: a new subpackage left out would work in an editable install only).
    folders = {"lazykv": "lazykv", "passes": "lazykv/passes", "runtime_shim": "lazykv/runtime_shim",
               "cli": "lazykv/cli", "examples": "lazykv/examples"}
    missing = []
    for folder, target in folders.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder)
            if folder == "lazykv" and rel.parts[0] in folders or "__pycache__" in rel.parts:
                continue
            if not all((ROOT / folder / Path(*rel.parts[:i]) / "__init__.py").exists()
                       for i in range(len(rel.parts))):
                continue  # not in a package (examples/ci: a user's CI example)
            if f"{target}/{rel.as_posix()}" not in names:
                missing.append(f"{target}/{rel.as_posix()}")
    assert not missing, missing
    assert "lazykv/runtime_shim/native/xnnpack_options.cpp" in names
    assert not [n for n in names if n.startswith("lazykv/tests") or "/__pycache__/" in n]
