"""Which of export_llm's models and options get a lazy KV cache: measured, not claimed.

For each (model class, option) of :mod:`lazykv.models.zoo`: export the tiny random
model twice through export_llm's own path (:func:`lazykv.llm_export.export_llm_pte`),
static and with ``--lazy-kv-cache``; check that lazykv's validator accepts the static
program; run the static program on the stock ExecuTorch runtime and the lazy one
through :mod:`lazykv.runtime_shim` over the same prompt and greedy decode steps, and
compare every call's logits. The result is one :class:`Cell`: ``lazy`` (every KV cache
lazy), ``partial`` (some stay planned: ring buffers, masked or cast reads), ``refused``
(none can be; the reason), with the largest logit difference (0 = bit-identical).

``python -m lazykv.support_table [--out FILE] [--readme README.md]`` runs the whole
matrix (tens of minutes: two exports per cell) and writes the markdown table; the test
suite runs a representative subset (``tests/test_export_llm_configs.py``) and the full
matrix under ``pytest -m support_table``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from lazykv.errors import ExportRefused, LazyKVError

#: (model class, options) rows of the table.
MATRIX: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("llama3_2", ("fp32", "8da4w", "bf16", "quantize_kv_cache", "fp16", "attention_sink",
                  "local_global_attention")),
    ("qwen3_0_6b", ("8da4w", "bf16", "quantize_kv_cache")),
    ("qwen2_5_0_5b", ("8da4w", "bf16", "quantize_kv_cache")),
    ("phi_4_mini", ("8da4w", "bf16", "quantize_kv_cache")),
    ("smollm2", ("8da4w", "bf16", "quantize_kv_cache")),
    ("lfm2_350m", ("8da4w", "bf16", "quantize_kv_cache")),
    ("qwen3_5_0_8b", ("8da4w", "bf16", "quantize_kv_cache", "fp16")),
)

#: Options exported with XNNPACK (8da4w's quantized linears need it); the others with
#: ``backend.xnnpack.enabled=False`` to keep the matrix short (the KV caches and their
#: readers are never delegated either way).
XNNPACK_OPTIONS = frozenset({"8da4w"})
NO_XNNPACK = ("++backend.xnnpack.enabled=False",)

PROMPT_LEN = 8
DECODE_STEPS = 20


@dataclasses.dataclass
class Cell:
    """One (model class, option) outcome."""

    model_class: str
    option: str
    status: str  # "lazy", "partial", "refused", "error"
    lazy_buffers: int = 0
    unmarked: Dict[str, str] = dataclasses.field(default_factory=dict)  # fqn -> cause
    reason: str = ""
    max_abs_diff: Optional[float] = None
    calls: int = 0
    static_valid: Optional[bool] = None
    seconds: float = 0.0

    def summary(self) -> str:
        """The table cell's text."""
        if self.status == "error":
            return f"error: {self.reason}"
        if self.status == "refused":
            return f"refused: {self.reason}"
        exact = "bit-exact" if self.max_abs_diff == 0.0 else f"max diff {self.max_abs_diff:g}"
        text = f"{self.status} ({self.lazy_buffers} lazy"
        caches = {f: c for f, c in self.unmarked.items() if c != "state"}
        if caches:
            causes = sorted(set(caches.values()))
            text += f", {len(caches)} planned: {', '.join(causes)}"
        states = [f for f, c in self.unmarked.items() if c == "state"]
        if states:
            text += f"; {len(states)} state buffers planned"
        return text + f"), {exact}"


def _inputs(tokens: Sequence[int], pos: int) -> list:
    return [torch.tensor([list(tokens)], dtype=torch.long), torch.tensor([pos], dtype=torch.long)]


def compare_logits(
    static_path: os.PathLike,
    lazy_path: os.PathLike,
    prompt_len: int = PROMPT_LEN,
    steps: int = DECODE_STEPS,
) -> Tuple[float, int]:
    """Run the static program on the stock runtime and the lazy one through the shim,
    same prompt and greedy steps (tokens chosen by the static program), and return
    ``(max |difference| over every call's logits, calls)``.

    A method whose token input is static ``[1, 1]`` (export_llm without dynamic shape)
    is fed the prompt one token per call.
    """
    from executorch.runtime import Runtime

    from lazykv import runtime_shim
    from lazykv.format.pte import open_pte
    from lazykv.runtime_shim.kernels import load_kernel_libraries

    load_kernel_libraries()  # the stock runtime, with the kernels export_llm's programs call
    stock = Runtime.get().load_program(str(static_path)).load_method("forward")
    prog = runtime_shim.load(str(lazy_path))
    with open_pte(str(static_path)) as pte:
        forward = pte.plan("forward")
        chunk = int(forward.tensors[forward.inputs[0]].sizes[1])
    gen = torch.Generator().manual_seed(0)
    worst, calls = 0.0, 0
    with prog.session() as s:
        pos = 0
        vocab = int(prog.constant("get_vocab_size"))
        prompt = torch.randint(1, vocab, (prompt_len,), generator=gen).tolist()
        feed = [prompt[i:i + chunk] for i in range(0, len(prompt), chunk)] if chunk < prompt_len else [prompt]
        logits = None
        for part in feed:
            a = stock.execute(_inputs(part, pos))[0].clone()
            b = s.run("forward", _inputs(part, pos))[0]
            worst = max(worst, float((a.float() - b.float()).abs().max()))
            calls += 1
            pos += len(part)
            logits = a
        for _ in range(steps):
            tok = int(logits.reshape(-1, logits.shape[-1])[-1].argmax())
            a = stock.execute(_inputs([tok], pos))[0].clone()
            b = s.run("forward", _inputs([tok], pos))[0]
            worst = max(worst, float((a.float() - b.float()).abs().max()))
            calls += 1
            pos += 1
            logits = a
    return worst, calls


def evaluate(
    model_class: str,
    option: str,
    work_dir: os.PathLike,
    extra_overrides: Sequence[str] = (),
) -> Cell:
    """Export ``model_class`` with ``option`` static and lazy and compare them (module
    docstring). Exports are written under ``work_dir`` (reused when present)."""
    from lazykv.inspect import inspect_pte
    from lazykv.llm_config import load_llm_config
    from lazykv.llm_export import export_llm_pte
    from lazykv.models import zoo
    from lazykv.passes import LazyKVConfig
    from lazykv.verify import verify_pte

    t0 = time.perf_counter()
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    overrides = zoo.tiny_overrides(model_class, option, work) + list(extra_overrides)
    cfg = load_llm_config(zoo.shipped_config(model_class), overrides)
    tag = f"{model_class}-{option}"
    if extra_overrides:  # a name per override set, so cells never reuse another's file
        tag += "-" + hashlib.sha256(repr(tuple(extra_overrides)).encode()).hexdigest()[:8]
    static, lazy = work / f"{tag}-static.pte", work / f"{tag}-lazy.pte"
    cell = Cell(model_class, option, "error")
    try:
        if not static.exists():
            export_llm_pte(cfg, static)
        verify_pte(str(static))
        cell.static_valid = True
        if not lazy.exists():
            export_llm_pte(cfg, lazy, lazy=LazyKVConfig())
    except ExportRefused as e:
        cell.status, cell.reason = "refused", str(e)
        cell.seconds = time.perf_counter() - t0
        return cell
    except LazyKVError as e:
        cell.reason = f"{type(e).__name__}: {e}"
        cell.seconds = time.perf_counter() - t0
        return cell
    info = inspect_pte(lazy)
    manifest = info["manifest"] or {}
    cell.lazy_buffers = len(manifest.get("lazy_buffers", ()))
    cell.unmarked = {u["fqn"]: u["cause"] for u in manifest.get("unmarked_buffers", ())}
    planned_caches = [c for c in cell.unmarked.values() if c != "state"]
    cell.status = "partial" if planned_caches else "lazy"
    cell.max_abs_diff, cell.calls = compare_logits(static, lazy)
    cell.seconds = time.perf_counter() - t0
    return cell


def markdown(cells: Iterable[Cell]) -> str:
    """The support table: one row per model class, one column per option."""
    cells = list(cells)
    options: List[str] = []
    for c in cells:
        if c.option not in options:
            options.append(c.option)
    rows: Dict[str, Dict[str, Cell]] = {}
    for c in cells:
        rows.setdefault(c.model_class, {})[c.option] = c
    lines = [
        "| model class | " + " | ".join(f"`{o}`" for o in options) + " |",
        "|---|" + "---|" * len(options),
    ]
    for mc, by_opt in rows.items():
        texts = []
        for o in options:
            c = by_opt.get(o)
            texts.append("" if c is None else _short(c))
        lines.append(f"| `{mc}` | " + " | ".join(texts) + " |")
    return "\n".join(lines) + "\n"


def _short(c: Cell) -> str:
    if c.status == "refused":
        cause = _refusal_cause(c.reason)
        return f"refused ({cause})"
    if c.status == "error":
        return "error"
    return c.summary().replace("|", "/")


def _refusal_cause(reason: str) -> str:
    for key, text in (("float16", "fp16 cast: use fp32 or bf16"), ("ring buffer", "ring buffers only"),
                      ("attention mask", "masked reads"), ("dequantiz", "dequantized reads")):
        if key in reason:
            return text
    return reason[:80]


README_START = "<!-- support-table:start -->"
README_END = "<!-- support-table:end -->"


def run_matrix(
    work_dir: os.PathLike,
    only: Optional[Iterable[Tuple[str, str]]] = None,
    readme: Optional[os.PathLike] = None,
    echo=print,
) -> List[Cell]:
    """Evaluate every cell of :data:`MATRIX` (or those in ``only``); with ``readme``,
    rewrite the table between :data:`README_START` and :data:`README_END` there."""
    wanted = None if only is None else set(only)
    cells = []
    for mc, options in MATRIX:
        for opt in options:
            if wanted is not None and (mc, opt) not in wanted:
                continue
            extra = () if opt in XNNPACK_OPTIONS else NO_XNNPACK
            cell = evaluate(mc, opt, work_dir, extra)
            with open(Path(work_dir) / "cells.jsonl", "a") as f:  # kept for --cells
                f.write(json.dumps(dataclasses.asdict(cell)) + "\n")
            echo(f"{mc:14s} {opt:24s} {cell.seconds:6.0f} s  {cell.summary()}")
            cells.append(cell)
    if readme is not None:
        write_readme(readme, cells)
    return cells


def write_readme(readme: os.PathLike, cells: Sequence[Cell]) -> None:
    """Replace the support-table block of ``readme`` with the table of ``cells``."""
    text = Path(readme).read_text()
    if README_START not in text or README_END not in text:
        raise LazyKVError(f"{readme}: no {README_START} ... {README_END} block to rewrite")
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    import datetime

    import executorch
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    block = (
        f"{README_START}\n<!-- written by `python -m lazykv.support_table --readme README.md` "
        f"(lazykv/support_table.py); edits here are overwritten -->\n\n"
        f"Measured {stamp}, executorch {getattr(executorch, '__version__', '1.5.1')}: each "
        f"cell is the tiny random model of that class (lazykv/models/zoo.py) exported with "
        f"the shipped configuration plus the option (XNNPACK for 8da4w, off otherwise), "
        f"static and with `--lazy-kv-cache`; "
        f"the lazy program through the shim and the static one on the stock runtime, "
        f"{PROMPT_LEN}-token prompt + {DECODE_STEPS} greedy steps, every call's logits "
        f"compared.\n\n{markdown(cells)}{_missing_note(cells)}\n{README_END}"
    )
    Path(readme).write_text(head + block + tail)


def load_cells(paths: Iterable[os.PathLike]) -> List[Cell]:
    """Cells recorded by earlier runs (``cells.jsonl`` of a work dir), the last record of
    each (model class, option) winning, in :data:`MATRIX` order."""
    by: Dict[Tuple[str, str], Cell] = {}
    for p in paths:
        for line in Path(p).read_text().splitlines():
            if line.strip():
                c = Cell(**json.loads(line))
                by[(c.model_class, c.option)] = c
    order = [(mc, o) for mc, opts in MATRIX for o in opts]
    return sorted(by.values(), key=lambda c: (
        order.index((c.model_class, c.option)) if (c.model_class, c.option) in order else 999))


def _missing_note(cells: Sequence[Cell]) -> str:
    """A sentence listing the cells of :data:`MATRIX` that ``cells`` does not cover."""
    done = {(c.model_class, c.option) for c in cells}
    missing: Dict[str, List[str]] = {}
    for mc, options in MATRIX:
        for opt in options:
            if (mc, opt) not in done:
                missing.setdefault(mc, []).append(opt)
    if not missing:
        return ""
    parts = "; ".join(f"`{mc}` {', '.join(opts)}" for mc, opts in missing.items())
    return f"\nNot measured in this run (`make support-table` runs them): {parts}.\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line: run the matrix (or ``--only MODEL:OPTION ...``) and print/write it."""
    ap = argparse.ArgumentParser(prog="python -m lazykv.support_table")
    ap.add_argument("--work-dir", default="build/support-table")
    ap.add_argument("--out", help="write the markdown table here")
    ap.add_argument("--readme", help="rewrite the support-table block of this README")
    ap.add_argument("--only", nargs="*", help="cells MODEL:OPTION to run (default: all)")
    ap.add_argument("--cells", nargs="*",
                    help="run nothing: render the cells.jsonl files of earlier runs")
    args = ap.parse_args(argv)
    only = None if not args.only else [tuple(x.split(":", 1)) for x in args.only]
    if args.cells:
        cells = load_cells(args.cells)
        if args.readme:
            write_readme(args.readme, cells)
    else:
        cells = run_matrix(args.work_dir, only, args.readme, echo=lambda s: print(s, flush=True))
    table = markdown(cells)
    if args.out:
        Path(args.out).write_text(table)
    print(table)
    return 0 if all(c.status != "error" for c in cells) else 1


if __name__ == "__main__":
    sys.exit(main())
