"""``lazykv check --runs``: the program loads through the runtime shim and every method
runs once on dummy inputs, with finite float outputs. The only rule that imports torch
and the ExecuTorch runtime; the runtime's log is captured and quoted where it explains a
failure."""

from __future__ import annotations

import time
from typing import Dict

from lazykv.check.config import Rules
from lazykv.check.program import CheckedProgram
from lazykv.check.report import RuleResult
from lazykv.native_log import NativeLog


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


def rule_runs(p: CheckedProgram, rules: Rules) -> RuleResult:
    """``runs`` (module docstring)."""
    from lazykv.errors import InvalidProgram

    r = RuleResult("runs", True, "")
    log = NativeLog(fds=(2,))
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


def _quote(log_text: str) -> str:
    lines = NativeLog.relevant(log_text)
    return f" (runtime log: {' | '.join(lines)})" if lines else ""


def _one_line(e: BaseException) -> str:
    s = " ".join(str(e).split())
    return s[:400] + ("..." if len(s) > 400 else "")
