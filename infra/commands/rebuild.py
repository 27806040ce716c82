"""`gpufleet rebuild`: reimage a node through its BMC, converge, validate, prove it came back the same."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from infra.commands.site import add_stack_args, site_from_args
from infra.console import Exit, confirm, emit, table
from infra.dr import fingerprint as fp
from infra.dr.rebuild import DEFAULT_RECORD_DIR, Refused, rebuild
from infra.dr.steps import StackRef
from infra.model.site import Site
from infra.plan.node import plan_site
from infra.plan.nodestate import DriftItem
from infra.provision.firstboot import DEFAULT_KEY_STORE, HostKeyStore, KeyStoreError, arm_install


def register(sub: Any) -> None:
    """Register rebuild."""
    p = sub.add_parser("rebuild", help="reimage a node through its BMC, converge, validate, prove it is the same")
    add_stack_args(p)
    p.add_argument("--node", required=True)
    p.add_argument("--yes", action="store_true", help="do not ask (the node's disk is reinstalled)")
    p.add_argument(
        "--host-key",
        type=Path,
        help="the node's new SSH public host key from an out-of-band source (required on real sites)",
    )
    p.add_argument("--keys", type=Path, default=DEFAULT_KEY_STORE,
                   help="host key store of network-installed nodes (default %(default)s): an `image` node is "
                   "reinstalled with its stored key, which is pinned, so known_hosts does not change")
    p.add_argument("--records", type=Path, default=DEFAULT_RECORD_DIR, help="fingerprint records folder")
    p.add_argument("--ssh-timeout", type=float, help="seconds to wait for SSH (default: the stack's reboot timeout)")
    p.set_defaults(func=cmd_rebuild)


def register_lab_hostkeys(site: Site) -> None:
    """Hand the lab's out-of-band host-key source to `infra.hostkeys` (product code never imports the lab).

    The import is here, not at the top, because the lab is an optional extra: without it a lab stack's
    rebuild is refused with a message saying so.
    """
    try:
        from infra.lab import hostkeys as lab_hostkeys
    except ImportError:
        return
    lab_hostkeys.register(site)


def cmd_rebuild(args: argparse.Namespace) -> int:
    """Rebuild one node; exit 0 identical, 3 different fingerprint, 1 a step failed, 5 refused up-front."""
    site = site_from_args(args)
    register_lab_hostkeys(site)
    plan = plan_site(site).node(args.node)
    host_key: Path | None = args.host_key
    arm: Callable[[], object] | None = None
    if plan.node.image is not None:
        # A network-installed node: the reimage arms its install, which carries the store's key; that key
        # (known before the install, never read from the wire) is the one pinned.
        store = HostKeyStore(args.keys)
        try:
            store.get(plan.node.hostname)
        except KeyStoreError as exc:
            sys.stderr.write(f"refused (nothing was done): {exc}\n")
            return Exit.UNAVAILABLE
        if host_key is None:
            host_key = store.public_path(plan.node.hostname)
        node = plan.node

        def arm_node() -> str:
            return arm_install(site, node, store)

        arm = arm_node
    if not confirm(f"rebuild {args.node}: its disk is reinstalled through PXE, then converged", args.yes):
        return Exit.ABORTED

    def progress(msg: str) -> None:
        if not args.json:
            sys.stderr.write(f"… {msg}\n")

    try:
        report = rebuild(
            site,
            plan,
            StackRef(args.stack, args.stack_file),
            record_dir=args.records,
            host_key=host_key,
            ssh_timeout=args.ssh_timeout,
            arm=arm,
            progress=progress,
        )
    except Refused as exc:
        data = {"hostname": args.node, "ok": False, "refused": exc.kind, "message": str(exc)}
        if args.json:
            emit(True, data, str)
        else:
            sys.stderr.write(f"refused (nothing was done): {exc}\n")
        return Exit.INVALID if exc.kind == "config" else Exit.UNAVAILABLE

    def render(d: dict[str, Any]) -> str:
        lines = [table([(s["step"], f"{s['seconds']:.1f}") for s in d["steps"]], ["step", "seconds"]), ""]
        if d["failed_step"]:
            lines.append(f"{d['hostname']}: FAILED at {d['failed_step']}: {d['message']}")
        elif d["identical"]:
            lines.append(f"{d['hostname']}: rebuilt in {d['seconds']:.0f} s — fingerprint identical")
        elif d["identical"] is None:
            lines.append(f"{d['hostname']}: rebuilt in {d['seconds']:.0f} s — {d['message']}")
        else:
            lines.append(f"{d['hostname']}: rebuilt in {d['seconds']:.0f} s — fingerprint DIFFERS:")
            lines += [f"  {fp.Difference(**x)}" for x in d["differences"]]
        if d.get("drift"):
            lines.append(f"{d['hostname']}: after the rebuild, {len(d['drift'])} difference(s) from the plan:")
            lines += [f"  {DriftItem(**x)}" for x in d["drift"]]
        return "\n".join(lines)

    emit(args.json, report.as_dict(), render)
    if report.failed_step:
        return Exit.FAILED
    return Exit.OK if report.identical is not False else Exit.DRIFT
