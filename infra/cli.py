"""`gpufleet`: the second entry point next to `pulumi`. Every step a Pulumi resource runs is one of these."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from infra.ansible.rolespecs import RoleArgumentError
from infra.console import Exit
from infra.model.load import SiteError
from infra.plan.node import UnknownNodeError

# Each module defines `register(subparsers)`; commands set `func(args) -> int`.
COMMAND_MODULES = (
    "infra.commands.bmc",
    "infra.commands.dr",
    "infra.commands.site",
    "infra.commands.converge",
    "infra.commands.lab",
    "infra.commands.bench",
    "infra.commands.inference",
    "infra.commands.bundle",
    "infra.commands.review",
    "infra.commands.monitoring",
    "infra.commands.provision",
)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (all command modules registered)."""
    parser = argparse.ArgumentParser(
        prog="gpufleet",
        description="Typed GPU site → Pulumi components and Ansible roles. Exit codes: 0 ok, 1 failed, "
        "2 invalid input (nothing touched), 3 drift found, 4 not confirmed, 5 prerequisite missing.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; bad stack files exit 2 with every problem listed."""
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except (SiteError, UnknownNodeError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return Exit.INVALID
    except RoleArgumentError as exc:
        sys.stderr.write(f"error: {exc}\nThis is a gpufleet bug (the plan and a role disagree); please report it.\n")
        return Exit.FAILED
    except KeyboardInterrupt as exc:
        sys.stderr.write(f"interrupted: {exc}\n" if str(exc) else "interrupted\n")
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
