"""`gpufleet fabric test`: the pairwise RDMA bandwidth/latency test of each fabric, against its thresholds."""

from __future__ import annotations

import argparse
from typing import Any

from infra import ssh
from infra.commands.site import add_stack_args, site_from_args
from infra.console import Exit, emit, fail, table
from infra.fabric.pairwise import MAX_ITERATIONS, MIN_ITERATIONS, run_pair
from infra.plan.fabric import port_pairs


def register(sub: Any) -> None:
    """Register `fabric`."""
    p = sub.add_parser("fabric", help="the GPU fabric: pairwise RDMA tests (ib_write_bw / ib_write_lat)")
    fsub = p.add_subparsers(dest="fabric_command", required=True)
    t = fsub.add_parser(
        "test",
        help="run ib_write_bw and ib_write_lat between every two nodes of each fabric (over RDMA-CM) and "
        "compare with the fabric's thresholds; exit 3 when a pair is below them",
    )
    add_stack_args(t)
    t.add_argument("--fabric", help="only this fabric (default: every fabric of the stack)")
    t.add_argument(
        "--iterations",
        type=int,
        help=f"perftest's -n for both tests ({MIN_ITERATIONS}–{MAX_ITERATIONS}; default: perftest's, 5000 writes of "
        "64 KiB and 1000 of 2 bytes); fewer for slow links such as Soft-RoCE in emulated VMs",
    )
    t.set_defaults(func=cmd_fabric_test)


def _render(data: dict[str, Any]) -> str:
    rows = [
        (
            r["pair"],
            "ok" if r["ok"] else "FAILED",
            "-" if r["bandwidth_gbps"] is None else f"{r['bandwidth_gbps']:.1f}",
            f"{r['min_bandwidth_gbps']:g}",
            "-" if r["latency_typical_us"] is None else f"{r['latency_typical_us']:.2f}",
            f"{r['max_latency_us']:g}",
        )
        for r in data["pairs"]
    ]
    out = table(rows, ["pair", "result", "Gb/s", "min Gb/s", "lat us", "max us"])
    errors = [f"{r['pair']}: {e}" for r in data["pairs"] for e in r["errors"]]
    return out + ("\nerrors:\n  " + "\n  ".join(errors) if errors else "")


def cmd_fabric_test(args: argparse.Namespace) -> int:
    """Every pair of every (or one) fabric; exit 0 all within thresholds, 3 a pair below them."""
    site = site_from_args(args)
    if args.fabric is not None and args.fabric not in site.fabrics_by_name:
        known = ", ".join(sorted(site.fabrics_by_name)) or "none"
        return fail(args, Exit.INVALID, f"no fabric {args.fabric!r} in stack {site.name!r} (fabrics: {known})")
    if args.iterations is not None and not MIN_ITERATIONS <= args.iterations <= MAX_ITERATIONS:
        return fail(args, Exit.INVALID, f"--iterations {args.iterations}: give {MIN_ITERATIONS}–{MAX_ITERATIONS}")
    pairs = port_pairs(site, args.fabric)
    if not pairs:
        return fail(args, Exit.INVALID, "no fabric of this stack has two nodes with ports on it: nothing to test")
    settings = ssh.SshSettings.of(site)
    results = [run_pair(site, pair, settings, iterations=args.iterations).as_dict() for pair in pairs]
    ok = all(r["ok"] for r in results)
    emit(args.json, {"stack": site.name, "ok": ok, "pairs": results}, _render)
    return Exit.OK if ok else Exit.DRIFT
