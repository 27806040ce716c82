"""`nvidia-smi` stand-in: reports the GPUs the lab stack declares for this node (SIMULATED)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

try:  # installed as a single file on nodes; a package module in the repo
    from common import DRIVER_FILE, GPUS_FILE, SIMULATED, load  # type: ignore[import-not-found]
except ImportError:
    from infra.lab.standin_bin.common import DRIVER_FILE, GPUS_FILE, SIMULATED, load

NO_DRIVER = ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
             "Make sure that the latest NVIDIA driver is installed and running.")

# query field → (csv header, value function, unit shown unless nounits)
_FIELDS: dict[str, tuple[str, str | None]] = {
    "name": ("name", None),
    "memory.total": ("memory.total [MiB]", "MiB"),
    "memory.used": ("memory.used [MiB]", "MiB"),
    "memory.free": ("memory.free [MiB]", "MiB"),
    "driver_version": ("driver_version", None),
    "uuid": ("uuid", None),
    "index": ("index", None),
    "pci.bus_id": ("pci.bus_id", None),
    "count": ("count", None),
    "persistence_mode": ("persistence_mode", None),
    "temperature.gpu": ("temperature.gpu", None),
    "utilization.gpu": ("utilization.gpu [%]", "%"),
}


def _value(field: str, gpu: dict[str, Any], decl: dict[str, Any], driver: dict[str, Any]) -> str:
    values: dict[str, Any] = {
        "name": decl["name"],
        "memory.total": str(decl["memory_mib"]),
        "memory.used": "0",
        "memory.free": str(decl["memory_mib"]),
        "driver_version": driver["version"],
        "uuid": gpu["uuid"],
        "index": str(gpu["index"]),
        "pci.bus_id": gpu["pci_bus_id"],
        "count": str(len(decl["gpus"])),
        "persistence_mode": "Enabled",
        "temperature.gpu": "34",
        "utilization.gpu": "0",
    }
    return str(values[field])


def query(fields: list[str], fmt: set[str], decl: dict[str, Any], driver: dict[str, Any],
          index: int | None = None) -> str:
    """CSV answer to `--query-gpu=FIELDS --format=csv[,noheader][,nounits]`."""
    lines = []
    if "noheader" not in fmt:
        lines.append(", ".join(_FIELDS[f][0] for f in fields))
    for gpu in decl["gpus"]:
        if index is not None and gpu["index"] != index:
            continue
        cells = []
        for f in fields:
            v = _value(f, gpu, decl, driver)
            unit = _FIELDS[f][1]
            cells.append(v if unit is None or "nounits" in fmt else f"{v} {unit}")
        lines.append(", ".join(cells))
    return "\n".join(lines) + "\n"


def listing(decl: dict[str, Any]) -> str:
    """`nvidia-smi -L`."""
    return "".join(f"GPU {g['index']}: {decl['name']} (UUID: {g['uuid']})\n" for g in decl["gpus"])


def summary(decl: dict[str, Any], driver: dict[str, Any], now: float | None = None) -> str:
    """Plain `nvidia-smi`: the usual table, headed by the SIMULATED label."""
    w = 89
    sep = "+" + "-" * 41 + "+" + "-" * 24 + "+" + "-" * 22 + "+"
    ver = driver["version"]
    head = f" NVIDIA-SMI {ver:<22}Driver Version: {ver:<15}CUDA Version: {driver['cuda_version']:<9}"
    out = [time.strftime("%a %b %d %H:%M:%S %Y", time.localtime(now)),
           "+" + "-" * w + "+",
           f"| {SIMULATED:<{w - 1}}|",
           f"|{head:<{w}}|",
           sep.replace("+", "|", 1)[:-1] + "+",
           "| GPU  Name                 Persistence-M | Bus-Id          Disp.A | Volatile Uncorr. ECC |",
           "| Fan  Temp   Perf          Pwr:Usage/Cap |           Memory-Usage | GPU-Util  Compute M. |",
           "|" + "=" * 41 + "+" + "=" * 24 + "+" + "=" * 22 + "|"]
    mem = decl["memory_mib"]
    for g in decl["gpus"]:
        cells = (f" {g['index']:>3}  {decl['name'][:28]:<28}  On ", f" {g['pci_bus_id']:>16} Off ", f"{'0':>21} ")
        out.append("|" + "|".join(c.ljust(n) for c, n in zip(cells, (41, 24, 22), strict=True)) + "|")
        cells = (" N/A   34C    P8             16W /  350W ", f" {'0MiB / ' + str(mem) + 'MiB':>22} ",
                 "      0%      Default ")
        out.append("|" + "|".join(c.ljust(n) for c, n in zip(cells, (41, 24, 22), strict=True)) + "|")
        out.append(sep)
    out += ["", "+" + "-" * w + "+",
            f"| {'Processes:':<{w - 1}}|",
            f"|  {'No running processes found':<{w - 2}}|",
            "+" + "-" * w + "+"]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Entry point of /usr/bin/nvidia-smi on lab nodes."""
    p = argparse.ArgumentParser(prog="nvidia-smi", add_help=True)
    p.add_argument("--query-gpu")
    p.add_argument("--format")
    p.add_argument("-L", "--list-gpus", action="store_true")
    p.add_argument("-i", "--id", type=int)
    args, _unknown = p.parse_known_args(argv)
    decl, driver = load(GPUS_FILE), load(DRIVER_FILE)
    if decl is None or driver is None:
        sys.stderr.write(NO_DRIVER + "\n")
        return 9
    if args.list_gpus:
        sys.stdout.write(listing(decl))
        return 0
    if args.query_gpu:
        fields = [f.strip() for f in args.query_gpu.split(",") if f.strip()]
        for f in fields:
            if f not in _FIELDS:
                sys.stderr.write(f'Field "{f}" is not a valid field to query.\n')
                return 2
        fmt = {x.strip() for x in (args.format or "").split(",")}
        if "csv" not in fmt:
            sys.stderr.write('"--format" must be given with "csv"\n')
            return 2
        sys.stdout.write(query(fields, fmt, decl, driver, args.id))
        return 0
    sys.stdout.write(summary(decl, driver))
    return 0


if __name__ == "__main__":
    sys.exit(main())
