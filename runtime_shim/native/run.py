"""The ``lazykv_run`` command: runs the C++ runner built at install (``lazykv_run`` next
to this file; source ``tools/lazykv_run.cpp``) in place of this process (``execv``), so
its memory and timing are the C++ program's alone."""

from __future__ import annotations

import os
import sys
from pathlib import Path

#: The runner ``setup.py`` builds (``runtime_shim/native/build.py: build_runtime``).
RUNNER = Path(__file__).resolve().with_name("lazykv_run")


def main() -> None:
    """Replace this process by the C++ runner with the same arguments; exit 2 with a
    message naming the fix if the install did not build it."""
    if not RUNNER.is_file():
        sys.stderr.write(
            f"lazykv_run: the native runner {RUNNER} was not built at install; reinstall "
            "with LAZYKV_REQUIRE_NATIVE=1 (make venv) to see why (needs cmake and a C++17 "
            "compiler)\n"
        )
        raise SystemExit(2)
    os.execv(str(RUNNER), [str(RUNNER), *sys.argv[1:]])


if __name__ == "__main__":
    main()
