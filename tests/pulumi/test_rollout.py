"""Rolling and bounded under `pulumi up`: reimage concurrency and the guard steps between batches.

The engine runs a step as soon as everything it depends on is done (unbounded `--parallel` by
default). `_schedule` does the same with a duration per step kind, so the tests see how many nodes
would be reinstalling at once and what a failed batch leaves unstarted.
"""

from __future__ import annotations

import itertools

import pytest

from infra.bench import pulumi_mocks as mocks
from infra.bench.sitegen import generate_site
from tests.pulumi.conftest import Run, run_program

# Relative durations: waiting for SSH after a reimage dominates, as on real machines.
DURATION = {"bmc": 1, "wait-ssh": 20, "converge": 5, "validate": 1}


def _duration(reg: mocks.Registration) -> int:
    return next((d for step, d in DURATION.items() if reg.name.endswith(f"-{step}")), 1)


def _schedule(run: Run) -> dict[str, tuple[int, int]]:
    """(start, end) per command URN with unbounded parallelism: start = latest end of its dependencies."""
    cmds = {r.urn: r for r in run.commands()}
    times: dict[str, tuple[int, int]] = {}

    def end(urn: str) -> int:
        if urn not in cmds:  # a component: done when registered
            return 0
        if urn not in times:
            start = max((end(d) for d in cmds[urn].dependencies), default=0)
            times[urn] = (start, start + _duration(cmds[urn]))
        return times[urn][1]

    for urn in cmds:
        end(urn)
    return times


def _reinstalling_at_once(run: Run) -> int:
    """Most nodes between the start of their BMC step and the end of their wait-ssh step."""
    times = _schedule(run)
    spans = [(times[run.reg(f"{p.hostname}-bmc").urn][0], times[run.reg(f"{p.hostname}-wait-ssh").urn][1])
             for p in run.plan.nodes]
    return max(sum(1 for s, e in spans if s <= t < e) for t in {s for s, _ in spans})


@pytest.mark.parametrize("width", [1, 3, 7])
def test_reimage_concurrency_is_bounded_by_the_stack(width: int) -> None:
    """A first `up` of 20 nodes never has more than max_parallel_reimage nodes reinstalling, and does use them."""
    raw = generate_site(20, nodes_per_segment=8)
    raw.setdefault("rollout", {})["max_parallel_reimage"] = width
    run = run_program("bench", raw)
    assert _reinstalling_at_once(run) == width


def test_without_a_bound_every_node_would_reinstall_at_once() -> None:
    """The simulation can tell: a bound larger than the site lets all 20 nodes reinstall together."""
    raw = generate_site(20, nodes_per_segment=8)
    raw.setdefault("rollout", {})["max_parallel_reimage"] = 1000
    assert _reinstalling_at_once(run_program("bench", raw)) == 20


def _guard(run: Run, segment: str, batch: int) -> mocks.Registration:
    return run.reg(f"{segment}-batch{batch}-guard")


def test_a_guard_sits_between_consecutive_batches_of_a_segment(prod_run: Run) -> None:
    """Batch k+1 of a segment converges only after the guard of batch k, which follows batch k's validate."""
    for seg in prod_run.plan.site.segments:
        batches = prod_run.plan.batches(seg.name)
        for k, (earlier, later) in enumerate(itertools.pairwise(batches)):
            guard = _guard(prod_run, seg.name, k)
            assert guard.inputs["create"].split()[1:] == [
                "rollout-guard", "--stack", "example-prod", "--segment", seg.name, "--batch", str(k)]
            assert {prod_run.reg(f"{n.hostname}-validate").urn for n in earlier} <= set(guard.dependencies)
            for n in later:
                assert guard.urn in prod_run.reg(f"{n.hostname}-converge").dependencies
        with pytest.raises(KeyError):  # no guard after the last batch: nothing to protect
            _guard(prod_run, seg.name, len(batches) - 1)


def test_a_failed_guard_leaves_later_batches_unstarted(prod_run: Run) -> None:
    """Every step of a later batch's nodes transitively depends on the guard (Pulumi skips dependents of a failure)."""
    cmds = {r.urn: r for r in prod_run.commands()}

    def needs(urn: str, target: str) -> bool:
        deps = cmds[urn].dependencies if urn in cmds else []
        return target in deps or any(needs(d, target) for d in deps)

    seg = prod_run.plan.site.segments[0].name
    guard = _guard(prod_run, seg, 0).urn
    for batch in prod_run.plan.batches(seg)[1:]:
        for n in batch:
            assert needs(prod_run.reg(f"{n.hostname}-validate").urn, guard)


def test_converge_and_validate_record_their_outcome_for_the_guard(stack_run: Run) -> None:
    """Each converge/validate runs the shared CLI string, then `rollout-record` with its exit status."""
    stack = stack_run.rec.resources[0].urn.split("::")[0].removeprefix("urn:pulumi:")
    for p in stack_run.plan.nodes:
        for step in ("converge", "validate"):
            create = stack_run.reg(f"{p.hostname}-{step}").inputs["create"]
            assert create.endswith(f"; .venv/bin/gpufleet rollout-record --stack {stack} --node {p.hostname} "
                                   f"--step {step} --rc $?")


