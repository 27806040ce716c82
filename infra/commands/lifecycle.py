"""Node lifecycle steps of `pulumi up`: rollout-record, rollout-guard, decommission.

These are the commands the Pulumi program's rolling and decommission steps run
(infra.components.commands); each also works by hand.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import pydantic

from infra.bmc.connect import client_for
from infra.bmc.errors import BmcError
from infra.bmc.redfish import PowerAction, Timeouts
from infra.commands.site import add_stack_args, site_from_args
from infra.components.outcomes import (
    RECORDED_STEPS,
    RECORDS_ENV,
    RecordError,
    check_names,
    record_step,
    tally,
    write_decommission,
)
from infra.console import Exit, emit, fail
from infra.model.site import DecommissionPolicy, Node
from infra.plan.node import plan_site
from infra.secrets import SecretError, resolve_secret


def register(sub: Any) -> None:
    """Register rollout-record, rollout-guard and decommission."""
    p = sub.add_parser(
        "rollout-record",
        help="record a node step's exit status for the rollout guard; exit 0 if passed or within max_failures",
        description="Run by every converge/validate step of `pulumi up` after the step itself. Writes "
        "rollout/<stack>/<node>.<step>.json under $GPUFLEET_RECORDS_DIR (default /var/lib/gpufleet/records). "
        "Exit 0 when --rc is 0, or when the segment's failed nodes (latest records) are within "
        "rollout.max_failures; else exit 1, which fails the step so Pulumi starts nothing that depends on it.",
    )
    add_stack_args(p)
    p.add_argument("--node", required=True, help="node hostname")
    p.add_argument("--step", required=True, choices=RECORDED_STEPS, help="which step ran")
    p.add_argument("--rc", required=True, type=int, help="the step's exit status")
    p.set_defaults(func=cmd_rollout_record)

    p = sub.add_parser(
        "rollout-guard",
        help="fail when a segment's failed nodes up to a batch exceed rollout.max_failures",
        description="The step between batch K and K+1 of a segment under `pulumi up`: counts nodes of the "
        "segment in batches ≤ K whose latest converge or validate record failed. Exit 1 (later batches do "
        "not start) when more than rollout.max_failures failed; else exit 0.",
    )
    add_stack_args(p)
    p.add_argument("--segment", required=True, help="segment name")
    p.add_argument("--batch", required=True, type=int, help="batch number K (0-based, per segment)")
    p.set_defaults(func=cmd_rollout_guard)

    p = sub.add_parser(
        "decommission",
        help="a node left the stack: power it off via its BMC (or keep it running) and write a record",
        description="Runs as the delete of `<node>-decommission` when a node is removed from the stack or "
        "on `pulumi destroy`. Needs no stack entry for the node: the node comes as --node-json (its BMC "
        "password as a reference; a `config:` secret arrives as GPUFLEET_SECRET_<KEY>). Writes "
        "decommission/<stack>/<node>-<time>.json under $GPUFLEET_RECORDS_DIR. --dry-run (the step's "
        "create) checks the arguments and that the BMC password can be read, touching nothing.",
    )
    p.add_argument("--stack", required=True, help="stack name (for the record)")
    p.add_argument("--node", required=True, help="node hostname")
    p.add_argument("--policy", required=True, choices=[x.value for x in DecommissionPolicy],
                   help="power-off: power off via the BMC; keep: leave it running (both record)")
    p.add_argument("--node-json", required=True, help="the node's stack entry as JSON (no secret values)")
    p.add_argument("--dry-run", action="store_true", help="check and say what removal would do; touch nothing")
    p.add_argument("--timeout", type=float, default=300, help="seconds to wait for power off (default 300)")
    p.add_argument("--json", action="store_true", help="machine-readable JSON output")
    p.set_defaults(func=cmd_decommission)


def _unwritable(args: argparse.Namespace, exc: OSError) -> int:
    return fail(args, Exit.UNAVAILABLE, f"cannot write the record ({exc}); set {RECORDS_ENV} to a writable directory")


def cmd_rollout_record(args: argparse.Namespace) -> int:
    """Record the outcome; the exit status says whether the rollout may go on."""
    plan = plan_site(site_from_args(args))
    node = plan.node(args.node)
    try:
        record_step(args.stack, node, args.step, args.rc)
        if args.rc == 0:
            return Exit.OK
        t = tally(plan, args.stack, node.segment.name)
    except RecordError as exc:
        return fail(args, Exit.INVALID, str(exc))
    except OSError as exc:
        # Without its records the rollout cannot count failures: stop rather than go on blind.
        return _unwritable(args, exc)
    names = ", ".join(t.failed)
    if t.exceeded:
        sys.stderr.write(f"{args.node}: {args.step} failed (exit {args.rc}); segment {t.segment}: {len(t.failed)} "
                         f"failed node(s) ({names}) > rollout.max_failures={t.max_failures}: stopping\n")
        return Exit.FAILED
    sys.stderr.write(
        f"{args.node}: {args.step} failed (exit {args.rc}), tolerated: segment {t.segment} has {len(t.failed)} "
        f"failed node(s) ({names}), rollout.max_failures={t.max_failures}. Pulumi records this step as done, "
        f"so a plain re-run does not retry it: `pulumi up --replace <URN of {args.node}-converge>` does (and "
        f"records the new outcome)\n")
    return Exit.OK


def cmd_rollout_guard(args: argparse.Namespace) -> int:
    """Exit 1 when the segment's failures up to the batch exceed the budget."""
    plan = plan_site(site_from_args(args))
    try:
        t = tally(plan, args.stack, args.segment, args.batch)
    except RecordError as exc:
        return fail(args, Exit.INVALID, str(exc))

    def render(d: dict[str, Any]) -> str:
        head = (f"segment {d['segment']} after batch {d['batch']}: {len(d['failed'])} failed node(s)"
                f"{' (' + ', '.join(d['failed']) + ')' if d['failed'] else ''}, max_failures={d['max_failures']}")
        if d["exceeded"]:
            head += ": later batches are not started"
        if d["unknown"]:
            head += f"\nno record yet (not converged through `pulumi up`): {', '.join(d['unknown'])}"
        return head

    emit(args.json, t.as_dict(), render)
    return Exit.FAILED if t.exceeded else Exit.OK


def cmd_decommission(args: argparse.Namespace) -> int:
    """Power off (or keep) a node that left the stack, and record it."""
    try:
        check_names(args.stack, args.node)
        node = Node.model_validate_json(args.node_json)
    except RecordError as exc:
        return fail(args, Exit.INVALID, str(exc))
    except pydantic.ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(x) for x in e['loc']) or '(root)'}: {e['msg']}" for e in exc.errors())
        return fail(args, Exit.INVALID, f"--node-json: {problems} (it is the node's entry of `nodes:` as JSON)")
    if node.hostname != args.node:
        return fail(args, Exit.INVALID, f"--node {args.node!r} but --node-json is node {node.hostname!r}")
    policy = DecommissionPolicy(args.policy)
    bmc = node.bmc
    if bmc is None and policy is DecommissionPolicy.POWER_OFF:
        return fail(args, Exit.INVALID, f"node {args.node} has no `bmc:` to power it off with: add one, or set "
                        "rollout.decommission: keep")
    base: dict[str, Any] = {"node": args.node, "stack": args.stack, "policy": policy.value,
                            "bmc": bmc.endpoint if bmc else None}
    if args.dry_run:
        try:
            if bmc is not None and policy is DecommissionPolicy.POWER_OFF:
                resolve_secret(bmc.password)  # the delete must be able to log in, possibly months later
        except SecretError as exc:
            return fail(args, Exit.UNAVAILABLE, str(exc))
        what = "power it off via its BMC" if policy is DecommissionPolicy.POWER_OFF else "leave it running"
        emit(args.json, {**base, "dry_run": True},
             lambda d: f"{d['node']}: removing it from stack {d['stack']} will {what} and write a record")
        return Exit.OK
    if policy is DecommissionPolicy.KEEP:
        try:
            path = write_decommission(args.stack, args.node, {"policy": policy.value, "bmc": base["bmc"],
                                                              "power": "left as it was"})
        except OSError as exc:
            return _unwritable(args, exc)
        emit(args.json, {**base, "record": str(path)}, lambda d: f"{d['node']}: kept running; record {d['record']}")
        return Exit.OK
    try:
        with client_for(node, Timeouts(power_timeout=args.timeout)) as c:
            result = c.set_power(PowerAction.OFF, wait=True, timeout=args.timeout)
    except SecretError as exc:
        return fail(args, Exit.UNAVAILABLE, str(exc))
    except BmcError as exc:
        # No record: the delete fails, Pulumi keeps the step in the state, the next up/destroy retries.
        code = Exit.UNAVAILABLE if exc.kind in {"unreachable", "timeout", "power_timeout"} else Exit.FAILED
        return fail(args, code, f"{args.node}: power off failed ({exc.kind}): {exc}")
    power = result.as_dict()
    try:
        path = write_decommission(args.stack, args.node, {"policy": policy.value, "bmc": base["bmc"], "power": power})
    except OSError as exc:
        # Powered off but unrecorded: fail, so the next up/destroy runs it again (powering off is idempotent).
        return _unwritable(args, exc)
    emit(args.json, {**base, "power": power, "record": str(path)},
         lambda d: f"{d['node']}: powered off ({d['power'].get('before')} → {d['power'].get('after')}); "
                   f"record {d['record']}")
    return Exit.OK
