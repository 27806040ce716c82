"""Converge, check and validate nodes with Ansible: the library behind `gpufleet converge | check | validate-node`.

Wave by wave per segment (`infra.ansible.rollout`), every node's role variables checked against the roles'
argument specs before any host is touched. Used by the CLI, by `rebuild`/`drift` and by the benchmarks.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from enum import StrEnum
from typing import Any

from infra import ssh
from infra.ansible import rolespecs
from infra.ansible.inventory import GROUP, build_inventory, subset
from infra.ansible.locks import NODE_GRACE_S, node_locks
from infra.ansible.remote.job import ExecHost, exec_host, run_playbook_remote
from infra.ansible.rollout import NodeOutcome, RolloutResult, roll
from infra.ansible.runner import Progress, RunInterrupted, RunResult, _StopOnSignal, run_playbook
from infra.ansible.settings import Tuning
from infra.model.site import Site
from infra.plan.node import NodePlan, SitePlan
from infra.plan.nodestate import NOT_A_CONVERGE_FAILURE, NodeState, compare, failures
from infra.ssh import SshSettings

# SecretRef convention (`GPUFLEET_SECRET_<KEY>`): the registry token of the inference images.
REGISTRY_TOKEN_ENV = "GPUFLEET_SECRET_REGISTRY_TOKEN"


class Execution(StrEnum):
    """Where a converge runs Ansible (`--execution`).

    `stack` follows each segment's `execution` (the controller for `host: local`, the default; else the
    segment's execution host). `local` runs every segment on the controller whatever the stack says
    (break-glass, and the side-by-side benchmark).
    """

    STACK = "stack"
    LOCAL = "local"


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
    execution: Execution = Execution.STACK,
) -> RolloutResult:
    """Converge (or check) nodes wave by wave; the function the CLI and the benchmark harness call.

    `plan` is the site's plan, made once by the command; `nodes` are plans from it. A run that changes nodes
    first takes their locks (`infra.ansible.locks`), waiting up to `wait_lock` seconds for another run to
    finish (else `LockBusy`, exit 5); check mode takes none. `execution`: each segment's execution host as
    the stack says, or everything on the controller.
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

    targets = {
        seg: None if execution is Execution.LOCAL else exec_host(site, seg) for seg in {n.segment.name for n in nodes}
    }
    label = "check" if check else "converge"

    def run_local(batch: list[NodePlan], shown: Progress | None) -> RunResult:
        hosts = [n.hostname for n in batch]
        return run_playbook(
            playbook,
            subset(inventory, hosts),
            hosts,
            ssh=settings,
            check=check,
            tuning=tuning,
            secrets=secrets,
            progress=shown,
            label=label,
            extravars=lock_vars,
        )

    def run_remote(
        target: ExecHost, batch: list[NodePlan], shown: Progress | None, cancel: threading.Event
    ) -> RunResult:
        hosts = [n.hostname for n in batch]
        return run_playbook_remote(
            playbook,
            subset(inventory, hosts),
            hosts,
            target=target,
            ssh_settings=settings,
            check=check,
            tuning=tuning,
            secrets=secrets,
            progress=shown,
            label=label,
            cancel=cancel,
            extravars=lock_vars,
        )

    def run(batch: list[NodePlan]) -> RunResult:
        shown = Progress([n.hostname for n in batch]) if progress else None
        result = run_split(batch, targets, run_local, run_remote, shown)
        if not check:
            # The controller's verdict on each node's probe, wherever its Ansible ran.
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


def run_split(
    batch: list[NodePlan],
    targets: dict[str, ExecHost | None],
    run_local: Callable[[list[NodePlan], Progress | None], RunResult],
    run_remote: Callable[[ExecHost, list[NodePlan], Progress | None, threading.Event], RunResult],
    shown: Progress | None,
) -> RunResult:
    """One wave: the controller's nodes in one local run, each execution host's nodes in one job, side by side.

    Remote jobs run in threads (the controller only relays their streams); the local run keeps the main
    thread, where SIGINT/SIGTERM/SIGHUP turn into a cancel of every part of the wave. The parts' results
    are folded into one, node by node.
    """
    local = [n for n in batch if targets.get(n.segment.name) is None]
    remote: dict[ExecHost, list[NodePlan]] = {}
    for n in batch:
        if (t := targets.get(n.segment.name)) is not None:
            remote.setdefault(t, []).append(n)
    if not remote:
        return run_local(local, shown)
    cancel = threading.Event()
    results: list[RunResult] = []
    errors: list[BaseException] = []

    def job(target: ExecHost, part: list[NodePlan]) -> None:
        try:
            results.append(run_remote(target, part, shown, cancel))
        except Exception as exc:  # reported below, after the other parts of the wave ended
            errors.append(exc)

    threads = [threading.Thread(target=job, args=(t, part), daemon=True) for t, part in remote.items()]
    for th in threads:
        th.start()
    # Remote parts only: no local ansible-playbook to pass a signal to (no process carries this id); a signal
    # only asks the remote jobs to stop.
    stop = None if local else _StopOnSignal(run_id=f"remote-only-{os.getpid()}-{time.monotonic_ns()}")
    try:
        if local:
            results.append(run_local(local, shown))
        while any(th.is_alive() for th in threads):
            if stop is not None and stop.requested():
                cancel.set()
            for th in threads:
                th.join(timeout=0.2)
    except RunInterrupted:
        cancel.set()
        for th in threads:
            th.join()
        raise
    finally:
        if stop is not None:
            stop.restore()
    if errors:
        raise errors[0]
    merged = merge_results(results)
    if stop is not None and stop.signal is not None:
        hosts = ", ".join(n.hostname for n in batch)
        raise RunInterrupted(
            f"stopped on {stop.signal.name}: the nodes of this batch ({hosts}) may be mid-change and no later "
            f"batch was started. Run the same command again to finish. Events: {merged.run_dir}"
        )
    return merged


def merge_results(results: Sequence[RunResult]) -> RunResult:
    """The parts of one wave as one result: every host's own outcome, the worst status and exit code."""
    first = results[0]
    failed = [r for r in results if r.status != "successful"]
    return RunResult(
        playbook=first.playbook,
        check=first.check,
        status=failed[0].status if failed else first.status,
        rc=max(r.rc for r in results),
        duration_s=max(r.duration_s for r in results),
        hosts={h: res for r in results for h, res in r.hosts.items()},
        run_dir=" ".join(r.run_dir for r in results),
    )


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
