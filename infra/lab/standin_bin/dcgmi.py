"""`dcgmi` stand-in: `discovery -l` over the simulated GPUs (SIMULATED)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

try:  # installed as a single file on nodes; a package module in the repo
    from common import GPUS_FILE, SIMULATED, load  # type: ignore[import-not-found]
except ImportError:
    from infra.lab.standin_bin.common import GPUS_FILE, SIMULATED, load

VERSION_FILE = os.environ.get("GPUFLEET_LAB_DCGM_VERSION_FILE", "/usr/lib/gpufleet-lab/dcgm.json")


def discovery(decl: dict[str, Any]) -> str:
    """`dcgmi discovery -l`."""
    bar = "+--------+----------------------------------------------------------------------+"
    out = [f"# {SIMULATED}", f"{len(decl['gpus'])} GPU{'s' if len(decl['gpus']) != 1 else ''} found.", bar,
           "| GPU ID | Device Information                                                   |", bar]
    for g in decl["gpus"]:
        for i, text in enumerate((f"Name: {decl['name']}", f"PCI Bus ID: {g['pci_bus_id']}",
                                  f"Device UUID: {g['uuid']}")):
            out.append(f"| {str(g['index']) if i == 0 else '':<6} | {text:<68} |")
        out.append(bar)
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Entry point of /usr/bin/dcgmi on lab nodes."""
    p = argparse.ArgumentParser(prog="dcgmi")
    p.add_argument("-v", "--version", action="store_true")
    sub = p.add_subparsers(dest="cmd")
    d = sub.add_parser("discovery")
    d.add_argument("-l", "--list", action="store_true")
    args = p.parse_args(argv)
    if args.version:
        sys.stdout.write(f"dcgmi  version: {(load(VERSION_FILE) or {}).get('version', 'unknown')} (simulated)\n")
        return 0
    if args.cmd == "discovery" and args.list:
        decl = load(GPUS_FILE)
        if decl is None:
            sys.stderr.write("Error: unable to establish a connection to the specified host: localhost\n")
            return 1
        sys.stdout.write(discovery(decl))
        return 0
    p.print_help(sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
