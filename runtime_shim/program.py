"""``load()``: a ``.pte`` on the stock runtime, its lazy KV buffers rebound as inputs."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import threading
import time
from struct import error as struct_error
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from executorch.exir.schema import (
    Bool,
    Double,
    Int,
    Tensor,
    TensorShapeDynamism,
)

from lazykv import disk_cache
from lazykv.errors import (
    InvalidInput,
    LazyKVError,
    MemoryBudgetExceeded,
    UnknownMethod,
    runtime_error,
)
from lazykv.manifest import LazyBuffer, Manifest
from lazykv.output_path import write_bytes
from lazykv.units import parse_size
from lazykv.pte_file import MethodLimits, PteFile, open_pte, preflight
from lazykv.runtime_shim import binding
from lazykv.runtime_shim.allocator import DynamicAllocator, TorchAllocator
from lazykv.runtime_shim.policy import GrowthPolicy, parse_policy

logger = logging.getLogger(__name__)

# executorch ScalarType code -> torch dtype.
_TORCH_DTYPES = {
    0: torch.uint8,
    1: torch.int8,
    2: torch.int16,
    3: torch.int32,
    4: torch.int64,
    5: torch.float16,
    6: torch.float32,
    7: torch.float64,
    11: torch.bool,
    15: torch.bfloat16,
}
_MANIFEST_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "bool": torch.bool,
}

_RUNTIME_LOCK = threading.Lock()
_RUNTIME = None


def _runtime():
    """The ExecuTorch runtime with the kernel libraries of the installed ExecuTorch
    registered (LLM custom ops, quantized kernels: DESIGN facts 3 and 12)."""
    global _RUNTIME
    with _RUNTIME_LOCK:
        if _RUNTIME is None:
            from lazykv.runtime_shim.kernels import load_kernel_libraries

            load_kernel_libraries()
            from executorch.runtime import Runtime

            _RUNTIME = Runtime.get()
        return _RUNTIME


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """What one user input of a method must look like (from the program flatbuffer)."""

    index: int
    kind: str  # "tensor", "int", "float", "bool", "other"
    dtype: Optional[torch.dtype] = None
    sizes: Tuple[int, ...] = ()
    dynamic: bool = False

    @staticmethod
    def from_dict(d: dict) -> "InputSpec":
        dt = d.get("dtype")
        return InputSpec(
            index=int(d["index"]),
            kind=str(d["kind"]),
            dtype=None if dt is None else getattr(torch, str(dt).replace("torch.", "")),
            sizes=tuple(int(x) for x in d.get("sizes", ())),
            dynamic=bool(d.get("dynamic", False)),
        )

    def describe(self) -> str:
        if self.kind != "tensor":
            return self.kind
        dims = "x".join(str(d) for d in self.sizes)
        return f"{str(self.dtype).replace('torch.', '')}[{dims}]" + (
            " (dims up to these)" if self.dynamic else ""
        )


@dataclasses.dataclass(frozen=True)
class MethodInfo:
    """A method as the shim sees it: user inputs, lazy buffers, fill rule, bound."""

    name: str
    inputs: Tuple[InputSpec, ...]
    lazy_fqns: Tuple[str, ...]

    @property
    def uses_lazy(self) -> bool:
        return bool(self.lazy_fqns)


class LazyProgram:
    """A loaded program. Make sessions with :meth:`session`; restore one with :meth:`restore`.

    Weights and the runtime's method state are loaded once per program; each session
    owns only its KV storage. Use :func:`load` to build one.
    """

    def __init__(
        self,
        source: Union[str, os.PathLike, bytes, bytearray, memoryview],
        policy: Union[str, GrowthPolicy, None] = "doubling",
        max_bytes: Optional[int] = None,
        *,
        allocator: Optional[DynamicAllocator] = None,
        cache_dir: Optional[Union[str, os.PathLike]] = None,
        weight_cache: Optional[bool] = None,
    ) -> None:
        t0 = time.perf_counter()
        self.policy: GrowthPolicy = parse_policy(policy)
        # Bytes, or a size string ("64MiB", "64MB"): lazykv.units, like every size.
        self.max_bytes: Optional[int] = None if max_bytes is None else parse_size(max_bytes, "max_bytes")
        self.allocator: DynamicAllocator = allocator or TorchAllocator()
        # The one cache folder, bounded (lazykv.disk_cache); a temporary one when it is off.
        cache = disk_cache.LoadCache(cache_dir)
        cache_dir = cache.dir

        if isinstance(source, (bytes, bytearray, memoryview)):
            src_path, data = None, bytes(source)
        else:
            src_path, data = os.fspath(source), None
            if not os.path.isfile(src_path):
                open_pte(src_path)  # raises InvalidProgram naming the problem
        self.source = src_path or "<bytes>"
        # The sha256 of a file seen before is memoized by (size, mtime, inode). For a new
        # file it is computed in a thread while the flatbuffer is patched and the
        # segments copied (both release the GIL), so the two costs overlap.
        self._digest_future = None
        if src_path is None:
            self.digest = binding.source_key(None, data)
        else:
            self.digest = binding.memoized_key(src_path, cache_dir)
            if self.digest is None:
                from concurrent.futures import ThreadPoolExecutor

                pool = ThreadPoolExecutor(max_workers=1)
                self._digest_future = pool.submit(binding.source_key, src_path, None, cache_dir)
                pool.shutdown(wait=False)
        meta = None
        self.cache_hit = None
        if self.digest is not None:
            # A cached load reads a small sidecar instead of parsing the flatbuffer. The
            # sidecar is written only after the program passed validation (below); one
            # without input limits predates it and does not count.
            meta = binding.read_sidecar(cache_dir, self.digest)
            if meta is not None and "limits" not in meta:
                meta = None
            if meta is not None:
                self.cache_hit = True
        limits = None
        if meta is None:
            # Nothing reaches the C++ runtime unchecked: ExecuTorch trusts the program's
            # meaning and aborts the process on much of what a corrupt file holds
            # (lazykv.pte_validate; tests/test_fuzz_pte.py). Raw flatbuffer plus a shape
            # pass: ~15 ms for the example decoder, ~0.25 s for stories110m; first load
            # only, and while the segments are copied (the copy releases the GIL).
            def validate() -> dict:
                checked = preflight(data if src_path is None else src_path)
                return {k: v.as_dict() for k, v in checked.limits.items()}

            meta, limits = self._fast_rebind(src_path, data, cache_dir, validate)
            if limits is None:
                limits = validate()
        self._resolve_digest()
        if meta is None:
            pte = open_pte(data if src_path is None else src_path)
            try:
                manifest = pte.manifest
                lazy = manifest is not None and bool(manifest.lazy_buffers)
                if lazy:
                    path, bound, hit = binding.bound_file(pte, manifest, src_path, self.digest, cache_dir)
                    self.cache_hit = hit
                else:
                    bound = {
                        p.name: binding.BoundMethod(p.name, len(p.inputs), ())
                        for p in pte.program.execution_plan
                    }
                meta = {
                    "lazy": lazy,
                    "manifest": manifest.to_json() if manifest is not None else None,
                    "method_names": pte.method_names,
                    "methods": {
                        plan.name: {
                            "inputs": [
                                dataclasses.asdict(_input_spec(plan, i))
                                for i in range(len(plan.inputs))
                            ],
                            "kv_fqns": list(bound[plan.name].kv_fqns),
                        }
                        for plan in pte.program.execution_plan
                    },
                    "limits": limits,
                }
                binding.write_sidecar(cache_dir, self.digest, meta)
            finally:
                pte.close()
        lazy = bool(meta["lazy"])
        self.manifest: Optional[Manifest] = (
            None if meta["manifest"] is None else Manifest.from_bytes(meta["manifest"].encode(), self.source)
        )
        self.method_names: List[str] = list(meta["method_names"])
        self._methods_info: Dict[str, MethodInfo] = {
            name: MethodInfo(
                name,
                tuple(InputSpec.from_dict(d) for d in m["inputs"]),
                tuple(m["kv_fqns"]),
            )
            for name, m in meta["methods"].items()
        }
        if lazy:
            run_path = str(binding.bound_path(cache_dir, self.digest))
        elif src_path is None:
            # Never hand the runtime bytes (it keeps an anonymous copy): cache a file.
            dest = cache_dir / f"{self.digest}.pte"
            if not dest.exists():
                write_bytes(dest, data, "the program's file copy", fix=disk_cache.FIX)
            run_path = str(dest)
        else:
            run_path = src_path
        self.limits: Dict[str, MethodLimits] = {
            k: MethodLimits.from_dict(v) for k, v in (meta.get("limits") or {}).items()
        }
        self.runtime_path = run_path
        try:
            self._et_program = _runtime().load_program(run_path)
        except RuntimeError as e:
            raise runtime_error(e, f"{self.source}: loading the program") from None
        cache.done(self.digest)  # mark used, evict over the cap (the runtime holds the file)
        self._loaded: Dict[str, Any] = {}
        # One lock per program: loading a method and every execute (the runtime's
        # planned arenas are shared by all methods of a program, DESIGN fact 6).
        self._lock = threading.RLock()
        self.weight_cache: Optional[bool] = None
        runnable = [n for n in self.method_names if self._methods_info[n].inputs]
        if weight_cache is None and len(runnable) > 1:
            # Several methods over the same weights: without XNNPACK's weight cache each
            # method's delegate packs its own copy (1.96x resident, DESIGN fact 7).
            weight_cache = True
        if weight_cache is not None:
            # Process-wide and read by each XNNPACK delegate at load_method: switch it for
            # the duration of loading every method now, then restore the previous value
            # (methods keep the setting they were loaded with).
            from lazykv.runtime_shim import weight_cache as _wc

            with _wc.enabled(bool(weight_cache)) as took:
                self.weight_cache = took if weight_cache else False
                for name in runnable:
                    self._method(name)
        self.buffers: Tuple[LazyBuffer, ...] = self.manifest.lazy_buffers if lazy else ()
        self.lazy = lazy
        if lazy and self.max_bytes is not None and self.max_bytes < self.bytes_per_position:
            raise InvalidInput(
                f"max_bytes={self.max_bytes:,} cannot hold one position of KV storage "
                f"({self.bytes_per_position:,} bytes each in {self.source}); raise it to at "
                f"least {self.bytes_per_position:,} or leave it unset"
            )
        self._dtypes = {b.fqn: _MANIFEST_DTYPES[b.dtype] for b in self.buffers}
        self._fill_plans: Dict[str, Tuple[Any, int]] = {}
        self.load_seconds = time.perf_counter() - t0
        self._sessions_open = 0

    def _fast_rebind(self, src_path, data, cache_dir, validate) -> Tuple[Optional[dict], Optional[dict]]:
        """Rebind by patching the flatbuffer bytes (:mod:`.fastpte`). Returns ``(meta,
        limits)``: meta None = use the object path; limits None = ``validate()`` (which
        raises on a bad program) did not run yet. The rebound copy is written to a
        temporary name in a thread while ``validate()`` runs, and enters the cache only
        once the program passed."""
        from lazykv.runtime_shim import fastpte

        try:
            fp = fastpte.FastPte(src_path, data)
        except Exception:
            return None, None
        limits = None
        tmp = None
        try:
            manifest = fp.manifest(self.source)
            lazy = manifest is not None and bool(manifest.lazy_buffers)
            # Input specs first: patching rewrites the plans' input vectors.
            specs_of = {}
            for pi, name in enumerate(fp.method_names):
                specs = fp.input_specs(pi)
                for d in specs:
                    if "scalar_type" in d:
                        dt = _TORCH_DTYPES.get(d.pop("scalar_type"))
                        d["dtype"] = None if dt is None else str(dt)
                specs_of[name] = specs
            appended = {n: () for n in fp.method_names}
            copy = None
            if lazy:
                region, appended = fp.rebound_region(manifest, binding._SCALAR_TYPE_NAMES)
                base = fp.segment_base_offset
                known = self.digest is not None and binding.bound_path(cache_dir, self.digest).exists()
                if not known:  # the digest may still be being computed: a temporary name
                    tmp = Path(cache_dir) / f"incoming-{os.getpid()}-{id(self)}.pte"
                    copy = functools.partial(
                        binding.write_with_segments,
                        tmp, region, src_path, data, base, fp.file_size - base,
                    )
            limits = _validate_while(validate, copy)
            if lazy:
                self._resolve_digest()
                dest = binding.bound_path(cache_dir, self.digest)
                self.cache_hit = dest.exists()
                if tmp is not None:
                    if self.cache_hit:
                        tmp.unlink()
                    else:
                        os.replace(tmp, dest)
                    tmp = None
            methods = {
                name: {"inputs": specs_of[name], "kv_fqns": list(appended[name])}
                for name in fp.method_names
            }
            meta = {
                "lazy": lazy,
                "manifest": manifest.to_json() if manifest is not None else None,
                "method_names": fp.method_names,
                "methods": methods,
                "limits": limits,
            }
        except LazyKVError:
            raise
        except Exception as e:  # anything odd: the object path decides
            logger.info("fast rebinding not possible (%s); using the object path", e)
            return None, limits
        finally:
            fp.close()
            if tmp is not None:  # the program was refused, or the copy failed
                try:
                    tmp.unlink()
                except OSError:
                    pass
        self._resolve_digest()
        binding.write_sidecar(cache_dir, self.digest, meta)
        return meta, limits

    def _resolve_digest(self) -> None:
        if self._digest_future is not None:
            self.digest = self._digest_future.result()
            self._digest_future = None

    # -- introspection ---------------------------------------------------------------

    @property
    def bytes_per_position(self) -> int:
        """KV bytes one filled position costs (all lazy buffers together)."""
        return sum(b.bytes_per_position for b in self.buffers)

    @property
    def max_positions(self) -> int:
        """The exported bound along the growth axis (smallest over the lazy buffers)."""
        return min((b.max_positions for b in self.buffers), default=0)

    def method_info(self, method: str) -> MethodInfo:
        info = self._methods_info.get(method)
        if info is None:
            raise UnknownMethod(
                f"{self.source}: no method {method!r}; it has {sorted(self.method_names)}"
            )
        return info

    def fill_plan(self, method: str) -> Tuple[Any, int]:
        """``(fill rule, bound)`` of a method that uses lazy buffers: which inputs give
        the start position and the length, and the most positions its buffers hold.
        Computed once per method (sessions ask on every call)."""
        plan = self._fill_plans.get(method)
        if plan is None:
            info = self.method_info(method)
            bound = min(b.max_positions for b in self.buffers if b.fqn in info.lazy_fqns)
            plan = self._fill_plans[method] = (self.manifest.fill_rule(method), bound)
        return plan

    def load_method(self, name: str) -> None:
        """Load method ``name`` into the runtime now instead of on its first run (sessions
        load methods on first use). Raises :class:`UnknownMethod` for a name the program
        lacks and :class:`ProgramRejected` if the runtime refuses the method."""
        self._method(name)

    def _method(self, name: str):
        m = self._loaded.get(name)
        if m is None:
            self.method_info(name)
            with self._lock:
                m = self._loaded.get(name)
                if m is None:
                    try:
                        m = self._et_program.load_method(name)
                    except RuntimeError as e:
                        from lazykv.runtime_shim.kernels import missing_kernels_error

                        context = f"{self.source}: loading method {name!r}"
                        raise (missing_kernels_error(self.runtime_path, context)
                               or runtime_error(e, context)) from None
                    self._loaded[name] = m
        return m

    def _execute(self, name: str, inputs: list) -> list:
        """Run method ``name`` on the runtime's inputs, under the program's lock."""
        m = self._method(name)
        with self._lock:
            try:
                return list(m.execute(inputs))
            except RuntimeError as e:
                raise self._execution_error(e, name) from None

    def _execution_error(self, e: RuntimeError, name: str) -> LazyKVError:
        """The lazykv error for the runtime's failure ``e`` while running method ``name``."""
        return runtime_error(e, f"{self.source}: running method {name!r}")

    def constant(self, method: str) -> Any:
        """Run a method that takes no inputs (e.g. ``get_vocab_size``) and return its value."""
        info = self.method_info(method)
        if info.inputs:
            raise InvalidInput(f"{method!r} takes {len(info.inputs)} inputs; not a constant")
        out = self._execute(method, [])
        return out[0] if len(out) == 1 else list(out)

    # -- memory estimate (lazykv.estimate) --------------------------------------------

    def footprint(self):
        """The :class:`lazykv.estimate.Footprint` of this program, read from its file
        (weights, arenas, runtime, KV bytes per position); computed once."""
        fp = getattr(self, "_footprint", None)
        if fp is None:
            from lazykv.estimate import footprint_of

            src = self.source if os.path.isfile(self.source) else self.runtime_path
            fp = self._footprint = footprint_of(src)
        return fp

    def estimate(self, positions: int, sessions: int = 1) -> int:
        """Resident bytes of this program with ``sessions`` sessions of ``positions``
        positions: weights, arenas and runtime once, KV per session at this program's
        policy capacity (and ``max_bytes``). See :mod:`lazykv.estimate`."""
        return self.footprint().estimate(positions, sessions, self.policy, self.max_bytes)

    def capacity(self, budget: int, positions: int) -> int:
        """How many sessions of ``positions`` positions fit in ``budget`` bytes with this
        program loaded (by :meth:`estimate`'s figures)."""
        return self.footprint().capacity(budget, positions, self.policy, self.max_bytes)

    # -- sessions --------------------------------------------------------------------

    def session(self):
        """A new conversation with its own KV storage (none allocated until needed,
        except under ``preallocate``)."""
        from lazykv.runtime_shim.session import Session

        return Session(self)

    def restore(self, path: Union[str, os.PathLike]):
        """A session restored from a file written by :meth:`Session.save`."""
        from lazykv.runtime_shim.session import Session

        return Session._restore(self, path)

    def __repr__(self) -> str:
        return (
            f"LazyProgram({self.source!r}, policy={self.policy.spec()!r}, "
            f"lazy_buffers={len(self.buffers)}, max_positions={self.max_positions})"
        )


def _validate_while(validate: Callable[[], dict], copy: Optional[Callable[[], Any]]) -> dict:
    """``validate()``, with ``copy()`` running in a thread meanwhile if given (the copy
    releases the GIL). Both finish before this returns; a refusal by ``validate`` wins
    over a failed copy."""
    if copy is None:
        return validate()
    from concurrent.futures import ThreadPoolExecutor, wait

    with ThreadPoolExecutor(max_workers=1) as pool:
        copying = pool.submit(copy)
        try:
            limits = validate()
        finally:
            wait([copying])
        copying.result()
    return limits


def _input_spec(plan, i: int) -> InputSpec:
    v = plan.values[plan.inputs[i]].val
    if isinstance(v, Tensor):
        return InputSpec(
            index=i,
            kind="tensor",
            dtype=_TORCH_DTYPES.get(int(v.scalar_type)),
            sizes=tuple(int(d) for d in v.sizes),
            dynamic=v.shape_dynamism != TensorShapeDynamism.STATIC,
        )
    if isinstance(v, Int):
        return InputSpec(i, "int")
    if isinstance(v, Double):
        return InputSpec(i, "float")
    if isinstance(v, Bool):
        return InputSpec(i, "bool")
    return InputSpec(i, "other")


def load(
    path_or_bytes: Union[str, os.PathLike, bytes, bytearray, memoryview],
    policy: Union[str, GrowthPolicy, None] = "doubling",
    max_bytes: Optional[int] = None,
    *,
    allocator: Optional[DynamicAllocator] = None,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    weight_cache: Optional[bool] = None,
) -> LazyProgram:
    """Load a ``.pte`` (lazy or not) on the stock ExecuTorch runtime.

    ``policy``: a :class:`GrowthPolicy` or its string (``doubling``, ``step:256``,
    ``hybrid``, ``preallocate``). ``max_bytes``: cap on each session's KV storage, in
    bytes or as a size string (``"64MiB"``, ``"64MB"``: :func:`lazykv.units.parse_size`);
    below one position's bytes it is refused (:class:`InvalidInput`).
    A lazy program's rebound copy is written once to ``cache_dir`` (default: lazykv's
    cache folder, :mod:`lazykv.disk_cache`: ``$LAZYKV_CACHE_DIR`` or ``~/.cache/lazykv``,
    bounded by ``$LAZYKV_CACHE_MAX_BYTES``), keyed by the source's sha256.
    ``weight_cache``: XNNPACK's weight cache (:mod:`lazykv.runtime_shim.weight_cache`)
    while this program's methods load. None (default): on for programs with several
    methods (their weights are then resident once), untouched for one method. True/False
    force it. Whenever it is set, every method is loaded now, inside that setting.
    """
    return LazyProgram(
        path_or_bytes, policy, max_bytes, allocator=allocator, cache_dir=cache_dir,
        weight_cache=weight_cache,
    )
