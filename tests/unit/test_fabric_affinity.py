"""GPU-to-NIC affinity (issue 23): a node of a server model the catalogue knows gets its fabric ports checked.

The DGX H100/H200 entries come from NVIDIA's DGX H100/H200 User Guide ("Network Modules", Table 6: port,
GPU, default interface name) and the DGX BasePOD deployment guide (the eight compute-fabric PCI buses);
these tests hold the catalogue to both, then check what validation makes of ports that match or do not.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.model.catalogue import resolve
from infra.model.load import SiteError, parse_site
from infra.model.rules import check

ROOT = Path(__file__).resolve().parents[2]
PROD = yaml.safe_load((ROOT / "stacks" / "Pulumi.example-prod.yaml").read_text())["config"]["gpufleet:site"]
# NVIDIA DGX H100/H200 User Guide, Table 6 (port → GPU, default interface name).
TABLE_6 = {
    "OSFP1P1": (7, "ibp220s0"), "OSFP1P2": (4, "ibp154s0"), "OSFP2P1": (6, "ibp206s0"), "OSFP2P2": (5, "ibp192s0"),
    "OSFP3P1": (2, "ibp79s0"), "OSFP3P2": (1, "ibp64s0"), "OSFP4P1": (3, "ibp94s0"), "OSFP4P2": (0, "ibp24s0"),
}
# DGX BasePOD deployment guide, compute interfaces configured with mlxconfig: `for i in dc 9a ce c0 4f 40 5e 18`.
BASEPOD_BUSES = {"dc", "9a", "ce", "c0", "4f", "40", "5e", "18"}


def _paths(site: dict[str, Any]) -> list[str]:
    try:
        return [p.path for p in check(parse_site(site))]
    except SiteError as e:
        return [p.path for p in e.problems]


def dgx_site(ports: list[dict[str, Any]], server: str = "dgx-h100") -> dict[str, Any]:
    site = copy.deepcopy(PROD)
    site["nodes"][0]["server"] = server
    site["nodes"][0]["fabric_ports"] = ports
    return site


def _port(k: int, **kw: Any) -> dict[str, Any]:
    return {"fabric": "ib-compute", "speed_gbps": 400, "address": f"10.50.0.{11 + k}", **kw}


def test_dgx_catalogue_entry_is_nvidias_table() -> None:
    """Every NIC of the entry is a row of Table 6 (GPU, name), on a BasePOD compute bus named by its interface."""
    for server in ("dgx-h100", "dgx-h200"):
        nics = resolve().servers[server].compute_nics
        assert sorted((n.gpu, n.netdev) for n in nics) == sorted(TABLE_6.values())
        for n in nics:
            bus = n.pci.split(":")[1]
            assert bus in BASEPOD_BUSES and n.netdev == f"ibp{int(bus, 16)}s0" and n.pci.endswith(":00.0")


def test_ports_named_by_interface_are_checked_too() -> None:
    """`netdev: ibp24s0` for GPU 0 passes; GPU 1 is named at .gpu with a suggestion; an unknown name at .netdev."""
    assert _paths(dgx_site([_port(0, netdev="ibp24s0", gpu=0)])) == []
    assert _paths(dgx_site([_port(0, netdev="ibp24s0", gpu=1)])) == ["nodes[0].fabric_ports[0].gpu"]
    assert _paths(dgx_site([_port(0, netdev="ibp25s0")])) == ["nodes[0].fabric_ports[0].netdev"]
    with pytest.raises(SiteError) as exc:
        parse_site(dgx_site([_port(0, netdev="ibp24s0", gpu=1)]))
    (problem,) = exc.value.problems
    assert problem.suggestions and problem.suggestions[0].edits[0].value == 0


def test_unknown_server_model_is_named() -> None:
    assert _paths(dgx_site([_port(0, pci="0000:18:00.0")], server="dgx-h999")) == ["nodes[0].server"]


def test_a_stack_can_describe_its_own_server() -> None:
    """A server model added under catalogue.servers is checked like a built-in one."""
    site = dgx_site([_port(0, pci="0000:1a:00.0", gpu=0)], server="my-hgx")
    site["catalogue"] = {"servers": {"my-hgx": {"gpu": "H100", "gpu_count": 8, "compute_nics": [
        {"pci": "0000:1a:00.0", "netdev": "ibs1a", "gpu": 0}]}}}
    assert _paths(site) == []
    site["nodes"][0]["fabric_ports"][0]["gpu"] = 2
    assert _paths(site) == ["nodes[0].fabric_ports[0].gpu"]


def test_without_a_server_model_nothing_is_assumed() -> None:
    """The example HGX nodes name no server model: their ports are not checked against any topology."""
    assert _paths(copy.deepcopy(PROD)) == []
