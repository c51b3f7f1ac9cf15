"""Write a rebound program: its patched flatbuffer region, then the source's segment
bytes, copied file to file (``copy_file_range``: the weights never pass through Python).

The runtime then loads the copy from its path (``mmap``); loading from ``bytes`` would
keep an anonymous copy of every weight (DESIGN fact 11). A native loader that serves the
patched region and passes segment reads to the original file would make this copy
unnecessary; nothing else in the shim depends on it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from lazykv import disk_cache
from lazykv.errors import InvalidProgram
from lazykv.format.rebind import Rebound
from lazykv.output_path import atomic_write


def write_rebound(dest: Path, rebound: Rebound, src_path: Optional[str], src_data,
                  src_segment_base: int) -> None:
    """Write ``rebound.region`` then the source's bytes from ``src_segment_base`` to its
    end (from ``src_path``, or ``src_data`` when it is None) to ``dest``, atomically."""
    # A temporary file renamed over dest when complete, removed on any failure.
    with atomic_write(dest, "the rebound program", fix=disk_cache.FIX) as out:
        out.write(rebound.region)
        out.flush()
        length = rebound.segment_data_size
        if length:
            if src_path is not None:
                with open(src_path, "rb") as src:
                    _copy_range(src, out, src_segment_base, length)
            else:
                out.write(memoryview(src_data)[src_segment_base : src_segment_base + length])


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
