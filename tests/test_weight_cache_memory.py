"""Resident memory of two methods sharing weights, with XNNPACK's weight cache off and on.

The program (issue 6's acceptance case): ``prefill`` (16 rows) and ``decode`` (1 row)
over the same 8 x Linear(2048, 2048) fp32 (128 MiB of weights), lowered to XNNPACK.
Each setting runs in a fresh subprocess that records VmRSS (``/proc/self/status``) after
imports and ``load_program``, after loading and running ``prefill``, and after loading
and running ``decode``. Growth is measured from the first point.

Run as a script to print the figures::

    .venv/bin/python tests/test_weight_cache_memory.py [--repeat N]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

MIB = 1024 * 1024
LAYERS, WIDTH, PREFILL_ROWS = 8, 2048, 16

#: Both methods with the cache on may cost at most this much more than one (issue 6).
MAX_RATIO_ON = 1.05
#: Sanity bound for the measurement itself: with the cache off each method packs its own
#: copy (fact 7 measured 1.96x); below this the test could not tell sharing apart.
MIN_RATIO_OFF = 1.6


def export_program(path: Path) -> Path:
    """Write the two-method program to ``path`` (about 128 MiB; 10-30 s)."""
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)]).eval()
    with torch.no_grad():
        programs = {
            "prefill": torch.export.export(model, (torch.randn(PREFILL_ROWS, WIDTH),)),
            "decode": torch.export.export(model, (torch.randn(1, WIDTH),)),
        }
    edge = to_edge_transform_and_lower(programs, partitioner=[XnnpackPartitioner()])
    path.write_bytes(edge.to_executorch().buffer)
    return path


_MEASURE = """
    import gc, json, sys, time, torch
    from lazykv.runtime_shim import weight_cache
    from executorch.runtime import Runtime

    def status():
        fields = {}
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile"):
                    fields[key] = int(value.split()[0]) * 1024
        return fields

    pte, mode, out_path, rows, width = sys.argv[1:4] + [int(a) for a in sys.argv[4:6]]
    took = weight_cache.enable(mode == "on")
    program = Runtime.get().load_program(pte)
    gen = torch.Generator().manual_seed(1)
    inputs = {
        "prefill": torch.randn(rows, width, generator=gen),
        "decode": torch.randn(1, width, generator=gen),
    }
    gc.collect()
    points = {"base": status()}
    outputs, load_s, methods = {}, {}, []
    for name in ("prefill", "decode"):
        t0 = time.perf_counter()
        method = program.load_method(name)
        load_s[name] = time.perf_counter() - t0
        methods.append(method)  # keep every method loaded
        outputs[name] = method.execute([inputs[name]])[0].clone()
        gc.collect()
        points[name] = status()
    torch.save(outputs, out_path)
    print(json.dumps({"mode": mode, "took_effect": took, "points": points, "load_s": load_s}))
"""


def measure(pte: Path, mode: str, out_path: Path) -> dict:
    """One fresh process with the cache ``mode`` ("on"/"off"); returns its figures."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_MEASURE), str(pte), mode, str(out_path),
         str(PREFILL_ROWS), str(WIDTH)],
        capture_output=True, text=True, timeout=600, check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"measurement ({mode}) exited {done.returncode}:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    base = result["points"]["base"]["VmRSS"]
    result["one_mib"] = (result["points"]["prefill"]["VmRSS"] - base) / MIB
    result["both_mib"] = (result["points"]["decode"]["VmRSS"] - base) / MIB
    result["ratio"] = result["both_mib"] / result["one_mib"]
    return result


@pytest.fixture(scope="session")
def shared_weights_pte(tmp_path_factory) -> Path:
    return export_program(tmp_path_factory.mktemp("weight_cache_memory") / "linear8x2048.pte")


@pytest.fixture(scope="session")
def measurements(shared_weights_pte, tmp_path_factory) -> dict[str, dict]:
    folder = tmp_path_factory.mktemp("weight_cache_outputs")
    results = {}
    for mode in ("off", "on"):
        out = folder / f"{mode}.pt"
        results[mode] = measure(shared_weights_pte, mode, out) | {"out": out}
    return results


def _describe(m: dict) -> str:
    load_ms = {name: seconds * 1e3 for name, seconds in m["load_s"].items()}
    return (
        f"cache {m['mode']}: one method +{m['one_mib']:.1f} MiB, "
        f"both +{m['both_mib']:.1f} MiB ({m['ratio']:.3f}x); "
        f"load_method prefill {load_ms['prefill']:.0f} ms, decode {load_ms['decode']:.0f} ms"
    )


def test_cache_on_holds_shared_weights_once(measurements):
    on, off = measurements["on"], measurements["off"]
    print("\n" + _describe(off) + "\n" + _describe(on))
    assert on["took_effect"] is True
    weights_mib = LAYERS * WIDTH * WIDTH * 4 / MIB
    # One method holds one packed copy of the weights, with the cache or without.
    assert 0.9 * weights_mib < on["one_mib"] < 1.5 * weights_mib, _describe(on)
    assert off["ratio"] > MIN_RATIO_OFF, f"measurement misses the duplicate copy: {_describe(off)}"
    assert on["ratio"] <= MAX_RATIO_ON, _describe(on)


def test_outputs_bit_identical_on_and_off(measurements):
    import torch

    off = torch.load(measurements["off"]["out"])
    on = torch.load(measurements["on"]["out"])
    for name in ("prefill", "decode"):
        assert torch.equal(off[name], on[name]), name


def main(argv: list[str]) -> int:
    repeat = int(argv[argv.index("--repeat") + 1]) if "--repeat" in argv else 1
    with tempfile.TemporaryDirectory() as tmp:
        pte = export_program(Path(tmp) / "linear8x2048.pte")
        print(f"program: {pte.stat().st_size / MIB:.1f} MiB; RSS growth from after load_program")
        for i in range(repeat):
            for mode in ("off", "on"):
                print(f"[{i}] " + _describe(measure(pte, mode, Path(tmp) / f"{mode}.pt")))
    return 0


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")  # export's deprecation chatter
    sys.exit(main(sys.argv[1:]))
