"""`gpufleet provision render|check`: the network-install service of each segment, derived from the stack."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from infra.commands.site import add_stack_args, site_from_args
from infra.console import Exit
from infra.provision.render import SegmentService, render_site


def register(sub: Any) -> None:
    """Register `provision`."""
    p = sub.add_parser(
        "provision",
        help="provisioning service (dnsmasq DHCP/TFTP + iPXE scripts) per segment, derived from the stack",
    )
    psub = p.add_subparsers(dest="provision_command", required=True, metavar="ACTION")
    r = psub.add_parser(
        "render",
        help="write <segment>/dnsmasq.conf and <segment>/http/… (boot.ipxe, ipxe/<mac>.ipxe) into a directory",
    )
    add_stack_args(r, json_flag=False)
    r.add_argument("--out", type=Path, required=True, help="directory to write into")
    r.set_defaults(func=cmd_render)
    c = psub.add_parser("check", help="render into a temporary directory, then `dnsmasq --test -C` each config")
    add_stack_args(c, json_flag=False)
    c.set_defaults(func=cmd_check)


def write_service(out: Path, svc: SegmentService) -> list[Path]:
    """Write one segment's files under `out/<segment>/`; return the paths written."""
    base = out / svc.segment
    written = []
    files = {"dnsmasq.conf": svc.dnsmasq_conf} | {f"http/{rel}": text for rel, text in svc.http_files.items()}
    for rel, text in files.items():
        path = base / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def cmd_render(args: argparse.Namespace) -> int:
    """Write the files of every segment with a provisioning service."""
    services = render_site(site_from_args(args))
    if not services:
        sys.stderr.write("error: no segment declares `provisioning`; see docs/bare-metal.md\n")
        return Exit.INVALID
    count = sum(len(write_service(args.out, svc)) for svc in services)
    for svc in services:
        sys.stdout.write(
            f"{svc.segment}: {svc.mode.value} on {svc.host} ({svc.address}), {len(svc.nodes)} reservations, "
            f"HTTP {svc.base_url}\n"
        )
    sys.stdout.write(f"wrote {count} files under {args.out}\n")
    return Exit.OK


def dnsmasq_test(conf: Path) -> subprocess.CompletedProcess[str]:
    """`dnsmasq --test -C FILE`: dnsmasq's own syntax check of a configuration file."""
    return subprocess.run(
        ["dnsmasq", "--test", f"--conf-file={conf}"], capture_output=True, text=True, check=False, timeout=30
    )


def cmd_check(args: argparse.Namespace) -> int:
    """Render into a temporary directory and let dnsmasq judge every configuration."""
    if shutil.which("dnsmasq") is None:
        sys.stderr.write("error: dnsmasq is not installed (Debian: apt-get install dnsmasq-base)\n")
        return Exit.UNAVAILABLE
    services = render_site(site_from_args(args))
    failed = 0
    with tempfile.TemporaryDirectory(prefix="gpufleet-provision-") as tmp:
        for svc in services:
            write_service(Path(tmp), svc)
            result = dnsmasq_test(Path(tmp) / svc.segment / "dnsmasq.conf")
            ok = result.returncode == 0
            failed += not ok
            sys.stdout.write(f"{svc.segment}: dnsmasq --test {'ok' if ok else 'FAILED'}\n")
            if not ok:
                sys.stdout.write(result.stdout + result.stderr)
    return Exit.FAILED if failed else Exit.OK
