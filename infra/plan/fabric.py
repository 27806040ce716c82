"""What the GPU fabric means for one node: its RDMA ports, QoS, subnet manager duty and the pairs to test.

Pure: derived from the validated site only. The `rdma` role gets these as variables (`rolevars`), the
pairwise test (`gpufleet fabric test`) and `validate-node` read the same objects, so a port's expected
speed or address is stated in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from typing import Any

from infra.model.site import Fabric, FabricPort, FabricType, InferenceService, Node, RoceQos, Site

DEFAULT_BANDWIDTH_FRACTION = 0.8
"""Without `min_bandwidth_gbps`, a pair passes at 80 % of the declared port speed: what a healthy link
reaches with one queue pair and large messages (ib_write_bw's default test is one QP)."""


@dataclass(frozen=True)
class PortPlan:
    """One fabric port of a node, with the settings of the fabric it is cabled to."""

    fabric: Fabric
    port: FabricPort

    @property
    def interface(self) -> dict[str, str]:
        """How the port is found on the node: `{"pci": …}`, `{"mac": …}` or `{"netdev": …}`."""
        p = self.port
        if p.pci is not None:
            return {"pci": p.pci}
        if p.mac is not None:
            return {"mac": p.mac}
        return {"netdev": p.netdev or ""}

    def as_vars(self) -> dict[str, Any]:
        """Role variables of the port (plain JSON values only)."""
        f, p = self.fabric, self.port
        roce = f.type is FabricType.ROCE
        qos = (f.qos or RoceQos()) if roce else None  # RoCE without `qos`: the model's defaults
        dscp = qos.dscp if qos else -1
        prio = qos.pfc_priority if qos else -1
        return {
            "fabric": f.name,
            "type": f.type.value,
            "pci": p.pci or "",
            "mac": p.mac or "",
            "netdev": p.netdev or "",
            "address": f"{p.address}/{f.cidr.prefixlen}",
            "speed_gbps": p.speed_gbps,
            "mtu": f.mtu,
            "vlan": f.vlan or 0,
            "partition_key": f.partition_key or "",
            "soft_roce": p.soft_roce,
            # RDMA-CM's default ToS byte: DSCP in the upper six bits (RFC 2474); -1: not RoCE.
            "roce_tos": dscp << 2 if dscp >= 0 else -1,
            "pfc_priority": prio,
            # PFC is a NIC/switch feature: a Soft-RoCE port (any Ethernet device) has none to set.
            "pfc": roce and not p.soft_roce,
        }


def node_ports(site: Site, node: Node) -> tuple[PortPlan, ...]:
    """The node's fabric ports on declared fabrics, in stack order."""
    fabrics = site.fabrics_by_name
    return tuple(PortPlan(fabrics[p.fabric], p) for p in node.fabric_ports if p.fabric in fabrics)


def subnet_manager_of(site: Site, node: Node) -> tuple[Fabric, ...]:
    """The InfiniBand fabrics this node runs opensm for."""
    return tuple(f for f in site.fabrics if f.type is FabricType.INFINIBAND and f.subnet_manager == node.hostname)


def bandwidth_threshold_gbps(fabric: Fabric, speed_gbps: int) -> float:
    """The bandwidth a pair of ports must reach: the stack's threshold, or 80 % of the port speed."""
    return fabric.min_bandwidth_gbps or speed_gbps * DEFAULT_BANDWIDTH_FRACTION


@dataclass(frozen=True)
class PortPair:
    """Two ports of one fabric on different nodes: one pairwise test (server on `a`, client on `b`)."""

    fabric: Fabric
    a: tuple[str, FabricPort]
    b: tuple[str, FabricPort]

    @property
    def threshold_gbps(self) -> float:
        """Minimum bandwidth for this pair (the slower port decides)."""
        return bandwidth_threshold_gbps(self.fabric, min(self.a[1].speed_gbps, self.b[1].speed_gbps))

    @property
    def label(self) -> str:
        """`node-a:10.0.0.1 → node-b:10.0.0.2 (fabric)` for reports."""
        return f"{self.a[0]}:{self.a[1].address} ↔ {self.b[0]}:{self.b[1].address} ({self.fabric.name})"


def port_pairs(site: Site, fabric_name: str | None = None) -> list[PortPair]:
    """The pairwise tests of each fabric: every pair of nodes once, on their first port of that fabric.

    All-pairs over nodes (not ports) keeps a 64-node fabric at 2,016 short tests; rails of a multi-port
    node are exercised by `validate-node`'s link checks, not by a bandwidth test per rail.
    """
    out: list[PortPair] = []
    for f in site.fabrics:
        if fabric_name is not None and f.name != fabric_name:
            continue
        first: dict[str, FabricPort] = {}
        for n in site.nodes:
            for p in n.fabric_ports:
                if p.fabric == f.name and n.hostname not in first:
                    first[n.hostname] = p
        for (ha, pa), (hb, pb) in combinations(first.items(), 2):
            out.append(PortPair(f, (ha, pa), (hb, pb)))
    return out


@dataclass(frozen=True)
class SpanGroup:
    """One instance of a service across nodes: the head serves the endpoint, the workers hold layers."""

    service: InferenceService
    fabric: Fabric
    head: str
    workers: tuple[tuple[str, str], ...]
    """(hostname, fabric address) of each worker, in stack order."""
    head_address: str = ""
    """The head's fabric address (vLLM: where rank 0 opens the group's torch.distributed store)."""

    @property
    def nnodes(self) -> int:
        """Nodes of the instance (vLLM: one pipeline stage each)."""
        return 1 + len(self.workers)

    def rank_of(self, hostname: str) -> int:
        """The node's rank: 0 for the head, then the workers in stack order."""
        if hostname == self.head:
            return 0
        return 1 + next(i for i, (h, _) in enumerate(self.workers) if h == hostname)

    def fabric_address_of(self, hostname: str) -> str:
        """The node's fabric address in this group (head or worker)."""
        return self.head_address if hostname == self.head else self.address_of(hostname)

    def role_of(self, hostname: str) -> str:
        """`head`, `worker` or "" (not in the group)."""
        if hostname == self.head:
            return "head"
        return "worker" if any(h == hostname for h, _ in self.workers) else ""

    def address_of(self, hostname: str) -> str:
        """A worker's fabric address (where its RPC backend listens)."""
        return next(a for h, a in self.workers if h == hostname)


def serves_endpoint(span: SpanGroup | None, hostname: str) -> bool:
    """Does the service answer HTTP on this node: every node of a replicated service, only a group's head.

    A worker of a spanning service runs only its RPC backend on the fabric; benches, probes, scrape targets
    and the plan's endpoints name the head alone (its endpoint is the service's).
    """
    return span is None or span.role_of(hostname) != "worker"


def endpoint_nodes(site: Site, service: InferenceService) -> list[str]:
    """The nodes where a service answers HTTP, in stack order (a spanning service: its head)."""
    span = span_group(site, service)
    return [h for h in dict.fromkeys(service.nodes) if serves_endpoint(span, h)]


def span_group(site: Site, service: InferenceService) -> SpanGroup | None:
    """The group of a service with `span_nodes` (None otherwise or when its nodes share no fabric).

    The fabric is the first, in stack order, that every node of the service has a port on; each worker is
    reached at its first port of that fabric.
    """
    if not service.span_nodes:
        return None
    hosts = list(dict.fromkeys(service.nodes))
    nodes = site.nodes_by_name
    if len(hosts) < 2 or any(h not in nodes for h in hosts):
        return None
    for f in site.fabrics:
        ports = {h: next((p for p in nodes[h].fabric_ports if p.fabric == f.name), None) for h in hosts}
        if all(p is not None for p in ports.values()):
            workers = tuple((h, str(p.address)) for h, p in ports.items() if h != hosts[0] and p is not None)
            head = ports[hosts[0]]
            return SpanGroup(service, f, hosts[0], workers, str(head.address) if head is not None else "")
    return None
