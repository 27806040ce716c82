"""validate-node's fabric port checks: the probe reads sysfs, `compare` judges each declared port.

The sysfs values are what two Soft-RoCE VM nodes showed (tests/lab/test_rxe_vm.py, Debian 12 generic kernel
6.1.0-50-amd64 (6.1.176-1), rdma-core 44.0-2, QEMU virtio-net with `speed=100000`), read with
`grep -H . state phys_state rate gid_attrs/ndevs/0` in /sys/class/infiniband/rxe_eth1/ports/1 and
/sys/class/net/eth1/{speed,operstate}:

    state:4: ACTIVE
    phys_state:5: LinkUp
    rate:100 Gb/sec (4X EDR)
    gid_attrs/ndevs/0:eth1
    /sys/class/net/eth1/speed:100000
    /sys/class/net/eth1/operstate:up

Other port states are the kernel's own strings for them (drivers/infiniband/core/sysfs.c, v6.1: `state_show`
prints "%d: %s" from NOP/DOWN/INIT/ARMED/ACTIVE/ACTIVE_DEFER; `rate_show` prints "%d%s Gb/sec (%dX%s)").
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from infra.model.load import parse_site
from infra.plan.node import NodePlan, plan_site
from infra.plan.nodestate import (
    NOT_A_VALIDATION_FAILURE,
    FabricPortState,
    NodeState,
    compare,
    failures,
    probe_spec,
    validation_facts,
)
from tests.unit.factories import make_node, make_profile, make_site
from tests.unit.nodestates import converged_state

ROOT = Path(__file__).resolve().parents[2]
# The probe program itself (it runs on nodes as a file, not as a package of this project).
_SPEC = importlib.util.spec_from_file_location("gpufleet_probe", ROOT / "plugins/module_utils/gpufleet_probe.py")
assert _SPEC is not None and _SPEC.loader is not None
gpufleet_probe = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(gpufleet_probe)

# Captured on rxe-a (see the module docstring).
RXE_SYSFS = {
    "class/net/eth1/operstate": "up",
    "class/net/eth1/speed": "100000",
    "class/net/eth1/address": "52:54:00:9d:00:11",
    "class/infiniband/rxe_eth1/ports/1/state": "4: ACTIVE",
    "class/infiniband/rxe_eth1/ports/1/phys_state": "5: LinkUp",
    "class/infiniband/rxe_eth1/ports/1/rate": "100 Gb/sec (4X EDR)",
    "class/infiniband/rxe_eth1/ports/1/gid_attrs/ndevs/0": "eth1",
}
RXE_SEEN = {
    "fabric": "rxe-lab",
    "kind": "netdev",
    "value": "eth1",
    "netdev": "eth1",
    "operstate": "up",
    "speed_mbps": 100000,
    "rdma_device": "rxe_eth1",
    "rdma_port": 1,
    "rdma_state": "4: ACTIVE",
    "rdma_phys_state": "5: LinkUp",
    "rdma_rate": "100 Gb/sec (4X EDR)",
}


def _site(extra_port: bool = False) -> dict[str, Any]:
    ports: list[dict[str, Any]] = [
        {"fabric": "rxe-lab", "netdev": "eth1", "soft_roce": True, "speed_gbps": 100, "address": "198.18.13.11"}
    ]
    if extra_port:
        ports.append(
            {"fabric": "rxe-lab", "netdev": "eth9", "soft_roce": True, "speed_gbps": 100, "address": "198.18.13.21"}
        )
    return make_site(
        profiles={"hgx": make_profile(rdma={"version": "44.0-2", "perftest_version": "4.5+0.17-1"})},
        nodes=[
            make_node("gpu01", os="debian-12", fabric_ports=ports),
            make_node(
                "gpu02",
                "10.0.0.12",
                mac="02:00:00:00:00:12",
                os="debian-12",
                fabric_ports=[{**ports[0], "address": "198.18.13.12"}],
            ),
        ],
        fabrics=[{"name": "rxe-lab", "type": "roce", "cidr": "198.18.13.0/24", "mtu": 1500}],
        services=[],
    )


def _plan(extra_port: bool = False) -> NodePlan:
    return plan_site(parse_site(_site(extra_port))).node("gpu01")


def _state(plan: NodePlan, *rows: dict[str, Any]) -> NodeState:
    return converged_state(plan, fabric_ports=tuple(FabricPortState.from_json(r) for r in rows))


def _fabric_problems(plan: NodePlan, state: NodeState) -> list[str]:
    return [str(i) for i in failures(compare(plan, state), NOT_A_VALIDATION_FAILURE) if i.kind == "fabric"]


def _write_sysfs(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text + "\n")


def test_probe_reads_the_soft_roce_port_and_finds_no_missing_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_sysfs(tmp_path, RXE_SYSFS)
    monkeypatch.setattr(gpufleet_probe, "SYS", str(tmp_path))
    out: dict[str, Any] = {"fabric_ports": []}
    gpufleet_probe._fabric(
        [
            {"fabric": "rxe-lab", "kind": "netdev", "value": "eth1"},
            {"fabric": "rxe-lab", "kind": "mac", "value": "52:54:00:9D:00:11"},
            {"fabric": "rxe-lab", "kind": "netdev", "value": "eth9"},
            {"fabric": "rxe-lab", "kind": "pci", "value": "0000:00:05.0"},
        ],
        out,
    )
    by_mac, missing, no_pci = out["fabric_ports"][1:]
    assert out["fabric_ports"][0] == RXE_SEEN
    assert by_mac["netdev"] == "eth1" and by_mac["rdma_device"] == "rxe_eth1"  # MACs compare case-blind
    assert missing["netdev"] is None and missing["rdma_device"] is None
    assert no_pci["netdev"] is None


def test_probe_sees_an_interface_without_rdma_device_and_a_speed_the_driver_does_not_know(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before the rdma role ran: eth1 is there, no rxe link; virtio-net without `speed=` reports -1.
    _write_sysfs(tmp_path, {"class/net/eth1/operstate": "up", "class/net/eth1/speed": "-1"})
    monkeypatch.setattr(gpufleet_probe, "SYS", str(tmp_path))
    out: dict[str, Any] = {"fabric_ports": []}
    gpufleet_probe._fabric([{"fabric": "rxe-lab", "kind": "netdev", "value": "eth1"}], out)
    (seen,) = out["fabric_ports"]
    assert (seen["netdev"], seen["speed_mbps"], seen["rdma_device"]) == ("eth1", None, None)


def test_a_port_as_declared_passes_and_facts_show_what_was_seen() -> None:
    plan = _plan()
    state = _state(plan, RXE_SEEN)
    assert _fabric_problems(plan, state) == []
    facts = validation_facts(plan, state, compare(plan, state))
    assert facts["fabric"]["ok"]
    (port,) = facts["fabric"]["ports"]
    assert (port["port"], port["declared_gbps"], port["seen_gbps"], port["ok"]) == ("netdev eth1", 100, 100, True)
    assert port["seen"]["rdma_rate"] == "100 Gb/sec (4X EDR)"


def test_a_declared_port_the_node_lacks_fails_naming_node_port_and_fix() -> None:
    plan = _plan(extra_port=True)
    missing = {**{k: None for k in RXE_SEEN}, "fabric": "rxe-lab", "kind": "netdev", "value": "eth9"}
    state = _state(plan, RXE_SEEN, missing)
    (problem,) = _fabric_problems(plan, state)
    assert problem.startswith("fabric port netdev eth9 of fabric rxe-lab on gpu01: no such interface on the node")
    assert "fix: check that the adapter is present" in problem and "`ip link show eth9`" in problem
    facts = validation_facts(plan, state, compare(plan, state))
    assert not facts["passed"] and not facts["fabric"]["ok"]
    assert [p["ok"] for p in facts["fabric"]["ports"]] == [True, False]


@pytest.mark.parametrize(
    ("change", "says", "fix"),
    [
        ({"operstate": "down"}, "interface eth1 is down", "check the cable"),
        (
            {"rdma_device": None, "rdma_port": None, "rdma_state": None, "rdma_rate": None},
            "interface eth1 has no RDMA device",
            "rdma link add rxe_eth1 type rxe netdev eth1",
        ),
        ({"rdma_state": "2: INIT"}, "RDMA port rxe_eth1/1 is 2: INIT", "subnet manager"),
        # A 25 GbE link under a port declared at 100: rxe derives 1X EDR (ib_get_eth_speed, v6.1).
        ({"speed_mbps": 25000, "rdma_rate": "25 Gb/sec (1X EDR)"}, "links at 25 Gb/s", "speed_gbps"),
    ],
)
def test_each_way_a_present_port_can_be_wrong(change: dict[str, Any], says: str, fix: str) -> None:
    plan = _plan()
    (problem,) = _fabric_problems(plan, _state(plan, {**RXE_SEEN, **change}))
    assert f"on gpu01: {says}" in problem and fix in problem.split("fix:", 1)[1]


def test_ethernet_speed_unknown_falls_back_to_the_rdma_rate() -> None:
    plan = _plan()
    assert _fabric_problems(plan, _state(plan, {**RXE_SEEN, "speed_mbps": None})) == []
    # rxe without a known Ethernet speed assumes 1 Gb/s and reports 1X SDR (ib_get_eth_speed, v6.1).
    sdr = {**RXE_SEEN, "speed_mbps": None, "rdma_rate": "2.5 Gb/sec (1X SDR)"}
    (problem,) = _fabric_problems(plan, _state(plan, sdr))
    assert "links at 2.5 Gb/s" in problem


def test_a_probe_that_reported_no_ports_fails_rather_than_passes() -> None:
    plan = _plan()
    (problem,) = _fabric_problems(plan, _state(plan))
    assert "not reported by the node's probe" in problem


def test_state_round_trips_and_nodes_without_ports_probe_as_before() -> None:
    plan = _plan()
    state = _state(plan, RXE_SEEN)
    assert NodeState.from_json(plan.hostname, json.loads(json.dumps(state.as_dict()))) == state
    assert probe_spec(plan).as_dict()["fabric_ports"] == [{"fabric": "rxe-lab", "kind": "netdev", "value": "eth1"}]
    plain = plan_site(parse_site(make_site())).node("gpu01")
    assert "fabric_ports" not in probe_spec(plain).as_dict()
    assert replace(state, fabric_ports=()).as_dict()["fabric_ports"] == []


def test_a_host_that_loads_no_kernel_modules_has_its_rdma_device_not_checked_but_its_link_is() -> None:
    # The lab's nspawn nodes declare kernel_modules=false (infra/lab/hosts.py): their fabric port is a veth
    # (10 Gb/s, no rdma_rxe). The interface, its state and its speed are still checked; the RDMA device is
    # reported as not checked, with the reason, instead of failing the node.
    plan = _plan()
    veth = {**RXE_SEEN, "speed_mbps": 100000, "rdma_device": None, "rdma_port": None, "rdma_state": None,
            "rdma_phys_state": None, "rdma_rate": None}  # fmt: skip
    no_modules = {"kernel_modules": False}
    state = replace(_state(plan, veth), capabilities=no_modules)
    assert _fabric_problems(plan, state) == []
    (port,) = validation_facts(plan, state, compare(plan, state))["fabric"]["ports"]
    assert port["ok"] and "capability kernel_modules=false" in port["rdma_not_checked"]
    # Without the declaration the same port fails; with it, a missing or slow interface still fails.
    assert "has no RDMA device" in _fabric_problems(plan, _state(plan, veth))[0]
    (slow,) = _fabric_problems(plan, replace(_state(plan, {**veth, "speed_mbps": 10000}), capabilities=no_modules))
    assert "links at 10 Gb/s" in slow
    (down,) = _fabric_problems(plan, replace(_state(plan, {**veth, "operstate": "down"}), capabilities=no_modules))
    assert "is down" in down


def test_probe_reads_the_capabilities_the_host_declares(tmp_path: Path) -> None:
    fact = tmp_path / "gpufleet_capabilities.fact"
    fact.write_text(json.dumps({"kernel_modules": False, "reboot": False, "note": "not a flag"}))
    assert gpufleet_probe._capabilities(str(fact)) == {"kernel_modules": False, "reboot": False}
    assert gpufleet_probe._capabilities(str(tmp_path / "absent")) == {}
    fact.write_text("[1, 2]")
    assert gpufleet_probe._capabilities(str(fact)) == {}
