"""Rebind lazy KV buffers as caller-owned inputs, rewriting only the program flatbuffer.

The stock runtime refuses ``DYNAMIC_UNBOUND`` tensors (DESIGN fact 4). What it accepts
(fact 5) is the same tensor marked ``DYNAMIC_BOUND``, with no ``allocation_info``, listed
among the plan's ``inputs``: the caller then passes storage of any capacity up to the
bound and the runtime writes it in place.

Only the program flatbuffer (tens to hundreds of KB) is parsed and re-serialized; the
segment bytes (weights) are copied file-to-file, never read into Python, and the result
is written to a cache file keyed by the source's hash so the runtime can ``mmap`` it from
a path (loading from ``bytes`` keeps an anonymous copy of every weight, fact 11). The
program region is padded so the segment base offset is unchanged whenever the rewritten
flatbuffer fits; otherwise the segments move by a multiple of their alignment.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from executorch.exir._serialize._flatbuffer_program import _program_to_flatbuffer
from executorch.exir._serialize._program import (
    _ExtendedHeader,
    _insert_flatbuffer_header,
)
from executorch.exir._serialize.padding import aligned_size, pad_to
from executorch.exir.schema import (
    ExtraTensorInfo,
    Program,
    Tensor,
    TensorShapeDynamism,
)

from lazykv import disk_cache
from lazykv.disk_cache import cache_dir as default_cache_dir  # the one cache folder
from lazykv.errors import InvalidProgram
from lazykv.manifest import Manifest
from lazykv.output_path import atomic_write
from lazykv.pte_file import PteFile

logger = logging.getLogger(__name__)

#: Bump when the rewrite changes, so stale cache files are never reused.
_REWRITE_VERSION = 1
_SEGMENT_ALIGNMENT = 128


@dataclasses.dataclass(frozen=True)
class BoundMethod:
    """How one method's lazy buffers were rebound.

    ``user_inputs`` is the number of inputs the user passes; ``kv_fqns`` lists the lazy
    buffers appended after them, in order (the shim passes their storage there).
    """

    name: str
    user_inputs: int
    kv_fqns: Tuple[str, ...]


def _lazy_tensors(program: Program, plan_index: int) -> Dict[int, Tensor]:
    plan = program.execution_plan[plan_index]
    out = {}
    for i, v in enumerate(plan.values):
        t = v.val
        if isinstance(t, Tensor) and t.shape_dynamism == TensorShapeDynamism.DYNAMIC_UNBOUND:
            out[i] = t
    return out


def find_lazy_tensors(pte: PteFile, manifest: Manifest) -> Dict[str, Dict[str, int]]:
    """``{method: {fqn: value index}}`` of every lazy buffer, checked against the manifest.

    Raises :class:`InvalidProgram` if a manifest buffer is missing from a method that the
    manifest says uses it, or if its recorded shape or dtype disagrees with the tensor.
    """
    from lazykv.manifest import DTYPE_BYTES  # noqa: F401  (dtype names checked below)

    result: Dict[str, Dict[str, int]] = {}
    for pi, plan in enumerate(pte.program.execution_plan):
        found: Dict[str, int] = {}
        for idx, t in _lazy_tensors(pte.program, pi).items():
            fqn = t.extra_tensor_info.fully_qualified_name if t.extra_tensor_info else None
            if fqn is None:
                raise InvalidProgram(
                    f"{pte.source}: method {plan.name!r} value {idx} is DYNAMIC_UNBOUND but "
                    f"has no fully qualified name; re-export with lazykv"
                )
            try:
                lb = manifest.buffer(fqn)
            except KeyError:
                raise InvalidProgram(
                    f"{pte.source}: method {plan.name!r} has a DYNAMIC_UNBOUND tensor "
                    f"{fqn!r} that the lazykv manifest does not list; re-export with lazykv"
                ) from None
            if tuple(t.sizes) != tuple(lb.max_shape):
                raise InvalidProgram(
                    f"{pte.source}: lazy buffer {fqn!r} in {plan.name!r} has shape "
                    f"{list(t.sizes)} but the manifest says {list(lb.max_shape)}"
                )
            if _SCALAR_TYPE_NAMES.get(int(t.scalar_type)) != lb.dtype:
                raise InvalidProgram(
                    f"{pte.source}: lazy buffer {fqn!r} in {plan.name!r} has scalar type "
                    f"{int(t.scalar_type)} but the manifest says {lb.dtype}"
                )
            if fqn in found:
                raise InvalidProgram(
                    f"{pte.source}: lazy buffer {fqn!r} appears twice in {plan.name!r}"
                )
            found[fqn] = idx
        for lb in manifest.buffers_of(plan.name):
            if lb.fqn not in found:
                raise InvalidProgram(
                    f"{pte.source}: the manifest says {plan.name!r} uses lazy buffer "
                    f"{lb.fqn!r} but that method has no DYNAMIC_UNBOUND tensor by that name"
                )
        if found:
            result[plan.name] = found
    return result


# executorch ScalarType codes -> manifest dtype names.
_SCALAR_TYPE_NAMES = {
    0: "uint8",
    1: "int8",
    2: "int16",
    3: "int32",
    4: "int64",
    5: "float16",
    6: "float32",
    7: "float64",
    11: "bool",
    15: "bfloat16",
}


def bound_methods(pte: PteFile, manifest: Manifest) -> Dict[str, BoundMethod]:
    """Per method: its user input count and the lazy buffers appended after them, in
    manifest order (the order the shim passes their storage)."""
    where = find_lazy_tensors(pte, manifest)
    bound: Dict[str, BoundMethod] = {}
    for plan in pte.program.execution_plan:
        fqn_to_idx = where.get(plan.name, {})
        fqns = tuple(b.fqn for b in manifest.lazy_buffers if b.fqn in fqn_to_idx)
        bound[plan.name] = BoundMethod(plan.name, len(plan.inputs), fqns)
    return bound


def rebind_program(pte: PteFile, manifest: Manifest) -> Tuple[Program, Dict[str, BoundMethod]]:
    """A copy of ``pte.program`` with every lazy buffer turned into a trailing input."""
    where = find_lazy_tensors(pte, manifest)
    bound = bound_methods(pte, manifest)
    program = copy.deepcopy(pte.program)
    for plan in program.execution_plan:
        for fqn in bound[plan.name].kv_fqns:
            idx = where[plan.name][fqn]
            t = plan.values[idx].val
            t.shape_dynamism = TensorShapeDynamism.DYNAMIC_BOUND
            t.allocation_info = None
            plan.inputs.append(idx)
    return program, bound


def serialize_program_region(
    program: Program, old_segment_base: int, min_alignment: int = _SEGMENT_ALIGNMENT
) -> Tuple[bytes, int]:
    """Flatbuffer + extended header, padded to the new segment base offset.

    Returns ``(region, segment_base_offset)``. The base offset stays ``old_segment_base``
    when the new program fits in front of it; otherwise it moves to the next multiple of
    the old base's alignment (so every segment keeps its alignment).
    """
    result = _program_to_flatbuffer(program)
    if old_segment_base == 0:
        return bytes(result.data), 0  # no segments: no extended header (as ExecuTorch)
    header_len = aligned_size(_ExtendedHeader.EXPECTED_LENGTH, result.max_alignment)
    program_size = header_len + len(result.data)
    base = old_segment_base
    if program_size > base:
        # The largest power of two dividing the old base (capped) keeps segment alignment.
        align = max(min_alignment, min(old_segment_base & -old_segment_base, 1 << 16))
        base = aligned_size(program_size, align)
    header = _ExtendedHeader(
        program_size=program_size,
        segment_base_offset=base,
        segment_data_size=0,  # filled by the caller via patch_segment_size
    ).to_bytes()
    data = _insert_flatbuffer_header(
        result.data, r"ET[0-9a-zA-Z][0-9a-zA-Z]", pad_to(header, header_len)
    )
    assert len(data) == program_size
    return data + b"\x00" * (base - program_size), base


def _patch_segment_size(region: bytes, segment_data_size: int) -> bytes:
    eh = _ExtendedHeader.from_bytes(region[8:64])
    eh.segment_data_size = segment_data_size
    hb = eh.to_bytes()
    return region[:8] + hb + region[8 + len(hb) :]


def write_with_segments(
    dest: Path,
    region: bytes,
    src_path: Optional[str],
    src_data,
    seg_start: int,
    seg_len: int,
    extra: bytes = b"",
) -> None:
    """Write ``region`` + the source's segment bytes (file-to-file copy) + ``extra``."""
    region = _patch_segment_size(region, seg_len + len(extra)) if (seg_len or extra) else region
    # A temporary file renamed over dest when complete, removed on any failure.
    with atomic_write(dest, "the rebound program", fix=disk_cache.FIX) as out:
        out.write(region)
        out.flush()
        if seg_len:
            if src_path is not None:
                with open(src_path, "rb") as src:
                    _copy_range(src, out, seg_start, seg_len)
            else:
                out.write(memoryview(src_data)[seg_start : seg_start + seg_len])
        if extra:
            out.write(extra)


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


def memoized_key(path: str, cache_dir: Optional[Path] = None) -> Optional[str]:
    """The memoized sha256 of ``path`` if its (size, mtime, inode) are unchanged, else None."""
    st = os.stat(path)
    stamp = (st.st_size, st.st_mtime_ns, st.st_ino)
    memo = _HASH_MEMO.get(os.path.abspath(path))
    if memo and memo[0] == stamp:
        return memo[1]
    memo_file = Path(cache_dir or default_cache_dir()) / "hashes" / (
        hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:32]
    )
    try:
        parts = memo_file.read_text().split()
        if len(parts) == 4 and tuple(int(x) for x in parts[:3]) == stamp:
            _HASH_MEMO[os.path.abspath(path)] = (stamp, parts[3])
            return parts[3]
    except (OSError, ValueError):
        pass
    return None


def source_key(path: Optional[str], data, cache_dir: Optional[Path] = None) -> str:
    """sha256 of the source ``.pte``'s bytes, memoized by (size, mtime, inode) in memory
    and in ``cache_dir/hashes`` so a cached load does not re-read the weights."""
    if path is None:
        return hashlib.sha256(memoryview(data)).hexdigest()
    known = memoized_key(path, cache_dir)
    if known is not None:
        return known
    st = os.stat(path)
    stamp = (st.st_size, st.st_mtime_ns, st.st_ino)
    memo_file = Path(cache_dir or default_cache_dir()) / "hashes" / (
        hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:32]
    )
    # One reused buffer: a fresh 8 MiB bytes object per read costs a page fault per 4 KiB
    # (the first load of stories110m hashes 537 MB on its critical path).
    h = hashlib.sha256()
    buf = bytearray(8 << 20)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    digest = h.hexdigest()
    _HASH_MEMO[os.path.abspath(path)] = (stamp, digest)
    try:
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        memo_file.write_text(" ".join(str(x) for x in stamp) + " " + digest)
    except OSError:
        pass
    return digest


_HASH_MEMO: Dict[str, tuple] = {}


def bound_path(cache_dir: Path, digest: str) -> Path:
    """Where the rebound copy of the program with sha256 ``digest`` is cached."""
    return Path(cache_dir) / f"{digest}.v{_REWRITE_VERSION}.bound.pte"


def _sidecar_path(cache_dir: Path, digest: str) -> Path:
    return Path(cache_dir) / f"{digest}.v{_REWRITE_VERSION}.meta.json"


def read_sidecar(cache_dir: Path, digest: str) -> Optional[dict]:
    """What a previous load learnt from the flatbuffer, or None (then parse it again).

    Valid only if, for a lazy program, its rebound file is also there."""
    try:
        meta = json.loads(_sidecar_path(cache_dir, digest).read_text())
        if not isinstance(meta, dict) or meta.get("digest") != digest:
            return None
        if meta.get("lazy") and not bound_path(cache_dir, digest).exists():
            return None
        return meta
    except (OSError, ValueError):
        return None


def write_sidecar(cache_dir: Path, digest: str, meta: dict) -> None:
    path = _sidecar_path(cache_dir, digest)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**meta, "digest": digest}, default=str))
        os.replace(tmp, path)
    except OSError as e:  # a read-only cache only costs speed
        logger.info("cannot write %s: %s", path, e)


def bound_file(
    pte: PteFile,
    manifest: Manifest,
    src_path: Optional[str],
    digest: str,
    cache_dir: Optional[Path] = None,
) -> Tuple[Path, Dict[str, BoundMethod], bool]:
    """Path of the rebound ``.pte`` for ``pte`` (written on first use, then cached).

    Returns ``(path, bound methods, cache_hit)``.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    dest = bound_path(cache_dir, digest)
    if dest.exists():
        return dest, bound_methods(pte, manifest), True
    program, bound = rebind_program(pte, manifest)
    seg_start = pte.segment_base_offset
    seg_len = pte.file_size - seg_start if seg_start else 0
    region, _ = serialize_program_region(program, seg_start)
    write_with_segments(dest, region, src_path, pte._data, seg_start, seg_len)
    logger.info("wrote rebound program %s", dest)
    return dest, bound, False
