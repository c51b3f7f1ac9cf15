"""XNNPACK's weight cache: one packed copy of each weight for all methods of a process.

Without it, every XNNPACK delegate packs its own copy of its weights when its method
loads, so a program whose ``prefill`` and ``decode`` methods use the same weights holds
them twice (DESIGN fact 7: +262 MiB for two methods over 8 x Linear(2048, 2048)
against +134 MiB for one). ExecuTorch 1.5's XNNPACK backend has a weight cache keyed by
the weights' names (the sha256 of their bytes), compiled into the wheel but off by
default; this module switches it with ``executorch::runtime::set_option("XnnpackBackend",
{"weight_cache_enabled": <bool>})`` through lazykv's native helper
(:mod:`lazykv.runtime_shim.native`).

The contract:

* **Process-wide.** The option is global state of the ExecuTorch runtime in this process,
  shared by every program and every thread.
* **Read at load.** Each XNNPACK delegate reads it once, in ``load_method``. It changes
  nothing for methods already loaded: they keep the packed weights they have (a method
  loaded with the cache keeps using it after the cache is switched off, and vice versa).
  Switch it before loading the methods that should share.
* **Same results.** Packing is the same code either way; outputs are bit-identical.
  Packed weights in the cache are freed when the last method using them is freed.
* **Never a crash.** When the helper cannot be loaded or built, :func:`enable` emits one
  :class:`WeightCacheUnavailableWarning` per process and returns ``False``; programs then
  run as on the stock runtime (cache off).
"""

from __future__ import annotations

import logging
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from . import native

__all__ = [
    "BACKEND",
    "OPTION",
    "WeightCacheStatus",
    "WeightCacheUnavailableWarning",
    "enable",
    "enabled",
    "is_available",
    "is_enabled",
    "status",
]

logger = logging.getLogger(__name__)

#: The backend's registered name; ``set_option`` matches it exactly.
BACKEND = "XnnpackBackend"
#: The option key; its value must be a bool (an int is refused with InvalidArgument).
OPTION = "weight_cache_enabled"


class WeightCacheUnavailableWarning(RuntimeWarning):
    """The weight cache cannot be switched in this process; methods load without it."""


@dataclass(frozen=True)
class WeightCacheStatus:
    """What :func:`status` reports."""

    #: The helper is loaded and the XNNPACK backend answers ``get_option``.
    available: bool
    #: The option's value now (``None`` when not available).
    enabled: bool | None
    #: The helper library in use, and whether it was built at install or on first use.
    helper_path: Path | None
    helper_origin: str | None
    #: Why it is not available (empty when it is).
    reason: str


_warn_lock = threading.Lock()
_warned = False


def _helper_or_reason() -> tuple[native.NativeHelper | None, str]:
    try:
        helper = native.load_helper()
    except native.NativeUnavailable as exc:
        return None, f"lazykv's native helper is unavailable: {exc}"
    try:
        helper.get_bool_option(BACKEND, OPTION)
    except native.OptionError as exc:
        return None, (
            f"the runtime refused the option: {exc} "
            "(is the XNNPACK backend in this ExecuTorch build?)"
        )
    return helper, ""


def _warn_once(reason: str) -> None:
    global _warned
    with _warn_lock:
        if _warned:
            return
        _warned = True
    warnings.warn(
        f"XNNPACK weight cache cannot be switched on, so methods that share weights hold "
        f"one copy each. {reason}. Fix: install a C++ compiler (e.g. g++) so lazykv compiles "
        f"the helper on first use, or build it at install and see any error with "
        f"`LAZYKV_REQUIRE_NATIVE=1 pip install --no-build-isolation -e .` (`make venv` does).",
        WeightCacheUnavailableWarning,
        stacklevel=3,
    )


def status() -> WeightCacheStatus:
    """The weight cache's availability and current value, without changing anything."""
    helper, reason = _helper_or_reason()
    if helper is None:
        return WeightCacheStatus(False, None, None, None, reason)
    return WeightCacheStatus(
        available=True,
        enabled=helper.get_bool_option(BACKEND, OPTION),
        helper_path=helper.info.path,
        helper_origin=helper.info.origin,
        reason="",
    )


def is_available() -> bool:
    """Whether :func:`enable` can switch the cache in this process.

    True when lazykv's native helper is loaded (built at install, or compiled on first
    use into the user cache folder) and the runtime's XNNPACK backend accepts the option.
    The first call may take about a second (it imports the ExecuTorch runtime, and may
    compile the helper); later calls are immediate.
    """
    return _helper_or_reason()[0] is not None


def is_enabled() -> bool | None:
    """The option's current value in this process, or ``None`` when it cannot be read."""
    helper, _ = _helper_or_reason()
    return None if helper is None else helper.get_bool_option(BACKEND, OPTION)


def enable(enabled: bool = True) -> bool:
    """Switch XNNPACK's weight cache on (or off) for every later ``load_method`` in this process.

    Process-wide: affects all programs and threads, and only methods loaded after the
    call (methods already loaded keep the weights they packed). Returns whether the
    option took effect, i.e. whether the runtime now reports the requested value.

    When the native helper is unavailable, ``enable(True)`` emits one
    :class:`WeightCacheUnavailableWarning` per process (naming the reason and the fix)
    and returns ``False``; ``enable(False)`` returns ``True`` without a warning, since
    the cache is off by default on the stock runtime and lazykv has no other way to
    switch it on. Never raises for an unavailable helper; raises ``TypeError`` if
    ``enabled`` is not a bool (the backend accepts only a bool).
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__} ({enabled!r})")
    helper, reason = _helper_or_reason()
    if helper is None:
        if enabled:
            _warn_once(reason)
            return False
        return True
    try:
        helper.set_bool_option(BACKEND, OPTION, enabled)
        now = helper.get_bool_option(BACKEND, OPTION)
    except native.OptionError as exc:
        if enabled:
            _warn_once(f"the runtime refused the option: {exc}")
        return False
    if now == enabled:
        state = "on" if enabled else "off"
        logger.debug("XNNPACK weight cache %s (helper %s)", state, helper.info.path)
    return now == enabled


@contextmanager
def enabled(value: bool = True) -> Iterator[bool]:
    """Switch the cache to ``value`` for the ``with`` block, then back to what it was.

    Yields what :func:`enable` returned. Load the methods inside the block: they keep
    the cache setting they were loaded with after the block ends. Not thread-safe
    against other threads changing the option at the same time (it is process-wide).
    """
    before = is_enabled()
    took = enable(value)
    try:
        yield took
    finally:
        if before is not None and took and before != value:
            enable(before)
