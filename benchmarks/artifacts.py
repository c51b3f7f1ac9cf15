"""Programs the benchmarks need, exported once into ``benchmarks/cache/``.

Each artifact is a small dict (an :class:`Art`). Its file name carries a hash of that
dict, of the library versions and of the sources that shape the ``.pte`` (the export
code, and for lazy programs the passes), so a change to any of them re-exports and a
cached file is never stale. Every export runs in its own subprocess (memory is bounded
by that process and given back when it ends); the parent records the child's wall time
and peak RSS (``wait4``) next to the file, in ``<file>.json``: the export case reads
those figures.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional

from benchmarks.common import CACHE, GIB, ROOT, log, meminfo, now, versions, worker

# Sources whose change changes the exported program.
_EXPORT_SOURCES = ["lazykv/export.py", "lazykv/models/llama.py", "lazykv/manifest.py",
                   "lazykv/_et_compat.py", "lazykv/format/scalar_type.py"]
_LAZY_SOURCES = ["passes"]  # lazy and multi-method exports run lazykv's passes
#: Bump when the benchmark's own two-method program changes.
_LINEAR_VERSION = 1

# Llama sizes (n_layers, KV bytes per position), for the memory guard only.
_PRESET_LAYERS = {"tiny": 4, "stories110m": 12}
_PRESET_BPP = {"tiny": 2 * 4 * 4 * 32 * 4, "stories110m": 2 * 12 * 12 * 64 * 4}


_KEYS: Dict["Art", str] = {}


@dataclasses.dataclass(frozen=True)
class Art:
    """One program to export. ``kind``: ``llama`` (ExecuTorch's Llama through
    :func:`lazykv.export.export_model`) or ``linear2`` (8 x Linear(2048, 2048) with a
    ``prefill`` and a ``decode`` method, built by the benchmark)."""

    kind: str = "llama"
    preset: str = "tiny"
    max_context: int = 0
    lazy: bool = False
    methods: tuple = ()  # () = forward only; ("prefill", "decode") where supported

    @property
    def label(self) -> str:
        if self.kind == "linear2":
            return "linear8x2048-2methods"
        m = "-" + "+".join(self.methods) if self.methods else ""
        return f"{self.preset}-{'lazy' if self.lazy else 'static'}-{self.max_context}{m}"

    def key(self) -> str:
        """Computed once per process: sources edited while an export runs must not move
        the file under its own record."""
        k = _KEYS.get(self)
        if k is None:
            k = _KEYS[self] = self._compute_key()
        return k

    def _compute_key(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps(dataclasses.asdict(self), sort_keys=True).encode())
        h.update(json.dumps(versions(), sort_keys=True).encode())
        if self.kind == "linear2":
            h.update(str(_LINEAR_VERSION).encode())
        else:
            for src in _EXPORT_SOURCES + (_LAZY_SOURCES if self.lazy or len(self.methods) > 1 else []):
                for f in sorted(_files(ROOT / src)):
                    h.update(f.relative_to(ROOT).as_posix().encode())
                    h.update(f.read_bytes())
        return h.hexdigest()[:16]

    @property
    def path(self) -> Path:
        return CACHE / f"{self.label}-{self.key()}.pte"

    @property
    def record_path(self) -> Path:
        return self.path.with_suffix(".json")

    @property
    def failed_path(self) -> Path:
        """Written when the export fails, so the same sources are not retried every run."""
        return self.path.with_suffix(".failed")

    def record(self) -> Optional[dict]:
        """What the export measured (wall, peak RSS, planned bytes), if built."""
        if not (self.path.exists() and self.record_path.exists()):
            return None
        return json.loads(self.record_path.read_text())

    @property
    def exists(self) -> bool:
        return self.record() is not None

    def export_estimate(self) -> int:
        """Rough peak RSS of the export, for the memory guard.

        Static: DESIGN fact 9's fit for stories110m (1.9 GB + 4.5 x KV + 12 N^2 bytes of
        masks), fact 1 for tiny. Lazy: no masks, but the KV buffers are still
        materialised once while exporting (measured: stories110m 2.4 GB at 2048, 4.2 GB
        at 32768)."""
        n = self.max_context
        if self.kind != "llama":
            return 2 * GIB
        kv = _PRESET_BPP.get(self.preset, 0) * n
        if self.lazy:
            return int((2.2e9 if self.preset == "stories110m" else 0.6e9) + kv)
        if self.preset == "stories110m":
            return int(1.9e9 + 4.5 * kv + 12 * n * n)
        return int(0.8e9 + 2.5 * _PRESET_LAYERS.get(self.preset, 12) * n * n + 4.5 * kv)


def _files(p: Path) -> Iterable[Path]:
    if p.is_dir():
        return [f for f in p.rglob("*.py") if "__pycache__" not in f.parts]
    return [p] if p.exists() else []


def supports_methods() -> bool:
    """Whether ``lazykv.export.ExportConfig`` has a ``methods`` field (multi-method export).

    Read from the source, so the parent process never imports torch."""
    import ast

    tree = ast.parse((ROOT / "lazykv" / "export.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == "ExportConfig":
            return any(isinstance(b, ast.AnnAssign) and getattr(b.target, "id", None) == "methods"
                       for b in node.body)
    return False


_reserve_lock = threading.Lock()
_reserved = 0  # estimated peak bytes of the exports running now (parallel builds)


def _reserve(art: Art, fraction: float = 0.8) -> int:
    """Wait until ``art``'s estimated export peak fits next to the exports already
    running; raise MemoryError if it cannot fit even alone."""
    global _reserved
    need = art.export_estimate()
    while True:
        with _reserve_lock:
            # Conservative: what running exports hold now is both out of MemAvailable and
            # still counted in their reservation.
            avail = fraction * meminfo().get("MemAvailable", 0)
            if need + _reserved <= avail:
                _reserved += need
                return need
            if _reserved == 0:
                raise MemoryError(
                    f"{art.label}: the export needs about {need / GIB:.1f} GiB and "
                    f"{meminfo().get('MemAvailable', 0) / GIB:.1f} GiB are available"
                )
        time.sleep(2)


def _release(need: int) -> None:
    global _reserved
    with _reserve_lock:
        _reserved -= need


def build(art: Art, force: bool = False, cpus: Optional[set] = None) -> dict:
    """Export ``art`` (in a subprocess, pinned to ``cpus`` if given) unless cached;
    returns its record."""
    rec = art.record()
    if rec is not None and not force:
        return rec
    if art.failed_path.exists() and not force:
        raise RuntimeError(f"export failed before with these sources ({art.failed_path.name}): "
                           + art.failed_path.read_text().strip().splitlines()[-1])
    need = _reserve(art)
    try:
        return _build(art, cpus)
    finally:
        _release(need)


def _build(art: Art, cpus: Optional[set]) -> dict:
    CACHE.mkdir(parents=True, exist_ok=True)
    # Stale files of the same label (older sources) go; the cache holds one per label.
    for old in CACHE.glob(f"{art.label}-*.pte"):
        if old != art.path:
            old.unlink(missing_ok=True)
            old.with_suffix(".json").unlink(missing_ok=True)
    for old in CACHE.glob(f"{art.label}-*.failed"):
        old.unlink(missing_ok=True)
    where = f" on CPU {','.join(map(str, sorted(cpus)))}" if cpus else ""
    log(f"exporting {art.label} (subprocess{where}) ...")
    try:
        run = worker("export", art=dataclasses.asdict(art), out=str(art.path), timeout=3600, _cpus=cpus)
    except RuntimeError as e:
        art.failed_path.write_text(str(e)[-4000:])
        raise
    rec = dict(run.out)
    rec.update(
        label=art.label,
        art=dataclasses.asdict(art),
        wall_seconds=run.wall_seconds,
        peak_rss_bytes=run.peak_rss_bytes,
        cpu_seconds=run.cpu_seconds,
        built=now(),
        cpus=sorted(cpus) if cpus else None,
        loadavg_after=os.getloadavg()[0],
    )
    art.record_path.write_text(json.dumps(rec, indent=1) + "\n")
    log(f"exported {art.label}: {run.wall_seconds:.0f} s ({run.cpu_seconds:.0f} s CPU), peak RSS {run.peak_rss_bytes / GIB:.2f} GiB, "
        f"planned {rec.get('planned_bytes', 0):,} B")
    return rec


def prepare_checkpoints(presets: Iterable[str]) -> None:
    """Write the random checkpoints first, so no timed export pays for them."""
    presets = sorted(set(presets))
    if presets:
        worker("checkpoints", presets=presets)


def _try_build(a: Art, force: bool, cpus: Optional[set] = None) -> Optional[dict]:
    try:
        return build(a, force=force, cpus=cpus)
    except (MemoryError, RuntimeError) as e:
        log(f"skipping {a.label}: {str(e).strip().splitlines()[-1][:300]}")
        return None


def build_all(arts: List[Art], jobs: int = 2, rebuild_timed: bool = False) -> Dict[Art, Optional[dict]]:
    """Export what is missing; an export that cannot run is recorded as None.

    ``tiny`` Llama programs are the export case's subjects (their wall time and peak RSS
    are reported), so they must be built under equal conditions. With ``jobs`` >= 2 the
    exports run in lanes, each lane pinned to its own CPU (exports are mostly
    single-threaded): lane 0 builds the timed programs one after another, then helps
    with the rest; the other lanes build the rest (stories110m, the two-method program)
    from the start. With ``jobs`` = 1 everything runs one at a time, unpinned.
    """
    import threading
    from collections import deque

    arts = list(dict.fromkeys(arts))
    missing = [a for a in arts if not a.exists or (rebuild_timed and is_timed(a))]
    prepare_checkpoints(a.preset for a in missing if a.kind == "llama")
    out: Dict[Art, Optional[dict]] = {a: a.record() for a in arts}
    timed = [a for a in missing if is_timed(a)]
    rest = deque(sorted((a for a in missing if not is_timed(a)), key=lambda a: -a.export_estimate()))
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    lanes = min(jobs, len(cpus))
    if lanes <= 1:
        for a in timed + list(rest):
            out[a] = _try_build(a, force=rebuild_timed and is_timed(a))
        return out
    lock = threading.Lock()

    def lane(i: int) -> None:
        cpu = {cpus[i]}
        if i == 0:
            for a in timed:
                out[a] = _try_build(a, force=rebuild_timed, cpus=cpu)
        while True:
            with lock:
                if not rest:
                    return
                a = rest.popleft()
            out[a] = _try_build(a, force=False, cpus=cpu)

    threads = [threading.Thread(target=lane, args=(i,), daemon=True) for i in range(lanes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def export_records(recs: Dict[Art, Optional[dict]]) -> Dict[str, dict]:
    """What each export cost (for the results' "cold cache" table), by label."""
    keys = ("wall_seconds", "cpu_seconds", "peak_rss_bytes", "built", "cpus", "loadavg_after")
    return {a.label: {k: r.get(k) for k in keys} for a, r in recs.items() if r}


def is_timed(a: Art) -> bool:
    """Programs whose export wall time and peak RSS the export case reports."""
    return a.kind == "llama" and a.preset == "tiny"
