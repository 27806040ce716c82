"""The per-node plan: roles in order, pinned packages per OS, batches, summaries and content hashes."""

from __future__ import annotations

from pathlib import Path

import pytest

from infra.cli import main
from infra.model.load import load_site, parse_site
from infra.model.site import OperatingSystem
from infra.plan.desired import DesiredState
from infra.plan.node import ROLE_ORDER, content_hash, plan_site, tree_hash
from infra.plan.packages import Component, packages_for
from tests.unit.factories import make_node, make_site


def test_roles_follow_converge_order_and_segment_kind() -> None:
    """Drivers before runtimes before inference; only air-gapped nodes get the air-gap firewall."""
    plan = plan_site(parse_site(make_site()))
    connected, isolated = plan.node("gpu01"), plan.node("gpu02")
    for n in (connected, isolated):
        assert list(n.roles) == sorted(n.roles, key=ROLE_ORDER.index)
        assert n.roles.index("nvidia_driver") < n.roles.index("container_runtime")
    assert "airgap_firewall" in isolated.roles and "airgap_firewall" not in connected.roles
    assert "inference_server" in connected.roles and "inference_server" not in isolated.roles


def test_fabric_manager_only_on_nvswitch_nodes_at_driver_version() -> None:
    """NVSwitch nodes get fabric manager pinned to the exact driver version; PCIe nodes do not."""
    raw = make_site()
    raw["nodes"].append(make_node("pcie01", "10.0.0.20", mac="02:00:00:00:00:20", gpu={"model": "L40S", "count": 4}))
    plan = plan_site(parse_site(raw))
    fm = plan.node("gpu01").packages_of(Component.FABRIC_MANAGER)
    driver = plan.node("gpu01").packages_of(Component.DRIVER)
    assert [p.name for p in fm] == ["nvidia-fabricmanager-570"]
    assert fm[0].version == driver[0].version == "570.133.20-0ubuntu1"
    assert plan.node("pcie01").packages_of(Component.FABRIC_MANAGER) == []


@pytest.mark.parametrize(
    ("os", "driver_pkg", "version"),
    [
        (OperatingSystem.DEBIAN_12, "nvidia-driver", "570.133.20-1"),
        (OperatingSystem.UBUNTU_2204, "nvidia-driver-570-server-open", "570.133.20-0ubuntu1"),
        (OperatingSystem.RHEL_9, "nvidia-driver", "570.133.20-1.el9"),
    ],
)
def test_package_names_follow_each_os_scheme(os: OperatingSystem, driver_pkg: str, version: str) -> None:
    """The same profile means NVIDIA's names and revision scheme of each OS family."""
    profile = parse_site(make_site()).profiles["hgx"]
    pkgs = packages_for(profile, os, fabric_manager=True)
    assert pkgs[0].name == driver_pkg and pkgs[0].version == version
    assert any(p.name == "cuda-toolkit-12-8" and p.version.startswith("12.8.1-") for p in pkgs)
    assert {p.component for p in pkgs} >= {Component.DRIVER, Component.CUDA, Component.CONTAINER_TOOLKIT}


def test_rolling_batches_per_segment() -> None:
    """Nodes are grouped per segment into batches of the rollout's batch size."""
    raw = make_site(rollout={"batch_size": 2, "max_failures": 0})
    for i in range(3, 6):
        raw["nodes"].append(make_node(f"gpu0{i}", f"10.0.0.{10 + i}", mac=f"02:00:00:00:00:{10 + i}"))
    plan = plan_site(parse_site(raw))
    batches = [[n.hostname for n in b] for b in plan.batches("compute")]
    assert batches == [["gpu01", "gpu03"], ["gpu04", "gpu05"]]
    assert [[n.hostname for n in b] for b in plan.batches("iso")] == [["gpu02"]]


def test_summary_names_versions_a_reviewer_needs() -> None:
    """The desired-state summary says driver, CUDA, runtime, roles and what is served."""
    s = DesiredState.of(plan_site(load_site("example-prod")).node("hgx-01")).summary()
    assert s["driver"].startswith("570.133.20") and s["cuda"] == "12.8.1"
    assert s["fabric_manager"] == "570.133.20"
    assert "llama-70b=vllm:llama-3.1-70b@" in s["inference"]


def test_content_hash_changes_with_role_files_and_variables(tmp_path: Path) -> None:
    """Editing a role file or a variable changes the node's content hash; nothing else does."""
    (tmp_path / "roles" / "base" / "tasks").mkdir(parents=True)
    task = tmp_path / "roles" / "base" / "tasks" / "main.yml"
    task.write_text("- name: A\n")
    h1 = tree_hash(tmp_path)
    assert tree_hash.__wrapped__(tmp_path) == h1  # type: ignore[attr-defined]
    task.write_text("- name: B\n")
    h2 = tree_hash.__wrapped__(tmp_path)  # type: ignore[attr-defined]
    assert h1 != h2
    assert content_hash({"a": 1}, h1) == content_hash({"a": 1}, h1)
    assert content_hash({"a": 1}, h1) != content_hash({"a": 2}, h1)
    assert content_hash({"a": 1}, h1) != content_hash({"a": 1}, h2)


def test_plan_cli_shows_vram_verdict(capsys: pytest.CaptureFixture[str]) -> None:
    """`gpufleet plan` prints the roles, pinned packages and the VRAM fit per service."""
    assert main(["plan", "--stack", "example-prod", "--node", "hgx-01"]) == 0
    out = capsys.readouterr().out
    assert "nvidia-fabricmanager-570" in out and "llama-70b" in out and "fits" in out


def test_plan_unknown_node_names_known_ones() -> None:
    """Asking for a node that is not in the site says which nodes exist."""
    plan = plan_site(load_site("lab"))
    with pytest.raises(KeyError, match="lab-gpu01"):
        plan.node("nope")


@pytest.mark.parametrize("command", ["validate-node", "wait-ssh", "rebuild", "fingerprint"])
def test_unknown_node_is_invalid_input_for_every_node_command(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Any command given a node the stack lacks exits 2 naming the known nodes, before touching anything."""
    argv = [command, "--stack", "lab", "--node", "nope"] + (["--yes"] if command == "rebuild" else [])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "no node 'nope'" in err and "lab-gpu01" in err
