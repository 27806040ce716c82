"""Drift: per node, what differs from the plan — packages, holds, config files, services, GPUs, reboot.

Two sources, merged per node:

- the probe (`infra.dr.probe`, one SSH round trip, read-only) compared with the plan by
  `infra.plan.nodestate.compare` (the comparison validate-node and converge use too): pinned package
  versions and holds, managed files changed since the last converge, expected services running and
  enabled, GPUs, CDI devices and endpoints as the plan declares them, a pending reboot;
- the roles' check mode (`gpufleet check`, ROLES' Ansible check+diff): every task that *would*
  change, with file diffs — this is what sees an edited managed config file.

A node that cannot be reached is reported as such (it is not "clean").
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from infra.dr.remote import RemoteError, probe
from infra.model.site import Site
from infra.plan.node import NodePlan
from infra.plan.nodestate import DriftItem, NodeState, compare


@dataclass
class NodeDrift:
    """Drift of one node (`DriftItem` lives with `compare` in infra.plan.nodestate)."""

    hostname: str
    reachable: bool = True
    items: list[DriftItem] = field(default_factory=list)
    error: str = ""
    check: str = "not run"  # ran | unavailable: <why> | failed: <why> | not run
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)  # reported, not counted as drift

    @property
    def drifted(self) -> bool:
        """True when something differs from the plan."""
        return bool(self.items)

    @property
    def status(self) -> str:
        """clean, drift, unreachable, or check-failed (drift unknown: the node could not be fully read)."""
        if not self.reachable:
            return "unreachable"
        if self.items:
            return "drift"
        return "check-failed" if self.check.startswith("failed") else "clean"

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "hostname": self.hostname,
            "reachable": self.reachable,
            "drifted": self.drifted,
            "status": self.status,
            "error": self.error,
            "check": self.check,
            "seconds": round(self.seconds, 2),
            "items": [i.as_dict() for i in self.items],
            "notes": self.notes,
        }


@dataclass(frozen=True)
class CheckOutcome:
    """What the roles' check mode says about one node: tasks that would change and files with diffs."""

    would_change: tuple[str, ...] = ()
    files: tuple[str, ...] = ()
    holds: tuple[str, ...] = ()  # pinned packages check mode would hold again (roles/pinned_packages)
    reboot_required: bool | None = None
    failed: str = ""


# The roles' check mode over some nodes (it carries its own site plan: see infra.dr.steps.check_with_roles).
CheckFn = Callable[[list[NodePlan]], dict[str, CheckOutcome]]


def with_check(items: list[DriftItem], outcome: CheckOutcome, *, want: str = "as rendered by the roles"
               ) -> list[DriftItem]:
    """`items` (the probe's) with what check mode adds: files it would rewrite, holds, tasks, a reboot."""
    out = list(items)
    seen_files = {i.item for i in out if i.kind == "file"}
    for f in outcome.files:
        if f not in seen_files:
            out.append(DriftItem("file", f, want, "differs", source="check"))
    seen_holds = {i.item for i in out if i.kind == "hold"}
    out.extend(DriftItem("hold", p, "hold", "not held", source="check") for p in outcome.holds if p not in seen_holds)
    for task in outcome.would_change:
        out.append(DriftItem("task", task, "ok", "would change", source="check"))
    if outcome.reboot_required and not any(i.kind == "reboot" for i in out):
        out.append(DriftItem("reboot", "pending", False, True, source="check"))
    return out


def drift(
    site: Site,
    plans: Iterable[NodePlan],
    *,
    check: CheckFn | None = None,
    probe_fn: Callable[[Site, NodePlan], NodeState] | None = None,
    parallel: int = 4,
) -> list[NodeDrift]:
    """Drift of each node: probe in parallel, then one check-mode run over the reachable nodes."""
    plans = list(plans)
    read = probe_fn or (lambda s, p: probe(s, p))

    def one(p: NodePlan) -> tuple[NodeDrift, NodeState | None]:
        t0 = time.monotonic()
        try:
            state = read(site, p)
        except RemoteError as exc:
            return NodeDrift(p.hostname, reachable=False, error=str(exc), seconds=time.monotonic() - t0), None
        r = NodeDrift(p.hostname, items=compare(p, state), seconds=time.monotonic() - t0)
        _unrebootable_reboot_as_note(state, r)
        return r, state

    with ThreadPoolExecutor(max_workers=max(1, min(parallel, len(plans) or 1))) as pool:
        results = list(pool.map(one, plans))
    reports = [r for r, _ in results]
    state_by_host = {r.hostname: st for r, st in results if st is not None}
    up = [p for p, (r, _) in zip(plans, results, strict=True) if r.reachable]
    if check is None:
        for r in reports:
            r.check = "not run"
        return reports
    t0 = time.monotonic()
    try:
        outcomes = check(up) if up else {}
    except CheckUnavailable as exc:
        for r in reports:
            r.check = f"unavailable: {exc}"
        return reports
    share = (time.monotonic() - t0) / max(1, len(up))
    for r in reports:
        if not r.reachable:
            continue
        outcome = outcomes.get(r.hostname)
        if outcome is None:
            r.check = "failed: no result for this node"
            continue
        if outcome.failed:
            r.check = f"failed: {outcome.failed}"
            continue
        r.items = with_check(r.items, outcome)
        _unrebootable_reboot_as_note(state_by_host[r.hostname], r)
        r.check = "ran"
        r.seconds += share
    return reports


def _unrebootable_reboot_as_note(state: NodeState, report: NodeDrift) -> None:
    """On a node that cannot reboot, a pending reboot is a note (with its reason), not drift.

    The node declares `reboot=false` among its capabilities (docs/roles.md "Node capabilities") and the
    nvidia_driver role records that in its fact file (`can_reboot`, `reboot_reason`). No converge can clear
    such a flag, so counting it as drift would make the node drift forever; the note keeps it visible.
    """
    if state.driver_fact.get("can_reboot", True) is not False:
        return
    if any(i.kind == "reboot" for i in report.items):
        report.items = [i for i in report.items if i.kind != "reboot"]
        why = str(state.driver_fact.get("reboot_reason") or "this host cannot reboot (capability reboot=false)")
        note = f"reboot pending, not counted as drift: {why}"
        if note not in report.notes:
            report.notes.append(note)


class CheckUnavailable(Exception):
    """The roles' check mode cannot run here (not installed yet, ansible missing …)."""
