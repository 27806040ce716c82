"""Converge benchmark: first and no-op converge for 1, 2, 4 nodes, tuned vs plain Ansible defaults.

Not a test (tests never assert wall-clock times): `python -m infra.bench.converge --stack lab` prints
a JSON report; `bench()` is what a benchmark harness calls. `--fresh` reimages lab nodes first (lab
only) so the first converge starts from the base OS. `reference_noop()` times a yardstick: a playbook
of as many trivial tasks as the roles' no-op, through the same runner, nodes and settings.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from infra.ansible.converge import Execution, converge
from infra.ansible.inventory import GROUP, build_inventory
from infra.ansible.runner import run_playbook
from infra.ansible.settings import SshSettings, Tuning
from infra.model.load import load_site
from infra.plan.node import plan_site


def machine_cpu_seconds() -> float:
    """CPU time all processes of this machine have used so far (busy fields of /proc/stat), seconds.

    The lab's nodes run on the controller's own cores, so a converge's cost is the controller's and
    the nodes' work together: the machine-wide figure is the one that bounds the wall time.
    """
    fields = Path("/proc/stat").read_text(encoding="ascii").splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def controller_cpu_seconds() -> float:
    """CPU time of this process and its reaped children (ansible-playbook, its workers, Mitogen), seconds."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _timed(
    stack: str,
    hosts: Sequence[str],
    tuning: Tuning,
    *,
    path: Path | None = None,
    execution: Execution = Execution.STACK,
) -> dict[str, Any]:
    plan = plan_site(load_site(stack, path=path))
    nodes = [plan.node(h) for h in hosts]
    cpu0, ctl0, start = machine_cpu_seconds(), controller_cpu_seconds(), time.monotonic()
    result = converge(plan, nodes, tuning=tuning, execution=execution)
    seconds, cpu = time.monotonic() - start, machine_cpu_seconds() - cpu0
    controller_cpu = controller_cpu_seconds() - ctl0
    # Task results per node (ok includes changed); a no-op's per-task cost is seconds / this.
    tasks = {n.hostname: sum(int(n.detail.get(k, 0)) for k in ("ok", "skipped", "failed")) for n in result.nodes}
    return {
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu, 1),
        "controller_cpu_seconds": round(controller_cpu, 2),
        "tasks": tasks,
        "succeeded": result.succeeded,
        "changed": {n.hostname: n.changed for n in result.nodes},
    }


def lab_reimage(stack: str) -> Callable[[Sequence[str]], None]:
    """A `fresh` hook for the lab: reimage nodes through the lab's BMC path and wait for SSH."""
    from infra.ansible.converge import wait_ssh
    from infra.lab import lab as lab_mod
    from infra.lab.config import Paths, lab_spec
    from infra.model.load import stack_path

    spec, paths = lab_spec(stack, stack_path(stack)), Paths.from_env()

    def fresh(hosts: Sequence[str]) -> None:
        for h in hosts:
            lab_mod.power_off(spec, paths, h)
            lab_mod.power_on(spec, paths, h, reimage=True)
        site = load_site(stack)
        plan = plan_site(site)
        for h in hosts:
            ok, _, err = wait_ssh(site, plan.node(h), 180)
            if not ok:
                raise RuntimeError(f"{h} did not come back: {err}")

    return fresh


def bench(
    stack: str = "lab",
    counts: Sequence[int] = (1, 2, 4),
    *,
    order: Sequence[str] | None = None,
    fresh: Callable[[Sequence[str]], None] | None = None,
    compare_defaults: bool | Sequence[int] = True,
    noop_rounds: int = 1,
) -> dict[str, Any]:
    """Measure converges of the first N nodes of `order` (default: plan order) for each N (JSON-ready).

    `compare_defaults`: also time the no-op with plain Ansible defaults (True: every count; a list:
    those counts only, since a defaults run of 4 nodes takes minutes). `noop_rounds`: tuned no-ops
    per count, taken in rounds of every count, so that a noisy stretch of the machine hits each count
    alike; `noop_tuned` is the median run (all of them under `noop_tuned_runs`).
    """
    all_hosts = list(order or [n.hostname for n in plan_site(load_site(stack)).nodes])
    report: dict[str, Any] = {"stack": stack, "runs": []}
    for count in counts:
        hosts = all_hosts[:count]
        row: dict[str, Any] = {"nodes": hosts}
        if fresh is not None:
            fresh(hosts)
            row["first"] = _timed(stack, hosts, Tuning.TUNED)
        row["noop_tuned_runs"] = [_timed(stack, hosts, Tuning.TUNED)]
        if compare_defaults is True or (not isinstance(compare_defaults, bool) and count in compare_defaults):
            row["noop_defaults"] = _timed(stack, hosts, Tuning.DEFAULTS)
        report["runs"].append(row)
    for _ in range(noop_rounds - 1):
        for row in report["runs"]:
            row["noop_tuned_runs"].append(_timed(stack, row["nodes"], Tuning.TUNED))
    for row in report["runs"]:
        by_time = sorted(row["noop_tuned_runs"], key=lambda r: r["seconds"])
        row["noop_tuned"] = by_time[(len(by_time) - 1) // 2]  # the median run (the lower one of an even count)
        if "noop_defaults" in row:
            row["defaults_over_tuned"] = round(row["noop_defaults"]["seconds"] / row["noop_tuned"]["seconds"], 2)
    base = next((r["noop_tuned"]["seconds"] for r in report["runs"] if len(r["nodes"]) == 1), None)
    if base:
        for r in report["runs"]:
            r["noop_vs_one_node"] = round(r["noop_tuned"]["seconds"] / base, 2)
    return report


def local_vs_segment(
    stack_file: Path,
    counts: Sequence[int] = (1, 2, 4),
    *,
    order: Sequence[str] | None = None,
    rounds: int = 1,
) -> dict[str, Any]:
    """No-op converges of the first N nodes on the controller and segment-local, side by side in one run.

    `stack_file` is a stack whose segments name execution hosts (the runtime installed there). For each round
    and node count the no-op runs with `--execution local`, then as the stack says, so a noisy stretch of the
    machine hits both alike. `controller_cpu_seconds` is this process and its reaped children: for a local run
    gpufleet, ansible-playbook, its workers and Mitogen; for a segment-local run gpufleet (transmit, process,
    folding) and the ssh clients — Ansible itself then runs inside the segment, off the controller.
    """
    site = load_site(path=stack_file)
    all_hosts = list(order or [n.hostname for n in plan_site(site).nodes])
    rows: list[dict[str, Any]] = [{"nodes": all_hosts[:c], "local": [], "segment": []} for c in counts]
    for _ in range(rounds):
        for row in rows:
            for mode, key in ((Execution.LOCAL, "local"), (Execution.STACK, "segment")):
                run = _timed("", row["nodes"], Tuning.TUNED, path=stack_file, execution=mode)
                run["controller_cpu_per_node"] = round(run["controller_cpu_seconds"] / len(row["nodes"]), 2)
                row[key].append(run)
    return {"stack_file": str(stack_file), "rows": rows}


def reference_playbook(tasks: int, path: Path) -> Path:
    """Write a playbook of `tasks` trivial tasks (`/bin/true` on the node, never "changed"), no facts.

    Each of them costs Ansible what any task costs, per task and node (a forked worker, templating,
    one module run on the node over the same connection, the runner's events), and does nothing of
    ours: its N-node/1-node ratio is what this machine allows a playbook of that length.
    """
    lines = [
        "---",
        "# Written by infra.bench.converge.reference_playbook: the yardstick of the no-op benchmark.",
        "- name: Reference no-op",
        f"  hosts: {GROUP}",
        "  gather_facts: false",
        "  tasks:",
    ]
    for i in range(1, tasks + 1):
        lines += [
            f"    - name: Reference task {i}",
            "      ansible.builtin.command: /bin/true",
            "      changed_when: false",
        ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def reference_noop(
    stack: str,
    counts: Sequence[int],
    tasks: int,
    *,
    order: Sequence[str] | None = None,
    rounds: int = 1,
) -> dict[str, Any]:
    """Time `reference_playbook(tasks)` over the first N nodes for each N, in rounds like `bench()`.

    Same runner, settings (tuned), inventory and nodes as a converge. Returns
    `{"tasks": T, "runs": [{"nodes": [...], "runs": [{"seconds", "cpu_seconds"}, ...]}, ...]}`.
    """
    site = load_site(stack)
    plan = plan_site(site)
    all_hosts = list(order or [n.hostname for n in plan.nodes])
    ssh = SshSettings.of(site)
    rows: list[dict[str, Any]] = [{"nodes": all_hosts[:c], "runs": []} for c in counts]
    inventories = [build_inventory(site, [plan.node(h) for h in row["nodes"]]) for row in rows]
    with tempfile.TemporaryDirectory(prefix="gpufleet-reference-") as tmp:
        playbook = reference_playbook(tasks, Path(tmp) / "reference.yml")
        for _ in range(rounds):
            for row, inventory in zip(rows, inventories, strict=True):
                hosts = row["nodes"]
                cpu0, start = machine_cpu_seconds(), time.monotonic()
                result = run_playbook(str(playbook), inventory, hosts, ssh=ssh, tuning=Tuning.TUNED, label="reference")
                seconds, cpu = time.monotonic() - start, machine_cpu_seconds() - cpu0
                if not result.succeeded:
                    raise RuntimeError(f"reference playbook failed on {', '.join(hosts)}: see {result.run_dir}")
                row["runs"].append({"seconds": round(seconds, 2), "cpu_seconds": round(cpu, 1)})
    return {"tasks": tasks, "runs": rows}


def main(argv: list[str] | None = None) -> int:
    """Print the benchmark report as JSON."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--stack", default="lab")
    p.add_argument("--counts", default="1,2,4", help="node counts, comma-separated")
    p.add_argument("--order", help="comma-separated node order (default: plan order)")
    p.add_argument("--fresh", action="store_true", help="reimage lab nodes first to time the first converge")
    p.add_argument("--no-defaults", action="store_true", help="skip the plain-defaults comparison")
    p.add_argument("--rounds", type=int, default=1, help="rounds of tuned no-ops over every count (median kept)")
    args = p.parse_args(argv)
    report = bench(
        args.stack,
        [int(c) for c in args.counts.split(",")],
        order=args.order.split(",") if args.order else None,
        fresh=lab_reimage(args.stack) if args.fresh else None,
        compare_defaults=not args.no_defaults,
        noop_rounds=args.rounds,
    )
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
