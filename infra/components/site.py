"""`Site`: the root component. Converts the plan into component args — the one place that does."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pulumi

from infra.components import commands
from infra.components.desired import (
    HOST_VARS,
    Fingerprints,
    HostVars,
    converge_trigger,
    provision_trigger,
)
from infra.components.node import GpuNode, GpuNodeArgs
from infra.components.segment import AirGappedSegment, AirGappedSegmentArgs, Segment, SegmentArgs
from infra.components.service import InferenceService, InferenceServiceArgs
from infra.plan.node import NodePlan, SitePlan

SecretResolver = Callable[[str], pulumi.Output[str]]


@dataclass(frozen=True)
class SiteArgs:
    """A planned site and how this program run reaches it."""

    plan: SitePlan
    """Per-node plans (`infra.plan.node.plan_site`)."""
    stack: str
    """Stack name passed to every command (`--stack`)."""
    workdir: str
    """Project directory: the commands' `dir`."""
    fingerprints: Fingerprints
    """Role-tree and lock hashes, computed once."""
    secret: SecretResolver
    """Reads a `config:` SecretRef as a Pulumi secret (`Config.require_secret`)."""
    bundle_dir: str = "bundles"
    """Air-gap bundle directory (`gpufleet bundle build --out`), relative to the project dir or absolute."""
    reimage_on_create: bool = True
    """Creating (or replacing) a node's BMC step PXE-reinstalls it; false adopts installed nodes as they are."""
    host_vars: HostVars = HOST_VARS
    """The node's Ansible host variables (hashed into its converge trigger)."""


class Site(pulumi.ComponentResource):
    """A whole GPU site: segments (with mirrors), nodes in rolling batches, inference services."""

    segments: dict[str, Segment]
    nodes: dict[str, GpuNode]
    services: dict[str, InferenceService]
    node_facts: pulumi.Output[dict[str, Any]]
    mirror_status: pulumi.Output[dict[str, Any]]
    endpoints: dict[str, list[str]]

    def __init__(self, name: str, args: SiteArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("gpufleet:site:Site", name, None, opts)
        site = args.plan.site
        self._secrets: dict[str, pulumi.Output[str]] = {}
        self.segments = {}
        for seg in site.segments:
            if seg.airgapped and seg.mirror:
                self.segments[seg.name] = AirGappedSegment(seg.name, AirGappedSegmentArgs(
                    cidr=str(seg.cidr),
                    mirror=seg.mirror,
                    import_command=commands.mirror_import(args.stack, seg.mirror, args.bundle_dir),
                    status_command=commands.mirror_status(args.stack, seg.mirror),
                    workdir=args.workdir,
                    import_trigger={"mirror": seg.mirror, "lock": args.fingerprints.lock or "none"},
                ), pulumi.ResourceOptions(parent=self))
            else:
                self.segments[seg.name] = Segment(seg.name, SegmentArgs(cidr=str(seg.cidr)),
                                                  pulumi.ResourceOptions(parent=self))

        self.nodes = {}
        previous: dict[str, list[GpuNode]] = {}  # segment → nodes of its previous batch
        for batch in args.plan.batches():
            seg_name = batch[0].segment.name
            after = [n.validate for n in previous.get(seg_name, [])]
            current = [self._node(p, args, after) for p in batch]
            previous[seg_name] = current

        self.services = {}
        self.endpoints = {}
        for svc in site.services:
            serving = [self.nodes[h] for h in svc.nodes]
            endpoints = [f"http://{args.plan.node(h).node.address}:{svc.port}/v1" for h in svc.nodes]
            self.endpoints[svc.name] = endpoints
            self.services[svc.name] = InferenceService(svc.name, InferenceServiceArgs(
                health_command=commands.service_health(args.stack, svc.name),
                workdir=args.workdir,
                trigger={"engine": svc.engine.value, "model": f"{svc.model.name}@{svc.model.revision}",
                         "image": svc.image or svc.wheel or "", "port": str(svc.port),
                         "nodes": ",".join(svc.nodes)},
                endpoints=endpoints,
                after=[n.validate for n in serving],
            ), pulumi.ResourceOptions(parent=self))

        self.node_facts = pulumi.Output.all(**{h: n.facts for h, n in self.nodes.items()})
        self.mirror_status = pulumi.Output.all(
            **{k: s.status for k, s in self.segments.items() if isinstance(s, AirGappedSegment)})
        self.register_outputs({"nodes": self.node_facts, "endpoints": self.endpoints,
                               "mirrors": self.mirror_status})

    def _secret(self, args: SiteArgs, key: str) -> pulumi.Output[str]:
        # One Output per config key: 1,000 nodes sharing `bmcPassword` read it once.
        if key not in self._secrets:
            self._secrets[key] = pulumi.Output.secret(args.secret(key))
        return self._secrets[key]

    def _node(self, p: NodePlan, args: SiteArgs, after: list[Any]) -> GpuNode:
        secret_env: dict[str, pulumi.Input[str]] = {}
        bmc = p.node.bmc
        if bmc is not None and bmc.password.config:
            # `env`/`file` refs are read by the CLI on the controller; only `config` refs pass through here.
            secret_env[commands.secret_env_name(bmc.password.config)] = self._secret(args, bmc.password.config)
        node = GpuNode(p.hostname, GpuNodeArgs(
            commands=commands.node_commands(
                args.stack, p.hostname, reimage_on_create=args.reimage_on_create,
                ssh_timeout_s=max(600, args.plan.site.reboot.timeout_s)),
            workdir=args.workdir,
            provision_trigger=provision_trigger(p),
            converge_trigger=converge_trigger(p, args.plan.site, args.fingerprints, args.host_vars),
            secret_env=secret_env,
            ready=self.segments[p.segment.name].ready,
            after=after,
        ), pulumi.ResourceOptions(
            # Nodes sit directly under the Site, so a node's URN (and its steps' URNs) do not depend on
            # its segment: moving a node to another segment re-converges it and never reinstalls it.
            parent=self,
            # Stacks created before that were parented under their segment. One alias per segment
            # (not only the current one) lets the engine find a node that moves in the same update
            # as it migrates; children inherit the matched alias (step_generator.generateAliases).
            aliases=[pulumi.Alias(parent=seg) for seg in self.segments.values()],
        ))
        self.nodes[p.hostname] = node
        return node
