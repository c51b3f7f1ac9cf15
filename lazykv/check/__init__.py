"""The rule engine behind ``lazykv check``: does a ``.pte`` keep its memory promises?

The library returns data (:class:`CheckReport`); ``lazykv.cli.check_cmd`` prints it.
Everything except :data:`RULES` ``runs`` reads the file the way :func:`lazykv.inspect.inspect_pte`
does (the program flatbuffer only, segments through ``mmap``) and imports neither torch
nor ExecuTorch; ``runs`` loads the program through :func:`lazykv.runtime_shim.load`.

Modules: :mod:`.config` (:class:`Rules`, sizes, TOML), :mod:`.report` (results, exit
code, JSON, JUnit), :mod:`.program` (the file as the rules see it), :mod:`.memory_rules`,
:mod:`.duplicates`, :mod:`.runs`; this one runs them.

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

import os
import time
from typing import Callable, Dict, Optional, Sequence, Union

from lazykv.check import duplicates, memory_rules, runs
from lazykv.check.config import (RULES, CheckConfigError, Rules, load_config, parse_size,
                                 pyproject_config)
from lazykv.check.program import CheckedProgram
from lazykv.check.report import (EXIT_FAILED, EXIT_OK, EXIT_UNREADABLE, REPORT_VERSION,
                                 CheckReport, FileResult, RuleResult)
from lazykv.check.runs import dummy_inputs
from lazykv.errors import InvalidProgram

__all__ = [
    "RULES", "REPORT_VERSION", "EXIT_OK", "EXIT_FAILED", "EXIT_UNREADABLE", "CheckConfigError",
    "Rules", "RuleResult", "FileResult", "CheckReport", "check_file", "check_files",
    "dummy_inputs", "load_config", "parse_size", "pyproject_config",
]


_RULE_FNS: Dict[str, Callable[[CheckedProgram, Rules], RuleResult]] = {
    "expect-lazy-kv": memory_rules.rule_expect_lazy_kv,
    "max-planned-bytes": memory_rules.rule_max_planned,
    "max-load-bytes": memory_rules.rule_max_load,
    "max-kv-bytes-at-max-context": memory_rules.rule_max_kv,
    "no-duplicate-constants": duplicates.rule_no_duplicate_constants,
    "methods": memory_rules.rule_methods,
    "shared-kv": memory_rules.rule_shared_kv,
    "runs": runs.rule_runs,
}


def check_file(path: Union[str, os.PathLike], rules: Rules) -> FileResult:
    """Check one ``.pte``. An unreadable file gives ``FileResult.error`` (never raises for it)."""
    path = os.fspath(path)
    t0 = time.perf_counter()
    res = FileResult(path)
    try:
        p = CheckedProgram(path)
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
