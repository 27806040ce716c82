"""`gpufleet drift`: what differs from the plan on each node and on its segment's provisioning host.

A node: the probe compared with the plan, plus the roles' check mode (infra.dr.drift). A provisioning host: the
provisioning play's check mode (infra.dr.provdrift).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from infra.commands.provision import stack_lock
from infra.commands.site import add_stack_args, site_from_args
from infra.console import Exit, emit, table
from infra.dr.drift import NodeDrift, drift
from infra.dr.provdrift import NOT_CHECKED, hosts_for, provisioning_drift
from infra.dr.steps import check_with_roles
from infra.model.site import Site
from infra.plan.node import NodePlan, SitePlan, plan_site

NODES, PROVISIONING = "nodes", "provisioning"
_UNREAD = ("unreachable", "check-failed")


def register(sub: Any) -> None:
    """Register drift."""
    p = sub.add_parser(
        "drift",
        help="what differs from the plan on each node and provisioning host (exit 3 when anything does)",
        description="Per node: the probe compared with the plan, plus the roles' check mode. Per provisioning host "
        "(`segments[].provisioning.host`; every one without --node, those of the selected nodes' segments with "
        "--node and --only provisioning): what `gpufleet provision converge` would change (its play in check "
        "mode: task names and file paths). Exit 0 clean, 3 drift, 1 a node or host could not be read.",
    )
    add_stack_args(p)
    p.add_argument("--node", action="append",
                   help="only this node (repeatable); with --only provisioning, its segment's provisioning host")
    p.add_argument(
        "--only",
        choices=[NODES, PROVISIONING],
        help="only the nodes, or only the provisioning hosts (default: both without --node, the nodes with --node)",
    )
    p.add_argument(
        "--no-check",
        action="store_true",
        help="probe only (packages, holds, services, GPUs, reboot); skip the roles' check mode "
        "(a provisioning host, read by check mode only, is then 'not checked')",
    )
    p.set_defaults(func=cmd_drift)


def _cell(v: Any) -> str:
    return "(absent)" if v is None else str(v)


def _render_nodes(d: dict[str, Any]) -> str:
    rows: list[tuple[str, ...]] = []
    for n in d["nodes"]:
        if n["status"] == "unreachable":
            rows.append((n["hostname"], "UNREACHABLE", "", "", n["error"]))
            continue
        if not n["items"]:
            extra = [] if n["check"] == "ran" else [f"check {n['check']}"]
            rows.append((n["hostname"], n["status"], "", "", "; ".join(extra + n.get("notes", []))))
        for i in n["items"]:
            rows.append((n["hostname"], i["kind"], i["item"], _cell(i["want"]), _cell(i["have"])))
    summary = (
        f"\n{d['drifted']} of {len(d['nodes'])} node(s) drifted, {d['unreachable']} unreachable ({d['seconds']:.1f} s)"
    )
    return table(rows, ["node", "kind", "item", "want", "have"]) + summary


def _render_provisioning(d: dict[str, Any]) -> str:
    rows: list[tuple[str, ...]] = []
    for h in d["provisioning"]:
        who = (h["hostname"], h["segment"])
        if h["status"] == "unreachable":
            rows.append((*who, "UNREACHABLE", h["error"]))
        elif h["status"] == NOT_CHECKED:
            rows.append((*who, h["status"], "a provisioning host is read by check mode only (--no-check)"))
        elif not h["items"]:
            rows.append((*who, h["status"], "" if h["check"] == "ran" else f"check {h['check']}"))
        rows += [(*who, i["kind"], f"{i['item']}: {i['have']}") for i in h["items"]]
    unread = sum(h["status"] in _UNREAD for h in d["provisioning"])
    drifted, total = d["provisioning_drifted"], len(d["provisioning"])
    summary = f"\n{drifted} of {total} provisioning host(s) drifted, {unread} not read"
    return table(rows, ["provisioning host", "segment", "kind", "what would change"]) + summary


def _render_drift(d: dict[str, Any]) -> str:
    parts = [_render_nodes(d)] if d["nodes"] or not d["provisioning"] else []
    if d["provisioning"]:
        parts.append(_render_provisioning(d))
    return "\n\n".join(parts)


def _selection(args: argparse.Namespace, sp: SitePlan) -> tuple[list[NodePlan], list[str] | None]:
    """The node plans to read, and the segments whose provisioning hosts to read (None: every segment)."""
    selected = [sp.node(h) for h in args.node] if args.node else list(sp.nodes)
    segments = sorted({p.segment.name for p in selected}) if args.node else None
    # Provisioning hosts come with the whole site, or when asked for: `drift --node N` after N's rebuild keeps
    # meaning "is N as planned" (the DR runbook's check), not "and is its segment's install service".
    with_hosts = args.only == PROVISIONING or (args.only is None and not args.node)
    return ([] if args.only == PROVISIONING else selected), (segments if with_hosts else [])


def _node_drift(args: argparse.Namespace, site: Site, sp: SitePlan, plans: list[NodePlan]) -> list[NodeDrift]:
    return drift(site, plans, check=None if args.no_check else check_with_roles(sp))


def run_drift(args: argparse.Namespace) -> tuple[list[NodeDrift], float]:
    """The drift of the nodes the arguments name (benchmark entry point too)."""
    site = site_from_args(args)
    sp = plan_site(site)
    plans, _ = _selection(args, sp)
    t0 = time.monotonic()
    reports = _node_drift(args, site, sp, plans)
    return reports, time.monotonic() - t0


def cmd_drift(args: argparse.Namespace) -> int:
    """Exit 0 clean, 3 drift found, 1 a node or provisioning host could not be read."""
    site = site_from_args(args)
    sp = plan_site(site)
    plans, segments = _selection(args, sp)
    hosts = hosts_for(site, segments)
    check = bool(hosts) and not args.no_check
    # The lock (the images' sha256) before anything is read: an unreadable one is bad input, exit 2.
    lock, lock_name = stack_lock(args) if check else (None, "")
    t0 = time.monotonic()
    reports = _node_drift(args, site, sp, plans)
    served = provisioning_drift(site, hosts, lock, lock_name, check=check)
    data = {
        "nodes": [r.as_dict() for r in reports],
        "drifted": sum(r.drifted for r in reports),
        "unreachable": sum(not r.reachable for r in reports),
        "provisioning": [h.as_dict() for h in served],
        "provisioning_drifted": sum(h.drifted for h in served),
        "seconds": round(time.monotonic() - t0, 2),
    }
    emit(args.json, data, _render_drift)
    both: list[NodeDrift] = [*reports, *served]
    if any(r.drifted for r in both):
        return Exit.DRIFT
    return Exit.FAILED if any(r.status in _UNREAD for r in both) else Exit.OK
