"""One probe, one comparison: validate-node, converge, drift and check agree on what differs (issue 17)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

import infra.commands.converge as converge_cmd
from infra.ansible.converge import VERDICT_TASK, check_report, judge
from infra.ansible.rollout import NodeOutcome, RolloutResult
from infra.ansible.runner import HostResult, RunResult
from infra.cli import main
from infra.dr.drift import CheckOutcome, drift
from infra.dr.probe import probe_source
from infra.model.load import load_site, project_dir
from infra.model.site import Site
from infra.plan.node import NodePlan, plan_site
from infra.plan.nodestate import (
    DRIVER_FACT_FILE,
    INFERENCE_UNIT_PREFIX,
    NodeState,
    ProbeSpec,
    compare,
    probe_spec,
)
from infra.plan.rolevars import host_vars
from tests.unit.nodestates import converged_state

ROOT = project_dir()
EDITED = "/etc/apt/preferences.d/gpufleet-nvidia-driver"


@pytest.fixture(scope="module")
def site() -> Site:
    return load_site(stack="lab")


@pytest.fixture(scope="module")
def plan(site: Site) -> NodePlan:
    return plan_site(site).node("lab-gpu01")


def tampered(plan: NodePlan) -> tuple[NodeState, str]:
    """`apt-mark unhold <a pinned package>` and an edit of a managed file, both after the last converge."""
    ok = converged_state(plan)
    released = plan.packages[0].name
    state = replace(ok, held=tuple(h for h in ok.held if h != released), files={**ok.files, EDITED: "e" * 64})
    return state, released


def test_compare_names_the_lost_hold_and_the_edited_file(plan: NodePlan) -> None:
    state, released = tampered(plan)
    items = {(i.kind, i.item): i for i in compare(plan, state)}
    assert set(items) == {("hold", released), ("file", EDITED)}
    assert items[("file", EDITED)].want == "a" * 64 and items[("file", EDITED)].have == "e" * 64


def test_validate_node_reports_both(
    plan: NodePlan, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """validate-node (text and --json) fails the node and names the hold and the file."""
    state, released = tampered(plan)
    outcome = NodeOutcome(plan.hostname, "connected", 0, "ok", 0, {"facts": {"gpu_validate_result": state.as_dict()}})
    monkeypatch.setattr(converge_cmd, "converge", lambda *a, **k: RolloutResult([outcome], [], {}))
    assert main(["validate-node", "--stack", "lab", "--node", plan.hostname, "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["passed"] is False
    assert data["facts"]["packages"]["not_held"] == [released] and data["facts"]["files"]["changed"] == [EDITED]
    assert main(["validate-node", "--stack", "lab", "--node", plan.hostname]) == 1
    text = capsys.readouterr().out
    assert f"problem: hold {released}" in text and f"problem: file {EDITED}" in text


def test_drift_reports_both_once(site: Site, plan: NodePlan) -> None:
    """drift's probe names both; check mode's own report of the same two is not counted twice."""
    state, released = tampered(plan)

    def check(ps: list[NodePlan]) -> dict[str, CheckOutcome]:
        return {p.hostname: CheckOutcome(files=(EDITED,), holds=(released,)) for p in ps}

    (report,) = drift(site, [plan], check=check, probe_fn=lambda s, p: state)
    assert report.status == "drift"
    assert sorted((i.kind, i.item, i.source) for i in report.items) == [
        ("file", EDITED, "probe"),
        ("hold", released, "probe"),
    ]


def test_check_reports_both(
    plan: NodePlan, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`gpufleet check` lists a hold check mode would restore next to the file it would render (exit 3)."""
    released = plan.packages[0].name
    host = HostResult(
        plan.hostname,
        changed=2,
        changed_tasks=["pinned_packages : Packages | Report driver packages that would be held", "base : Render"],
        diffs=[{"task": "base : Render", "path": EDITED}],
        # As the runner collects roles/pinned_packages' published fact in check mode.
        package_changes={"nvidia_driver:hold": [released]},
    )
    outcome = NodeOutcome(plan.hostname, "connected", 0, "ok", 2, host.as_dict())
    assert check_report(RolloutResult([outcome], [], {}))["nodes"][0]["holds"] == [released]
    monkeypatch.setattr(converge_cmd, "converge", lambda *a, **k: RolloutResult([outcome], [], {}))
    assert main(["check", "--stack", "lab", "--node", plan.hostname]) == 3
    out = capsys.readouterr().out
    assert f"hold    {released}" in out and f"file    {EDITED}" in out and f"package {released}" not in out


def test_converge_fails_on_a_lost_hold_not_on_a_file_it_just_rendered(plan: NodePlan) -> None:
    """After a converge the files are the roles' own; a node still differing otherwise fails the converge."""

    def run_with(state: NodeState) -> HostResult:
        h = HostResult(plan.hostname, facts={"gpu_validate_result": state.as_dict()})
        judge(plan, RunResult("node.yml", False, "successful", 0, 0.1, {plan.hostname: h}, "/nonexistent"))
        return h

    state, released = tampered(plan)
    assert run_with(replace(state, held=converged_state(plan).held)).succeeded  # only the file differs
    h = run_with(state)
    assert not h.succeeded
    assert h.failures == [{"task": VERDICT_TASK, "msg": f"hold {released}: want hold, have not held"}]


def test_probe_arguments_are_one_contract(site: Site, plan: NodePlan) -> None:
    """The plan's probe spec, the role's argument spec and the module's arguments name the same keys."""
    spec = probe_spec(plan).as_dict()
    assert host_vars(plan, site)["gpu_validate_probe"] == spec
    # `fabric_ports` and `capabilities_file` are in the spec only for nodes with fabric ports (lab-gpu01 has
    # one, lab-gpu03 none): every other node's probe input stays as it was.
    assert {"fabric_ports", "capabilities_file"} <= set(spec)
    plain = probe_spec(plan_site(site).node("lab-gpu03")).as_dict()
    assert not {"fabric_ports", "capabilities_file"} & set(plain)
    keys = set(spec)
    role = yaml.safe_load((ROOT / "roles" / "gpu_validate" / "meta" / "argument_specs.yml").read_text())
    assert set(role["argument_specs"]["main"]["options"]["gpu_validate_probe"]["options"]) == keys
    tasks = yaml.safe_load((ROOT / "roles" / "gpu_validate" / "tasks" / "main.yml").read_text())
    (module_args,) = [t["gpufleet.fleet.gpu_validate"] for t in tasks if "gpufleet.fleet.gpu_validate" in t]
    assert set(module_args) == keys


def test_names_the_roles_write_are_the_plans(site: Site, plan: NodePlan) -> None:
    """The inference units' prefix and the driver's fact file: the plan's names are the roles' names."""
    role_vars = yaml.safe_load((ROOT / "roles" / "inference_server" / "vars" / "main.yml").read_text())
    assert role_vars["_inference_server_unit_prefix"] == INFERENCE_UNIT_PREFIX
    assert host_vars(plan, site)["nvidia_driver_fact_file"] == DRIVER_FACT_FILE


def _run_probe(spec: ProbeSpec) -> NodeState:
    program = f"{probe_source()}\nmain({json.dumps(json.dumps(spec.as_dict()))})\n"
    p = subprocess.run([sys.executable, "-"], input=program, capture_output=True, text=True, timeout=60, check=True)
    return NodeState.from_json("here", json.loads(p.stdout))


def test_probe_reads_the_converge_record(plan: NodePlan, tmp_path: Path) -> None:
    """The probe program reads the file record the last converge left (and says None when there is none)."""
    record = tmp_path / "converged-files.json"
    spec = replace(probe_spec(plan), record_file=str(record), globs=(), services=(), endpoints=(), cdi=False)
    assert _run_probe(spec).recorded_files is None
    record.write_text(json.dumps({"files": {EDITED: "a" * 64}}))
    assert _run_probe(spec).recorded_files == {EDITED: "a" * 64}
