"""The Python shim's runtime engine: programs loaded and methods run by lazykv's C++
library (``runtime_shim/native``) through its raw C ABI (``lkv_raw_*`` in
``include/lazykv/c_api.h``), with ctypes.

:class:`RawProgram` replaces ``executorch.runtime``'s ``Program``: the C++ loader reads
the original file (or the caller's ``bytes``, kept alive by the program) and rebinds
the lazy KV buffers in memory (DESIGN fact 5, ``docs/format.md`` section 5), so loading
writes nothing and copies no weight. :class:`RawMethod` replaces ``Method``: it runs on
inputs Python owns (ints, floats, bools, CPU tensors; the session's KV tensors among
them), passed by pointer with dtype and shape, never copied; the outputs come back as
new torch tensors. The library runs inside this process's ExecuTorch (it links the same
``libexecutorch.so``; :func:`~lazykv.runtime_shim.native_runtime.library` imports the
runtime and its kernel libraries first), so kernels, delegates, XNNPACK's process-wide
weight-cache option and the BLAS torch interposes are the ones ExecuTorch's own Python
runtime uses: results are bit-identical.

Nothing here checks inputs: the caller (:class:`lazykv.runtime_shim.Session`, with
:class:`lazykv.runtime_shim.inputs.MethodInfo`) does, before any call; a tensor of the
right element count and a wrong shape aborts inside ExecuTorch (DESIGN fact 5).
"""

from __future__ import annotations

import ctypes
import os
from typing import Callable, List, Sequence, Union

import torch

from lazykv import errors
from lazykv.runtime_shim.native_runtime import _CODES, _DTYPES, _ERRORS, _Value, library

_TENSOR, _INT, _DOUBLE, _BOOL, _NONE = 1, 2, 3, 4, 0
#: Outputs read per call (a method with more raises ExecutionFailed naming the count).
_MAX_OUTPUTS = 64
_Tensor = torch.Tensor
_empty = torch.empty
_memmove = ctypes.memmove


def _raise(code: int, context: str, name: str, *, loading: bool = False):
    """Raise the lazykv error of the library's failure ``code`` (a ``lazykv::ErrorKind``)
    while doing ``context`` to program ``name``."""
    lib = library()
    message = (lib.lkv_last_error() or b"").decode("utf-8", "replace")
    et = lib.lkv_last_et_error()
    if code in (3, 9) and et:  # ProgramRejected / ExecutionFailed with ExecuTorch's code
        raise errors.et_failure(et, context, loading=loading) from None
    if not message.startswith(name):  # the loader's own messages name the file already
        message = f"{context}: {message}"
    raise _ERRORS.get(code, errors.LazyKVError)(message) from None


class _Native:
    """Owns one native program (and the bytes it reads in place); frees it when the last
    of its :class:`RawProgram` and :class:`RawMethod` objects goes (no reference cycle,
    so that is as soon as they are dropped, never at a later garbage collection)."""

    def __init__(self, handle: ctypes.c_void_p, data) -> None:
        self.handle = handle
        self.data = data
        self._free = library().lkv_raw_program_free

    def __del__(self) -> None:
        if self.handle:
            self._free(self.handle)
            self.handle = None


class RawProgram:
    """A ``.pte`` loaded by the C++ runtime, its lazy KV buffers rebound in memory.

    ``source``: a path, or the program's bytes (a ``bytes`` object is used in place and
    kept alive by this object; another bytes-like object is copied once). ``name``
    stands for it in messages. Methods load on request (:meth:`method`), under
    XNNPACK's process-wide weight-cache option. Raises :class:`InvalidProgram`,
    :class:`ManifestError` or :class:`ProgramRejected` naming the problem, and
    :class:`~lazykv.errors.NativeRuntimeMissing` when the library is not built.
    """

    def __init__(self, source: Union[str, os.PathLike, bytes, bytearray, memoryview], name: str) -> None:
        lib = library()
        self.name = name
        self._methods = {}
        handle = ctypes.c_void_p()
        if isinstance(source, (bytes, bytearray, memoryview)):
            # Segments are read in place: the buffer must stay alive and unchanged.
            data = source if isinstance(source, bytes) else bytes(source)
            pointer = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p)
            code = lib.lkv_raw_program_load(None, pointer, len(data), name.encode(), ctypes.byref(handle))
        else:
            data = None
            code = lib.lkv_raw_program_load(os.fspath(source).encode(), None, 0, name.encode(),
                                            ctypes.byref(handle))
        if code:
            _raise(code, f"{name}: loading the program", name, loading=True)
        self._native = _Native(handle, data)

    def method(self, name: str) -> "RawMethod":
        """Method ``name``, loaded on the first call (:class:`ProgramRejected` if the
        runtime refuses it: ExecuTorch's error code named)."""
        m = self._methods.get(name)
        if m is None:
            handle, n = ctypes.c_void_p(), ctypes.c_int32()
            code = library().lkv_raw_method_load(self._native.handle, name.encode(), ctypes.byref(handle),
                                                 ctypes.byref(n))
            if code:
                _raise(code, f"{self.name}: loading method {name!r}", self.name, loading=True)
            m = self._methods[name] = RawMethod(self._native, self.name, name, handle, n.value)
        return m


class RawMethod:
    """One loaded method of a :class:`RawProgram`. Not thread-safe: the caller holds
    the program's lock around every call (its methods share planned memory)."""

    def __init__(self, native: _Native, program_name: str, name: str, handle: ctypes.c_void_p,
                 n_inputs: int) -> None:
        self._native = native  # keeps the native program (and its bytes) alive
        self.name = name
        self.n_inputs = n_inputs
        self._handle = handle
        self._execute_c = library().lkv_raw_execute
        self._args = (_Value * max(1, n_inputs))()
        self._outs = (_Value * _MAX_OUTPUTS)()
        self._views = [self._outs[i] for i in range(_MAX_OUTPUTS)]  # made once, read per call
        self._n_out = ctypes.c_int32()
        self._n_out_p = ctypes.pointer(self._n_out)
        self._program_name = program_name
        self._context = f"{program_name}: running method {name!r}"

    def execute(self, inputs: Sequence) -> List:
        """Run the method on all its ``inputs`` (the user's, then the KV storage);
        returns the outputs (tensors as new torch tensors, scalars as Python values).
        Raises :class:`ExecutionFailed` (ExecuTorch's error code named) or
        :class:`InvalidInput` when ExecuTorch refuses an input."""
        args = self._args
        if len(inputs) != self.n_inputs:
            raise errors.InvalidInput(
                f"{self._context}: it takes {self.n_inputs} inputs, got {len(inputs)}")
        for i, x in enumerate(inputs):
            _set(args[i], x, i, self._context)
        return self._run(args)

    def bind(self, kv: Sequence[_Tensor]) -> Callable[[Sequence[_Tensor]], List]:
        """A call of this method with ``kv`` (the session's storage, in the order of the
        method's last inputs) set once: the returned function takes the user's inputs
        (tensors only) and returns the outputs as :meth:`execute`. ``kv`` must stay
        unmoved while the function is used (a session rebuilds it whenever
        its storage changes; the function keeps them alive); the C++ side keeps them
        bound between calls."""
        n_user = self.n_inputs - len(kv)
        if n_user < 0:
            raise errors.InvalidInput(f"{self._context}: {len(kv)} KV inputs for a method of {self.n_inputs}")
        args = (_Value * max(1, self.n_inputs))()
        for k, t in enumerate(kv):
            _set(args[n_user + k], t, n_user + k, self._context)
        user = args[:n_user]  # the Structure views of the user's slots, made once
        for a in user:
            a.kind = _TENSOR
        run = self._run
        codes = _CODES

        def call(inputs: Sequence[_Tensor], _kv=kv) -> List:  # _kv: the storage stays alive
            for a, x in zip(user, inputs):
                a.data = x.data_ptr()
                a.scalar_type = codes[x.dtype]
                shape = x.shape
                a.dim = len(shape)
                a.sizes[:len(shape)] = shape
            return run(args)

        return call

    def _run(self, args) -> List:
        code = self._execute_c(self._handle, args, self.n_inputs, self._outs, _MAX_OUTPUTS, self._n_out_p)
        if code:
            _raise(code, self._context, self._program_name)
        n = self._n_out.value
        if n > _MAX_OUTPUTS:
            raise errors.ExecutionFailed(f"{self._context}: {n} outputs; lazykv reads at most {_MAX_OUTPUTS}")
        outs = []
        for o in self._views[:n]:
            kind = o.kind
            if kind == _TENSOR:  # copied out: the program's memory is reused by the next call
                t = _empty(tuple(o.sizes[:o.dim]), dtype=_DTYPES[o.scalar_type])
                nbytes = t.nbytes
                if nbytes:
                    _memmove(t.data_ptr(), o.data, nbytes)
                outs.append(t)
            elif kind == _INT:
                outs.append(o.i)
            elif kind == _DOUBLE:
                outs.append(o.d)
            elif kind == _BOOL:
                outs.append(bool(o.i))
            else:
                outs.append(None)
        return outs


def _set(a: _Value, x, i: int, context: str) -> None:
    """Describe input ``i`` (``x``) in ``a``."""
    if isinstance(x, _Tensor):
        code = _CODES.get(x.dtype)
        if code is None or x.device.type != "cpu" or not x.is_contiguous() or x.dim() > len(a.sizes):
            raise errors.InvalidInput(
                f"{context}: input {i} must be a contiguous CPU tensor of a dtype ExecuTorch has "
                f"(got {x.dtype} on {x.device}{'' if x.is_contiguous() else ', not contiguous'})")
        a.kind = _TENSOR
        a.data = x.data_ptr()
        a.scalar_type = code
        a.dim = x.dim()
        a.sizes[:x.dim()] = tuple(x.shape)
    elif isinstance(x, bool):
        a.kind, a.i = _BOOL, int(x)
    elif isinstance(x, int):
        a.kind, a.i = _INT, x
    elif isinstance(x, float):
        a.kind, a.d = _DOUBLE, x
    elif x is None:
        a.kind = _NONE
    else:
        raise errors.InvalidInput(f"{context}: input {i} is a {type(x).__name__}; ExecuTorch takes "
                                  "tensors, ints, floats, bools and None")

