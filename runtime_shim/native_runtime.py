"""The native runtime from Python: the C++ loader and sessions of ``runtime_shim/native``
through their C ABI (``include/lazykv/c_api.h``), loaded with ctypes.

The C++ library rebinds a lazy ``.pte`` in memory and hands ExecuTorch a DataLoader
that maps every segment read to the original file, so loading writes nothing to disk
and keeps no copy of the weights. A :class:`NativeSession` keeps its KV storage bound
to the method's inputs between calls and passes only the user's inputs per call, where
ExecuTorch's pybind ``Method.execute`` converts every input (the KV tensors too) on
every call. The library runs inside this process's ExecuTorch runtime: importing this
module imports ``executorch.runtime`` and the LLM custom ops first, so the kernels and
delegates registered there are the ones the native code finds (it links the same
``libexecutorch.so``). Why this route and not ExecuTorch's ``PyDataLoader``: see
``docs/cpp.md`` (Python section).

Errors are :mod:`lazykv.errors` classes with the C++ message.
"""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch

from lazykv import errors
from lazykv.format.scalar_type import SCALAR_TYPES
from lazykv.runtime_shim.policy import GrowthPolicy, parse_policy

#: Built by setup.py next to the native build recipe (runtime_shim/native/build.py).
LIBRARY = Path(__file__).resolve().parent / "native" / "liblazykv_native.so"
#: Names another build of the library to load instead of :data:`LIBRARY` (a sanitizer
#: build, a test of what happens when it is missing).
ENV_LIBRARY = "LAZYKV_NATIVE_LIBRARY"
_ABI_VERSION = 3
_MAX_DIMS = 16

# lazykv::ErrorKind (include/lazykv/status.h) -> lazykv.errors class.
_ERRORS = {
    1: errors.InvalidProgram,
    2: errors.ManifestError,
    3: errors.ProgramRejected,
    4: errors.InvalidInput,
    5: errors.UnknownMethod,
    6: errors.ContextOverflow,
    7: errors.MemoryBudgetExceeded,
    8: errors.AllocationFailed,
    9: errors.ExecutionFailed,
    10: errors.SessionClosed,
    11: errors.SessionFileError,
    13: errors.LazyKVError,
}

# executorch ScalarType codes <-> torch dtypes: lazykv.format.scalar_type's table, for the
# plain (not quantized, not bit-packed) dtypes this torch has: the C ABI hands their
# tensors across as raw memory.
_CODES = {getattr(torch, t.dtype): t.code for t in SCALAR_TYPES
          if not t.dtype.startswith(("q", "bits")) and isinstance(getattr(torch, t.dtype, None), torch.dtype)}
_DTYPES = {v: k for k, v in _CODES.items()}


class _Tensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("scalar_type", ctypes.c_int32),
        ("dim", ctypes.c_int32),
        ("sizes", ctypes.c_int64 * _MAX_DIMS),
    ]


class _Value(ctypes.Structure):
    """``lkv_value`` (c_api.h): one method input or output."""

    _fields_ = [
        ("kind", ctypes.c_int32),
        ("scalar_type", ctypes.c_int32),
        ("dim", ctypes.c_int32),
        ("reserved", ctypes.c_int32),
        ("data", ctypes.c_void_p),
        ("i", ctypes.c_int64),
        ("d", ctypes.c_double),
        ("sizes", ctypes.c_int64 * _MAX_DIMS),
    ]


_LIB_LOCK = threading.Lock()
_LIB: Optional[ctypes.CDLL] = None


def library_path() -> Path:
    """The library :func:`library` loads: ``$LAZYKV_NATIVE_LIBRARY`` if set, else
    :data:`LIBRARY`."""
    override = os.environ.get(ENV_LIBRARY, "").strip()
    return Path(override).expanduser() if override else LIBRARY


def library() -> ctypes.CDLL:
    """The loaded C ABI library (ExecuTorch's runtime and custom ops imported first).

    Raises :class:`lazykv.errors.NativeRuntimeMissing` naming the fix when the install
    did not build it (there is no other way to load a program)."""
    global _LIB
    with _LIB_LOCK:
        if _LIB is not None:
            return _LIB
        path = library_path()
        if not path.is_file():
            where = f" (${ENV_LIBRARY})" if path != LIBRARY else ""
            raise errors.NativeRuntimeMissing(
                f"lazykv's native runtime {path}{where} is missing: lazykv loads every program "
                "through it. Build it with `make venv` in a clone of lazykv, or reinstall with "
                "`LAZYKV_REQUIRE_NATIVE=1 pip install --no-build-isolation .` to see why it "
                "was not built (it needs cmake and a C++17 compiler)"
            )
        from lazykv.runtime_shim.kernels import runtime

        runtime()  # libexecutorch.so, kernels, delegates and custom ops in the process first
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as e:
            raise errors.NativeRuntimeMissing(
                f"lazykv's native runtime {path} cannot be loaded ({e}); rebuild it with "
                "`make venv` (or reinstall lazykv against the installed executorch)"
            ) from None
        c = ctypes
        P, S = c.c_void_p, c.c_char_p
        sigs = {
            "lkv_abi_version": (c.c_int, []),
            "lkv_last_error": (c.c_char_p, []),
            "lkv_last_et_error": (c.c_int, []),
            "lkv_raw_program_load": (c.c_int, [S, P, c.c_int64, S, c.POINTER(P)]),
            "lkv_raw_program_free": (None, [P]),
            "lkv_raw_method_load": (c.c_int, [P, S, c.POINTER(P), c.POINTER(c.c_int32)]),
            "lkv_raw_execute": (c.c_int, [P, c.POINTER(_Value), c.c_int32, c.POINTER(_Value), c.c_int32,
                                          c.POINTER(c.c_int32)]),
            "lkv_program_load": (c.c_int, [S, S, c.c_int64, c.c_int, c.POINTER(P)]),
            "lkv_program_free": (None, [P]),
            "lkv_program_manifest": (c.c_char_p, [P]),
            "lkv_program_region_bytes": (c.c_int64, [P]),
            "lkv_program_load_method": (c.c_int, [P, S]),
            "lkv_program_digest": (c.c_int, [P, c.c_char_p]),
            "lkv_program_kv_figures": (c.c_int, [P, c.POINTER(c.c_int64), c.POINTER(c.c_int64)]),
            "lkv_session_new": (c.c_int, [P, c.POINTER(P)]),
            "lkv_session_restore": (c.c_int, [P, S, c.POINTER(P)]),
            "lkv_session_fork": (c.c_int, [P, c.c_int64, c.POINTER(P)]),
            "lkv_session_free": (None, [P]),
            "lkv_session_run": (c.c_int, [P, S, c.POINTER(_Tensor), c.c_int32, c.POINTER(c.c_int32)]),
            "lkv_session_output": (c.c_int, [P, c.c_int32, c.POINTER(_Tensor)]),
            "lkv_session_stats": (c.c_int, [P, c.POINTER(c.c_int64)]),
            "lkv_session_trim": (c.c_int, [P, c.c_int64, c.POINTER(c.c_int64), c.POINTER(c.c_int64)]),
            "lkv_session_reset": (c.c_int, [P, c.POINTER(c.c_int64), c.POINTER(c.c_int64)]),
            "lkv_session_save": (c.c_int, [P, S, c.POINTER(c.c_int64)]),
        }
        for name, (res, args) in sigs.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args
        if lib.lkv_abi_version() != _ABI_VERSION:
            raise errors.NativeRuntimeMissing(
                f"{path} has C ABI version {lib.lkv_abi_version()}, this lazykv needs "
                f"{_ABI_VERSION}; rebuild it with `make venv` (or reinstall lazykv)"
            )
        _LIB = lib
        return lib


def _check(code: int) -> None:
    if code:
        message = (library().lkv_last_error() or b"").decode("utf-8", "replace")
        raise _ERRORS.get(code, errors.LazyKVError)(message)


class NativeProgram:
    """A ``.pte`` loaded by the C++ runtime. Sessions: :meth:`session`, :meth:`restore`."""

    def __init__(
        self,
        path: Union[str, os.PathLike],
        policy: Union[str, GrowthPolicy, None] = "doubling",
        max_bytes: Optional[int] = None,
        weight_cache: Optional[bool] = None,
    ) -> None:
        lib = library()
        self.policy = parse_policy(policy)
        self.source = os.fspath(path)
        handle = ctypes.c_void_p()
        wc = -1 if weight_cache is None else int(bool(weight_cache))
        _check(lib.lkv_program_load(self.source.encode(), self.policy.spec().encode(),
                                    -1 if max_bytes is None else int(max_bytes), wc, ctypes.byref(handle)))
        self._handle = handle

    @property
    def manifest_json(self) -> str:
        """The manifest as stored in the ``.pte`` ("" for a program lazykv did not mark)."""
        return library().lkv_program_manifest(self._handle).decode()

    @property
    def region_bytes(self) -> int:
        """Bytes of the rebound program flatbuffer held in memory (the only copy made)."""
        return int(library().lkv_program_region_bytes(self._handle))

    @property
    def digest(self) -> str:
        """sha256 of the ``.pte`` file (what session files record)."""
        buf = ctypes.create_string_buffer(65)
        _check(library().lkv_program_digest(self._handle, buf))
        return buf.value.decode()

    @property
    def kv_figures(self) -> Dict[str, int]:
        """KV bytes as ``lazykv inspect`` counts them: ``planned_bytes`` (static caches,
        held from load on, shared by the sessions) and ``at_max_context`` (every cache at
        its bound); the fields of :class:`lazykv.runtime_shim.generate.KVFigures`."""
        planned, at_max = ctypes.c_int64(), ctypes.c_int64()
        _check(library().lkv_program_kv_figures(self._handle, ctypes.byref(planned), ctypes.byref(at_max)))
        return {"planned_bytes": planned.value, "at_max_context": at_max.value}

    def load_method(self, name: str) -> None:
        """Load method ``name`` now (sessions load on first use)."""
        _check(library().lkv_program_load_method(self._handle, name.encode()))

    def session(self) -> "NativeSession":
        """A new conversation with its own KV storage."""
        handle = ctypes.c_void_p()
        _check(library().lkv_session_new(self._handle, ctypes.byref(handle)))
        return NativeSession(self, handle)

    def restore(self, path: Union[str, os.PathLike]) -> "NativeSession":
        """A session restored from a session file (saved by C++ or by Python)."""
        handle = ctypes.c_void_p()
        _check(library().lkv_session_restore(self._handle, os.fspath(path).encode(), ctypes.byref(handle)))
        return NativeSession(self, handle)

    def close(self) -> None:
        """Free the program (its sessions keep it alive until they are closed)."""
        if self._handle:
            library().lkv_program_free(self._handle)
            self._handle = ctypes.c_void_p()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class NativeSession:
    """One conversation of a :class:`NativeProgram`: ``run``, ``stats``, ``trim``,
    ``reset``, ``save``, ``close`` as :class:`lazykv.runtime_shim.Session`."""

    _STATS = ("current_bytes", "peak_bytes", "grow_events", "shrink_events", "bytes_copied",
              "positions_filled", "capacity_positions", "max_positions", "bytes_per_position",
              "allocations", "frees", "grows")

    def __init__(self, program: NativeProgram, handle: ctypes.c_void_p) -> None:
        self.program = program
        self._handle = handle
        self._lib = library()
        self._args = (_Tensor * 8)()
        self._n_out = ctypes.c_int32()
        self._out = _Tensor()

    def _live(self) -> ctypes.c_void_p:
        if not self._handle:
            raise errors.SessionClosed("this session was closed; open a new one with program.session()")
        return self._handle

    def run(self, method: str, inputs: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """Run ``method`` on the user's inputs (contiguous CPU tensors); returns copies of
        the outputs. The C++ side checks every input before ExecuTorch sees it."""
        n = len(inputs)
        if n > len(self._args):
            raise errors.InvalidInput(f"{method}: {n} inputs; the native binding passes at most {len(self._args)}")
        args = self._args
        for i, x in enumerate(inputs):
            if not isinstance(x, torch.Tensor) or x.device.type != "cpu" or x.dim() > _MAX_DIMS:
                raise errors.InvalidInput(f"{method}: input {i} must be a CPU tensor")
            if not x.is_contiguous():
                raise errors.InvalidInput(f"{method}: input {i} must be contiguous; call .contiguous() first")
            code = _CODES.get(x.dtype)
            if code is None:
                raise errors.InvalidInput(f"{method}: input {i} has dtype {x.dtype}, which ExecuTorch has no code for")
            a = args[i]
            a.data = x.data_ptr()
            a.scalar_type = code
            a.dim = x.dim()
            for d, s in enumerate(x.shape):
                a.sizes[d] = s
        _check(self._lib.lkv_session_run(self._live(), method.encode(), args, n, ctypes.byref(self._n_out)))
        outs = []
        for i in range(self._n_out.value):
            if self._lib.lkv_session_output(self._handle, i, ctypes.byref(self._out)):
                outs.append(None)  # not a tensor
                continue
            o = self._out
            t = torch.empty(tuple(o.sizes[: o.dim]), dtype=_DTYPES[o.scalar_type])
            ctypes.memmove(t.data_ptr(), o.data, t.numel() * t.element_size())
            outs.append(t)
        return outs

    @property
    def stats(self) -> Dict[str, int]:
        """The session's counters (the fields of :class:`SessionStats`)."""
        buf = (ctypes.c_int64 * len(self._STATS))()
        _check(self._lib.lkv_session_stats(self._live(), buf))
        return dict(zip(self._STATS, buf))

    @property
    def kv_bytes(self) -> int:
        return self.stats["current_bytes"]

    @property
    def offset(self) -> int:
        """Positions filled so far (the next call must start here)."""
        return self.stats["positions_filled"]

    @property
    def capacity(self) -> int:
        """Positions the storage holds now (without growing)."""
        return self.stats["capacity_positions"]

    def fork(self, positions: Optional[int] = None) -> "NativeSession":
        """A new session holding a copy of this one's first ``positions`` filled positions
        (default: all), independent from then on; the contract of
        :meth:`lazykv.runtime_shim.Session.fork` (:class:`InvalidInput` for ``positions``
        outside ``0..offset``, :class:`MemoryBudgetExceeded`, :class:`AllocationFailed`,
        :class:`SessionClosed`; this session is unchanged whatever happens)."""
        handle = self._live()
        if positions is not None and (isinstance(positions, bool) or not isinstance(positions, int)
                                      or positions < 0):
            raise errors.InvalidInput(
                f"fork(positions={positions!r}): positions must be an int from 0 to the "
                f"{self.offset} this session has filled"
            )
        child = ctypes.c_void_p()
        _check(self._lib.lkv_session_fork(handle, -1 if positions is None else positions, ctypes.byref(child)))
        return NativeSession(self.program, child)

    def trim(self, n: int):
        """Drop the last ``n`` positions; returns (positions, bytes) freed."""
        p, b = ctypes.c_int64(), ctypes.c_int64()
        _check(self._lib.lkv_session_trim(self._live(), int(n), ctypes.byref(p), ctypes.byref(b)))
        return p.value, b.value

    def reset(self):
        """Forget every position; returns (positions, bytes) freed."""
        p, b = ctypes.c_int64(), ctypes.c_int64()
        _check(self._lib.lkv_session_reset(self._live(), ctypes.byref(p), ctypes.byref(b)))
        return p.value, b.value

    def save(self, path: Union[str, os.PathLike]) -> int:
        """Write the session file (Python's format); returns bytes written."""
        w = ctypes.c_int64()
        _check(self._lib.lkv_session_save(self._live(), os.fspath(path).encode(), ctypes.byref(w)))
        return w.value

    def close(self) -> None:
        """Free the session's storage. Idempotent."""
        if self._handle:
            self._lib.lkv_session_free(self._handle)
            self._handle = ctypes.c_void_p()

    def __enter__(self) -> "NativeSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
