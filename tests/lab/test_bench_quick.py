"""The lab figures of the benchmark harness run in quick mode (numbers are reported, never asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from infra.cli import main
from infra.lab.session import Lab

pytestmark = pytest.mark.lab


def test_lab_figures_are_measured_not_skipped(lab: Lab, tmp_path: Path) -> None:
    """With the lab up, figures 1 (converge) and 5 (lab up/down, drift) produce measurements."""
    out = tmp_path / "quick.json"
    assert main(["bench", "--quick", "--only", "1", "--only", "5", "--out", str(out)]) == 0
    figures = json.loads(out.read_text())["figures"]
    for key in ("1", "5"):
        assert "skipped" not in figures[key], figures[key].get("skipped")
        assert figures[key]["results"], key
    assert any("no-op, tuned" in name for name in figures["1"]["results"])
    assert any(name.startswith("drift check") for name in figures["5"]["results"])
