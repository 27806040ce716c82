"""Site → per-node plan: what each node should be. Pure: no I/O except hashing the role tree."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from infra.model import sizing
from infra.model.catalogue import ResolvedCatalogue, resolve
from infra.model.site import (
    Engine,
    InferenceService,
    Mirror,
    Node,
    NodeRole,
    RebootPolicy,
    Segment,
    Site,
    SoftwareProfile,
)
from infra.model.sizing import deployment, model_arch
from infra.plan.fabric import PortPlan, SpanGroup, node_ports, span_group, subnet_manager_of
from infra.plan.packages import Component, Package, packages_for

# Ansible roles in converge order: drivers before runtimes before inference.
ROLE_ORDER = (
    "base",
    "network",
    "airgap_firewall",
    "nvidia_driver",
    "rdma",  # after the driver: nvidia-peermem ships with it
    "cuda_toolkit",
    "container_runtime",
    "nvidia_container_toolkit",
    "inference_server",
    "monitoring",
    "gpu_validate",
)


@dataclass(frozen=True)
class ServicePlan:
    """One inference service as deployed on one node."""

    service: InferenceService
    vram: sizing.VramPlan | None
    span: SpanGroup | None = None
    """The group when the service spans nodes (this node is its head or one of its workers)."""

    @property
    def name(self) -> str:
        """Service name."""
        return self.service.name


@dataclass(frozen=True)
class NodePlan:
    """The desired state of one node."""

    node: Node
    segment: Segment
    mirror: Mirror | None
    profile_name: str
    profile: SoftwareProfile
    packages: tuple[Package, ...]
    roles: tuple[str, ...]
    reboot_policy: RebootPolicy
    services: tuple[ServicePlan, ...]
    gpu_product_name: str
    gpu_memory_mib: int
    batch: int = 0
    extras: dict[str, Any] = field(default_factory=dict)
    fabric_ports: tuple[PortPlan, ...] = ()
    """RDMA ports with their fabrics' settings (empty: the node is on no fabric)."""
    subnet_manager_for: tuple[str, ...] = ()
    """InfiniBand fabrics this node runs opensm for."""

    @property
    def hostname(self) -> str:
        """Node hostname."""
        return self.node.hostname

    def packages_of(self, component: Component) -> list[Package]:
        """Pinned packages of one component."""
        return [p for p in self.packages if p.component is component]


class UnknownNodeError(KeyError):
    """A node name the site does not have; the CLI reports it as invalid input (exit 2)."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class SitePlan:
    """Plans of every node, in converge order (segment, then batch)."""

    site: Site
    nodes: tuple[NodePlan, ...]

    def node(self, hostname: str) -> NodePlan:
        """The plan of one node; KeyError naming the known hosts otherwise."""
        for n in self.nodes:
            if n.hostname == hostname:
                return n
        raise UnknownNodeError(
            f"no node {hostname!r} in site {self.site.name!r}; known: " + ", ".join(n.hostname for n in self.nodes)
        )

    def batches(self, segment: str | None = None) -> list[list[NodePlan]]:
        """Rolling batches, per segment, in order."""
        out: dict[tuple[str, int], list[NodePlan]] = {}
        for n in self.nodes:
            if segment is None or n.segment.name == segment:
                out.setdefault((n.segment.name, n.batch), []).append(n)
        return list(out.values())


def _roles_for(
    node: Node, segment: Segment, services: list[ServicePlan], profile: SoftwareProfile, *, fabric: bool = False
) -> tuple[str, ...]:
    wanted = {
        "base",
        "network",
        "nvidia_driver",
        "cuda_toolkit",
        "container_runtime",
        "nvidia_container_toolkit",
        "gpu_validate",
    }
    if segment.airgapped:
        wanted.add("airgap_firewall")
    if services:
        wanted.add("inference_server")
    if NodeRole.MONITORING in node.roles:
        wanted.add("monitoring")
    if fabric:
        wanted.add("rdma")
    return tuple(r for r in ROLE_ORDER if r in wanted)


def plan_node(site: Site, node: Node, cat: ResolvedCatalogue | None = None) -> NodePlan:
    """The plan of one node of a validated site."""
    cat = cat or resolve(site.catalogue)
    segment = site.segments_by_name[node.segment]
    mirror = site.mirror(segment.mirror)
    profile_name = node.profile or site.default_profile
    profile = site.profiles[profile_name]
    services = []
    for svc in site.services:
        if node.hostname in svc.nodes:
            arch = model_arch(svc, cat)
            fit = None
            if arch is not None and svc.engine is not Engine.LLAMACPP:
                fit = sizing.plan(arch, deployment(svc, node, cat))
            services.append(ServicePlan(svc, fit, span_group(site, svc)))
    gpu = cat.gpus[node.gpu.model]
    ports = node_ports(site, node)
    sm = tuple(f.name for f in subnet_manager_of(site, node))
    return NodePlan(
        node=node,
        segment=segment,
        mirror=mirror,
        profile_name=profile_name,
        profile=profile,
        packages=tuple(
            packages_for(
                profile,
                node.os,
                fabric_manager=node.gpu.nvswitch,
                monitoring=NodeRole.MONITORING in node.roles,
                rdma=bool(ports),
                subnet_manager=bool(sm),
            )
        ),
        roles=_roles_for(node, segment, services, profile, fabric=bool(ports)),
        reboot_policy=site.reboot.policy,
        services=tuple(services),
        gpu_product_name=gpu.product_name,
        gpu_memory_mib=gpu.smi_memory_mib,
        fabric_ports=ports,
        subnet_manager_for=sm,
    )


def plan_site(site: Site) -> SitePlan:
    """Plans for every node, with rolling batch numbers per segment."""
    cat = resolve(site.catalogue)
    seg_order = {s.name: i for i, s in enumerate(site.segments)}
    counters: dict[str, int] = {}
    plans = []
    # Workers of a service that spans nodes go first in their segment: their RPC backends are up (or come up
    # in the same batch) when the head starts and is health-checked.
    workers = {h for svc in site.services if svc.span_nodes for h in list(dict.fromkeys(svc.nodes))[1:]}
    for node in sorted(site.nodes, key=lambda n: (seg_order[n.segment], n.hostname not in workers)):
        idx = counters.get(node.segment, 0)
        counters[node.segment] = idx + 1
        p = plan_node(site, node, cat)
        plans.append(NodePlan(**{**p.__dict__, "batch": idx // site.rollout.batch_size}))
    return SitePlan(site, tuple(plans))


@cache
def tree_hash(root: Path, parts: tuple[str, ...] = ("roles", "playbooks")) -> str:
    """sha256 over every file under the given project folders (paths and bytes), in sorted order."""
    h = hashlib.sha256()
    for part in parts:
        base = root / part
        if not base.exists():
            continue
        for f in sorted(p for p in base.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
            h.update(str(f.relative_to(root)).encode() + b"\0")
            h.update(f.read_bytes() + b"\0")
    return h.hexdigest()


def content_hash(host_vars: dict[str, Any], role_tree: str, lock: str = "") -> str:
    """Hash of everything that affects a node: role/playbook tree, its variables and the lock."""
    h = hashlib.sha256()
    h.update(role_tree.encode())
    h.update(json.dumps(host_vars, sort_keys=True, default=str).encode())
    h.update(lock.encode())
    return h.hexdigest()
