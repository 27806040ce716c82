"""Rolling and bounded under `pulumi up`: reimage concurrency and the guard steps between batches.

The engine runs a step as soon as everything it depends on is done (unbounded `--parallel` by
default). `_schedule` does the same with a duration per step kind, so the tests see how many nodes
would be reinstalling at once and what a failed batch leaves unstarted.
"""

from __future__ import annotations

import itertools

import pulumi
import pytest

from infra.bench import pulumi_mocks as mocks
from infra.bench.sitegen import generate_site
from infra.components import site as site_mod
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


def test_no_bmc_step_waits_for_another_node() -> None:
    """The reimage bound is a lease the BMC step's command takes, not a chain of nodes through the graph.

    A chain node i → node i−N is as deep as the site is large: the SDK's recursive dependency walk
    (pulumi/runtime/resource_cycle_breaker.py) failed with RecursionError on it at 5,000 nodes.
    """
    raw = generate_site(20, nodes_per_segment=8)
    raw.setdefault("rollout", {})["max_parallel_reimage"] = 3
    run = run_program("bench", raw)
    for p in run.plan.nodes:
        bmc = run.reg(f"{p.hostname}-bmc")
        assert not [d for d in bmc.dependencies if d.endswith(("-wait-ssh", "-bmc"))]
        assert bmc.inputs["create"].split(" && ")[0].split()[1:6] == [
            "provision-slot", "--stack", "bench", "--node", p.hostname]


def _depth(run: Run) -> int:
    """Longest dependency path (in steps) of the registered graph, as the SDK's walk would follow it."""
    deps = {r.urn: r.dependencies for r in run.rec.resources}
    memo: dict[str, int] = {}

    def depth(urn: str) -> int:
        if urn not in memo:
            memo[urn] = 1 + max((depth(d) for d in deps.get(urn, [])), default=0)
        return memo[urn]

    return max(depth(u) for u in deps)


def test_graph_depth_grows_with_a_segment_not_with_the_site() -> None:
    """Four times the segments (same segment size): the longest dependency path stays the same."""
    small = run_program("bench", generate_site(16, nodes_per_segment=8))
    large = run_program("bench", generate_site(64, nodes_per_segment=8))
    assert _depth(small) == _depth(large)
    # ... and it does grow with the number of batches in a segment (the rolling order is in the graph).
    longer = run_program("bench", generate_site(16, nodes_per_segment=16))
    assert _depth(longer) > _depth(small)


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
            assert guard.urn in prod_run.reg(f"{seg.name}-batch{later[0].batch}-converge").dependencies
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


def test_batch_converge_and_validate_record_their_outcome_for_the_guard(stack_run: Run) -> None:
    """The batch step records every node's outcome itself (`--record`); each validate runs `rollout-record`."""
    stack = stack_run.rec.resources[0].urn.split("::")[0].removeprefix("urn:pulumi:")
    for p in stack_run.plan.nodes:
        create = stack_run.reg(f"{p.hostname}-validate").inputs["create"]
        assert create.endswith(f"; .venv/bin/gpufleet rollout-record --stack {stack} --node {p.hostname} "
                               f"--step validate --rc $?")
        batch = stack_run.reg(f"{p.segment.name}-batch{p.batch}-converge").inputs["create"].split()
        assert "--record" in batch and ["--node", p.hostname] in [batch[i:i + 2] for i in range(len(batch))]


def test_a_segment_with_more_batches_than_the_sdk_can_walk_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before registering anything: a RunError naming the segment, the setting and the batch size that fits."""
    monkeypatch.setattr(site_mod, "max_batches_per_segment", lambda: 2)
    raw = generate_site(6, nodes_per_segment=6)  # one segment, 6 batches of 1
    with pytest.raises(pulumi.RunError, match=r"segments\[.*\]: 6 rolling batches \(rollout.batch_size=1\).*"
                                              r"supports 2 per segment.*batch_size to at least 3"):
        run_program("bench", raw)


def test_the_depth_limit_follows_the_measured_recursion_failure() -> None:
    """With the default limit the bound admits the 250-node segments of the benchmark at batch_size 1
    (measured: 752-step path, runs) and refuses 330 (measured: RecursionError in the SDK)."""
    assert 250 <= site_mod.max_batches_per_segment() < 330
