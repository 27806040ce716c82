"""`Site`: the root component. Converts the plan into component args — the one place that does."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pulumi
from pulumi_command import local

from infra.components import commands
from infra.components.desired import (
    HOST_VARS,
    Fingerprints,
    HostVars,
    desired_state,
    provision_trigger,
)
from infra.components.node import GpuNode, GpuNodeArgs
from infra.components.segment import AirGappedSegment, AirGappedSegmentArgs, Segment, SegmentArgs
from infra.components.service import InferenceService, InferenceServiceArgs
from infra.plan.fabric import endpoint_nodes
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
        self.guards: dict[tuple[str, int], local.Command] = {}
        # Nodes in plan order; node i's BMC step waits for node i-N's SSH (N = max_parallel_reimage),
        # so at most N nodes are between power-on/reimage and SSH answering at any time.
        self._provisioning: list[GpuNode] = []
        previous: dict[str, list[tuple[NodePlan, GpuNode]]] = {}  # segment → its previous batch
        for batch in args.plan.batches():
            seg_name = batch[0].segment.name
            earlier = previous.get(seg_name)
            after = [self._guard(seg_name, earlier, args)] if earlier else []
            current = [(p, self._node(p, args, after)) for p in batch]
            previous[seg_name] = current

        self.services = {}
        self.endpoints = {}
        for svc in site.services:
            serving = [self.nodes[h] for h in svc.nodes]
            endpoints = [f"http://{args.plan.node(h).node.address}:{svc.port}/v1" for h in endpoint_nodes(site, svc)]
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

    def _guard(self, segment: str, batch: list[tuple[NodePlan, GpuNode]], args: SiteArgs) -> local.Command:
        # Between batch K and K+1 of a segment: after batch K validated (or recorded a tolerated
        # failure), `rollout-guard` counts the segment's failed nodes; over rollout.max_failures it
        # fails, and Pulumi starts nothing that depends on it — the later batches of the segment.
        k = batch[0][0].batch
        validates = [n.validate for _, n in batch]
        guard = local.Command(
            f"{segment}-batch{k}-guard",
            create=commands.rollout_guard(args.stack, segment, k),
            dir=args.workdir,
            add_previous_output_in_env=False,
            # The batch's validate ids: whenever one of its nodes re-converges, the guard runs again.
            triggers=[v.id for v in validates],
            opts=pulumi.ResourceOptions(parent=self.segments[segment], depends_on=validates),
        )
        self.guards[(segment, k)] = guard
        return guard

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
                ssh_timeout_s=max(600, args.plan.site.reboot.timeout_s),
                decommission_policy=args.plan.site.rollout.decommission.value,
                # Sorted, compact JSON of the validated node entry: the same node always gives the same
                # string (no spurious updates); its BMC password is only a reference here.
                node_json=json.dumps(p.node.model_dump(mode="json", exclude_none=True), sort_keys=True,
                                     separators=(",", ":"))),
            workdir=args.workdir,
            provision_trigger=provision_trigger(p),
            desired=desired_state(p, args.plan.site, args.fingerprints, args.host_vars),
            secret_env=secret_env,
            ready=self.segments[p.segment.name].ready,
            after=after,
            provision_after=self._provision_slot(args),
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
        self._provisioning.append(node)
        return node

    def _provision_slot(self, args: SiteArgs) -> list[pulumi.Resource]:
        # A chain per slot: the next node's BMC step starts only once the node N places earlier
        # answers SSH (a reinstall is over), so N chains run side by side, never more.
        width = args.plan.site.rollout.max_parallel_reimage
        if len(self._provisioning) < width:
            return []
        return [self._provisioning[-width].wait_ssh]
