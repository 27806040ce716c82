"""The lab figures of the benchmark harness run in quick mode (numbers are reported, never asserted)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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


def test_reference_playbook_runs_for_real_and_changes_nothing(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    """The yardstick of figure 1 goes through the real runner to real nodes: every task ok, none changed."""
    from infra.bench import converge as cb

    seen: list[Any] = []
    real = cb.run_playbook

    def keep(*args: Any, **kwargs: Any) -> Any:
        seen.append(result := real(*args, **kwargs))
        return result

    monkeypatch.setattr(cb, "run_playbook", keep)
    report = cb.reference_noop("lab", (1, 2), 3, rounds=1)
    assert [len(r["nodes"]) for r in report["runs"]] == [1, 2]
    assert all(r["runs"][0]["seconds"] > 0 for r in report["runs"])
    assert [sorted(r.hosts) for r in seen] == [r["nodes"] for r in report["runs"]]
    for result in seen:
        assert result.succeeded
        for host in result.hosts.values():
            assert (host.ok, host.changed, host.skipped) == (3, 0, 0), host
