"""Byte sizes, one way everywhere: the parser behind every size option and argument.

``parse_size`` reads what a person writes: a bare number is bytes (``123``,
``8,388,608``); SI units are powers of 1000 (``KB``, ``MB``, ``GB``, ``TB``: ``64MB`` is
64,000,000 bytes); IEC units are powers of 1024 (``KiB``, ``MiB``, ``GiB``, ``TiB``:
``64MiB`` is 67,108,864 bytes); ``B`` alone is bytes. Case does not matter. Anything
else is refused with :class:`SizeError`, including ``64M`` (say which: ``64MB`` or
``64MiB``). Used by ``lazykv generate --max-bytes``, ``lazykv check --max-*-bytes``, the
``hybrid`` policy's byte parameters, ``runtime_shim.load(max_bytes=...)`` and the disk
cache's size cap. ``format_size`` prints sizes back in IEC units.

Torch-free and click-free: the CLI wraps it in a click type (``lazykv.cli.params``).
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Union

from lazykv.errors import LazyKVError

#: Unit (lower case) -> bytes.
UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*([0-9][0-9_,]*(?:\.[0-9]+)?|\.[0-9]+)\s*([a-zA-Z]*)\s*$")
FORMS = "bytes (123), KiB/MiB/GiB (powers of 1024, e.g. 64MiB) or KB/MB/GB (powers of 1000, e.g. 1.5GB)"


class SizeError(LazyKVError, ValueError):
    """A size that cannot be read (unknown unit, ambiguous ``64M``, negative, fractional
    bytes); the message names the value and the accepted forms."""

    exit_code = 2


def parse_size(value: Union[str, int, float], what: str = "size") -> int:
    """Bytes from ``123``, ``"123"``, ``"64MiB"``, ``"1.5GB"``, ``"8,388,608"``, ``"7B"``.

    ``what`` names the setting in the error message (``"--max-bytes"``). Ints and
    integral floats are bytes. Raises :class:`SizeError` for anything else: an unknown
    or ambiguous unit (``64M``, ``64K``), a negative size, a result that is not a whole
    number of bytes, a bool or another type.
    """
    if isinstance(value, bool):
        raise SizeError(f"{what}: expected a size, got {value!r}; use {FORMS}")
    if isinstance(value, int):
        n = Fraction(value)
    elif isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise SizeError(f"{what}: expected a size, got {value!r}; use {FORMS}")
        n = Fraction(value)
    elif isinstance(value, str):
        m = _SIZE_RE.match(value)
        unit = m.group(2).lower() if m else None
        if not m or unit not in UNITS:
            hint = ""
            if m and unit in ("k", "m", "g", "t"):
                u = m.group(2).upper()
                hint = f" ({m.group(2)} is ambiguous: write {u}iB for powers of 1024 or {u}B for powers of 1000)"
            elif value.strip().startswith("-"):
                hint = " (a size cannot be negative)"
            raise SizeError(f"{what}: cannot read {value!r} as a size{hint}; use {FORMS}")
        n = Fraction(m.group(1).replace("_", "").replace(",", "")) * UNITS[unit]
    else:
        raise SizeError(f"{what}: expected a size, got {type(value).__name__} {value!r}; use {FORMS}")
    if n < 0:
        raise SizeError(f"{what}: a size cannot be negative ({value!r})")
    if n.denominator != 1:
        raise SizeError(f"{what}: {value!r} is not a whole number of bytes ({float(n):g})")
    return int(n)


def format_size(n) -> str:
    """``1536`` -> ``'1.5 KiB'``, ``512`` -> ``'512 B'``, ``None`` -> ``'-'`` (IEC units,
    one decimal; exact figures, where they matter, are printed as ``f"{n:,} B"``)."""
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
