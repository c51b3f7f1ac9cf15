"""Write a rebound program: its patched flatbuffer region, then the source's segment
bytes, copied file to file (``copy_file_range``: the weights never pass through Python).

The runtime then loads the copy from its path (``mmap``); loading from ``bytes`` would
keep an anonymous copy of every weight (DESIGN fact 11). A native loader that serves the
patched region and passes segment reads to the original file would make this copy
unnecessary; nothing else in the shim depends on it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional

from lazykv.errors import InvalidProgram
from lazykv.format.rebind import Rebound


def write_rebound(dest: Path, rebound: Rebound, src_path: Optional[str], src_data,
                  src_segment_base: int) -> None:
    """Write ``rebound.region`` then the source's bytes from ``src_segment_base`` to its
    end (from ``src_path``, or ``src_data`` when it is None) to ``dest``, atomically."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".tmp", dir=str(dest.parent))
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(rebound.region)
            out.flush()
            length = rebound.segment_data_size
            if length:
                if src_path is not None:
                    with open(src_path, "rb") as src:
                        _copy_range(src, out, src_segment_base, length)
                else:
                    out.write(memoryview(src_data)[src_segment_base : src_segment_base + length])
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, dest)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _copy_range(src, out, start: int, length: int) -> None:
    out.flush()
    off_in = start
    remaining = length
    if hasattr(os, "copy_file_range"):
        try:
            while remaining > 0:
                n = os.copy_file_range(src.fileno(), out.fileno(), remaining, off_in)
                if n == 0:
                    break
                off_in += n
                remaining -= n
            if remaining == 0:
                return
        except OSError:
            pass
    src.seek(off_in)
    out.seek(0, os.SEEK_END)
    while remaining > 0:
        chunk = src.read(min(remaining, 8 << 20))
        if not chunk:
            raise InvalidProgram(f"{src.name}: truncated while copying segments")
        out.write(chunk)
        remaining -= len(chunk)
