"""`gpufleet`: the second entry point next to `pulumi`. Every step a Pulumi resource runs is one of these.

One error path: every command ends with an exit code of the README's table and, on failure, one line
(one JSON object under `--json`). Known errors map to their codes here; anything else is a gpufleet bug,
reported in one line with its traceback written to a log file — never to the terminal.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from infra.ansible.rolespecs import RoleArgumentError
from infra.console import CommandError, Exit, fail, one_line, write_error_log
from infra.model.load import SiteError
from infra.plan.node import UnknownNodeError
from infra.ssh import SshError

# Every top-level command → the one module (per command group) that registers it, so a command imports only
# what it uses: `gpufleet validate` never loads Pulumi, Ansible or the lab. tests/unit/test_cli_index.py checks
# this index against what the modules register. Each module defines `register(subparsers)`; commands set
# `func(args) -> int`.
COMMANDS: dict[str, str] = {
    "validate": "infra.commands.site",
    "plan": "infra.commands.site",
    "schema": "infra.commands.site",
    "vram": "infra.commands.site",
    "converge": "infra.commands.converge",
    "check": "infra.commands.converge",
    "validate-node": "infra.commands.converge",
    "wait-ssh": "infra.commands.converge",
    "provision-slot": "infra.commands.converge",
    "rebuild": "infra.commands.rebuild",
    "drift": "infra.commands.drift",
    "fingerprint": "infra.commands.fingerprint",
    "state": "infra.commands.state",
    "bmc": "infra.commands.bmc",
    "lock": "infra.commands.lock",
    "bundle": "infra.commands.bundle",
    "mirror": "infra.commands.mirror",
    "review": "infra.commands.review",
    "bench-inference": "infra.commands.inference",
    "monitoring": "infra.commands.monitoring",
    "status": "infra.commands.monitoring",
    "rollout-record": "infra.commands.lifecycle",
    "rollout-guard": "infra.commands.lifecycle",
    "decommission": "infra.commands.lifecycle",
    "collection": "infra.commands.collection",
    "inventory": "infra.commands.collection",
    "lab": "infra.commands.lab",
    "bench": "infra.commands.bench",
    "provision": "infra.commands.provision",
    "fabric": "infra.commands.fabric",
    "image": "infra.commands.provision",
    "exec-host": "infra.commands.exechost",
}
COMMAND_MODULES = tuple(dict.fromkeys(COMMANDS.values()))
EXIT_INTERRUPTED = 130  # the shell's code for SIGINT; a run stopped by Ctrl-C/SIGTERM says what to re-run


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser: only `command`'s module when it is a known command, else every module (help, typos)."""
    parser = argparse.ArgumentParser(
        prog="gpufleet",
        description="Typed GPU site → Pulumi components and Ansible roles. Exit codes: 0 ok, 1 failed, "
        "2 invalid input (nothing touched), 3 drift found, 4 not confirmed, 5 prerequisite missing.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in (COMMANDS[command],) if command in COMMANDS else COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def command_of(argv: Sequence[str]) -> str | None:
    """The command word of an argument list (the first word that is not an option)."""
    return next((a for a in argv if not a.startswith("-")), None)


def _internal_error(args: argparse.Namespace | None, exc: BaseException) -> int:
    log = write_error_log(exc)
    where = f"details in {log}" if log else "no log file could be written"
    return fail(
        args,
        Exit.FAILED,
        f"internal error: {type(exc).__name__}: {one_line(str(exc), 300)} (this is a gpufleet bug; {where})",
        log=str(log) if log else None,
    )


def run(args: argparse.Namespace) -> int:
    """Run a parsed command and turn every way it can end into an exit code and at most one message."""
    try:
        code = args.func(args)
    except CommandError as exc:
        return fail(args, exc.code, exc.message, **exc.fields)
    except SiteError as exc:
        return fail(
            args,
            Exit.INVALID,
            f"{exc.source}: {len(exc.problems)} problem(s)",
            lines=[str(p) for p in exc.problems],
            problems=[p.as_dict() for p in exc.problems],
        )
    except UnknownNodeError as exc:
        return fail(args, Exit.INVALID, str(exc))
    except RoleArgumentError as exc:
        return fail(
            args, Exit.FAILED, f"{exc} — this is a gpufleet bug (the plan and a role disagree); please report it"
        )
    except SshError as exc:
        return fail(args, Exit.FAILED, str(exc), host=exc.host, kind=exc.kind)
    except PermissionError as exc:
        return fail(args, Exit.UNAVAILABLE, f"permission denied: {exc.filename or exc} (run as a user that may)")
    except KeyboardInterrupt as exc:
        sys.stderr.write(f"interrupted: {one_line(str(exc))}\n" if str(exc) else "interrupted\n")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`| head`): nothing left to tell it; keep Python from complaining at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return Exit.FAILED
    except Exception as exc:
        return _internal_error(args, exc)
    if not isinstance(code, int) or isinstance(code, bool) or not 0 <= code <= max(Exit):
        return _internal_error(args, TypeError(f"command {args.command!r} returned {code!r}, not an exit code"))
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Parse and run one command (argparse errors exit 2 through argparse itself)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser(command_of(argv))
    except Exception as exc:  # a broken install (missing dependency) must still end in one line
        if isinstance(exc, ModuleNotFoundError):
            return fail(None, Exit.UNAVAILABLE, f"missing Python package {exc.name!r}: reinstall gpufleet")
        return _internal_error(None, exc)
    args = parser.parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
