"""Role arguments are checked on the controller against meta/argument_specs.yml before any host is touched."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from infra.ansible import converge as ansible_converge
from infra.ansible.inventory import GROUP, build_inventory
from infra.ansible.rolespecs import RoleArgumentError, check_inventory, problems
from infra.cli import main
from infra.model.load import load_site
from infra.plan.node import plan_site


@pytest.mark.parametrize("stack", ["lab", "example-prod", "example-airgap"])
def test_every_planned_node_satisfies_its_roles_specs(stack: str) -> None:
    """The plan of every shipped stack gives each node variables its roles accept."""
    site = load_site(stack)
    check_inventory(build_inventory(site, plan_site(site).nodes), GROUP)


def _lab_hostvars() -> tuple[str, dict[str, Any]]:
    site = load_site("lab")
    hosts = build_inventory(site, plan_site(site).nodes)["all"]["children"][GROUP]["hosts"]
    return "lab-gpu01", dict(hosts["lab-gpu01"])


def test_wrong_type_and_choice_are_named_with_host_role_and_argument() -> None:
    host, hv = _lab_hostvars()
    hv["base_time_sync_start"] = "maybe"
    hv["container_runtime_engine"] = "lxc"
    found = problems(host, hv["gpufleet_roles"], hv)
    assert len(found) == 2
    assert found[0].startswith("lab-gpu01: role base: argument 'base_time_sync_start'")
    assert "container_runtime_engine must be one of: containerd, docker, podman, got: lxc" in found[1]


def test_roles_the_node_does_not_have_are_not_checked() -> None:
    host, hv = _lab_hostvars()
    assert "airgap_firewall" not in hv["gpufleet_roles"]
    hv["airgap_firewall_allow"] = {"not": "a list"}
    assert problems(host, hv["gpufleet_roles"], hv) == []


def test_converge_refuses_before_running_anything(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A plan/role disagreement stops `gpufleet converge` (exit 1) before a playbook starts."""
    ran: list[Any] = []
    monkeypatch.setattr(ansible_converge, "run_playbook", lambda *a, **k: ran.append(a))
    real = build_inventory

    def broken(site: Any, nodes: Any) -> dict[str, Any]:
        inv = real(site, nodes)
        for hv in inv["all"]["children"][GROUP]["hosts"].values():
            hv["container_runtime_engine"] = "lxc"
        return inv

    monkeypatch.setattr(ansible_converge, "build_inventory", broken)
    with pytest.raises(RoleArgumentError):
        plan = plan_site(load_site("lab"))
        ansible_converge.converge(plan, plan.nodes)
    assert main(["converge", "--stack", "lab", "--node", "lab-gpu02"]) == 1
    assert ran == []
    err = capsys.readouterr().err
    assert "lab-gpu02: role container_runtime: value of container_runtime_engine must be one of" in err
    assert "nothing was run" in err


def test_converge_plans_once_and_builds_each_nodes_variables_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`gpufleet converge` of the lab plans the site once and builds every node's host variables once: the
    argument-spec check and the wave's run share them (before, each was built twice) (issue 17)."""
    # Its own runs directory: the node locks of a real lab run on this machine are not this test's business.
    monkeypatch.setenv("GPUFLEET_RUNS_DIR", str(tmp_path))
    import infra.ansible.inventory as inventory_mod
    import infra.commands.converge as converge_cmd
    from infra.ansible.runner import RunResult

    planned: list[Any] = []
    built: list[str] = []
    real_plan, real_entry = converge_cmd.plan_site, inventory_mod.host_entry
    monkeypatch.setattr(converge_cmd, "plan_site", lambda site: planned.append(site) or real_plan(site))
    # The library cannot plan again: it takes the command's plan.
    assert not hasattr(ansible_converge, "plan_site")
    monkeypatch.setattr(
        inventory_mod, "host_entry", lambda plan, site: built.append(plan.hostname) or real_entry(plan, site)
    )
    waves: list[list[str]] = []

    def fake_run(playbook: str, inventory: Any, hosts: list[str], **kw: Any) -> RunResult:
        waves.append(hosts)
        assert set(inventory["all"]["children"][GROUP]["hosts"]) == set(hosts)
        return RunResult(playbook, False, "successful", 0, 0.0, {}, "")

    monkeypatch.setattr(ansible_converge, "run_playbook", fake_run)
    main(["converge", "--stack", "lab"])
    assert waves
    assert len(planned) == 1
    assert sorted(built) == sorted({h for w in waves for h in w})
