"""One-off scale figures for docs/scale.md: the Pulumi program under mocks at any size, with memory.

Figure 2 of `gpufleet bench` (infra.bench.figures) measures the same program at 10–10,000 nodes with its CPU
time and registered JSON; this adds the validate-and-plan time and peak RSS, one size per line:
`python -m infra.bench.scale 1000 10000` prints JSON. The registered JSON (each resource's URN, type, parent,
dependencies and inputs) is a lower bound of the state file's growth: the engine's checkpoint holds the same
per resource plus outputs and bookkeeping, so it grows at least as fast, and linearly in the resources as
long as no resource depends on all others (none does in gpufleet: dependencies stay per node, per segment
batch and per mirror).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from typing import Any

from infra.bench.program import _program, state_bytes
from infra.bench.sitegen import generate_site
from infra.components.program import ProgramSettings
from infra.model.load import parse_site, project_dir
from infra.plan.node import plan_site


def measure(nodes: int) -> dict[str, Any]:
    """One mocked program run of a generated `nodes`-node site."""
    t0 = time.perf_counter()
    plan = plan_site(parse_site(generate_site(nodes)))
    plan_s = time.perf_counter() - t0
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    rec = _program(plan, ProgramSettings(stack="bench", project=project_dir()))
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    size = state_bytes(rec)
    return {
        "nodes": nodes,
        "resources": len(rec.resources),
        "validate_and_plan_s": round(plan_s, 1),
        "program_wall_s": round(wall, 1),
        "program_cpu_s": round(ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime, 1),
        "registered_json_bytes": size,
        "bytes_per_node": round(size / nodes),
        "peak_rss_mib": round(ru1.ru_maxrss / 1024),
    }


def main(argv: list[str]) -> int:
    """Print one JSON line per size given on the command line."""
    for n in [int(a) for a in argv] or [1000]:
        print(json.dumps(measure(n)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
