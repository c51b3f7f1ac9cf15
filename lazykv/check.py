"""The rule engine behind ``lazykv check``: does a ``.pte`` keep its memory promises?

The library returns data (:class:`CheckReport`); ``lazykv.cli.check_cmd`` prints it.
Everything except :data:`RULES` ``runs`` reads the file the way :func:`lazykv.inspect.inspect_pte`
does (the program flatbuffer only, segments through ``mmap``) and never imports the
ExecuTorch runtime; ``runs`` loads the program through :func:`lazykv.runtime_shim.load`.

::

    from lazykv.check import Rules, check_files
    report = check_files(["model.pte"], Rules(expect_lazy_kv=True, max_planned_bytes="8MiB"))
    assert report.return_code == 0, report.failure_lines()

Rules (the :class:`Rules` field, the CLI flag, the TOML key):

``expect_lazy_kv``
    Every position-indexed cache (``kv_buffers`` of :func:`inspect_pte`) is lazy: marked
    (manifest or ``DYNAMIC_UNBOUND``) and not planned. A program with no KV cache fails.
``max_planned_bytes``
    The planned arenas the runtime allocates at load (per arena the max over methods,
    summed: ``inspect``'s ``planned_bytes``) stay within the limit.
``max_load_bytes``
    Planned bytes plus what loads eagerly with them: constant-segment tensors, named-data
    blobs (delegate weights; the lazykv manifest excluded) and delegate blobs.
``max_kv_bytes_at_max_context``
    All KV caches together at their upper bound (max context) stay within the limit.
``no_duplicate_constants``
    No constant is stored twice: no two constant-segment buffers, named-data blobs or
    delegate blobs hold the same bytes (sha256), and no shared constant of the lazykv
    manifest is ``stored_once = false``. No weight is resident twice: a named-data blob
    used by the XNNPACK delegates of two or more methods is packed once per method on the
    stock runtime (DESIGN fact 7) unless ``assume_weight_cache`` says the process switches
    XNNPACK's weight cache on (:mod:`lazykv.runtime_shim.weight_cache`).
``methods``
    The program has *at least* these methods (others, e.g. constant methods such as
    ``get_max_context_len``, are allowed).
``shared_kv``
    Every method that binds a KV cache binds the same ones: the same FQNs (lazy buffers
    are bound by FQN by the shim), and for planned caches the same arena and offset with
    no other planned tensor of any method over them (the runtime shares each arena across
    methods, DESIGN fact 6). Methods binding no KV cache are not counted. A program with
    no KV cache fails.
``runs``
    The program loads through :func:`lazykv.runtime_shim.load` and every method runs once,
    each in a fresh session, on dummy inputs: zeros of each input's dtype and shape, with
    dynamic token/position inputs cut to one position (``[1, 1]`` tokens at position 0), and
    float outputs must be finite.

Exit codes (:attr:`CheckReport.return_code`): 0 every rule holds for every file, 1 a rule
fails, 2 a file cannot be read (this wins over 1; the other files are still checked).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import sys
import time
import xml.etree.ElementTree as ET
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from lazykv.errors import LazyKVError
from lazykv.units import SizeError, parse_size as _parse_size

#: Rule ids in report order (CLI flags and TOML keys are derived from them).
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

#: Version of the JSON document :meth:`CheckReport.to_dict` returns.
REPORT_VERSION = 1

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_UNREADABLE = 2


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


def _b(n: int) -> str:
    """``18354112`` -> ``'18,354,112 B'`` (exact figures: CI logs get compared)."""
    return f"{int(n):,} B"


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


# -- results -------------------------------------------------------------------------------


@dataclasses.dataclass
class RuleResult:
    """One rule on one file. ``failures`` each name the offender and its figure vs limit."""

    rule: str
    passed: bool
    summary: str
    failures: List[str] = dataclasses.field(default_factory=list)
    figures: Dict[str, Any] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class FileResult:
    """All rules on one file, or the reason it could not be read (``error``)."""

    file: str
    rules: List[RuleResult] = dataclasses.field(default_factory=list)
    error: Optional[str] = None
    seconds: float = 0.0

    @property
    def status(self) -> str:
        if self.error is not None:
            return "error"
        return "pass" if all(r.passed for r in self.rules) else "fail"

    def to_dict(self) -> dict:
        return {
            "file": self.file,
            "status": self.status,
            "error": self.error,
            "seconds": round(self.seconds, 4),
            "rules": [r.to_dict() for r in self.rules],
        }


@dataclasses.dataclass
class CheckReport:
    """Every file's results. :attr:`return_code` is the one thing that decides the exit code."""

    rules: Rules
    files: List[FileResult] = dataclasses.field(default_factory=list)
    config_source: Optional[str] = None

    @property
    def return_code(self) -> int:
        if any(f.error is not None for f in self.files):
            return EXIT_UNREADABLE
        if any(not r.passed for f in self.files for r in f.rules):
            return EXIT_FAILED
        return EXIT_OK

    @property
    def failed(self) -> List[Tuple[str, RuleResult]]:
        return [(f.file, r) for f in self.files for r in f.rules if not r.passed]

    def failure_lines(self) -> List[str]:
        """``"<file>: <rule>: <failure>"`` for every failure and unreadable file."""
        out = []
        for f in self.files:
            if f.error is not None:
                out.append(f"{f.file}: cannot be read: {f.error}")
            for r in f.rules:
                for msg in r.failures or ([] if r.passed else [r.summary]):
                    out.append(f"{f.file}: {r.rule}: {msg}")
        return out

    def to_dict(self) -> dict:
        """The ``--json`` document (``version`` is :data:`REPORT_VERSION`)."""
        return {
            "version": REPORT_VERSION,
            "exit_code": self.return_code,
            "config": self.config_source,
            "rules": self.rules.to_dict(),
            "enabled_rules": list(self.rules.enabled),
            "summary": {
                "files": len(self.files),
                "unreadable": sum(f.error is not None for f in self.files),
                "failed_rules": len(self.failed),
                "passed_rules": sum(r.passed for f in self.files for r in f.rules),
            },
            "files": [f.to_dict() for f in self.files],
        }

    def to_junit_xml(self) -> str:
        """JUnit XML: one ``<testcase>`` per enabled rule per file (``classname`` = file).

        A failing rule carries ``<failure message=first failure>`` with every failure in
        its text; for a file that cannot be read every rule carries ``<error>``.
        """
        enabled = self.rules.enabled
        suites = ET.Element("testsuites", name="lazykv check")
        suite = ET.SubElement(suites, "testsuite", name="lazykv check")
        n_fail = n_err = n = 0
        total = 0.0
        for f in self.files:
            by_rule = {r.rule: r for r in f.rules}
            for rule in enabled:
                n += 1
                r = by_rule.get(rule)
                seconds = r.seconds if r else 0.0
                total += seconds
                case = ET.SubElement(
                    suite, "testcase", classname=f.file, name=rule, time=f"{seconds:.3f}"
                )
                if f.error is not None:
                    n_err += 1
                    e = ET.SubElement(case, "error", message=f"cannot read {f.file}: {f.error}",
                                      type="unreadable")
                    e.text = f.error
                elif r is not None and not r.passed:
                    n_fail += 1
                    msgs = r.failures or [r.summary]
                    e = ET.SubElement(case, "failure", message=msgs[0], type=rule)
                    e.text = "\n".join(msgs)
                elif r is not None:
                    out = ET.SubElement(case, "system-out")
                    out.text = r.summary
        for el in (suites, suite):
            el.set("tests", str(n))
            el.set("failures", str(n_fail))
            el.set("errors", str(n_err))
            el.set("time", f"{total:.3f}")
        ET.indent(suites)
        return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


# -- checking ------------------------------------------------------------------------------


class _Program:
    """One opened ``.pte`` plus what several rules need, computed once."""

    def __init__(self, path: str) -> None:
        from lazykv.inspect import inspect_pte
        from lazykv.pte_file import open_pte

        self.path = path
        # The deep validation (lazykv.pte_validate: every kernel argument against its
        # schema, shapes through torch's meta kernels) imports torch: skip it here (check
        # reads metadata only; ``runs`` loads through the shim, which validates).
        self.pte = open_pte(path, validate=False)
        self.info = inspect_pte(self.pte)
        self._delegates: Optional[Dict[Tuple[int, int], dict]] = None

    @property
    def program(self):
        return self.pte.program

    def plan(self, name: str):
        return self.pte.plan(name)

    def delegate_blobs(self) -> Dict[Tuple[int, int], dict]:
        """(location, index) -> {bytes, methods, id} for every delegate blob called."""
        if self._delegates is None:
            out: Dict[Tuple[int, int], dict] = {}
            prog = self.program
            for plan in prog.execution_plan:
                for d in plan.delegates:
                    loc, idx = int(d.processed.location), int(d.processed.index)
                    e = out.setdefault((loc, idx), {"id": d.id, "methods": [], "size": 0})
                    if plan.name not in e["methods"]:
                        e["methods"].append(plan.name)
                    if loc == 1:  # DataLocation.SEGMENT
                        if 0 <= idx < len(prog.segments or []):
                            e["size"] = prog.segments[idx].size
                    elif 0 <= idx < len(prog.backend_delegate_data or []):
                        e["size"] = len(prog.backend_delegate_data[idx].data)
            self._delegates = out
        return self._delegates

    def delegate_bytes(self, loc: int, idx: int) -> bytes:
        if loc == 1:
            return bytes(self.pte.segment(idx))
        return bytes(self.program.backend_delegate_data[idx].data)

    def close(self) -> None:
        self.pte.close()


def _kv_name(b: dict) -> str:
    """A KV buffer as a reader can find it: its FQN, else method and value index."""
    if b.get("fqn"):
        return repr(b["fqn"])
    vi = b.get("value_index") or {}
    where = ", ".join(f"{m} value {i}" for m, i in vi.items())
    return f"(unnamed: {where})"


def _shape(b: dict) -> str:
    return f"{b['dtype']}[{', '.join(str(d) for d in b['shape'])}]"


def _rule_expect_lazy_kv(p: _Program, rules: Rules) -> RuleResult:
    info = p.info
    kv = info["kv_buffers"]
    r = RuleResult("expect-lazy-kv", True, "", figures={
        "kv_buffers": len(kv), "lazy": sum(bool(b["lazy"]) for b in kv),
        "lazy_kv_bytes": info["lazy_kv_bytes"], "kv_bytes_at_max_context": info["kv_bytes_at_max_context"],
    })
    if not kv:
        r.passed = False
        r.summary = "no position-indexed KV cache found"
        r.failures.append(
            "no position-indexed KV cache found (no lazykv manifest and no llama::update_cache-"
            "style kernel writes a mutable buffer), so none is lazy; export with "
            "`lazykv export --lazy-kv-cache` or lazykv.passes.to_executorch_lazy"
        )
        return r
    for b in kv:
        if not b["lazy"]:
            why = b.get("planned_because")  # left planned by a lazy export: its reason
            r.failures.append(
                f"KV buffer {_kv_name(b)} {_shape(b)} {_b(b['nbytes'])} is not lazy: "
                f"{b['dynamism']}, planned in arena {b['arena']} (methods {', '.join(b['methods'])})"
                + (f"; the lazy export left it planned ({why['cause']}): {why['reason']}. "
                   f"Fix: {why['fix']}" if why else "")
            )
        elif b["arena"] is not None:
            r.failures.append(
                f"KV buffer {_kv_name(b)} {_shape(b)} is marked lazy but still planned in arena "
                f"{b['arena']} ({_b(b['nbytes'])} allocated at load)"
            )
    lazy = r.figures["lazy"]
    if r.failures:
        r.passed = False
        static_bytes = sum(b["nbytes"] for b in kv if not b["lazy"] or b["arena"] is not None)
        causes = sorted({b["planned_because"]["cause"] for b in kv
                         if not b["lazy"] and b.get("planned_because")})
        hint = (f"the lazy export left them planned ({', '.join(causes)}): see the failures"
                if causes else "export with --lazy-kv-cache")
        r.summary = (f"{len(kv) - lazy} of {len(kv)} KV buffers are planned ({_b(static_bytes)}); "
                     f"{hint}")
    else:
        r.summary = f"{lazy} of {len(kv)} KV buffers lazy ({_b(info['lazy_kv_bytes'])} not planned)"
    return r


def _planned_buffers(p: _Program) -> List[dict]:
    return sorted((b for b in p.info["mutable_buffers"] if b["arena"] is not None),
                  key=lambda b: -b["nbytes"])


def _rule_max_planned(p: _Program, rules: Rules) -> RuleResult:
    info, limit = p.info, rules.max_planned_bytes
    planned = info["planned_bytes"]
    r = RuleResult("max-planned-bytes", planned <= limit,
                   f"planned {_b(planned)} <= limit {_b(limit)}",
                   figures={"planned_bytes": planned, "limit": limit,
                            "by_method": {m: v["planned_bytes"] for m, v in info["methods"].items()}})
    if r.passed:
        return r
    bufs = _planned_buffers(p)
    kv_planned = [b for b in bufs if b["kv"] or b["lazy"]]
    tail = ""
    if kv_planned:
        tail = (f" ({len(kv_planned)} planned KV buffers hold {_b(sum(b['nbytes'] for b in kv_planned))}; "
                f"largest {_kv_name(kv_planned[0])} {_shape(kv_planned[0])} {_b(kv_planned[0]['nbytes'])})")
    elif bufs:
        tail = f" (largest planned buffer {_kv_name(bufs[0])} {_b(bufs[0]['nbytes'])})"
    over = [(m, v["planned_bytes"]) for m, v in info["methods"].items() if v["planned_bytes"] > limit]
    for m, n in over:
        r.failures.append(f"{m}: planned {_b(n)} > limit {_b(limit)}" + tail)
    if not over:
        per = ", ".join(f"{m} {_b(v['planned_bytes'])}" for m, v in info["methods"].items())
        r.failures.append(
            f"program: planned {_b(planned)} > limit {_b(limit)} (each arena sized to its largest "
            f"method: {per}; arenas {[f'{a:,}' for a in info['arena_bytes']]})" + tail)
    r.summary = f"planned {_b(planned)} > limit {_b(limit)}"
    return r


def _rule_max_kv(p: _Program, rules: Rules) -> RuleResult:
    info, limit = p.info, rules.max_kv_bytes_at_max_context
    kv = sorted(info["kv_buffers"], key=lambda b: -b["nbytes"])
    total = info["kv_bytes_at_max_context"]
    r = RuleResult("max-kv-bytes-at-max-context", total <= limit,
                   f"KV at max context {_b(total)} <= limit {_b(limit)} ({len(kv)} buffers)",
                   figures={"kv_bytes_at_max_context": total, "limit": limit, "kv_buffers": len(kv)})
    if r.passed:
        return r
    ctx = _max_context(p)
    largest = kv[0]
    r.failures.append(
        f"KV at max context {_b(total)} > limit {_b(limit)}: {len(kv)} buffers"
        + (f" at max context {ctx:,}" if ctx else "")
        + f", largest {_kv_name(largest)} {_shape(largest)} {_b(largest['nbytes'])}"
    )
    r.summary = f"KV at max context {_b(total)} > limit {_b(limit)}"
    return r


def _max_context(p: _Program) -> Optional[int]:
    man = p.pte.manifest
    if man is not None and man.lazy_buffers:
        return min(b.max_positions for b in man.lazy_buffers)
    v = p.info["constant_methods"].get("get_max_context_len")
    return v if isinstance(v, int) else None


def _rule_max_load(p: _Program, rules: Rules) -> RuleResult:
    info, limit = p.info, rules.max_load_bytes
    planned = info["planned_bytes"]
    consts = info["constants"]["bytes"]
    named = info["constants"]["named_data_bytes"]
    delegates = p.delegate_blobs()
    dbytes = sum(d["size"] for d in delegates.values())
    total = planned + consts + named + dbytes
    parts = {"planned": planned, "constant segment": consts, "named data": named, "delegate blobs": dbytes}
    breakdown = " + ".join(f"{k} {v:,}" for k, v in parts.items())
    r = RuleResult("max-load-bytes", total <= limit,
                   f"load {_b(total)} <= limit {_b(limit)} ({breakdown})",
                   figures={"load_bytes": total, "limit": limit, "planned_bytes": planned,
                            "constant_bytes": consts, "named_data_bytes": named,
                            "delegate_bytes": dbytes})
    if r.passed:
        return r
    # Name the largest single things that load eagerly.
    items: List[Tuple[int, str]] = []
    bufs = _planned_buffers(p)
    for k, size in enumerate(info["arena_bytes"]):
        owner = max(info["methods"], key=lambda m: (info["methods"][m]["arenas"] + [0] * (k + 1))[k])
        inside = [b for b in bufs if b["arena"] == k + 1]
        items.append((size, f"planned arena {k + 1} (sized by {owner}"
                      + (f"; largest buffer {_kv_name(inside[0])} {_b(inside[0]['nbytes'])})" if inside else ")")))
    prog = p.program
    for nd in prog.named_data or []:
        if not nd.key.startswith("lazykv/") and 0 <= nd.segment_index < len(prog.segments or []):
            items.append((prog.segments[nd.segment_index].size, f"named data {nd.key!r}"))
    for (loc, idx), d in delegates.items():
        items.append((d["size"], f"{d['id']} delegate blob {idx} ({', '.join(d['methods'])})"))
    for idx, (name, methods, nbytes) in _constant_buffers(p).items():
        items.append((nbytes, name))
    items.sort(key=lambda t: -t[0])
    top = "; ".join(f"{name} {_b(n)}" for n, name in items[:3] if n)
    r.failures.append(f"load {_b(total)} > limit {_b(limit)} = {breakdown}; largest: {top}")
    r.summary = f"load {_b(total)} > limit {_b(limit)}"
    return r


def _rule_methods(p: _Program, rules: Rules) -> RuleResult:
    have = p.pte.method_names
    missing = [m for m in rules.methods if m not in have]
    shown = ", ".join(have)
    r = RuleResult("methods", not missing,
                   f"has {', '.join(rules.methods)} (program methods: {shown})",
                   figures={"expected": list(rules.methods), "methods": list(have), "missing": missing})
    for m in missing:
        r.failures.append(f"missing method {m!r}; the program has: {shown}")
    if missing:
        r.summary = f"missing {', '.join(repr(m) for m in missing)}"
    return r


def _alloc_range(t) -> Optional[Tuple[int, int, int]]:
    """(memory id, start, end) of a planned tensor, or None."""
    from lazykv.inspect import tensor_nbytes

    a = t.allocation_info
    if a is None:
        return None
    start = int(a.memory_offset_low) + (int(a.memory_offset_high) << 32)
    return int(a.memory_id), start, start + tensor_nbytes(t)


def _rule_shared_kv(p: _Program, rules: Rules) -> RuleResult:
    from executorch.exir.schema import Tensor

    kv = p.info["kv_buffers"]
    r = RuleResult("shared-kv", True, "", figures={"kv_buffers": len(kv)})
    if not kv:
        r.passed = False
        r.summary = "no position-indexed KV cache found"
        r.failures.append("no position-indexed KV cache found, so no method binds one")
        return r
    order = p.pte.method_names
    kv_methods = [m for m in order if any(m in b["methods"] for b in kv)]
    r.figures["methods"] = kv_methods
    for b in kv:
        missing = [m for m in kv_methods if m not in b["methods"]]
        for m in missing:
            r.failures.append(
                f"{m}: does not bind KV buffer {_kv_name(b)} {_shape(b)} (bound by "
                f"{', '.join(b['methods'])}): its methods keep separate caches"
            )
    # Planned caches: same place in every method, and nothing else planned over them.
    kv_ranges: Dict[str, Dict[str, Tuple[int, int, int]]] = {}
    for b in kv:
        if len(b["methods"]) < 2:
            continue
        per = {}
        for m, i in (b.get("value_index") or {}).items():
            rng = _alloc_range(p.plan(m).values[i].val)
            if rng is not None:
                per[m] = rng
        if not per:
            continue
        if len(set(per.values())) > 1:
            where = ", ".join(f"{m} at arena {a} offset {s:,}" for m, (a, s, e) in per.items())
            r.failures.append(f"KV buffer {_kv_name(b)} is planned in different places ({where}): "
                              f"each method has its own copy")
        else:
            kv_ranges[_kv_name(b)] = per
    if kv_ranges:
        kv_values = {(m, i) for b in kv for m, i in (b.get("value_index") or {}).items()}
        spans = {name: next(iter(per.values())) for name, per in kv_ranges.items()}
        for m in order:
            plan = p.plan(m)
            for i, v in enumerate(plan.values):
                t = v.val
                if (m, i) in kv_values or not isinstance(t, Tensor) or t.allocation_info is None:
                    continue
                rng = _alloc_range(t)
                for name, (a, s, e) in spans.items():
                    if rng[0] == a and rng[1] < e and s < rng[2] and (rng[1], rng[2]) != (s, e):
                        r.failures.append(
                            f"KV buffer {name} (arena {a}, bytes {s:,}..{e - 1:,}): {m} plans value "
                            f"{i} ({_b(rng[2] - rng[1])}) over it, so running {m} overwrites the cache "
                            f"the other methods keep; export with MemoryPlanningPass("
                            f"share_mutable_buffers=True) or lazy KV"
                        )
                        break
    if r.failures:
        r.passed = False
        r.summary = f"{len(r.failures)} problem(s) across {', '.join(kv_methods)}"
    elif len(kv_methods) == 1:
        r.summary = f"only {kv_methods[0]} binds KV ({len(kv)} buffers): nothing to share"
    else:
        r.summary = f"{', '.join(kv_methods)} bind the same {len(kv)} KV buffers"
    return r


def _fingerprint(view) -> Tuple[int, bytes, bytes]:
    n = len(view)
    return n, bytes(view[:64]), bytes(view[max(0, n - 64):])


def _duplicates(blobs: List[Tuple[str, List[str], Callable[[], Any]]]) -> List[List[Tuple[str, List[str], int]]]:
    """Groups (size >= 2) of blobs with equal bytes. ``blobs``: (name, methods, get_view).

    A cheap fingerprint (size, first and last 64 bytes) first; sha256 only for blobs whose
    fingerprints collide, so a program without duplicates is not read in full.
    """
    by_fp: Dict[Tuple, List[int]] = {}
    views = [get() for _, _, get in blobs]
    for k, v in enumerate(views):
        if len(v):
            by_fp.setdefault(_fingerprint(v), []).append(k)
    groups = []
    for ks in by_fp.values():
        if len(ks) < 2:
            continue
        by_hash: Dict[bytes, List[int]] = {}
        for k in ks:
            by_hash.setdefault(hashlib.sha256(views[k]).digest(), []).append(k)
        groups.extend([(blobs[k][0], blobs[k][1], len(views[k])) for k in same]
                      for same in by_hash.values() if len(same) > 1)
    return groups


def _constant_buffers(p: _Program) -> Dict[int, Tuple[str, List[str], int]]:
    """data_buffer_idx -> (name, methods using it, tensor bytes) of every constant tensor."""
    from executorch.exir.schema import Tensor
    from lazykv.inspect import tensor_nbytes

    out: Dict[int, Tuple[str, List[str], int]] = {}
    for plan in p.program.execution_plan:
        for i, v in enumerate(plan.values):
            t = v.val
            if not isinstance(t, Tensor) or t.data_buffer_idx <= 0:
                continue
            e = out.get(t.data_buffer_idx)
            if e is None:
                fqn = t.extra_tensor_info.fully_qualified_name if t.extra_tensor_info else None
                name = f"constant buffer {t.data_buffer_idx} " + (
                    f"{fqn!r}" if fqn else f"({plan.name} value {i})")
                e = out[t.data_buffer_idx] = (f"{name} {dtype_shape(t)}", [], tensor_nbytes(t))
            if plan.name not in e[1]:
                e[1].append(plan.name)
    return out


def dtype_shape(t) -> str:
    from lazykv.inspect import dtype_name

    return f"{dtype_name(t.scalar_type)}[{', '.join(str(d) for d in t.sizes)}]"


#: At most this many duplicate groups are spelled out per kind (all are in ``figures``).
_MAX_LISTED = 10


def _rule_no_duplicate_constants(p: _Program, rules: Rules) -> RuleResult:
    prog = p.program
    r = RuleResult("no-duplicate-constants", True, "")
    # 1. What the lazykv manifest records about constants shared by FQN.
    for c in p.info.get("shared_constants") or []:
        if not c["stored_once"]:
            r.failures.append(
                f"constant {c['fqn']!r} ({_b(c['nbytes'])}) is stored once per method "
                f"({', '.join(c['methods'])}; lazykv manifest: stored_once = false)"
            )
    n_manifest = len(r.failures)
    # 2. Constant-segment tensors with equal bytes.
    consts = _constant_buffers(p)
    const_blobs = []
    cs = prog.constant_segment
    segs = prog.segments or []
    if cs is not None and cs.offsets and 0 <= cs.segment_index < len(segs) and segs[cs.segment_index].size:
        seg = p.pte.segment(cs.segment_index)
        offsets = list(cs.offsets)
        for idx in sorted(consts):
            name, methods, nbytes = consts[idx]
            if 0 <= idx < len(offsets):
                start = offsets[idx]
                const_blobs.append((name, methods, lambda s=start, n=nbytes: seg[s:s + n]))
    elif prog.constant_buffer:
        for idx in sorted(consts):
            name, methods, _ = consts[idx]
            if 0 <= idx < len(prog.constant_buffer):
                data = bytes(prog.constant_buffer[idx].storage)
                const_blobs.append((name, methods, lambda d=data: memoryview(d)))
    # 3. Named data (delegate weights) and delegate blobs with equal bytes; which methods'
    #    delegates name each blob (its key appears in the delegate's payload).
    delegates = p.delegate_blobs()
    named = [nd for nd in prog.named_data or [] if not nd.key.startswith("lazykv/")]
    key_users: Dict[str, List[str]] = {nd.key: [] for nd in named}
    delegate_methods = {m for d in delegates.values() for m in d["methods"]}
    if named and len(delegate_methods) > 1:
        for (loc, idx), d in delegates.items():
            blob = p.delegate_bytes(loc, idx)
            for nd in named:
                if len(nd.key) >= 8 and nd.key.encode() in blob:
                    key_users[nd.key].extend(m for m in d["methods"] if m not in key_users[nd.key])
    named_blobs = [(f"named data {nd.key!r}", key_users[nd.key],
                    lambda i=nd.segment_index: p.pte.segment(i)) for nd in named]
    dblobs = [(f"{d['id']} delegate blob {idx}", d["methods"],
               lambda loc=loc, idx=idx: memoryview(p.delegate_bytes(loc, idx)))
              for (loc, idx), d in delegates.items()]
    groups = []
    for blobs in (const_blobs, named_blobs, dblobs):
        groups.extend(_duplicates(blobs))
    groups.sort(key=lambda g: -g[0][2] * (len(g) - 1))
    for g in groups[:_MAX_LISTED]:
        size = g[0][2]
        desc = "; ".join(name + (f" (used by {', '.join(ms)})" if ms else "") for name, ms, _ in g)
        r.failures.append(f"the same {_b(size)} is stored {len(g)} times: {desc}")
    if len(groups) > _MAX_LISTED:
        extra = groups[_MAX_LISTED:]
        r.failures.append(
            f"... and {len(extra)} more duplicated blobs ({_b(sum(g[0][2] * (len(g) - 1) for g in extra))} "
            f"stored more than once; all are listed in the JSON report)")
    # 4. Resident twice: one weight packed by the XNNPACK delegates of several methods.
    resident = []
    if not rules.assume_weight_cache:
        xnn_methods = {m for d in delegates.values() if d["id"] == "XnnpackBackend" for m in d["methods"]}
        for nd in named:
            ms = [m for m in key_users[nd.key] if m in xnn_methods]
            if len(ms) > 1:
                resident.append((prog.segments[nd.segment_index].size, nd.key, ms))
    resident.sort(key=lambda t: -t[0])
    if resident:
        order = p.pte.method_names
        methods = sorted({m for _, _, mm in resident for m in mm}, key=order.index)
        size, key, ms = resident[0]
        r.failures.append(
            f"{len(resident)} weights ({_b(sum(t[0] for t in resident))}) are packed by the XNNPACK "
            f"delegates of {', '.join(methods)}: each is resident once per method on the stock "
            f"runtime (largest: named data {key!r} {_b(size)}, used by {', '.join(ms)}); switch "
            f"XNNPACK's weight cache on before loading (lazykv.runtime_shim.weight_cache.enable()) "
            f"and check with --assume-weight-cache"
        )
    wasted = sum(g[0][2] * (len(g) - 1) for g in groups)
    r.figures = {
        "constant_buffers": len(const_blobs), "named_data": len(named_blobs),
        "delegate_blobs": len(dblobs), "duplicate_bytes": wasted,
        "duplicates": [[{"name": n, "methods": ms, "bytes": b} for n, ms, b in g] for g in groups],
        "resident_per_method": [{"key": k, "bytes": b, "methods": ms} for b, k, ms in resident],
        "assume_weight_cache": rules.assume_weight_cache,
    }
    if r.failures:
        r.passed = False
        parts = []
        if groups:
            parts.append(f"{_b(wasted)} stored more than once")
        if resident:
            parts.append(f"{len(resident)} weights resident once per method")
        if n_manifest:
            parts.append(f"{n_manifest} shared constants stored once per method (manifest)")
        r.summary = "; ".join(parts)
    else:
        r.summary = (f"{len(const_blobs)} constant tensors, {len(named_blobs)} named blobs, "
                     f"{len(dblobs)} delegate blobs: each stored once"
                     + (", none packed by two methods' delegates" if len(delegate_methods) > 1
                        and not rules.assume_weight_cache else ""))
    return r


# -- runs ----------------------------------------------------------------------------------


def dummy_inputs(info, fill_rule=None) -> list:
    """Zeros for a method's inputs (``lazykv.runtime_shim`` ``MethodInfo``).

    Tensors get their dtype and (upper-bound) shape. A dynamic token/position pair (an
    integer ``[1, S]`` tensor and an integer 1-D tensor) becomes ``[1, 1]`` tokens at
    position ``[0]``; with a lazykv fill rule the length input is cut to one position.
    """
    import torch

    specs = list(info.inputs)
    shapes = [list(s.sizes) for s in specs]
    ints = [s.kind == "tensor" and s.dtype in (torch.int64, torch.int32) for s in specs]
    tokens = [k for k, s in enumerate(specs) if ints[k] and len(s.sizes) == 2 and s.sizes[0] == 1]
    positions = [k for k, s in enumerate(specs) if ints[k] and len(s.sizes) == 1]
    if len(specs) == 2 and len(tokens) == 1 and len(positions) == 1:
        t, q = tokens[0], positions[0]
        if specs[t].dynamic:
            shapes[t] = [1, 1]
        if specs[q].dynamic:
            shapes[q] = [1]
    if fill_rule is not None:
        li = fill_rule.length_input
        if 0 <= li < len(specs) and specs[li].dynamic and fill_rule.length_axis < len(shapes[li]):
            shapes[li][fill_rule.length_axis] = 1
            pi = fill_rule.position_input
            if pi != li and 0 <= pi < len(specs) and specs[pi].dynamic and len(shapes[pi]) == 1:
                shapes[pi] = [max(1, fill_rule.position_index + 1)]
    out = []
    for s, shape in zip(specs, shapes):
        if s.kind == "tensor":
            out.append(torch.zeros(shape, dtype=s.dtype or torch.float32))
        elif s.kind == "int":
            out.append(0)
        elif s.kind == "float":
            out.append(0.0)
        elif s.kind == "bool":
            out.append(False)
        else:
            out.append(None)
    return out


def _describe(x) -> str:
    import torch

    if isinstance(x, torch.Tensor):
        return f"{str(x.dtype).replace('torch.', '')}[{', '.join(str(d) for d in x.shape)}]"
    return repr(x)


class _CapturedStderr:
    """Send stderr (file descriptor 2 and ``sys.stderr``) to a temporary file in the block.

    ExecuTorch's runtime logs on stderr (CPU probing on every load; the reason for a
    failure, e.g. ``Missing operator: [2] foo.out``, which the Python exception leaves
    out), from C++ to fd 2 and from its Python bindings through ``sys.stderr`` (which is
    not fd 2 under pytest's capture). The rule keeps the log and quotes what explains a
    failure.
    """

    def __init__(self) -> None:
        self.text = ""
        self._pos = 0

    def __enter__(self) -> "_CapturedStderr":
        import tempfile

        _flush(sys.stderr)
        self._tmp = tempfile.TemporaryFile()
        self._saved_fd = os.dup(2)
        os.dup2(self._tmp.fileno(), 2)
        self._saved_sys = sys.stderr
        self._py = open(self._tmp.fileno(), "w", encoding="utf-8", errors="replace",
                        buffering=1, closefd=False)
        sys.stderr = self._py
        return self

    def __exit__(self, *exc) -> None:
        _flush(self._py)
        sys.stderr = self._saved_sys
        self._py.close()
        os.dup2(self._saved_fd, 2)
        os.close(self._saved_fd)
        self._tmp.seek(0)
        self.text = self._tmp.read().decode("utf-8", "replace")
        self._tmp.close()

    def new_text(self) -> str:
        """What was written since the last call (inside the block)."""
        _flush(self._py)
        fd = self._tmp.fileno()
        end = os.fstat(fd).st_size
        start = self._pos
        self._pos = end
        return os.pread(fd, end - start, start).decode("utf-8", "replace") if end > start else ""

    @staticmethod
    def relevant(text: str, limit: int = 4) -> List[str]:
        """The log lines that explain a failure (errors, missing kernels), last ``limit``."""
        pat = re.compile(r"missing|error|fail|not found|invalid|abort|mismatch", re.I)
        lines = [ln.strip() for ln in text.splitlines()]
        keep = [ln for ln in lines if ln and pat.search(ln) and "cpuinfo" not in ln]
        return keep[-limit:]


def _rule_runs(p: _Program, rules: Rules) -> RuleResult:
    from lazykv.errors import InvalidProgram

    r = RuleResult("runs", True, "")
    log = _CapturedStderr()
    ran: Dict[str, dict] = {}
    with log:
        try:
            import torch

            from lazykv.runtime_shim import load

            prog = load(p.path)
        except InvalidProgram:
            raise  # the shim's deeper validation refused the file: it cannot be read
        except Exception as e:  # any other load failure is the rule's finding
            prog = None
            r.failures.append(f"program does not load through lazykv.runtime_shim: "
                              f"{type(e).__name__}: {_one_line(e)}" + _quote(log.new_text()))
        for name in prog.method_names if prog is not None else ():
            info = prog.method_info(name)
            fill = prog.manifest.fill_rule(name) if prog.manifest is not None else None
            inputs = dummy_inputs(info, fill)
            shown = ", ".join(_describe(x) for x in inputs)
            log.new_text()
            t0 = time.perf_counter()
            try:
                with prog.session() as s:
                    outs = s.run(name, inputs)
            except Exception as e:
                r.failures.append(f"{name}: fails on inputs ({shown}): {type(e).__name__}: "
                                  f"{_one_line(e)}" + _quote(log.new_text()))
                continue
            seconds = time.perf_counter() - t0
            for k, o in enumerate(outs):
                if isinstance(o, torch.Tensor) and o.is_floating_point():
                    bad = int((~torch.isfinite(o)).sum())
                    if bad:
                        r.failures.append(f"{name}: output {k} {_describe(o)} has {bad:,} NaN/inf "
                                          f"values on inputs ({shown})")
            ran[name] = {"seconds": round(seconds, 4), "inputs": [_describe(x) for x in inputs],
                         "outputs": [_describe(o) for o in outs]}
    r.figures = {"methods": ran}
    if r.failures:
        r.passed = False
        r.figures["runtime_log"] = log.text[-4000:]
        r.summary = "does not load" if prog is None else f"{len(r.failures)} failure(s)"
    else:
        r.summary = "ran " + ", ".join(f"{m} ({v['seconds'] * 1000:.0f} ms)" for m, v in ran.items())
    return r


def _flush(stream) -> None:
    try:
        stream.flush()
    except (AttributeError, OSError, ValueError):
        pass


def _quote(log_text: str) -> str:
    lines = _CapturedStderr.relevant(log_text)
    return f" (runtime log: {' | '.join(lines)})" if lines else ""


def _one_line(e: BaseException) -> str:
    s = " ".join(str(e).split())
    return s[:400] + ("..." if len(s) > 400 else "")


_RULE_FNS: Dict[str, Callable[[_Program, Rules], RuleResult]] = {
    "expect-lazy-kv": _rule_expect_lazy_kv,
    "max-planned-bytes": _rule_max_planned,
    "max-load-bytes": _rule_max_load,
    "max-kv-bytes-at-max-context": _rule_max_kv,
    "no-duplicate-constants": _rule_no_duplicate_constants,
    "methods": _rule_methods,
    "shared-kv": _rule_shared_kv,
    "runs": _rule_runs,
}


def check_file(path: Union[str, os.PathLike], rules: Rules) -> FileResult:
    """Check one ``.pte``. An unreadable file gives ``FileResult.error`` (never raises for it)."""
    from lazykv.errors import InvalidProgram

    path = os.fspath(path)
    t0 = time.perf_counter()
    res = FileResult(path)
    try:
        p = _Program(path)
    except InvalidProgram as e:
        res.error = str(e)
        res.seconds = time.perf_counter() - t0
        return res
    except OSError as e:
        res.error = f"{path}: {e.strerror or e}"
        res.seconds = time.perf_counter() - t0
        return res
    try:
        for rule in rules.enabled:
            t = time.perf_counter()
            try:
                rr = _RULE_FNS[rule](p, rules)
            except InvalidProgram as e:  # a corrupt part found while checking
                res.error = str(e)
                break
            rr.seconds = time.perf_counter() - t
            res.rules.append(rr)
    finally:
        p.close()
    res.seconds = time.perf_counter() - t0
    return res


def check_files(
    paths: Sequence[Union[str, os.PathLike]],
    rules: Rules,
    *,
    config_source: Optional[str] = None,
    progress: Optional[Callable[[FileResult], None]] = None,
) -> CheckReport:
    """Check every file against ``rules``; ``progress(file_result)`` after each file.

    Raises :class:`CheckConfigError` if ``rules`` enables no rule.
    """
    if not rules.enabled:
        raise CheckConfigError("no rules given")
    report = CheckReport(rules, config_source=config_source)
    for path in paths:
        fr = check_file(path, rules)
        report.files.append(fr)
        if progress is not None:
            progress(fr)
    return report
