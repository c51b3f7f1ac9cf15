"""lazykv's disk cache folder: one place decides where it is.

``$LAZYKV_CACHE_DIR`` if set (``~`` expanded), else ``$XDG_CACHE_HOME/lazykv``, else
``~/.cache/lazykv``. What lives there: the runtime shim's rebound programs and prepared
metadata (:mod:`lazykv.runtime_shim.program_cache`), random-weight checkpoints written by
``lazykv export``, the native helper when compiled on first use. Standard library only.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_DIR = "LAZYKV_CACHE_DIR"


def cache_dir() -> Path:
    """The cache folder (see the module doc); not created here."""
    explicit = os.environ.get(ENV_DIR)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "lazykv"
