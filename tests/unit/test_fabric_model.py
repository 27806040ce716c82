"""The GPU fabric in the site model (issue 23): grammars of the new strings and the rules that need the site.

The one-mistake corpus (tests/fixtures/mistakes/fabric-*.yaml, span-*.yaml) covers the realistic mistakes
with their twins; this file covers the grammar edges and the rules the corpus cannot express alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.model.load import SiteError, parse_site
from infra.model.rules import check

ROOT = Path(__file__).resolve().parents[2]


def _prod() -> dict[str, Any]:
    doc = yaml.safe_load((ROOT / "stacks" / "Pulumi.example-prod.yaml").read_text())
    site: dict[str, Any] = doc["config"]["gpufleet:site"]
    return site


def _problems(site: dict[str, Any]) -> list[str]:
    """Paths of every problem: grammar errors from parsing, then cross-field rules."""
    try:
        parsed = parse_site(site)
    except SiteError as e:
        return [p.path for p in e.problems]
    return [p.path for p in check(parsed)]


def test_example_fabric_is_valid() -> None:
    assert _problems(_prod()) == []


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("netdev", "eth0\nExecStartPre=/bin/true"),
        ("netdev", "../../etc"),
        ("netdev", "-oProxyCommand"),
        ("netdev", "ib0{{ lookup('pipe','id') }}"),
        ("netdev", "a-name-longer-than-15"),
        ("pci", "0000:17:00.0;reboot"),
        ("pci", "0000:17:00.8"),
        ("pci", "0000:1A:00.0"),
        ("mac", "B8:3F:D2:10:00:01\n"),
    ],
)
def test_port_identity_grammar(field: str, value: str) -> None:
    site = _prod()
    port = site["nodes"][0]["fabric_ports"][0]
    port.pop("pci")
    port[field] = value
    assert "nodes[0].fabric_ports[0]." + field in _problems(site)


@pytest.mark.parametrize("pkey", ["0xffff", "0x0000", "0x8001", "7fff", "0x7FFF", "0x7fff\n"])
def test_partition_key_grammar(pkey: str) -> None:
    site = _prod()
    site["fabrics"][0]["partition_key"] = pkey
    assert "fabrics[0].partition_key" in _problems(site)


def test_port_needs_exactly_one_identity() -> None:
    site = _prod()
    site["nodes"][0]["fabric_ports"][0]["mac"] = "b8:3f:d2:10:09:01"
    assert "nodes[0].fabric_ports[0]" in _problems(site)
    site["nodes"][0]["fabric_ports"][0] = {"fabric": "ib-compute", "speed_gbps": 400, "address": "10.50.0.19"}
    assert "nodes[0].fabric_ports[0]" in _problems(site)


def test_port_speed_is_a_sold_speed() -> None:
    site = _prod()
    site["nodes"][0]["fabric_ports"][0]["speed_gbps"] = 300
    assert "nodes[0].fabric_ports[0]" in _problems(site)


def test_soft_roce_needs_a_roce_fabric_and_an_interface() -> None:
    site = _prod()
    port = site["nodes"][0]["fabric_ports"][0]
    port.pop("pci")
    port.update(netdev="eth1", soft_roce=True)
    assert "nodes[0].fabric_ports[0].soft_roce" in _problems(site)  # the fabric is InfiniBand
    site["fabrics"][0]["type"] = "roce"
    site["fabrics"][0]["mtu"] = 9000
    assert "nodes[0].fabric_ports[0].soft_roce" not in _problems(site)
    port.pop("netdev")
    port["pci"] = "0000:aa:00.0"
    assert "nodes[0].fabric_ports[0]" in _problems(site)


def test_threshold_above_port_speed_is_refused() -> None:
    site = _prod()
    site["fabrics"][0]["min_bandwidth_gbps"] = 800
    assert "fabrics[0].min_bandwidth_gbps" in _problems(site)
    site["fabrics"][0]["min_bandwidth_gbps"] = 350
    assert _problems(site) == []


def test_fabric_port_on_gpu_less_node_is_refused() -> None:
    site = _prod()
    site["nodes"][4]["fabric_ports"] = [
        {"fabric": "ib-compute", "pci": "0000:1a:00.0", "speed_gbps": 400, "address": "10.50.0.51"}
    ]
    assert _problems(site) == ["profiles.pcie-570.rdma"]  # the L40S profile pins no RDMA stack
    site["profiles"]["pcie-570"]["rdma"] = site["profiles"]["hgx-570"]["rdma"]
    assert _problems(site) == []
    site["nodes"][4]["gpu"]["count"] = 0
    site["services"][1]["nodes"] = ["l40s-02"]
    assert "nodes[4].fabric_ports" in _problems(site)


def test_spanning_service_takes_tensor_parallel_gpus_per_node() -> None:
    site = _prod()
    svc = site["services"][0]
    svc.update(span_nodes=True, pipeline_parallel=4, tensor_parallel=8)
    assert _problems(site) == []  # TP 8 on each 8-GPU node, 4 stages: fits
    svc["span_nodes"] = False
    assert "services[0].tensor_parallel" in _problems(site)  # 32 GPUs asked of one node


def test_subnet_manager_node_needs_opensm_pinned() -> None:
    site = _prod()
    site["fabrics"][0]["subnet_manager"] = "hgx-01"
    assert _problems(site) == ["profiles.hgx-570.rdma.opensm_version"]
    site["profiles"]["hgx-570"]["rdma"]["opensm_version"] = "3.3.24-1"
    assert _problems(site) == []
