"""`gpufleet lab up|status|down`: the local lab of nspawn hosts for the lab stack."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from infra.console import CommandError, Exit, emit, table
from infra.lab.config import LabConfigError, Paths, lab_spec
from infra.lab.sh import LabCommandError
from infra.model.load import stack_path

# The lab's engine (infra.lab.lab, .measure) needs the `lab` extra (gguf/numpy for the tiny model,
# sushy-tools for the BMCs). A production controller never installs it, and every other command must
# work there: those modules are imported only when a lab command runs (tests/unit/test_core_install.py).
LAB_EXTRA_HINT = "install the lab extra: `uv sync --all-extras` (scripts/setup.sh) or `pip install 'gpufleet[lab]'`"


def _lab() -> tuple[ModuleType, ModuleType]:
    """`infra.lab.lab` and `infra.lab.measure`, imported on first use (CommandError exit 5 without the extra)."""
    try:
        from infra.lab import lab, measure
    except ModuleNotFoundError as exc:
        raise CommandError(
            Exit.UNAVAILABLE, f"`gpufleet lab` needs the Python package {exc.name!r}: {LAB_EXTRA_HINT}"
        ) from exc
    return lab, measure


def register(sub: Any) -> None:
    """Register `lab` with up, status, down."""
    p = sub.add_parser("lab", help="local lab: nspawn hosts, bridges, mirror, Redfish BMCs for the lab stack")
    lsub = p.add_subparsers(dest="lab_command", required=True, metavar="ACTION")
    for name, func, text in (("up", cmd_up, "bring the lab up (idempotent: re-checks health when up)"),
                             ("status", cmd_status, "what runs: hosts, SSH, bridges, firewall, BMC"),
                             ("down", cmd_down, "stop and remove every lab host, bridge and rule")):
        q = lsub.add_parser(name, help=text)
        g = q.add_mutually_exclusive_group()
        g.add_argument("--stack", default="lab", help="stack name (default: lab)")
        g.add_argument("--stack-file", type=Path, help="path of a stack file instead of a stack name")
        q.add_argument("--json", action="store_true", help="machine-readable JSON output")
        q.add_argument("-v", "--verbose", action="store_true", help="log each step")
        q.set_defaults(func=func)
    q = lsub.add_parser("measure", help="benchmark figures from a second lab beside the shared one (198.19.x)")
    q.add_argument("--cold", action="store_true", help="empty caches: includes the debootstrap build (~4-5 min)")
    q.add_argument("--json", action="store_true", help="machine-readable JSON output")
    q.add_argument("-v", "--verbose", action="store_true", help="log each step")
    q.set_defaults(func=cmd_measure, stack="lab", stack_file=None)


def _setup(args: argparse.Namespace) -> Path:
    logging.basicConfig(level=logging.INFO if args.verbose or not args.json else logging.WARNING,
                        format="lab: %(message)s", stream=sys.stderr)
    return Path(args.stack_file) if args.stack_file else stack_path(args.stack)


def _render(d: dict[str, Any]) -> str:
    rows = [(h["name"], h["kind"], h["segment"], h["address"],
             "yes" if h["running"] else ("off (BMC)" if h.get("bmc_off") else "no"),
             "yes" if h["ssh"] else "no", h["gpus"]) for h in d["hosts"]]
    out = [table(rows, ["host", "kind", "segment", "address", "running", "ssh", "gpus"]), ""]
    out.append("bridges: " + ", ".join(f"{b['name']} {b['address']}{' (air-gapped)' if b['airgapped'] else ''}"
                                        f"{'' if b['present'] else ' MISSING'}" for b in d["bridges"]))
    out.append(f"firewall: nft table {'present' if d['nft_table'] else 'MISSING'}; ip_forward={d['ip_forward']}")
    out.append(f"BMC: {d['bmc']['url']} ({'running' if d['bmc']['running'] else 'NOT running'}), "
               f"user admin, password in {d['bmc']['password_file']}")
    if "vms" in d:
        v = d["vms"]
        out.append("VM nodes: " + ", ".join(f"{n['name']} {n['address']} ({n['domain']})" for n in v["nodes"])
                   + f"; libvirtd {'running' if v['libvirt'] else 'NOT running'}; BMC {v['bmc']['url']} "
                   f"({'running' if v['bmc']['running'] else 'NOT running'})")
    out.append(f"ssh: ssh -F {d['ssh_config']} HOST")
    if d.get("stack_changed"):
        out.append("WARNING: the stack file changed since `lab up`; run `gpufleet lab down` and `up` to follow it")
    if "timings" in d:
        out.append("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in d["timings"].items()))
    return "\n".join(out)


def cmd_up(args: argparse.Namespace) -> int:
    """Bring the lab up."""
    lab, _ = _lab()
    path = _setup(args)
    t0 = time.monotonic()
    try:
        spec = lab_spec(stack=args.stack_file.stem.removeprefix("Pulumi.") if args.stack_file else args.stack,
                        path=path)
        result = lab.up(spec, Paths.from_env(), path)
    except LabConfigError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return Exit.INVALID
    except lab.LabUnavailable as exc:
        sys.stderr.write(f"error: {exc}\n")
        return Exit.UNAVAILABLE
    except LabCommandError as exc:
        sys.stderr.write(f"error: lab up failed: {exc}\n(`gpufleet lab down` cleans up)\n")
        return Exit.FAILED
    result["seconds"] = round(time.monotonic() - t0, 2)
    emit(args.json, result, lambda d: _render(d) + f"\nlab up in {d['seconds']:.1f}s")
    return Exit.OK if all(h["ssh"] or h["bmc_off"] for h in result["hosts"]) else Exit.FAILED


def cmd_status(args: argparse.Namespace) -> int:
    """Print what runs; exit 1 when the lab is down or unhealthy."""
    lab, _ = _lab()
    path = _setup(args)
    try:
        spec = lab_spec(stack=args.stack_file.stem.removeprefix("Pulumi.") if args.stack_file else args.stack,
                        path=path)
    except LabConfigError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return Exit.INVALID
    result = lab.status(spec, Paths.from_env())
    emit(args.json, result, _render)
    healthy = result["up"] and all(h["ssh"] or h["bmc_off"] for h in result["hosts"]) and result["nft_table"]
    if "vms" in result:  # VM nodes may be off (blank, or powered off through their BMC): their daemons must run
        healthy = healthy and result["vms"]["libvirt"] and result["vms"]["bmc"]["running"]
    return Exit.OK if healthy else Exit.FAILED


def cmd_down(args: argparse.Namespace) -> int:
    """Tear the lab down."""
    lab, _ = _lab()
    _setup(args)
    try:
        lab.check_prerequisites(install=False)
    except lab.LabUnavailable as exc:
        sys.stderr.write(f"error: {exc}\n")
        return Exit.UNAVAILABLE
    result = lab.down(Paths.from_env())
    emit(args.json, result, lambda d: f"lab down in {d['seconds']:.1f}s ({len(d['hosts_stopped'])} hosts stopped)")
    return Exit.OK


def cmd_measure(args: argparse.Namespace) -> int:
    """Print cold/warm/idle `up` and `down` seconds of a throwaway second lab."""
    lab, measure = _lab()
    _setup(args)
    try:
        lab.check_prerequisites()
        result = measure.measure(cold=args.cold)
    except lab.LabUnavailable as exc:
        sys.stderr.write(f"error: {exc}\n")
        return Exit.UNAVAILABLE
    except LabCommandError as exc:
        sys.stderr.write(f"error: measure failed: {exc}\n")
        return Exit.FAILED
    emit(args.json, result, lambda d: table([(k, v) for k, v in d.items() if k.endswith("_s")], ["figure", "seconds"]))
    return Exit.OK
