"""Citations and figures a newcomer follows (issue 17, items 12 and 13): every "DESIGN
fact N" the code cites is in the repository (docs/design.md), and the benchmark plots
neither overlap their labels nor leave a silent gap."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tracked(*exts):
    out = subprocess.run(["git", "ls-files", *[f"*.{e}" for e in exts]], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.split()
    return [ROOT / p for p in out if (ROOT / p).is_file()]


def test_design_citations_point_into_the_repository():
    design = (ROOT / "docs" / "design.md").read_text()
    facts = {int(n) for n in re.findall(r"^ ?(\d+)\. \*\*", design, re.M)}
    sections = set(re.findall(r"^## (.+)$", design, re.M))
    assert set(range(1, 17)) <= facts
    cited = 0
    for path in _tracked("py", "md"):
        if path.name == "design.md" or path == Path(__file__).resolve():
            continue
        text = path.read_text(errors="replace")
        assert "DESIGN.md" not in text, f"{path}: cite docs/design.md (or 'DESIGN fact N')"
        for m in re.finditer(r"DESIGN facts? (\d+)(?: and (\d+))?", text):
            for n in filter(None, m.groups()):
                assert int(n) in facts, f"{path}: {m.group(0)} is not in docs/design.md"
                cited += 1
        for title in re.findall(r'DESIGN "([^"]+)"', text):
            assert title in sections, f"{path}: DESIGN section {title!r} is not in docs/design.md"
    assert cited > 10
    assert "docs/design.md" in (ROOT / "README.md").read_text()


def _boxes(fig, ax):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)  # the figure was saved and closed: draw it again
    canvas.draw()
    renderer = canvas.get_renderer()
    from matplotlib.text import Text

    return [Text.get_window_extent(t, renderer) for t in ax.texts]  # the text, not its arrow


def test_export_plot_labels_do_not_overlap(monkeypatch, tmp_path):
    from benchmarks import cases

    monkeypatch.setattr(cases, "RESULTS", tmp_path)
    gib = cases.GIB
    rec = {
        (False, 4096): {"wall_seconds": 54, "peak_rss_bytes": 0.87 * gib},
        (True, 4096): {"wall_seconds": 45, "peak_rss_bytes": 0.83 * gib},
        (True, 32768): {"wall_seconds": 50, "peak_rss_bytes": 0.85 * gib},
        (False, 32768): {"wall_seconds": 114, "peak_rss_bytes": 11.4 * gib},
        (True, 131072): {"wall_seconds": 47, "peak_rss_bytes": 0.86 * gib},
    }
    fig = cases._plot_export(rec)
    boxes = _boxes(fig, fig.axes[1])
    assert len(boxes) >= 5
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not a.overlaps(b), (a, b)
    assert (tmp_path / "export.png").exists()


def test_load_plot_says_why_static_bars_are_missing(monkeypatch, tmp_path):
    from benchmarks import cases

    monkeypatch.setattr(cases, "RESULTS", tmp_path)
    m = {"peak_during": 600 * cases.MIB, "growth": 500 * cases.MIB, "seconds": 0.6}
    names = ["stock static 2048", "shim lazy 2048 first", "shim lazy 2048 cached",
             "shim lazy 32768 first", "shim lazy 32768 cached",
             "shim lazy 131072 first", "shim lazy 131072 cached"]
    fig = cases._plot_load({n: m for n in names}, {n: [m] * 5 for n in names})
    ticks = fig.axes[0].get_xticklabels()
    labels = [t.get_text() for t in ticks]
    assert labels[0] == "max context 2048"
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    boxes = [t.get_window_extent(canvas.get_renderer()) for t in ticks]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    assert all("no static bars" in t and "GiB" in t and "N x N masks" in t for t in labels[1:]), labels
