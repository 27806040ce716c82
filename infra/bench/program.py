"""Benchmark: Pulumi program evaluation under mocks vs registering as many bare `local.Command`s.

`figure(ctx)` is the function the benchmark harness (`gpufleet bench`) calls; `compare()` can be
used on its own. Times are wall clock of one mocked program run (registration + outputs), after
validation and planning, which figure 3 measures separately.
"""

from __future__ import annotations

import json
import resource
import time
from typing import Any

import pulumi
from pulumi_command import local

from infra.bench import pulumi_mocks as mocks
from infra.bench.harness import Context, Measurement, Ratio, interleave
from infra.bench.sitegen import generate_site
from infra.components.program import ProgramSettings, build
from infra.model.load import parse_site
from infra.plan.node import SitePlan, plan_site

_SECRET = {"gpufleet:bmcPassword": "bench-not-a-secret"}


def _program(plan: SitePlan, settings: ProgramSettings) -> mocks.Recording:
    def program() -> pulumi.Output[Any]:
        site = build(plan, settings, pulumi.Config("gpufleet").require_secret)
        return site.node_facts

    return mocks.run(program, stack=settings.stack, config=_SECRET, secret_keys=list(_SECRET))


def _bare(count: int) -> mocks.Recording:
    def program() -> pulumi.Output[Any]:
        cmds = [local.Command(f"c{i}", create=f"true {i}") for i in range(count)]
        return pulumi.Output.all(*[c.stdout for c in cmds])

    return mocks.run(program, stack="bench")


def state_bytes(rec: mocks.Recording) -> int:
    """JSON size of what the program registered (URN, type, parent, dependencies, inputs per resource).

    A lower bound of the state file: the engine's checkpoint holds the same per resource plus outputs and
    bookkeeping.
    """
    registered = [{"urn": r.urn, "type": r.type, "parent": r.parent, "dependencies": r.dependencies,
                   "inputs": r.raw_inputs} for r in rec.resources]
    return len(json.dumps(registered, default=str, separators=(",", ":")))


def _timed_program(plan: SitePlan, settings: ProgramSettings, out: dict[str, Any]) -> int:
    """One program run: its wall time, CPU time and registered JSON size into `out`; returns the resource count."""
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    rec = _program(plan, settings)
    out.setdefault("program", []).append(time.perf_counter() - t0)
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    out.setdefault("cpu", []).append(ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime)
    out["state_bytes"] = state_bytes(rec)
    return len(rec.resources)


def compare(nodes: int, repeats: int, settings: ProgramSettings, *, bare: bool = True) -> dict[str, Any]:
    """Time the gpufleet program for a generated site of `nodes` nodes against the same number of bare commands.

    Sites of 1,000 nodes and more also give the program's CPU time and registered JSON size (`cpu`,
    `state_bytes`); `bare=False` times the program alone (the 10,000-node figure, where a bare pair would
    add minutes to the harness).
    """
    plan = plan_site(parse_site(generate_site(nodes)))
    if nodes >= 1000:
        # Large sites take 20 s to minutes per run, next to which a warm-up changes nothing: the
        # first timed program run also gives the resource count, then program and bare alternate.
        got: dict[str, Any] = {}
        samples: dict[str, list[float]] = {"program": [], "bare": []}
        registered = 0
        for _ in range(repeats):  # program, bare, program, bare … (alternate, as interleave does)
            registered = _timed_program(plan, settings, got)
            if bare:
                t0 = time.perf_counter()
                _bare(registered)
                samples["bare"].append(time.perf_counter() - t0)
        samples["program"] = got["program"]
        program = Measurement(samples["program"])
        out: dict[str, Any] = {"resources": registered, "program": program,
                               "cpu": Measurement(got["cpu"], unit="CPU-s"), "state_bytes": got["state_bytes"]}
        if bare:
            out["bare"] = Measurement(samples["bare"])
            out["ratio"] = Ratio(program, out["bare"], f"program / {registered} bare local.Command", goal="≤ 1.5×")
        return out
    registered = len(_program(plan, settings).resources)  # warm-up, and the resource count to match
    times = interleave({"program": lambda: _program(plan, settings), "bare": lambda: _bare(registered)}, repeats)
    return {
        "resources": registered,
        "program": times["program"],
        "bare": times["bare"],
        "ratio": Ratio(times["program"], times["bare"], f"program / {registered} bare local.Command",
                       goal="≤ 1.5×"),
    }


def figure(ctx: Context) -> dict[str, Measurement | Ratio | str]:
    """Program evaluation for 10, 100 and 1,000 nodes (quick: 10, 100) as a ratio to bare commands."""
    settings = ProgramSettings(stack="bench", project=ctx.root)
    out: dict[str, Measurement | Ratio | str] = {}
    for n in (10, 100) if ctx.quick else (10, 100, 1000):
        r = compare(n, ctx.repeats, settings)
        out[f"{n} nodes: program ({r['resources']} resources)"] = r["program"]
        out[f"{n} nodes: {r['resources']} bare local.Command"] = r["bare"]
        out[f"{n} nodes: ratio"] = r["ratio"]
        out[f"{n} nodes: per node"] = f"{r['program'].median / n * 1e3:.1f} ms"
    return out


if __name__ == "__main__":  # `python -m infra.bench.program [N ...]`: print figures without the harness
    import sys
    from pathlib import Path

    sizes = [int(a) for a in sys.argv[1:]] or [10, 100, 1000]
    for n in sizes:
        res = compare(n, 3, ProgramSettings(stack="bench", project=Path.cwd()))
        print(f"{n} nodes, {res['resources']} resources: program {res['program']}, bare {res['bare']}, "
              f"{res['ratio']}")
