"""Loader of lazykv's native helper: ExecuTorch backend options from Python.

ExecuTorch's Python runtime cannot call ``executorch::runtime::set_option`` /
``get_option``; the small C++ library built from ``xnnpack_options.cpp`` can. It is
compiled at install by ``setup.py`` (next to this file) and loaded here with ctypes.

Where the library comes from, in order:

1. the one built at install (this folder), if it loads and was compiled against the
   ExecuTorch version installed now;
2. otherwise one compiled on first use into lazykv's cache folder
   (:func:`lazykv.disk_cache.cache_dir`),
   when a C++ compiler is available (``$CXX``, ``g++``, ``c++``, ``clang++``).

If neither works, :func:`load_helper` raises :class:`NativeUnavailable` whose message
lists every attempt; callers (see :mod:`lazykv.runtime_shim.weight_cache`) turn that
into one warning and carry on without the helper.
"""

from __future__ import annotations

import ctypes
import os
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from . import build as _build

__all__ = [
    "HelperInfo",
    "NativeHelper",
    "NativeUnavailable",
    "OptionError",
    "load_helper",
    "user_cache_dir",
]

#: Where ``setup.py`` puts the helper (editable installs: the source folder).
INSTALLED_LIBRARY = Path(__file__).resolve().with_name(_build.LIBRARY_NAME)

# executorch::runtime::Error codes (runtime/core/error.h) that set/get_option return.
_ERROR_NAMES = {
    0x00: "Ok",
    0x01: "Internal",
    0x02: "InvalidState",
    0x10: "NotSupported",
    0x11: "NotImplemented",
    0x12: "InvalidArgument",
    0x13: "InvalidType",
    0x20: "NotFound",
}


class NativeUnavailable(Exception):
    """The helper could not be loaded or built; ``str(e)`` lists each attempt and why."""


class OptionError(Exception):
    """``set_option``/``get_option`` returned an error code (e.g. NotFound: no such backend)."""

    def __init__(self, call: str, backend: str, key: str, code: int) -> None:
        self.call, self.backend, self.key, self.code = call, backend, key, code
        name = _ERROR_NAMES.get(code, f"0x{code:02x}")
        super().__init__(f"{call}({backend!r}, {key!r}) returned Error::{name}")


@dataclass(frozen=True)
class HelperInfo:
    """Which helper library is loaded."""

    path: Path
    origin: Literal["install", "user-cache"]
    #: ExecuTorch version the library was compiled against (== the installed one).
    executorch_version: str


class NativeHelper:
    """The loaded helper: typed wrappers of the C functions. Obtain it with :func:`load_helper`."""

    def __init__(self, lib: ctypes.CDLL, info: HelperInfo) -> None:
        self._lib = lib
        self.info = info

    def set_bool_option(self, backend: str, key: str, value: bool) -> None:
        """``executorch::runtime::set_option(backend, {key: value})`` with a bool value."""
        code = self._lib.lazykv_set_bool_option(backend.encode(), key.encode(), int(bool(value)))
        self._check("set_option", backend, key, code)

    def get_bool_option(self, backend: str, key: str) -> bool:
        """The bool that ``executorch::runtime::get_option(backend, {key})`` reports."""
        out = ctypes.c_int(0)
        code = self._lib.lazykv_get_bool_option(backend.encode(), key.encode(), ctypes.byref(out))
        self._check("get_option", backend, key, code)
        return bool(out.value)

    def set_int_option(self, backend: str, key: str, value: int) -> None:
        """``executorch::runtime::set_option(backend, {key: value})`` with an int value."""
        code = self._lib.lazykv_set_int_option(backend.encode(), key.encode(), int(value))
        self._check("set_option", backend, key, code)

    def get_int_option(self, backend: str, key: str) -> int:
        """The int that ``executorch::runtime::get_option(backend, {key})`` reports."""
        out = ctypes.c_int(0)
        code = self._lib.lazykv_get_int_option(backend.encode(), key.encode(), ctypes.byref(out))
        self._check("get_option", backend, key, code)
        return out.value

    @staticmethod
    def _check(call: str, backend: str, key: str, code: int) -> None:
        if code != 0:
            raise OptionError(call, backend, key, code)


def user_cache_dir() -> Path:
    """Folder for helpers compiled on first use (created on demand): lazykv's cache
    folder (:func:`lazykv.disk_cache.cache_dir`)."""
    from lazykv.disk_cache import cache_dir

    return cache_dir()


_lock = threading.Lock()
_loaded: NativeHelper | None = None
_failure: NativeUnavailable | None = None


def load_helper() -> NativeHelper:
    """The helper, loaded once per process (later calls return the same object).

    Imports ``executorch.runtime`` first, so that ``libexecutorch.so`` and its registered
    backends are in the process before the helper binds to them. Raises
    :class:`NativeUnavailable` (also on every later call, without retrying) when no
    helper can be loaded or built.
    """
    global _loaded, _failure
    with _lock:
        if _loaded is not None:
            return _loaded
        if _failure is not None:
            raise _failure
        try:
            _loaded = _load_uncached()
        except NativeUnavailable as exc:
            _failure = exc
            raise
        return _loaded


def _load_uncached() -> NativeHelper:
    try:
        from executorch.runtime import Runtime

        Runtime.get()  # loads the pybindings, hence libexecutorch.so and the backends
    except Exception as exc:  # noqa: BLE001 - any import failure means "no runtime"
        raise NativeUnavailable(f"the ExecuTorch runtime cannot be imported: {exc!r}") from exc
    try:
        executorch = _build.find_executorch()
    except _build.NativeBuildError as exc:
        raise NativeUnavailable(str(exc)) from exc

    attempts: list[str] = []
    if INSTALLED_LIBRARY.is_file():
        try:
            return _open(INSTALLED_LIBRARY, "install", executorch.version)
        except NativeUnavailable as exc:
            attempts.append(f"installed helper {INSTALLED_LIBRARY}: {exc}")
    else:
        attempts.append(f"installed helper {INSTALLED_LIBRARY}: not built at install")

    try:
        compiler = _build.find_compiler()
        key = _build.build_key(executorch, compiler)
        cached = user_cache_dir() / "native" / key / _build.LIBRARY_NAME
        if not cached.is_file():
            _build.compile_helper(cached, executorch, compiler)
            return _open(cached, "user-cache", executorch.version)
        try:
            return _open(cached, "user-cache", executorch.version)
        except NativeUnavailable as exc:  # damaged or foreign file: build it anew
            attempts.append(f"cached helper {cached}: {exc}")
        # The dynamic loader may hold the bad file under its path: build and open the
        # new one under a fresh name, then move it over the old one for later processes.
        fresh = cached.with_name(f"{cached.name}.{os.getpid()}")
        _build.compile_helper(fresh, executorch, compiler)
        helper = _open(fresh, "user-cache", executorch.version)
        os.replace(fresh, cached)
        return NativeHelper(helper._lib, replace(helper.info, path=cached))
    except (_build.NativeBuildError, NativeUnavailable, OSError) as exc:
        attempts.append(f"compiling on first use: {exc}")
    raise NativeUnavailable("; ".join(attempts))


def _open(
    path: Path, origin: Literal["install", "user-cache"], expected_version: str
) -> NativeHelper:
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        raise NativeUnavailable(f"cannot be loaded ({exc})") from exc
    try:
        lib.lazykv_native_abi_version.restype = ctypes.c_int
        lib.lazykv_native_abi_version.argtypes = []
        lib.lazykv_native_executorch_version.restype = ctypes.c_char_p
        lib.lazykv_native_executorch_version.argtypes = []
        for name in ("lazykv_set_bool_option", "lazykv_set_int_option"):
            fn = getattr(lib, name)
            fn.restype = ctypes.c_int
            fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int]
        for name in ("lazykv_get_bool_option", "lazykv_get_int_option"):
            fn = getattr(lib, name)
            fn.restype = ctypes.c_int
            fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_int)]
    except AttributeError as exc:
        raise NativeUnavailable(f"is not a lazykv helper ({exc})") from exc
    abi = lib.lazykv_native_abi_version()
    if abi != _build.ABI_VERSION:
        raise NativeUnavailable(
            f"has C ABI version {abi}, this lazykv needs {_build.ABI_VERSION}"
        )
    built_for = (lib.lazykv_native_executorch_version() or b"").decode()
    if built_for != expected_version:
        raise NativeUnavailable(
            f"was compiled against executorch {built_for}, but {expected_version} is installed"
        )
    return NativeHelper(lib, HelperInfo(path=path, origin=origin, executorch_version=built_for))
