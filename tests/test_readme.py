"""The README as a newcomer reads it: its first Python block runs as pasted, and it says
how to install lazykv elsewhere and where the disk cache is."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _first_python_block(text: str) -> str:
    m = re.search(r"^```python\n(.*?)^```", text, re.S | re.M)
    assert m, "README.md has no ```python block"
    return m.group(1)


@pytest.mark.slow  # a subprocess or an export of its own
def test_first_python_block_runs_as_pasted(tmp_path):
    """Extracted and run in a fresh interpreter, in an empty folder: exit 0, tokens printed,
    the KV cache grew with the positions (not the whole bound)."""
    script = tmp_path / "readme_example.py"
    script.write_text(_first_python_block(README))
    env = dict(os.environ, LAZYKV_CACHE_DIR=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    m = re.search(r"^tokens: \[(.*)\]$", r.stdout, re.M)
    assert m, r.stdout
    assert len(m.group(1).split(",")) == 10
    held = re.search(r"KV bytes held: ([\d,]+) for 15 positions", r.stdout)
    assert held, r.stdout
    # The example decoder at max context 1024: 2 layers x (K + V) x 2 KV heads x 32 dims
    # x 4 bytes = 1,024 bytes a position; doubling holds 16 for 15 positions.
    assert int(held.group(1).replace(",", "")) == 16 * 1024
    assert (tmp_path / "model.pte").stat().st_size > 0


def test_readme_says_how_to_install_elsewhere_and_where_the_cache_is():
    assert "pip install /path/to/lazykv" in README
    assert "only works inside this repository" in README
    for name in ("LAZYKV_CACHE_DIR", "LAZYKV_CACHE_MAX_BYTES=0", "lazykv cache clear", "~/.cache/lazykv"):
        assert name in README, name
    ci = (ROOT / "examples" / "ci" / "lazykv-check.yml").read_text()
    # `pip install -e .` there would install the user's own repository, not lazykv.
    assert not re.search(r"^\s*python -m pip install[^\n]* -e \.", ci, re.M)
    assert "./.lazykv" in ci
