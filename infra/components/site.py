"""`Site`: the root component. Converts the plan into component args — the one place that does."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pulumi
from pulumi_command import local

from infra.bundle.lock import Lock
from infra.components import commands
from infra.components.desired import (
    HOST_VARS,
    Fingerprints,
    HostVars,
    desired_state,
    provision_trigger,
)
from infra.components.facts import parse_json_stdout
from infra.components.node import GpuNode, GpuNodeArgs
from infra.components.segment import AirGappedSegment, AirGappedSegmentArgs, Segment, SegmentArgs
from infra.components.service import InferenceService, InferenceServiceArgs
from infra.plan.fabric import endpoint_nodes
from infra.plan.node import NodePlan, SitePlan
from infra.provision.service import served_digest

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
    lock: Lock | None = None
    """The stack's lock (its OS images: what a provisioning service serves), None without one."""


# The Python SDK checks each dependency it declares for a cycle by walking every transitive dependency with
# a recursive generator (pulumi/runtime/resource_cycle_breaker.py `_with_transitive_deps`): one frame per step
# of the longest path. A segment's rolling order is such a path, 3 steps per batch (batch converge → guard →
# validate → previous batch converge). Measured under mocks with the default limit of 1,000 frames: 250
# batches in one segment (path of 752) run, 330 fail with RecursionError. Keep ~100 frames for the program's
# own stack (the SDK's asyncio loop and ours: ~25 seen) and refuse more batches with the fix named.
STEPS_PER_BATCH = 3
STACK_FRAMES_KEPT = 100


def max_batches_per_segment() -> int:
    """Most rolling batches one segment may have before the SDK's dependency walk exceeds the recursion limit."""
    return (sys.getrecursionlimit() - STACK_FRAMES_KEPT) // STEPS_PER_BATCH


def _check_depth(plan: SitePlan) -> None:
    limit = max_batches_per_segment()
    counts: dict[str, int] = {}
    for batch in plan.batches():
        counts[batch[0].segment.name] = counts.get(batch[0].segment.name, 0) + 1
    for seg, n in counts.items():
        if n > limit:
            size = plan.site.rollout.batch_size
            raise pulumi.RunError(
                f"segments[{seg}]: {n} rolling batches (rollout.batch_size={size}) in one segment; the Pulumi "
                f"program supports {limit} per segment (the Python SDK's recursive dependency walk fails "
                f"beyond): raise rollout.batch_size to at least {-(-n * size // limit)}, or split the segment")


class Site(pulumi.ComponentResource):
    """A whole GPU site: segments (with mirrors), nodes in rolling batches, inference services."""

    segments: dict[str, Segment]
    nodes: dict[str, GpuNode]
    services: dict[str, InferenceService]
    node_facts: pulumi.Output[dict[str, Any]]
    mirror_status: pulumi.Output[dict[str, Any]]
    endpoints: dict[str, list[str]]

    def __init__(self, name: str, args: SiteArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        _check_depth(args.plan)  # before registering anything: refuse a graph the SDK cannot walk
        super().__init__("gpufleet:site:Site", name, None, opts)
        site = args.plan.site
        self._secrets: dict[str, pulumi.Output[str]] = {}
        self.segments = {}
        for seg in site.segments:
            # A segment's provisioning service: re-run when what it serves changes (stack, lock's images, roles).
            prov: dict[str, Any] = {}
            if seg.provisioning is not None:
                prov = {"provisioning_command": commands.provision_converge(args.stack, seg.name),
                        "provisioning_trigger": {"host": seg.provisioning.host,
                                                 "served": served_digest(site, seg, args.lock,
                                                                         args.fingerprints.role_tree)},
                        "provisioning_dir": args.workdir}
            if seg.airgapped and seg.mirror:
                self.segments[seg.name] = AirGappedSegment(seg.name, AirGappedSegmentArgs(
                    cidr=str(seg.cidr),
                    **prov,
                    mirror=seg.mirror,
                    import_command=commands.mirror_import(args.stack, seg.mirror, args.bundle_dir),
                    status_command=commands.mirror_status(args.stack, seg.mirror),
                    workdir=args.workdir,
                    import_trigger={"mirror": seg.mirror, "lock": args.fingerprints.lock or "none"},
                ), pulumi.ResourceOptions(parent=self))
            else:
                self.segments[seg.name] = Segment(seg.name, SegmentArgs(cidr=str(seg.cidr), **prov),
                                                  pulumi.ResourceOptions(parent=self))

        self.nodes = {}
        self.guards: dict[tuple[str, int], local.Command] = {}
        self.batch_steps: dict[tuple[str, int], local.Command] = {}
        # Dependencies stay inside one segment: a batch waits for its nodes' SSH and the guard after the
        # segment's previous batch, nothing else. How many batches of different segments run at once
        # (rollout.max_parallel_batches) and how many nodes reinstall at once (max_parallel_reimage) are
        # bounded by slots on the controller that the steps' commands take, not by chains through the graph:
        # the SDK walks every dependency path recursively on each dependency it declares, so a chain across
        # the site failed with RecursionError at 5,000 nodes and made the program's time grow quadratically.
        previous: dict[str, tuple[int, list[GpuNode]]] = {}  # segment → its previous batch (number, nodes)
        for batch in args.plan.batches():
            seg_name = batch[0].segment.name
            earlier = previous.get(seg_name)
            after = [self._guard(seg_name, *earlier, args)] if earlier else []
            current = [self._node(p, args) for p in batch]
            self._batch(seg_name, batch, current, after, args)
            previous[seg_name] = (batch[0].batch, current)
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
        # Per node, what its batch's converge said (status, changed, failed tasks): with a tolerated failure
        # (rollout.max_failures) the batch step succeeds, and this output is where the failed node shows.
        self.converge_status = pulumi.Output.all(*[b.stdout for b in self.batch_steps.values()]).apply(
            _per_node_status)
        self.mirror_status = pulumi.Output.all(
            **{k: s.status for k, s in self.segments.items() if isinstance(s, AirGappedSegment)})
        self.register_outputs({"nodes": self.node_facts, "endpoints": self.endpoints,
                               "mirrors": self.mirror_status, "converge": self.converge_status})

    def _guard(self, segment: str, k: int, batch: list[GpuNode], args: SiteArgs) -> local.Command:
        # Between batch K and K+1 of a segment: after batch K validated (or recorded a tolerated
        # failure), `rollout-guard` counts the segment's failed nodes; over rollout.max_failures it
        # fails, and Pulumi starts nothing that depends on it — the later batches of the segment.
        validates = [n.validate for n in batch]
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

    def _batch(self, segment: str, plans: list[NodePlan], nodes: list[GpuNode], after: list[local.Command],
               args: SiteArgs) -> local.Command:
        # One converge step per segment batch: one `gpufleet converge` (one Ansible job, streamed to the
        # segment's execution host when it has one) over the batch's nodes, after their SSH answers and
        # after the guard of the segment's previous batch. Its triggers are the nodes' converge-step ids:
        # a node whose desired state changed gets a new id (its own step is replaced, shown under that
        # node), which re-runs this step; the other nodes' steps are untouched and their converge is a no-op.
        k = plans[0].batch
        step = local.Command(
            f"{segment}-batch{k}-converge",
            create=commands.batch_converge(args.stack, [p.hostname for p in plans]),
            dir=args.workdir,
            # Else pulumi-command puts the previous stdout into the environment: "argument list too long"
            # on large converge output (pulumi-command #285, #552).
            add_previous_output_in_env=False,
            triggers=[n.converge.id for n in nodes],
            opts=pulumi.ResourceOptions(parent=self.segments[segment],
                                        depends_on=[*(n.converge for n in nodes), *after]),
        )
        for n in nodes:
            n.converged_by(step)
        self.batch_steps[(segment, k)] = step
        return step

    def _ready(self, p: NodePlan) -> list[pulumi.Resource]:
        # A node installed from an image is reinstalled through its segment's provisioning service: its BMC
        # step (the reimage) waits for that service to serve the stack's current files.
        seg = self.segments[p.segment.name]
        if p.node.image is not None and seg.provisioning is not None:
            return [*seg.ready, seg.provisioning]
        return list(seg.ready)

    def _secret(self, args: SiteArgs, key: str) -> pulumi.Output[str]:
        # One Output per config key: 1,000 nodes sharing `bmcPassword` read it once.
        if key not in self._secrets:
            self._secrets[key] = pulumi.Output.secret(args.secret(key))
        return self._secrets[key]

    def _node(self, p: NodePlan, args: SiteArgs) -> GpuNode:
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
            ready=self._ready(p),
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



def _per_node_status(stdouts: list[str | None]) -> dict[str, Any]:
    """Each node's entry of its batch's `gpufleet converge --json` (status, changed, failures)."""
    out: dict[str, Any] = {}
    for stdout in stdouts:
        data = parse_json_stdout(stdout, "converge")
        nodes = data.get("nodes")
        if not isinstance(nodes, list):
            continue  # no JSON (a preview, or a failed run): the records and the step's error say more
        for n in nodes:
            if isinstance(n, dict) and isinstance(n.get("hostname"), str):
                out[n["hostname"]] = {"status": n.get("status"), "changed": n.get("changed", 0),
                                      "failures": [f"{f.get('task', '?')}: {str(f.get('msg', ''))[:200]}"
                                                   for f in n.get("failures", []) if isinstance(f, dict)]}
    return out
