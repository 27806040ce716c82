"""Converge, check and validate nodes with Ansible: the library behind `gpufleet converge | check | validate-node`.

Wave by wave per segment (`infra.ansible.rollout`), every node's role variables checked against the roles'
argument specs before any host is touched. Used by the CLI, by `rebuild`/`drift` and by the benchmarks.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

from infra import ssh
from infra.ansible import rolespecs
from infra.ansible.inventory import GROUP, build_inventory, subset
from infra.ansible.locks import NODE_GRACE_S, node_locks
from infra.ansible.rollout import NodeOutcome, RolloutResult, roll
from infra.ansible.runner import Progress, RunResult, run_playbook
from infra.ansible.settings import Tuning
from infra.model.site import Site
from infra.plan.node import NodePlan, SitePlan
from infra.plan.nodestate import NOT_A_CONVERGE_FAILURE, NodeState, compare, failures
from infra.ssh import SshSettings

# SecretRef convention (`GPUFLEET_SECRET_<KEY>`): the registry token of the inference images.
REGISTRY_TOKEN_ENV = "GPUFLEET_SECRET_REGISTRY_TOKEN"


def select(plan: SitePlan, nodes: Sequence[str] | None, segment: str | None) -> list[NodePlan]:
    """Nodes named by --node/--segment (all when neither); KeyError/ValueError name what is known."""
    if nodes:
        return [plan.node(n) for n in nodes]
    if segment:
        chosen = [n for n in plan.nodes if n.segment.name == segment]
        if not chosen:
            known = sorted({n.segment.name for n in plan.nodes})
            raise ValueError(f"no nodes on segment {segment!r}; segments with nodes: {', '.join(known)}")
        return chosen
    return list(plan.nodes)


def secrets_from_env() -> dict[str, str]:
    """Secret role variables from the environment (values never printed)."""
    token = os.environ.get(REGISTRY_TOKEN_ENV)
    return {"inference_server_registry_token": token} if token else {}


def converge(
    plan: SitePlan,
    nodes: Sequence[NodePlan],
    *,
    check: bool = False,
    tuning: Tuning = Tuning.TUNED,
    progress: bool = False,
    playbook: str = "node.yml",
    wait_lock: float = 0.0,
) -> RolloutResult:
    """Converge (or check) nodes wave by wave; the function the CLI and the benchmark harness call.

    `plan` is the site's plan, made once by the command; `nodes` are plans from it. A run that changes nodes
    first takes their locks (`infra.ansible.locks`), waiting up to `wait_lock` seconds for another run to
    finish (else `LockBusy`, exit 5); check mode takes none.
    """
    site = plan.site
    # Every selected node's host variables, built once: checked against the roles' argument specs before
    # any host is touched (node.yml includes the roles with rolespec_validate: false), then each wave's
    # inventory reuses them.
    inventory = build_inventory(site, nodes)
    rolespecs.check_inventory(inventory, GROUP)
    settings = SshSettings.of(site)
    secrets = secrets_from_env()
    # The node-side lock's record of this run and how long it waits (the first task of node.yml reads it).
    lock_vars: dict[str, Any] = {}

    def run(batch: list[NodePlan]) -> RunResult:
        hosts = [n.hostname for n in batch]
        result = run_playbook(
            playbook,
            subset(inventory, hosts),
            hosts,
            ssh=settings,
            check=check,
            tuning=tuning,
            secrets=secrets,
            progress=Progress(hosts) if progress else None,
            label="check" if check else "converge",
            extravars=lock_vars,
        )
        if not check:
            for n in batch:
                judge(n, result)
        return result

    # Check mode changes nothing, so there is nothing to roll: every node is looked at in one run.
    max_failures = len(nodes) if check else site.rollout.max_failures
    if check:
        result = run(list(nodes))
        out = []
        for n in nodes:
            h = result.hosts.get(n.hostname)
            status = "ok" if h and h.succeeded else ("unreachable" if h and h.unreachable else "failed")
            out.append(
                NodeOutcome(
                    n.hostname, n.segment.name, n.batch, status, h.changed if h else 0, h.as_dict() if h else {}
                )
            )
        return RolloutResult(nodes=out, runs=[result], stopped_segments={})
    with node_locks(site.name, [n.hostname for n in nodes], wait_s=wait_lock) as holder:
        lock_vars["gpufleet_run_lock"] = {"holder": holder.as_vars(), "wait": int(max(wait_lock, NODE_GRACE_S))}
        return roll(plan, nodes, run, max_failures=max_failures)


HOLD_SUFFIX = ":hold"
VERDICT_TASK = "gpu_validate : compare the node with its plan"


def judge(plan: NodePlan, result: RunResult) -> None:
    """Fail a node whose probed state differs from its plan (infra.plan.nodestate.compare, as validate-node).

    The play's gpu_validate role only reads the node; the verdict is the controller's, so converge,
    validate-node and drift can never disagree on what differs. Files and a pending reboot do not fail a
    converge (see `NOT_A_CONVERGE_FAILURE`).
    """
    h = result.hosts.get(plan.hostname)
    data = h.facts.get("gpu_validate_result") if h is not None else None
    if h is None or not h.succeeded or not isinstance(data, dict):
        return
    wrong = failures(compare(plan, NodeState.from_json(plan.hostname, data)), NOT_A_CONVERGE_FAILURE)
    if wrong:
        h.failed += 1
        h.failures.append({"task": VERDICT_TASK, "msg": "; ".join(str(i) for i in wrong)})


def check_report(result: RolloutResult) -> dict[str, Any]:
    """Per node: would anything change, which packages and files, would a reboot be required."""
    nodes = []
    for n in result.nodes:
        d = n.detail
        changes = d.get("package_changes") or {}
        # roles/pinned_packages publishes the holds check mode would restore under `<role>:hold`.
        packages = sorted({p for k, v in changes.items() if not k.endswith(HOLD_SUFFIX) for p in v})
        holds = sorted({p for k, v in changes.items() if k.endswith(HOLD_SUFFIX) for p in v})
        stale = (d.get("facts") or {}).get("nvidia_driver_stale_packages") or []
        nodes.append(
            {
                "hostname": n.hostname,
                "segment": n.segment,
                "status": n.status,
                "changes": n.changed,
                "changed_tasks": d.get("changed_tasks", []),
                "packages": packages,
                "holds": holds,
                "packages_removed": sorted(stale),
                "files": d.get("files_changed", []),
                "reboot_required": bool(d.get("reboot_required")),
                "reboot_pending": bool(d.get("reboot_pending")),
                "reboot_reason": str(d.get("reboot_reason") or ""),
                "failures": d.get("failures", []),
            }
        )
    return {"drift": any(x["changes"] for x in nodes), "succeeded": result.succeeded, "nodes": nodes}


def wait_ssh(site: Site, node: NodePlan, timeout: float) -> tuple[bool, float, str]:
    """Wait for SSH with the pinned key (infra.ssh.wait); (ok, seconds, error) — a key mismatch ends at once."""
    start = time.monotonic()
    try:
        seconds = ssh.wait(SshSettings.of(site), str(node.node.address), user=node.node.ssh_user, timeout=timeout)
    except ssh.SshError as exc:
        return False, time.monotonic() - start, exc.detail
    return True, seconds, ""
