"""Rolling converge: batches per segment, stopping a segment once its failures pass the threshold.

Batch k of every segment runs in the same ansible-playbook run (a "wave"): segments are
independent failure domains, so they roll side by side and a 4-node site with two segments costs
one Ansible start-up per wave, not per segment. After each wave the failures of every segment are
counted; a segment whose failures exceed `rollout.max_failures` stops and its later batches are
never touched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from infra.ansible.runner import RunResult
from infra.plan.node import NodePlan, SitePlan

NOT_RUN = "not-run"


@dataclass
class NodeOutcome:
    """What happened to one node during a rollout."""

    hostname: str
    segment: str
    batch: int
    status: str = NOT_RUN  # ok | failed | unreachable | not-run
    changed: int = 0
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class RolloutResult:
    """Per node outcomes, the runs that produced them, and which segments stopped."""

    nodes: list[NodeOutcome]
    runs: list[RunResult]
    stopped_segments: dict[str, str]

    @property
    def succeeded(self) -> bool:
        """Every selected node converged."""
        return all(n.status == "ok" for n in self.nodes)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "succeeded": self.succeeded,
            "stopped_segments": self.stopped_segments,
            "nodes": [
                {
                    "hostname": n.hostname,
                    "segment": n.segment,
                    "batch": n.batch,
                    "status": n.status,
                    "changed": n.changed,
                    **n.detail,
                }
                for n in self.nodes
            ],
            "runs": [
                {
                    "hosts": sorted(r.hosts),
                    "status": r.status,
                    "rc": r.rc,
                    "duration_s": round(r.duration_s, 2),
                    "run_dir": r.run_dir,
                }
                for r in self.runs
            ],
        }


def waves(plan: SitePlan, selected: Sequence[NodePlan]) -> list[list[NodePlan]]:
    """Batch k of every segment together, in order; only the selected nodes."""
    names = {n.hostname for n in selected}
    out: dict[int, list[NodePlan]] = {}
    for batch in plan.batches():
        for n in batch:
            if n.hostname in names:
                out.setdefault(n.batch, []).append(n)
    return [out[k] for k in sorted(out)]


def roll(
    plan: SitePlan,
    selected: Sequence[NodePlan],
    run: Callable[[list[NodePlan]], RunResult],
    *,
    max_failures: int,
) -> RolloutResult:
    """Run `run` wave by wave; stop a segment when its failures exceed `max_failures`."""
    outcomes = {n.hostname: NodeOutcome(n.hostname, n.segment.name, n.batch) for n in selected}
    failures: dict[str, int] = {}
    stopped: dict[str, str] = {}
    runs: list[RunResult] = []
    for wave in waves(plan, selected):
        todo = [n for n in wave if n.segment.name not in stopped]
        if not todo:
            continue
        result = run(todo)
        runs.append(result)
        for n in todo:
            o = outcomes[n.hostname]
            h = result.hosts.get(n.hostname)
            if h is None:
                o.status = "failed"
                o.detail = {"failures": [{"task": "(run)", "msg": f"no result (status={result.status})"}]}
            else:
                o.status = "unreachable" if h.unreachable else ("failed" if h.failed else "ok")
                o.changed = h.changed
                o.detail = h.as_dict()
            if o.status != "ok":
                failures[n.segment.name] = failures.get(n.segment.name, 0) + 1
        for seg, count in failures.items():
            if count > max_failures and seg not in stopped:
                stopped[seg] = f"{count} failed node(s) > max_failures={max_failures}; later batches not touched"
    return RolloutResult(nodes=[outcomes[n.hostname] for n in selected], runs=runs, stopped_segments=stopped)
