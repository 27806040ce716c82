"""Entry points for the benchmark harness: rebuild one node end to end, drift over a whole stack.

Both return plain dicts of seconds (and what was measured) so `infra.bench` can put them in its report.
Times live here and in the benchmark report, never in test assertions.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from infra.dr.drift import drift
from infra.dr.rebuild import DEFAULT_RECORD_DIR, rebuild
from infra.dr.steps import StackRef, check_with_roles, converge
from infra.lab import hostkeys as lab_hostkeys
from infra.model.load import load_site
from infra.plan.node import plan_site


def measure_rebuild(
    stack: str = "lab",
    node: str = "lab-gpu02",
    *,
    stack_file: Path | None = None,
    record_dir: Path = DEFAULT_RECORD_DIR,
) -> dict[str, Any]:
    """Converge the node first (a rebuild must start from the plan), then rebuild it (destructive!).

    Returns total and per-step seconds of the rebuild alone, the verdict, and the preparatory converge time.
    """
    site = load_site(stack=stack, path=stack_file)
    ref = StackRef(stack, stack_file)
    prep = converge(ref, node)
    if not prep.ok:
        return {
            "node": node,
            "seconds": None,
            "identical": None,
            "ok": False,
            "failed_step": "prepare-converge",
            "message": prep.output,
            "steps": {},
        }
    lab_hostkeys.register(site)
    report = rebuild(site, plan_site(site).node(node), ref, record_dir=record_dir)
    return {
        "node": node,
        "seconds": round(report.seconds, 2),
        "identical": report.identical,
        "ok": report.ok,
        "failed_step": report.failed_step,
        "prepare_converge_seconds": round(prep.seconds, 2),
        "steps": {s["step"]: s["seconds"] for s in report.steps},
    }


def measure_drift(stack: str = "lab", *, stack_file: Path | None = None, check: bool = True) -> dict[str, Any]:
    """Drift over every node of the stack (probe + roles' check mode); seconds and drifted node count."""
    site = load_site(stack=stack, path=stack_file)
    sp = plan_site(site)
    plans = list(sp.nodes)
    t0 = time.monotonic()
    reports = drift(site, plans, check=check_with_roles(sp) if check else None)
    seconds = time.monotonic() - t0
    return {
        "nodes": len(plans),
        "seconds": round(seconds, 2),
        "drifted": sum(r.drifted for r in reports),
        "unreachable": sum(not r.reachable for r in reports),
        "check": check,
        "per_node_seconds": {r.hostname: round(r.seconds, 2) for r in reports},
    }
