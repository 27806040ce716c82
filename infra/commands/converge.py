"""`gpufleet converge | check | validate-node | wait-ssh`: the Ansible side of a node's lifecycle."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from infra.ansible.converge import VERDICT_TASK, Execution, check_report, converge, select, wait_ssh
from infra.ansible.rollout import NodeOutcome, RolloutResult
from infra.ansible.settings import Tuning
from infra.commands.exechost import lock_file_of, require_runtime
from infra.commands.hostplay import provisioning_notes
from infra.commands.site import add_stack_args, site_from_args
from infra.components.outcomes import (
    RECORDS_ENV,
    RecordError,
    batch_slot,
    record_step,
    release_reimage_lease,
    take_reimage_lease,
    tally,
)
from infra.console import Exit, emit, fail, positive_float, table
from infra.plan.node import NodePlan, SitePlan, plan_site
from infra.plan.nodestate import NodeState, compare, validation_facts


def _selection_args(p: argparse.ArgumentParser) -> None:
    add_stack_args(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--node", action="append", help="only this node (repeatable)")
    g.add_argument("--segment", help="only the nodes of this segment")
    p.add_argument(
        "--tuning",
        choices=[t.value for t in Tuning],
        default=Tuning.TUNED.value,
        help="runner settings: tuned (default) or plain Ansible defaults (for benchmarks)",
    )
    p.add_argument(
        "--execution",
        choices=[e.value for e in Execution],
        default=Execution.STACK.value,
        help="stack (default): each segment's execution host as the stack says; local: all on this controller",
    )


def register(sub: Any) -> None:
    """Register converge, check, validate-node and wait-ssh."""
    p = sub.add_parser("converge", help="apply the plan to nodes with Ansible, in rolling batches per segment")
    _selection_args(p)
    p.add_argument(
        "--wait-lock",
        type=positive_float,
        default=0.0,
        metavar="SECONDS",
        help="wait this long for another run of the same nodes to finish (default: fail at once, exit 5)",
    )
    p.add_argument(
        "--record",
        action="store_true",
        help="pulumi up's batch step: write each node's outcome as its converge record for the rollout guard "
        "(rollout/<stack>/<node>.converge.json under $GPUFLEET_RECORDS_DIR); exit 0 when every node passed or "
        "the segment's failed nodes are within rollout.max_failures, else 1 naming the failed nodes",
    )
    p.add_argument(
        "--batch-slot",
        action="store_true",
        help="first wait for one of rollout.max_parallel_batches controller-wide slots of the stack, held "
        "while converging (bounds how many segment batches of `pulumi up` run at once)",
    )
    p.set_defaults(func=cmd_converge)

    p = sub.add_parser(
        "provision-slot",
        help="wait for one of rollout.max_parallel_reimage reimage leases of the stack and take it for a node",
        description="What a node's BMC step of `pulumi up` runs before power-on/reimage. Leases live under "
        "$GPUFLEET_RECORDS_DIR/slots/<stack>/reimage/; the node's `wait-ssh` gives it back when it ends, and "
        "a lease nobody gives back expires after --ttl seconds.",
    )
    add_stack_args(p)
    p.add_argument("--node", required=True, help="node hostname")
    p.add_argument("--ttl", type=int, required=True, help="seconds (≥ 1) until the lease expires by itself")
    p.add_argument("--timeout", type=positive_float, default=None,
                   help="give up (exit 5) after this many seconds without a free lease (default: wait)")
    p.set_defaults(func=cmd_provision_slot)

    p = sub.add_parser("check", help="check + diff: what a converge would change per node (exit 3 if anything)")
    _selection_args(p)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("validate-node", help="check one node against its plan and print its facts")
    add_stack_args(p)
    p.add_argument("--node", required=True, help="node hostname")
    p.add_argument("--tuning", choices=[t.value for t in Tuning], default=Tuning.TUNED.value)
    p.set_defaults(func=cmd_validate_node)

    p = sub.add_parser("wait-ssh", help="wait until a node answers SSH with its pinned host key")
    add_stack_args(p)
    p.add_argument("--node", required=True, help="node hostname")
    p.add_argument("--timeout", type=positive_float, default=600, help="seconds to wait (default 600)")
    p.set_defaults(func=cmd_wait_ssh)


def _load(args: argparse.Namespace) -> tuple[SitePlan, list[NodePlan]] | int:
    """The site planned once for the command, and the nodes the arguments select from that plan."""
    plan = plan_site(site_from_args(args))
    try:
        return plan, select(plan, args.node, args.segment)
    except (KeyError, ValueError) as exc:
        return fail(args, Exit.INVALID, str(exc.args[0]))


def _render_converge(d: dict[str, Any]) -> str:
    rows = [
        (
            n["hostname"],
            n["segment"],
            n["batch"],
            n["status"],
            n.get("changed", 0),
            "; ".join(f"{f['task']}: {f['msg'][:80]}" for f in n.get("failures", []))[:120],
        )
        for n in d["nodes"]
    ]
    out = table(rows, ["node", "segment", "batch", "status", "changed", "failure"])
    for seg, why in d["stopped_segments"].items():
        out += f"\nsegment {seg} stopped: {why}"
    return out


def _record(args: argparse.Namespace, plan: SitePlan, result: RolloutResult) -> int:
    """Write every node's converge record; the exit status says whether the segments' rollout may go on."""
    by_name = {n.hostname: n for n in plan.nodes}
    try:
        for n in result.nodes:
            failures = [f"{f.get('task', '?')}: {str(f.get('msg', ''))[:200]}" for f in n.detail.get("failures", [])]
            record_step(args.stack, by_name[n.hostname], "converge", 0 if n.status == "ok" else 1,
                        detail={"status": n.status, "changed": n.changed, "failures": failures})
        failed = [n for n in result.nodes if n.status != "ok"]
        tallies = [tally(plan, args.stack, seg) for seg in sorted({n.segment for n in failed})]
    except RecordError as exc:
        return fail(args, Exit.INVALID, str(exc))
    except OSError as exc:
        # Without its records the rollout cannot count failures: stop rather than go on blind.
        return fail(args, Exit.UNAVAILABLE, f"cannot write the record ({exc}); set {RECORDS_ENV} to a writable "
                                            "directory")
    emit(args.json, result.as_dict(), _render_converge)
    if not failed:
        return Exit.OK
    names = ", ".join(f"{n.hostname} ({n.status})" for n in failed)
    over = [t for t in tallies if t.exceeded]
    if over:
        sys.stderr.write(
            f"converge failed on {names}; "
            + "; ".join(f"segment {t.segment}: {len(t.failed)} failed node(s) ({', '.join(t.failed)}) > "
                        f"rollout.max_failures={t.max_failures}" for t in over)
            + ": stopping (the segment's later batches do not start)\n")
        return Exit.FAILED
    sys.stderr.write(
        f"converge failed on {names}, tolerated: "
        + "; ".join(f"segment {t.segment} has {len(t.failed)} failed node(s), rollout.max_failures="
                    f"{t.max_failures}" for t in tallies)
        + ". Pulumi records this batch as done, so a plain re-run does not retry it: `pulumi up --replace "
        "<URN of <node>-converge>` does (and records the new outcome)\n")
    return Exit.OK


def cmd_converge(args: argparse.Namespace) -> int:
    """Converge the selected nodes; exit 1 when any node failed or was not run (with --record: over budget)."""
    loaded = _load(args)
    if isinstance(loaded, int):
        return loaded
    plan, nodes = loaded
    if Execution(args.execution) is not Execution.LOCAL:
        # Before any job: each execution host runs exactly the runtime the lock records (exit 2 otherwise).
        require_runtime(plan.site, lock_file_of(args), {n.segment.name for n in nodes})

    def run() -> RolloutResult:
        return converge(
            plan,
            nodes,
            tuning=Tuning(args.tuning),
            progress=not args.json,
            wait_lock=args.wait_lock,
            execution=Execution(args.execution),
        )

    if args.batch_slot:
        width = plan.site.rollout.max_parallel_batches
        try:
            with batch_slot(args.stack, width, waiting=lambda: sys.stderr.write(
                    f"waiting for one of rollout.max_parallel_batches={width} converge slots of stack "
                    f"{args.stack}\n")):
                result = run()
        except RecordError as exc:
            return fail(args, Exit.INVALID, str(exc))
        except OSError as exc:
            return fail(args, Exit.UNAVAILABLE, f"cannot take a converge slot ({exc}); set {RECORDS_ENV} to a "
                                                "writable directory")
    else:
        result = run()
    if args.record:
        # Records first: when they cannot be written the step ends with that one error (one JSON document
        # on stdout under --json, as the batch step's output must be), not with the result and then it.
        return _record(args, plan, result)
    emit(args.json, result.as_dict(), _render_converge)
    if not args.json:
        sys.stderr.writelines(line + "\n" for line in provisioning_notes(plan.site, (n.hostname for n in nodes)))
    return Exit.OK if result.succeeded else Exit.FAILED


def cmd_provision_slot(args: argparse.Namespace) -> int:
    """Take one of the stack's reimage leases for the node; exit 5 when --timeout passed without one."""
    if args.ttl < 1:
        return fail(args, Exit.INVALID, f"--ttl {args.ttl}: a lease lasts at least 1 second")
    plan = plan_site(site_from_args(args))
    node = plan.node(args.node)
    width = plan.site.rollout.max_parallel_reimage
    try:
        ok = take_reimage_lease(
            args.stack, node.hostname, width, args.ttl, timeout_s=args.timeout or 0.0,
            waiting=lambda held: sys.stderr.write(
                f"{node.hostname}: waiting for a reimage lease (rollout.max_parallel_reimage={width}; held by "
                f"{', '.join(held)})\n"))
    except RecordError as exc:
        return fail(args, Exit.INVALID, str(exc))
    except OSError as exc:
        return fail(args, Exit.UNAVAILABLE, f"cannot take a reimage lease ({exc}); set {RECORDS_ENV} to a "
                                            "writable directory")
    if not ok:
        return fail(args, Exit.UNAVAILABLE, f"{node.hostname}: no reimage lease free after {args.timeout} s "
                                            f"(rollout.max_parallel_reimage={width})")
    emit(args.json, {"node": node.hostname, "lease": True, "ttl_s": args.ttl},
         lambda d: f"{d['node']}: reimage lease taken for at most {d['ttl_s']} s")
    return Exit.OK


def _render_check(d: dict[str, Any]) -> str:
    out = []
    for n in d["nodes"]:
        head = f"{n['hostname']}: {n['status']}, {n['changes']} change(s)"
        if n["reboot_required"]:
            head += ", reboot required"
        if n.get("reboot_reason"):
            head += f" ({n['reboot_reason']})"
        out.append(head)
        out += [f"  package {p}" for p in n["packages"]]
        out += [f"  hold    {p}" for p in n.get("holds", [])]
        out += [f"  remove  {p}" for p in n["packages_removed"]]
        out += [f"  file    {f}" for f in n["files"]]
        out += [f"  FAILED  {f['task']}: {f['msg'][:200]}" for f in n["failures"]]
    return "\n".join(out)


def cmd_check(args: argparse.Namespace) -> int:
    """Check + diff; exit 3 when any node would change, 1 when the check itself failed."""
    loaded = _load(args)
    if isinstance(loaded, int):
        return loaded
    plan, nodes = loaded
    if Execution(args.execution) is not Execution.LOCAL:
        require_runtime(plan.site, lock_file_of(args), {n.segment.name for n in nodes})
    result = converge(
        plan, nodes, check=True, tuning=Tuning(args.tuning), progress=not args.json, execution=Execution(args.execution)
    )
    report = check_report(result)
    emit(args.json, report, _render_check)
    if not result.succeeded:
        return Exit.FAILED
    return Exit.DRIFT if report["drift"] else Exit.OK


def _render_validation(d: dict[str, Any]) -> str:
    f = d["facts"] or {}
    lines = [f"{d['node']}: {'PASSED' if d['passed'] else 'FAILED'}"]
    if f:
        lines.append(
            f"  gpus: {len(f['gpus']['seen'])} seen, declared {f['gpus']['declared']['count']}x "
            f"{f['gpus']['declared']['product_name']}"
        )
        lines.append(f"  driver: {', '.join(f['driver']['seen']) or '-'} (pinned {f['driver']['pinned']})")
        lines.append(f"  cuda: pinned {f['cuda']['pinned']}")
        pk = f.get("packages") or {}
        if pk:
            lines.append(
                "  packages: at the pinned versions and held"
                if pk.get("ok")
                else f"  packages: {len(pk.get('mismatched', []))} not at the pinned version, "
                f"{len(pk.get('not_held', []))} not held"
            )
        files = f.get("files") or {}
        if files:
            lines.append(
                "  files: no record of a converge yet"
                if not files.get("recorded")
                else f"  files: {len(files.get('changed', []))} changed since the last converge"
            )
        services = (f.get("services") or {}).get("expected") or {}
        if services:
            lines.append("  services: " + ", ".join(f"{u} {s['active']}" for u, s in services.items()))
        cdi = f.get("cdi") or {}
        lines.append(f"  cdi devices: {', '.join(cdi.get('devices') or []) or 'none'}")
        for e in f.get("endpoints") or []:
            lines.append(f"  endpoint {e['name']}: {e['url']} → {e['status'] or 'no answer'}")
        lines.append(
            ("  reboot: pending — " + f["reboot_reason"])
            if f["reboot_required"] and f.get("reboot_reason")
            else "  reboot: pending — a driver change since the last boot is loaded only after a reboot "
            "(the stack's reboot policy decides when)"
            if f["reboot_required"]
            else "  reboot: not needed"
        )
        lines += [f"  problem: {p}" for p in f["problems"]]
    lines += [f"  failure: {x['task']}: {x['msg'][:200]}" for x in d["failures"]]
    return "\n".join(lines)


def validation(plan: NodePlan, outcome: NodeOutcome) -> dict[str, Any]:
    """validate-node's report of one node: the probe's state compared with the plan (infra.plan.nodestate)."""
    raw = (outcome.detail.get("facts") or {}).get("gpu_validate_result")
    facts = None
    if isinstance(raw, dict):
        state = NodeState.from_json(plan.hostname, raw)
        facts = validation_facts(plan, state, compare(plan, state))
    return {
        "node": plan.hostname,
        "reachable": outcome.status != "unreachable",
        "passed": bool(facts and facts["passed"]),
        "facts": facts,
        # The controller's verdict on the probe is in `facts.problems`; here only what failed in the play.
        "failures": [f for f in outcome.detail.get("failures", []) if f.get("task") != VERDICT_TASK],
    }


def cmd_validate_node(args: argparse.Namespace) -> int:
    """Probe one node, compare it with its plan and print both; exit 1 when it differs."""
    plan = plan_site(site_from_args(args))
    node = plan.node(args.node)
    result = converge(plan, [node], tuning=Tuning(args.tuning), playbook="validate.yml")
    data = validation(node, result.nodes[0])
    emit(args.json, data, _render_validation)
    return Exit.OK if data["passed"] else Exit.FAILED


def cmd_wait_ssh(args: argparse.Namespace) -> int:
    """Wait for SSH with the pinned key; exit 1 on timeout or host key mismatch."""
    site = site_from_args(args)
    node = plan_site(site).node(args.node)
    ok, seconds, err = wait_ssh(site, node, args.timeout)
    # The node is out of its reimage window either way: give back the lease its BMC step took under
    # `pulumi up` (none when run by hand), so the next node's reinstall can start.
    try:
        release_reimage_lease(args.stack, node.hostname)
    except (RecordError, OSError) as exc:
        sys.stderr.write(f"{node.hostname}: could not give back its reimage lease ({exc}); it expires by itself\n")
    data = {"node": node.hostname, "ready": ok, "seconds": round(seconds, 2), "error": err}
    emit(
        args.json,
        data,
        lambda d: f"{d['node']}: {'ssh ready' if d['ready'] else 'NOT ready: ' + d['error']} after {d['seconds']} s",
    )
    return Exit.OK if ok else Exit.FAILED
