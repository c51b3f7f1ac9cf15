"""The results of ``lazykv check``: per rule, per file, and the report that decides the
exit code (:attr:`CheckReport.return_code`), as JSON or JUnit XML."""

from __future__ import annotations

import dataclasses
import xml.etree.ElementTree as ET
from typing import Any, Dict, List, Optional, Tuple

from lazykv.check.config import Rules

#: Version of the JSON document :meth:`CheckReport.to_dict` returns.
REPORT_VERSION = 1

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_UNREADABLE = 2


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
