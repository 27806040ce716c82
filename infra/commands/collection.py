"""`gpufleet collection build|ee` and `gpufleet inventory`: the roles for AWX/AAP and execution environments."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from infra.ansible.converge import select
from infra.ansible.ee import EE_FILE, render
from infra.ansible.inventory import build_inventory
from infra.commands.site import add_stack_args, site_from_args
from infra.console import Exit
from infra.model.load import project_dir
from infra.plan.node import plan_site


def register(sub: Any) -> None:
    """Register `collection` and `inventory`."""
    p = sub.add_parser("collection", help="the roles as the Ansible collection galaxy.yml declares")
    csub = p.add_subparsers(dest="collection_command", required=True, metavar="ACTION")
    b = csub.add_parser("build", help="ansible-galaxy collection build into a directory")
    b.add_argument("--out", type=Path, required=True, help="directory for the .tar.gz")
    b.set_defaults(func=cmd_build)
    e = csub.add_parser("ee", help=f"write (or --check) {EE_FILE} from uv.lock and galaxy.yml")
    e.add_argument("--check", action="store_true", help="exit 1 if the file differs from what would be written")
    e.set_defaults(func=cmd_ee)

    i = sub.add_parser(
        "inventory",
        help="the inventory and host variables gpufleet converges with, for an AWX/AAP project (no secrets)",
        description="Prints the JSON inventory of the selected nodes exactly as `gpufleet converge` builds it. "
        "Secrets are not in it: the BMC password is not a role variable, and the registry token is an extra "
        "variable that AWX injects from a credential (docs/awx.md).",
    )
    add_stack_args(i, json_flag=False)
    g = i.add_mutually_exclusive_group()
    g.add_argument("--node", action="append", help="only this node (repeatable)")
    g.add_argument("--segment", help="only the nodes of this segment")
    i.add_argument("--out", type=Path, help="write here instead of stdout")
    i.set_defaults(func=cmd_inventory)


def cmd_build(args: argparse.Namespace) -> int:
    """Build the collection artifact."""
    args.out.mkdir(parents=True, exist_ok=True)
    galaxy = Path(sys.executable).parent / "ansible-galaxy"
    p = subprocess.run(
        [str(galaxy), "collection", "build", "--force", "--output-path", str(args.out), str(project_dir())],
        capture_output=True,
        text=True,
        check=False,
    )
    sys.stdout.write(p.stdout)
    if p.returncode != 0:
        sys.stderr.write(f"error: ansible-galaxy collection build failed: {p.stderr.strip()[-500:]}\n")
        return Exit.FAILED
    return Exit.OK


def cmd_ee(args: argparse.Namespace) -> int:
    """Write or check execution-environment.yml."""
    root = project_dir()
    path = root / EE_FILE
    text = render(root)
    if args.check:
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            sys.stderr.write(f"{path} is out of date: run `gpufleet collection ee`\n")
            return Exit.FAILED
        return Exit.OK
    path.write_text(text, encoding="utf-8")
    sys.stdout.write(f"wrote {path}\n")
    return Exit.OK


def cmd_inventory(args: argparse.Namespace) -> int:
    """Print or write the inventory."""
    site = site_from_args(args)
    try:
        nodes = select(plan_site(site), args.node, args.segment)
    except (KeyError, ValueError) as exc:
        sys.stderr.write(f"error: {exc.args[0]}\n")
        return Exit.INVALID
    text = json.dumps(build_inventory(site, nodes), indent=2, sort_keys=True) + "\n"
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return Exit.OK
