"""The one ScalarType table: ExecuTorch's dtype codes, their torch names and sizes.

ExecuTorch defines the codes in ``executorch.exir.scalar_type.ScalarType`` (and in the
flatbuffer schema, ``schema/scalar_type.fbs``), but importing that module runs
``executorch/exir/__init__.py``, which imports torch and the whole export stack
(seconds): too much for ``lazykv inspect``. So the table is written here once, and
``tests/test_format_layer.py`` checks it against ExecuTorch's enum, the installed
wheel's ``scalar_type.fbs`` and torch (every torch name exists and has this element
size; ``executorch.exir.tensor`` maps it to this code).

Dtype names are torch's (``float32``, ``bfloat16``...): the lazykv manifest, ``inspect``
and the runtime shim all speak them.
"""

from __future__ import annotations

from typing import Dict, NamedTuple, Optional


class ScalarType(NamedTuple):
    """One ExecuTorch scalar type."""

    code: int
    #: ExecuTorch's enum name (``executorch.exir.scalar_type.ScalarType``).
    name: str
    #: torch's dtype name (``getattr(torch, dtype)``).
    dtype: str
    #: Bytes per element as ExecuTorch stores it (a sub-byte type packs into one byte).
    itemsize: int
    #: An integer type (its scalars read back as ints: ``aten::_local_scalar_dense``).
    integer: bool = False


SCALAR_TYPES = (
    ScalarType(0, "BYTE", "uint8", 1, True),
    ScalarType(1, "CHAR", "int8", 1, True),
    ScalarType(2, "SHORT", "int16", 2, True),
    ScalarType(3, "INT", "int32", 4, True),
    ScalarType(4, "LONG", "int64", 8, True),
    ScalarType(5, "HALF", "float16", 2),
    ScalarType(6, "FLOAT", "float32", 4),
    ScalarType(7, "DOUBLE", "float64", 8),
    ScalarType(8, "COMPLEX32", "complex32", 4),
    ScalarType(9, "COMPLEX64", "complex64", 8),
    ScalarType(10, "COMPLEX128", "complex128", 16),
    ScalarType(11, "BOOL", "bool", 1),
    ScalarType(12, "QINT8", "qint8", 1),
    ScalarType(13, "QUINT8", "quint8", 1),
    ScalarType(14, "QINT32", "qint32", 4),
    ScalarType(15, "BFLOAT16", "bfloat16", 2),
    ScalarType(16, "QUINT4x2", "quint4x2", 1),
    ScalarType(17, "QUINT2x4", "quint2x4", 1),
    ScalarType(22, "BITS16", "bits16", 2),
    ScalarType(23, "FLOAT8E5M2", "float8_e5m2", 1),
    ScalarType(24, "FLOAT8E4M3FN", "float8_e4m3fn", 1),
    ScalarType(25, "FLOAT8E5M2FNUZ", "float8_e5m2fnuz", 1),
    ScalarType(26, "FLOAT8E4M3FNUZ", "float8_e4m3fnuz", 1),
    ScalarType(27, "UINT16", "uint16", 2, True),
    ScalarType(28, "UINT32", "uint32", 4, True),
    ScalarType(29, "UINT64", "uint64", 8, True),
)

BY_CODE: Dict[int, ScalarType] = {t.code: t for t in SCALAR_TYPES}
BY_DTYPE: Dict[str, ScalarType] = {t.dtype: t for t in SCALAR_TYPES}
#: Code of ``bool`` (its scalars read back as a Bool, not an Int).
BOOL = BY_DTYPE["bool"].code


def dtype_name(code: int) -> str:
    """torch's name for ExecuTorch scalar type ``code`` (``scalar_type_<code>`` if unknown)."""
    t = BY_CODE.get(int(code))
    return t.dtype if t is not None else f"scalar_type_{int(code)}"


def itemsize(code: int) -> Optional[int]:
    """Bytes per element of scalar type ``code``, None for a code ExecuTorch does not have."""
    t = BY_CODE.get(int(code))
    return None if t is None else t.itemsize


def nbytes(code: int, sizes) -> int:
    """Bytes of a tensor of scalar type ``code`` and shape ``sizes`` (1 byte per element
    for an unknown code)."""
    n = itemsize(code) or 1
    for d in sizes:
        n *= d
    return n
