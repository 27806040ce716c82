"""`gpufleet bmc status|power|boot|inventory|reimage`: BMC control of one node (or every node for status)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from infra.bmc.connect import BmcClient, NoBmcError, client_for
from infra.bmc.errors import (
    BmcAuthError,
    BmcError,
    BmcNotFound,
    BmcRedirected,
    BmcTimeout,
    BmcTlsError,
    BmcUnreachable,
)
from infra.bmc.lifecycle import DEFAULT_BOOT_GRACE, reimage
from infra.bmc.redfish import BootTarget, PowerAction, Timeouts
from infra.commands.site import add_stack_args, site_from_args
from infra.console import Exit, confirm, emit, table
from infra.hostkeys import HostKeyError, parse_public_key, pin_key
from infra.model.site import Node, Site
from infra.provision.firstboot import DEFAULT_KEY_STORE, ArmError, HostKeyStore, KeyStoreError, arm_install
from infra.secrets import SecretError, loose_permissions

_BOOT_CHOICES = {
    "pxe": BootTarget.PXE,
    "hdd": BootTarget.HDD,
    "cd": BootTarget.CD,
    "usb": BootTarget.USB,
    "bios": BootTarget.BIOS,
    "http": BootTarget.UEFI_HTTP,
}


def register(sub: Any) -> None:
    """Register `gpufleet bmc ...`."""
    bmc = sub.add_parser("bmc", help="BMC (Redfish) control: power, one-time boot, inventory, reimage")
    bsub = bmc.add_subparsers(dest="bmc_command", required=True, metavar="ACTION")

    def common(p: argparse.ArgumentParser, *, node_required: bool = True) -> None:
        add_stack_args(p)
        p.add_argument(
            "--node", required=node_required, help="node hostname" + ("" if node_required else " (default: every node)")
        )
        p.add_argument(
            "--timeout",
            type=float,
            default=Timeouts.power_timeout,
            help="seconds to wait for a power change (default %(default)s)",
        )

    p = bsub.add_parser("status", help="power state and boot override")
    common(p, node_required=False)
    p.set_defaults(func=cmd_status)

    p = bsub.add_parser("power", help="ensure a power state (idempotent: `on` on a running node does nothing)")
    common(p)
    p.add_argument("--state", required=True, choices=[a.value for a in PowerAction])
    p.add_argument("--no-wait", action="store_true", help="return once the BMC accepted the request")
    p.set_defaults(func=cmd_power)

    p = bsub.add_parser("boot", help="set the boot device for the next boot only")
    common(p)
    p.add_argument("--target", required=True, choices=sorted(_BOOT_CHOICES))
    p.add_argument("--persistent", action="store_true", help="every boot (Continuous) instead of the next one")
    p.set_defaults(func=cmd_boot)

    p = bsub.add_parser("inventory", help="model, serial, UUID and MACs (checked against the stack)")
    common(p)
    p.set_defaults(func=cmd_inventory)

    p = bsub.add_parser(
        "reimage", help="power off, one-time PXE boot, power on: the node reinstalls (destroys its disk)"
    )
    common(p)
    p.add_argument("--yes", action="store_true", help="do not ask")
    p.add_argument(
        "--boot-grace",
        type=float,
        default=DEFAULT_BOOT_GRACE,
        help="seconds the firmware may take to reach the PXE boot; a BMC that still holds the PXE override "
        "then ignored 'Once', and the disk is set back as boot device (default %(default)s)",
    )
    p.add_argument(
        "--host-key",
        type=Path,
        help="the reinstalled node's SSH public host key (out-of-band); pinned in the stack's known_hosts",
    )
    p.add_argument("--keys", type=Path, default=DEFAULT_KEY_STORE,
                   help="host key store of network-installed (`image`) nodes: their install is armed with the "
                   "stored key, which is then pinned (default %(default)s)")
    p.set_defaults(func=cmd_reimage)


def _fail(as_json: bool, code: Exit, kind: str, message: str) -> int:
    if as_json:
        emit(True, {"ok": False, "error": kind, "message": message}, str)
    else:
        sys.stderr.write(f"error: {message}\n")
    return code


def exit_for(exc: BmcError) -> Exit:
    """Exit code of a BMC failure: can't reach or log in = prerequisite missing (5); else failed (1)."""
    if isinstance(exc, BmcUnreachable | BmcTimeout | BmcTlsError | BmcAuthError):
        return Exit.UNAVAILABLE
    if isinstance(exc, BmcNotFound | BmcRedirected):
        return Exit.INVALID
    return Exit.FAILED


def _node(site: Site, hostname: str) -> Node:
    for n in site.nodes:
        if n.hostname == hostname:
            return n
    raise KeyError(f"no node {hostname!r} in site {site.name!r}; known: " + ", ".join(n.hostname for n in site.nodes))


def with_client(args: argparse.Namespace, body: Callable[[Node, BmcClient], int]) -> int:
    """Load the node, log in to its BMC, run `body`; turn every failure into a clear message and exit code."""
    try:
        node = _node(site_from_args(args), args.node)
        if node.bmc is not None and loose_permissions(node.bmc.password):
            sys.stderr.write(f"warning: {node.bmc.password.describe()} is readable by group/others; chmod 600 it\n")
        with client_for(node, Timeouts(power_timeout=args.timeout)) as client:
            return body(node, client)
    except (KeyError, NoBmcError) as exc:
        return _fail(args.json, Exit.INVALID, "config", str(exc).strip("'\""))
    except SecretError as exc:
        return _fail(args.json, Exit.UNAVAILABLE, "secret", str(exc))
    except BmcError as exc:
        return _fail(args.json, exit_for(exc), exc.kind, str(exc))


def _status_row(node: Node, timeout: float) -> dict[str, Any]:
    row: dict[str, Any] = {"node": node.hostname, "endpoint": node.bmc.endpoint if node.bmc else None}
    try:
        with client_for(node, Timeouts(power_timeout=timeout)) as c:
            s = c.system()
            boot = s.get("Boot") or {}
            row.update(
                ok=True,
                power=s.get("PowerState"),
                boot_target=boot.get("BootSourceOverrideTarget"),
                boot_enabled=boot.get("BootSourceOverrideEnabled"),
                auth=c.auth_mode,
            )
    except (BmcError, SecretError, NoBmcError) as exc:
        row.update(ok=False, error=getattr(exc, "kind", "config"), message=str(exc))
    return row


def cmd_status(args: argparse.Namespace) -> int:
    """Power state and boot override of one node, or of every node with a BMC."""
    site = site_from_args(args)
    try:
        nodes = [_node(site, args.node)] if args.node else [n for n in site.nodes if n.bmc]
    except KeyError as exc:
        return _fail(args.json, Exit.INVALID, "config", str(exc).strip("'\""))
    rows = [_status_row(n, args.timeout) for n in nodes]

    def render(d: dict[str, Any]) -> str:
        return table(
            [
                (
                    r["node"],
                    r.get("power", "-"),
                    f"{r.get('boot_target', '-')} ({r.get('boot_enabled', '-')})",
                    r["endpoint"],
                    "ok" if r["ok"] else r["message"],
                )
                for r in d["nodes"]
            ],
            ["node", "power", "boot override", "bmc", "status"],
        )

    emit(args.json, {"nodes": rows}, render)
    return Exit.OK if all(r["ok"] for r in rows) else Exit.UNAVAILABLE


def cmd_power(args: argparse.Namespace) -> int:
    """Ensure a power state and wait for it (unless --no-wait)."""

    def body(node: Node, c: BmcClient) -> int:
        result = c.set_power(PowerAction(args.state), wait=not args.no_wait, timeout=args.timeout)
        emit(
            args.json,
            {"ok": True, "node": node.hostname, **result.as_dict()},
            lambda d: (
                f"{d['node']}: {d['before']} → {d['after']}"
                + (f" ({d['reset_type']}, {d['seconds']} s)" if d["changed"] else " (nothing to do)")
            ),
        )
        return Exit.OK

    return with_client(args, body)


def cmd_boot(args: argparse.Namespace) -> int:
    """Set the next boot device (one time unless --persistent)."""

    def body(node: Node, c: BmcClient) -> int:
        result = c.set_boot_override(_BOOT_CHOICES[args.target], enabled="Continuous" if args.persistent else "Once")
        emit(args.json, {"ok": True, "node": node.hostname, **result.as_dict()}, _render_boot(node))
        return Exit.OK

    return with_client(args, body)


def _render_boot(node: Node) -> Callable[[dict[str, Any]], str]:
    def render(d: dict[str, Any]) -> str:
        text = f"{node.hostname}: next boot from {d['target']} ({d['enabled']})"
        if not d["honoured"]:
            text += (
                f"\nwarning: asked {d['requested_enabled']}, the BMC reports {d['enabled']}; "
                "`bmc reimage` and `rebuild` set the boot device back to Hdd when the BMC keeps a PXE override"
            )
        return text

    return render


def _cell(value: Any) -> str:
    """One table cell for people: lists joined, mappings as `key=value` pairs, nothing Python-shaped."""
    if isinstance(value, dict):
        return ", ".join(f"{k}={_cell(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(_cell(v) for v in value)
    return "-" if value is None else str(value)


def cmd_inventory(args: argparse.Namespace) -> int:
    """Identity of the machine behind the BMC; exit 1 when its MACs do not include the node's PXE MAC."""

    def body(node: Node, c: BmcClient) -> int:
        inv = c.inventory().as_dict()
        declared = node.macs
        inv["declared_macs"] = declared
        inv["mac_matches"] = (declared[0] in inv["macs"]) if inv["macs"] else None
        emit(
            args.json,
            {"ok": inv["mac_matches"] is not False, "node": node.hostname, **inv},
            lambda d: table(
                [
                    (
                        k,
                        _cell(v),
                    )
                    for k, v in d.items()
                    if k != "ok"
                ],
                ["field", "value"],
            ),
        )
        return Exit.FAILED if inv["mac_matches"] is False else Exit.OK

    return with_client(args, body)


def cmd_reimage(args: argparse.Namespace) -> int:
    """Power off, one-time PXE boot, power on: the node reinstalls from the network (infra.bmc.lifecycle)."""
    key: tuple[str, str] | None = None
    if args.host_key is not None:
        # Checked before the BMC is touched: a bad key file must not leave a reimaged node nobody can reach.
        try:
            key = parse_public_key(args.host_key.read_text(encoding="utf-8"))
        except (OSError, HostKeyError) as exc:
            return _fail(args.json, Exit.INVALID, "hostkey", f"--host-key {args.host_key}: {exc}")
        if not site_from_args(args).controller.known_hosts:
            return _fail(args.json, Exit.INVALID, "hostkey", "the stack has no `controller.known_hosts` to pin into")
    if not confirm(f"reimage {args.node}: its disk will be reinstalled from PXE", args.yes):
        return Exit.ABORTED

    def body(node: Node, c: BmcClient) -> int:
        pin: Callable[[], str] | None = None
        arm: Callable[[], object] | None = None
        site = site_from_args(args)
        node_key = key
        if node.image is not None:
            # Network-installed: arm the install (its first-boot data carries the store's key) and pin that key.
            store = HostKeyStore(args.keys)

            def arm_node() -> str:
                return arm_install(site, node, store)

            arm = arm_node
            if node_key is None and site.controller.known_hosts:
                try:
                    node_key = parse_public_key(store.get(node.hostname).public)
                except KeyStoreError as exc:
                    return _fail(args.json, Exit.UNAVAILABLE, "hostkey", str(exc))
        if node_key is not None:
            known_hosts, (key_type, blob) = Path(str(site.controller.known_hosts)), node_key

            def pin() -> str:
                return pin_key(known_hosts, node, key_type, blob)
        def progress(message: str) -> None:
            if not args.json:
                sys.stderr.write(f"{node.hostname}: {message}\n")

        try:
            result = reimage(
                c, arm=arm, host_key=pin, power_timeout=args.timeout, boot_grace=args.boot_grace, progress=progress
            )
        except ArmError as exc:
            return _fail(args.json, Exit.FAILED, "arm", f"{exc} (nothing was done through the BMC)")
        emit(
            args.json,
            {"ok": True, "node": node.hostname, **result.as_dict()},
            lambda d: (
                f"{node.hostname}: PXE boot set ({d['boot']['enabled']}), "
                f"{d['power']['before']} → {d['power']['after']} in {d['seconds']} s"
                + (
                    f"; the BMC kept the PXE override ({d['override_after']['enabled']}), boot device set back to "
                    f"{d['restored']['target']}"
                    if d["restored"]
                    else ""
                )
            ),
        )
        return Exit.OK

    return with_client(args, body)
