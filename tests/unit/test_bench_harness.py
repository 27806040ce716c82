"""The benchmark harness runs figures, states skips, and writes JSON plus Markdown."""

from __future__ import annotations

import json
from pathlib import Path

from infra.bench import harness
from infra.bench.harness import Context, Measurement, Ratio, Skip


def test_measurement_median_and_range() -> None:
    """Medians and min–max come from the samples, not the first run."""
    m = Measurement([3.0, 1.0, 2.0])
    assert m.median == 2.0
    assert m.as_dict() == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3, "unit": "s"}
    assert Ratio(Measurement([4.0]), Measurement([2.0]), "a/b").value == 2.0


def test_run_reports_results_and_skips(tmp_path: Path, monkeypatch: object) -> None:
    """A skipped figure states its reason; a measured one its numbers; both land in JSON and Markdown."""
    figs = [
        harness.Figure("a", "counts", "meaning a", lambda ctx: {"x": Measurement([1.0, 2.0, 3.0], goal="≤ 2 s")}),
        harness.Figure("b", "needs root", "meaning b", lambda ctx: (_ for _ in ()).throw(Skip("not root"))),
    ]
    saved = list(harness.FIGURES)
    harness.FIGURES[:] = figs
    try:
        report = harness.run(Context(quick=True, repeats=1, root=tmp_path), log=lambda s: None)
    finally:
        harness.FIGURES[:] = saved
    assert report["figures"]["a"]["data"]["x"]["median"] == 2.0
    assert report["figures"]["b"]["skipped"] == "not root"
    harness.write(report, tmp_path / "r.json", tmp_path / "b.md")
    md = (tmp_path / "b.md").read_text()
    assert "| a | counts: x | 2 s (1–3, n=3) | ≤ 2 s |" in md
    assert "skipped: not root" in md
    assert json.loads((tmp_path / "r.json").read_text())["mode"] == "quick"
