"""``lazykv check``'s rules and where they come from: :class:`Rules`, sizes, TOML.

:class:`Rules` holds which rules are on and their limits (validated at construction);
:func:`load_config` and :func:`pyproject_config` read them from ``lazykv.toml`` or
``[tool.lazykv.check]`` of a ``pyproject.toml``. Every bad value raises
:class:`CheckConfigError` naming the key and the accepted forms.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple, Union

from lazykv.errors import LazyKVError
from lazykv.units import SizeError
from lazykv.units import parse_size as _parse_size

RULES = (
    "methods",
    "expect-lazy-kv",
    "shared-kv",
    "max-planned-bytes",
    "max-kv-bytes-at-max-context",
    "max-load-bytes",
    "no-duplicate-constants",
    "runs",
)

class CheckConfigError(LazyKVError):
    """Rules that cannot be used: an unknown TOML key, a bad size, a wrong type."""

    exit_code = 2


# -- sizes ---------------------------------------------------------------------------------


def parse_size(value: Union[str, int, float], what: str = "size") -> int:
    """:func:`lazykv.units.parse_size` (the one size parser), refusing with
    :class:`CheckConfigError` so a bad limit is a config error (exit code 2)."""
    try:
        return _parse_size(value, what)
    except SizeError as e:
        raise CheckConfigError(str(e)) from None


# -- rules ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rules:
    """Which rules to check, with their limits. Sizes accept the forms of :func:`parse_size`.

    Validated at construction; build from TOML with :meth:`from_mapping`.
    """

    expect_lazy_kv: bool = False
    max_planned_bytes: Optional[int] = None
    max_load_bytes: Optional[int] = None
    max_kv_bytes_at_max_context: Optional[int] = None
    no_duplicate_constants: bool = False
    assume_weight_cache: bool = False
    methods: Optional[Tuple[str, ...]] = None
    shared_kv: bool = False
    runs: bool = False

    def __post_init__(self) -> None:
        for f in ("expect_lazy_kv", "no_duplicate_constants", "assume_weight_cache", "shared_kv", "runs"):
            v = getattr(self, f)
            if not isinstance(v, bool):
                raise CheckConfigError(f"{f}: expected true or false, got {v!r}")
        for f in ("max_planned_bytes", "max_load_bytes", "max_kv_bytes_at_max_context"):
            v = getattr(self, f)
            if v is not None:
                object.__setattr__(self, f, parse_size(v, f))
        if self.methods is not None:
            object.__setattr__(self, "methods", _method_list(self.methods))

    @property
    def enabled(self) -> Tuple[str, ...]:
        """Ids (from :data:`RULES`) of the rules these settings turn on, in report order."""
        on = {
            "methods": self.methods is not None,
            "expect-lazy-kv": self.expect_lazy_kv,
            "shared-kv": self.shared_kv,
            "max-planned-bytes": self.max_planned_bytes is not None,
            "max-kv-bytes-at-max-context": self.max_kv_bytes_at_max_context is not None,
            "max-load-bytes": self.max_load_bytes is not None,
            "no-duplicate-constants": self.no_duplicate_constants,
            "runs": self.runs,
        }
        return tuple(r for r in RULES if on[r])

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any], source: str = "config") -> "Rules":
        """Rules from a TOML table (``[tool.lazykv.check]`` or a ``lazykv.toml``).

        Keys are the field names, with ``_`` or ``-``; unknown keys and wrong types are
        refused (:class:`CheckConfigError` naming ``source``, the key and the known keys).
        A size limit may be ``"off"`` (no limit).
        """
        return cls(**_fields_from_mapping(mapping, source))

    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}


_FIELDS = tuple(f.name for f in dataclasses.fields(Rules))
_SIZE_FIELDS = ("max_planned_bytes", "max_load_bytes", "max_kv_bytes_at_max_context")


def _method_list(value: Union[str, Iterable[str]]) -> Tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else list(value)
    out = []
    for m in items:
        if not isinstance(m, str):
            raise CheckConfigError(f"methods: expected method names, got {m!r}")
        m = m.strip()
        if m and m not in out:
            out.append(m)
    if not out:
        raise CheckConfigError("methods: give at least one method name (e.g. prefill,decode)")
    return tuple(out)


def _fields_from_mapping(mapping: Mapping[str, Any], source: str) -> Dict[str, Any]:
    if not isinstance(mapping, Mapping):
        raise CheckConfigError(f"{source}: expected a table of rules, got {type(mapping).__name__}")
    out: Dict[str, Any] = {}
    for key, value in mapping.items():
        name = str(key).replace("-", "_")
        if name not in _FIELDS:
            raise CheckConfigError(
                f"{source}: unknown key {key!r}; known keys: {', '.join(_FIELDS)}"
            )
        where = f"{source}: {key}"
        if name in _SIZE_FIELDS:
            if isinstance(value, str) and value.strip().lower() in ("off", "none"):
                out[name] = None
                continue
            out[name] = parse_size(value, where)
        elif name == "methods":
            if not isinstance(value, (str, list)):
                raise CheckConfigError(f"{where}: expected a list of names or \"a,b\", got {value!r}")
            out[name] = _method_list(value)
        else:
            if not isinstance(value, bool):
                raise CheckConfigError(f"{where}: expected true or false, got {value!r}")
            out[name] = value
    return out


def _toml(path: str) -> dict:
    """``path`` parsed with the standard library's ``tomllib`` (Python 3.11+)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib  # the same parser, packaged for 3.10
        except ModuleNotFoundError:
            raise CheckConfigError(
                f"{path}: reading TOML needs Python 3.11+ (tomllib) or the tomli package"
            ) from None
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise CheckConfigError(f"{path}: cannot read the config ({e.strerror or e})") from None
    except tomllib.TOMLDecodeError as e:
        raise CheckConfigError(f"{path}: not valid TOML ({e})") from None


def load_config(path: Union[str, os.PathLike]) -> Tuple[Dict[str, Any], str]:
    """Rule settings from a TOML file, and a description of where they came from.

    ``lazykv.toml``: a ``[check]`` table, or the keys at the top level. A
    ``pyproject.toml`` (or any file with one): the ``[tool.lazykv.check]`` table.
    Returns field values as accepted by :class:`Rules` (only the keys present).
    """
    path = os.fspath(path)
    doc = _toml(path)
    tool = doc.get("tool", {}).get("lazykv", {}) if isinstance(doc.get("tool"), dict) else {}
    if isinstance(tool, dict) and "check" in tool:
        return _fields_from_mapping(tool["check"], f"{path} [tool.lazykv.check]"), f"{path} [tool.lazykv.check]"
    if "check" in doc:
        return _fields_from_mapping(doc["check"], f"{path} [check]"), f"{path} [check]"
    top = {k: v for k, v in doc.items() if k != "tool"}
    if not top:
        raise CheckConfigError(
            f"{path}: no rules found; put them in a [check] table (lazykv.toml) or in "
            f"[tool.lazykv.check] (pyproject.toml)"
        )
    return _fields_from_mapping(top, path), path


def pyproject_config(directory: Union[str, os.PathLike] = ".") -> Tuple[Dict[str, Any], Optional[str]]:
    """``[tool.lazykv.check]`` of ``directory/pyproject.toml``: ``({}, None)`` if absent."""
    path = os.path.join(os.fspath(directory), "pyproject.toml")
    if not os.path.isfile(path):
        return {}, None
    doc = _toml(path)
    tool = doc.get("tool")
    lazykv = tool.get("lazykv") if isinstance(tool, dict) else None
    table = lazykv.get("check") if isinstance(lazykv, dict) else None
    if table is None:
        return {}, None
    where = f"{path} [tool.lazykv.check]"
    return _fields_from_mapping(table, where), where
