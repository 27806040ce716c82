"""The benchmark harness runs figures, states skips, and writes JSON plus Markdown."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from infra.bench import harness
from infra.bench import program as bench_program
from infra.bench.harness import Context, Measurement, Ratio, Skip
from infra.bench.sitegen import generate_site
from infra.components.program import ProgramSettings
from infra.model.load import parse_site
from infra.plan.node import plan_site


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
    assert "| a | counts: x | 2 s (1–3, n=3) — met | ≤ 2 s |" in md
    assert "skipped: not root" in md
    assert json.loads((tmp_path / "r.json").read_text())["mode"] == "quick"


def _report(tmp_path: Path) -> dict[str, object]:
    figs = [
        harness.Figure("1", "converge", "m", lambda ctx: {
            "1 node(s): no-op, tuned": Measurement([10.0]),
            "1 node(s): no-op, Ansible defaults": Measurement([90.0]),
            "1 node(s): defaults / tuned": Ratio(Measurement([90.0]), Measurement([10.0]), "d/t", goal="≥ 2×"),
            "4 node(s): no-op vs 1 node": Ratio(Measurement([30.0]), Measurement([10.0]), "4/1", goal="≤ 1.5× (4)"),
            "lab up": Measurement([5.0, 6.0, 7.0], goal="≤ 15 s"),
            "lab down": Measurement([7.0], goal="≤ 5 s"),
        }),
    ]
    saved = list(harness.FIGURES)
    harness.FIGURES[:] = figs
    try:
        return harness.run(Context(quick=False, repeats=1, root=tmp_path), log=lambda s: None)
    finally:
        harness.FIGURES[:] = saved


def test_readme_table_shows_goals_with_verdicts_and_headlines_only(tmp_path: Path) -> None:
    """Rows with a goal say met / not met from the measured ratio or median; headline rows come too; others stay out."""
    table = harness.readme_table(_report(tmp_path))
    assert "| 1 | converge: 1 node(s): defaults / tuned | 9.00× (d/t) — met | ≥ 2× |" in table
    assert "| 1 | converge: 4 node(s): no-op vs 1 node | 3.00× (4/1) — **not met** | ≤ 1.5× (4) |" in table
    assert "1 node(s): no-op, tuned | 10 s |" in table
    assert "no-op, Ansible defaults" not in table
    assert "| 1 | converge: lab up | 6 s (5–7, n=3) — met | ≤ 15 s |" in table
    assert "| 1 | converge: lab down | 7 s — **not met** | ≤ 5 s |" in table


def test_update_readme_replaces_only_the_marked_block(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{harness.README_BEGIN}\nold table\n{harness.README_END}\noutro\n")
    harness.update_readme(readme, _report(tmp_path))
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("\noutro\n") and "old table" not in text
    assert text.count(harness.README_BEGIN) == 1 and "defaults / tuned" in text


def test_cpu_counters_see_work_of_reaped_children() -> None:
    """Figure 1's CPU columns: the controller counter includes a reaped child's CPU, the machine counter too."""
    from infra.bench.converge import controller_cpu_seconds, machine_cpu_seconds

    m0, c0 = machine_cpu_seconds(), controller_cpu_seconds()
    subprocess.run([sys.executable, "-c", "sum(i * i for i in range(4_000_000))"], check=True)
    spent = controller_cpu_seconds() - c0
    assert spent > 0.1
    assert machine_cpu_seconds() - m0 >= spent * 0.8


def test_converge_bench_takes_noop_rounds_over_every_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """No-op rounds visit every count in turn; each count keeps its median run and the ratios use it."""
    from infra.ansible.settings import Tuning
    from infra.bench import converge as cb

    calls: list[tuple[int, str]] = []
    # Each count's no-ops take these seconds, in order (1 node: 10, 12, 11; 2 nodes: 30, 20, 25).
    times = {1: [10.0, 12.0, 11.0], 2: [30.0, 20.0, 25.0]}

    def timed(stack: str, hosts: list[str], tuning: Tuning) -> dict[str, Any]:
        calls.append((len(hosts), tuning.value))
        if tuning is Tuning.DEFAULTS:
            return {"seconds": 55.0}
        return {"seconds": times[len(hosts)].pop(0)}

    monkeypatch.setattr(cb, "_timed", timed)
    report = cb.bench("lab", (1, 2), order=["a", "b"], compare_defaults=(1,), noop_rounds=3)
    # Round 1 with the defaults run, then two rounds of every count.
    assert calls == [(1, "tuned"), (1, "defaults"), (2, "tuned")] + [(1, "tuned"), (2, "tuned")] * 2
    one, two = report["runs"]
    assert [r["seconds"] for r in one["noop_tuned_runs"]] == [10.0, 12.0, 11.0]
    assert one["noop_tuned"]["seconds"] == 11.0 and two["noop_tuned"]["seconds"] == 25.0
    assert one["defaults_over_tuned"] == 5.0 and two["noop_vs_one_node"] == round(25 / 11, 2)


def test_reference_playbook_is_n_trivial_tasks_that_pass_syntax_check(tmp_path: Path) -> None:
    """The yardstick playbook: exactly N `/bin/true` tasks on the nodes group, never "changed", no facts."""
    import yaml

    from infra.ansible.inventory import GROUP
    from infra.bench.converge import reference_playbook

    path = reference_playbook(7, tmp_path / "reference.yml")
    (play,) = yaml.safe_load(path.read_text())
    assert play["hosts"] == GROUP and play["gather_facts"] is False
    assert len(play["tasks"]) == 7
    assert all(t["ansible.builtin.command"] == "/bin/true" and t["changed_when"] is False for t in play["tasks"])
    assert len({t["name"] for t in play["tasks"]}) == 7
    bin_dir = Path(sys.executable).parent
    p = subprocess.run(
        [str(bin_dir / "ansible-playbook"), "-i", "localhost,", "--syntax-check", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert p.returncode == 0, p.stdout + p.stderr


def test_reference_noop_runs_rounds_over_every_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reference runs like the no-op bench (rounds over every count, tuned runner, the stack's
    inventory of exactly those nodes) and a failed run is an error, not a fast number."""
    from infra.ansible.inventory import GROUP
    from infra.ansible.runner import RunResult
    from infra.ansible.settings import Tuning
    from infra.bench import converge as cb

    calls: list[tuple[list[str], list[str], Tuning, int]] = []

    def run(playbook: str, inventory: dict[str, Any], hosts: list[str], **kw: Any) -> RunResult:
        inv_hosts = sorted(inventory["all"]["children"][GROUP]["hosts"])
        tasks = Path(playbook).read_text().count("ansible.builtin.command: /bin/true")
        calls.append((list(hosts), inv_hosts, kw["tuning"], tasks))
        return RunResult(playbook, False, "successful", 0, 1.0, {}, "/tmp/x")

    monkeypatch.setattr(cb, "run_playbook", run)
    order = ["lab-gpu01", "lab-gpu02", "lab-gpu03", "lab-gpu04"]
    report = cb.reference_noop("lab", (1, 4), 5, order=order, rounds=2)
    assert [c[0] for c in calls] == [order[:1], order, order[:1], order]
    assert all(c[0] == c[1] and c[2] is Tuning.TUNED and c[3] == 5 for c in calls)
    assert report["tasks"] == 5
    assert [len(r["runs"]) for r in report["runs"]] == [2, 2]
    assert [r["nodes"] for r in report["runs"]] == [order[:1], order]

    monkeypatch.setattr(cb, "run_playbook", lambda *a, **k: RunResult("p", False, "failed", 2, 1.0, {}, "/tmp/x"))
    with pytest.raises(RuntimeError, match="reference playbook failed on lab-gpu01"):
        cb.reference_noop("lab", (1,), 2, order=order)


def test_figure_2_program_run_reports_cpu_and_registered_state_size() -> None:
    """The large-site path of figure 2 measures CPU and the JSON of what was registered, per resource."""
    plan = plan_site(parse_site(generate_site(4, nodes_per_segment=2)))
    settings = ProgramSettings(stack="bench", project=Path(__file__).resolve().parents[2])
    got: dict[str, Any] = {}
    count = bench_program._timed_program(plan, settings, got)
    rec = bench_program._program(plan, settings)
    assert count == len(rec.resources) and got["cpu"][0] > 0 and len(got["program"]) == 1
    assert got["state_bytes"] == bench_program.state_bytes(rec)
    assert got["state_bytes"] == len(json.dumps(
        [{"urn": r.urn, "type": r.type, "parent": r.parent, "dependencies": r.dependencies, "inputs": r.raw_inputs}
         for r in rec.resources], default=str, separators=(",", ":")))
