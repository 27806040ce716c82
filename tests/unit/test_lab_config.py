"""Lab stack checks: only 198.18.0.0/15 addresses, loopback BMC; hosts and bridges derived from the stack."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.lab import hosts
from infra.lab.config import (
    LAB_KEY,
    HostKind,
    LabConfigError,
    Paths,
    bridge_name,
    check_addresses,
    gpus_json,
    lab_spec,
    spec_digest,
)
from infra.lab.network import render_ruleset
from infra.model.load import stack_path
from infra.model.site import Site

LAB_STACK: dict[str, Any] = yaml.safe_load(stack_path("lab").read_text(encoding="utf-8"))


def make_lab_stack(tmp_path: Path, change: Callable[[dict[str, Any], dict[str, Any]], None] | None = None,
                   *, stack: dict[str, Any] = LAB_STACK, name: str = "lab") -> Path:
    """A copy of a lab stack file (default: the lab stack), changed by `change(site, lab)`, written to tmp_path."""
    data = copy.deepcopy(stack)
    if change:
        change(data["config"]["gpufleet:site"], data["config"][LAB_KEY])
    path = tmp_path / f"Pulumi.{name}.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def refused_paths(path: Path) -> list[str]:
    with pytest.raises(LabConfigError) as exc:
        lab_spec("lab", path)
    return [p.path for p in exc.value.problems]


def address_problems(change: Callable[[dict[str, Any], dict[str, Any]], None]) -> list[str]:
    """Config paths check_addresses() refuses, on a site that skips the model's cross-field rules."""
    data = copy.deepcopy(LAB_STACK["config"])
    change(data["gpufleet:site"], data[LAB_KEY])
    return [p.path for p in check_addresses(Site.model_validate(data["gpufleet:site"]), data[LAB_KEY])]


def test_lab_stack_gives_nodes_mirror_and_outside_host(tmp_path: Path) -> None:
    """The shipped lab stack yields 4 nodes, the mirror and the outside-world host on two bridges."""
    spec = lab_spec("lab", make_lab_stack(tmp_path))
    kinds = {h.name: h.kind for h in spec.hosts}
    assert kinds == {"lab-gpu01": HostKind.NODE, "lab-gpu02": HostKind.NODE, "lab-gpu03": HostKind.NODE,
                     "lab-gpu04": HostKind.NODE, "lab-mirror": HostKind.MIRROR, "lab-upstream": HostKind.OUTSIDE}
    assert {b.name: str(b.address) for b in spec.bridges} == {"gpfl-connected": "198.18.1.1/24",
                                                               "gpfl-airgap": "198.18.2.1/24",
                                                               "gpfl-f-lab-roce": "198.18.8.1/24"}
    assert spec.host("lab-gpu03").gateway is None  # air-gapped: no route out
    assert str(spec.host("lab-gpu01").gateway) == "198.18.1.1"
    assert spec.keyrings["lab-upstream"] == Path("/var/lib/gpufleet/lab/keys/lab-upstream.gpg")


@pytest.mark.parametrize(("where", "change"), [
    (f"{LAB_KEY}.outside_world.address", lambda s, lab: lab["outside_world"].update(address="8.8.8.8")),
    ("segments[1].egress_probe", lambda s, lab: s["segments"][1].update(egress_probe="1.1.1.1")),
    ("segments[0].sources[0].url", lambda s, lab: s["segments"][0]["sources"][0].update(url="http://172.16.0.1/apt")),
])
def test_stack_with_an_outside_address_is_refused(tmp_path: Path, where: str,
                                                  change: Callable[[dict[str, Any], dict[str, Any]], None]) -> None:
    """A valid site that names an address outside 198.18.0.0/15 is refused by `lab_spec` with its config path."""
    assert where in refused_paths(make_lab_stack(tmp_path, change))


@pytest.mark.parametrize(("where", "change"), [
    ("nodes[0].address", lambda s, lab: s["nodes"][0].update(address="192.0.2.50")),
    ("segments[0].cidr", lambda s, lab: s["segments"][0].update(cidr="192.168.1.0/24")),
    ("segments[0].gateway", lambda s, lab: s["segments"][0].update(gateway="192.0.2.1")),
    ("segments[0].ntp[0]", lambda s, lab: s["segments"][0].update(ntp=["10.1.1.1"])),
    ("mirrors[0].address", lambda s, lab: s["mirrors"][0].update(address="10.0.0.10")),
    ("segments[1].egress_allow[0]", lambda s, lab: s["segments"][1].update(egress_allow=["0.0.0.0/0"])),
    ("fabrics[0].cidr", lambda s, lab: s["fabrics"][0].update(cidr="10.50.0.0/24")),
    ("nodes[1].fabric_ports[0].address", lambda s, lab: s["nodes"][1]["fabric_ports"][0].update(address="10.50.0.12")),
])
def test_every_address_field_is_checked(where: str, change: Callable[[dict[str, Any], dict[str, Any]], None]) -> None:
    """Each address-bearing field outside 198.18.0.0/15 is named; the unchanged lab stack has none."""
    assert address_problems(lambda s, lab: None) == []
    assert where in address_problems(change)


def test_bmc_must_listen_on_loopback(tmp_path: Path) -> None:
    """The Redfish emulator never listens on a routable address."""
    paths = refused_paths(make_lab_stack(tmp_path, lambda s, lab: lab["bmc_listen"].update(address="198.18.1.5")))
    assert f"{LAB_KEY}.bmc_listen.address" in paths


def test_node_bmc_endpoint_must_be_loopback(tmp_path: Path) -> None:
    """A node BMC endpoint on a real network is refused."""
    def change(s: dict[str, Any], lab: dict[str, Any]) -> None:
        s["nodes"][0]["bmc"] = {**s["nodes"][0]["bmc"], "endpoint": "http://192.0.2.9:8000"}

    assert "nodes[0].bmc.endpoint" in refused_paths(make_lab_stack(tmp_path, change))


def test_outside_world_on_airgapped_segment_is_refused(tmp_path: Path) -> None:
    """The outside world must sit on a connected segment."""
    stack = make_lab_stack(tmp_path, lambda s, lab: lab["outside_world"].update(segment="airgap",
                                                                                  address="198.18.2.250"))
    assert f"{LAB_KEY}.outside_world.segment" in refused_paths(stack)


def test_duplicate_host_address_is_refused(tmp_path: Path) -> None:
    """The outside-world host cannot take a node's address."""
    stack = make_lab_stack(tmp_path, lambda s, lab: lab["outside_world"].update(address="198.18.1.11"))
    assert "lab-outside" in refused_paths(stack)  # no apt source points at .11, so the generic name


def test_gpus_json_follows_the_catalogue(tmp_path: Path) -> None:
    """The node's GPU declaration carries the catalogue product name, smi memory, count and unique UUIDs."""
    spec = lab_spec("lab", make_lab_stack(tmp_path))
    decl = gpus_json(spec.site, "lab-gpu02")
    assert decl["name"] == "NVIDIA H100 80GB HBM3" and decl["memory_mib"] == 81559 and decl["simulated"] is True
    assert len(decl["gpus"]) == 8 and len({g["uuid"] for g in decl["gpus"]}) == 8
    assert gpus_json(spec.site, "lab-gpu02") == decl  # deterministic: a reimage gives the same GPUs


def test_bridge_names_fit_linux_limit() -> None:
    """Long segment names still give interface names of at most 15 characters, distinct per segment."""
    long_a, long_b = bridge_name("a-very-long-segment-name"), bridge_name("a-very-long-segment-other")
    assert len(long_a) <= 15 and len(long_b) <= 15 and long_a != long_b
    assert bridge_name("airgap") == "gpfl-airgap"


def test_ruleset_isolates_bridges(tmp_path: Path) -> None:
    """Same-bridge traffic is accepted, cross-bridge dropped, the air-gapped bridge may not open connections in."""
    text = render_ruleset(lab_spec("lab", make_lab_stack(tmp_path)).bridges)
    assert 'iifname "gpfl-airgap" oifname "gpfl-airgap" accept' in text
    assert 'iifname { "gpfl-connected", "gpfl-airgap", "gpfl-f-lab-roce" } drop' in text
    assert 'iifname "gpfl-airgap" drop' in text and 'iifname "gpfl-connected" drop' not in text


def _port(site: dict[str, Any], host: str) -> dict[str, Any]:
    port: dict[str, Any] = next(n for n in site["nodes"] if n["hostname"] == host)["fabric_ports"][0]
    return port


def test_fabric_gets_its_own_bridge_and_each_port_a_veth(tmp_path: Path) -> None:
    """The lab fabric: a bridge of its own, and per fabric port an extra veth named as the stack names the port."""
    spec = lab_spec("lab", make_lab_stack(tmp_path))
    fabric = next(b for b in spec.bridges if b.segment == "fabric:lab-roce")
    assert fabric.airgapped  # the lab host takes no new connection from the fabric
    site = LAB_STACK["config"]["gpufleet:site"]
    for name in ("lab-gpu01", "lab-gpu02"):
        (link,) = spec.host(name).fabric
        port = _port(site, name)
        assert (link.bridge, link.netdev, str(link.address)) == (fabric.name, port["netdev"], port["address"] + "/24")
        argv = hosts.nspawn_argv(spec, spec.host(name), Path("/r"), Paths())
        assert f"--network-veth-extra={link.host_if}:{port['netdev']}" in argv and len(link.host_if) <= 15
        assert f"Address={port['address']}/24" in hosts.fabric_network(link)
    assert spec.host("lab-gpu03").fabric == ()
    assert not any(a.startswith("--network-veth-extra") for a in hosts.nspawn_argv(spec, spec.host("lab-gpu03"),
                                                                                  Path("/r"), Paths()))


def test_lab_fabric_port_must_be_named_by_netdev(tmp_path: Path) -> None:
    """A PCI address names no device in an nspawn host: the lab refuses it, naming the port."""
    def by_pci(s: dict[str, Any], lab: dict[str, Any]) -> None:
        port = _port(s, "lab-gpu02")
        del port["netdev"], port["soft_roce"]
        port["pci"] = "0000:1a:00.0"

    assert "nodes[1].fabric_ports[0]" in refused_paths(make_lab_stack(tmp_path, by_pci))


def test_fabric_port_cannot_take_the_bridge_address(tmp_path: Path) -> None:
    """The fabric bridge holds the fabric's first address: a port with it is refused, naming the host."""
    stack = make_lab_stack(tmp_path, lambda s, lab: _port(s, "lab-gpu01").update(address="198.18.8.1"))
    assert "lab-gpu01" in refused_paths(stack)


def test_fabric_links_change_the_digest(tmp_path: Path) -> None:
    """A running lab built without the fabric is not taken for this one."""
    with_fabric = spec_digest(lab_spec("lab", make_lab_stack(tmp_path)))

    def without(s: dict[str, Any], lab: dict[str, Any]) -> None:
        s.pop("fabrics")
        for n in s["nodes"]:
            n.pop("fabric_ports", None)
        s["services"] = [x for x in s["services"] if not x.get("span_nodes")]

    assert spec_digest(lab_spec("lab", make_lab_stack(tmp_path, without))) != with_fabric
