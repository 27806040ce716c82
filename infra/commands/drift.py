"""`gpufleet drift`: what differs from the plan on each node (the probe compared with the plan, plus check mode)."""

from __future__ import annotations

import argparse
import time
from typing import Any

from infra.commands.site import add_stack_args, site_from_args
from infra.console import Exit, emit, table
from infra.dr.drift import NodeDrift, drift
from infra.dr.steps import check_with_roles
from infra.plan.node import plan_site


def register(sub: Any) -> None:
    """Register drift."""
    p = sub.add_parser("drift", help="what differs from the plan on each node (exit 3 when anything does)")
    add_stack_args(p)
    p.add_argument("--node", action="append", help="only this node (repeatable)")
    p.add_argument(
        "--no-check",
        action="store_true",
        help="probe only (packages, holds, services, GPUs, reboot); skip the roles' check mode",
    )
    p.set_defaults(func=cmd_drift)


def _cell(v: Any) -> str:
    return "(absent)" if v is None else str(v)


def _render_drift(d: dict[str, Any]) -> str:
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


def run_drift(args: argparse.Namespace) -> tuple[list[NodeDrift], float]:
    """The drift of the nodes the arguments name (benchmark entry point too)."""
    site = site_from_args(args)
    sp = plan_site(site)
    plans = [sp.node(h) for h in args.node] if args.node else list(sp.nodes)
    t0 = time.monotonic()
    reports = drift(site, plans, check=None if args.no_check else check_with_roles(sp))
    return reports, time.monotonic() - t0


def cmd_drift(args: argparse.Namespace) -> int:
    """Exit 0 clean, 3 drift found, 1 a node could not be read."""
    reports, seconds = run_drift(args)
    data = {
        "nodes": [r.as_dict() for r in reports],
        "drifted": sum(r.drifted for r in reports),
        "unreachable": sum(not r.reachable for r in reports),
        "seconds": round(seconds, 2),
    }
    emit(args.json, data, _render_drift)
    if any(r.drifted for r in reports):
        return Exit.DRIFT
    return Exit.FAILED if any(r.status in ("unreachable", "check-failed") for r in reports) else Exit.OK
