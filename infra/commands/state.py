"""`gpufleet state backup | list | restore`: Pulumi state backups (stack export/import) for backend loss."""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from infra.console import Exit, confirm, emit, table
from infra.dr import state
from infra.model.load import project_dir

DEFAULT_BACKUP_DIR = Path("/var/backups/gpufleet/state")


def register(sub: Any) -> None:
    """Register state (backup, list, restore)."""
    st = sub.add_parser("state", help="Pulumi state backups (stack export/import) for backend loss")
    ssub = st.add_subparsers(dest="state_command", required=True, metavar="ACTION")
    p = ssub.add_parser("backup", help="`pulumi stack export` (secrets stay encrypted) with rotation")
    p.add_argument("--stack", required=True, help="Pulumi stack name (as `pulumi stack ls` shows it)")
    p.add_argument("--dir", type=Path, default=DEFAULT_BACKUP_DIR)
    p.add_argument("--keep", type=int, default=14, help="newest backups kept (default %(default)s)")
    p.add_argument("--pulumi", default="pulumi", help="Pulumi CLI binary")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_state_guarded(cmd_state_backup))
    p = ssub.add_parser("list", help="backups of a stack, newest last (unknown age at the end)")
    p.add_argument("--stack", required=True)
    p.add_argument("--dir", type=Path, default=DEFAULT_BACKUP_DIR)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_state_guarded(cmd_state_list))
    p = ssub.add_parser("restore", help="check a backup, save the current state, then `pulumi stack import` it")
    p.add_argument("--stack", required=True)
    p.add_argument("--file", type=Path, required=True)
    p.add_argument("--dir", type=Path, default=DEFAULT_BACKUP_DIR,
                   help="where the current state is saved before importing (default %(default)s)")
    p.add_argument("--pulumi", default="pulumi")
    p.add_argument("--yes", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_state_guarded(cmd_state_restore))


def _state_fail(args: argparse.Namespace, exc: Exception) -> int:
    """One line (or JSON under --json) and the exit code of a state error: 2 refused input, 5 no CLI, else 1."""
    code = (Exit.INVALID if getattr(exc, "invalid", False) else Exit.UNAVAILABLE if getattr(exc, "missing", False)
            else Exit.FAILED)
    message = " ".join(str(exc).split())
    if getattr(args, "json", False):
        emit(True, {"ok": False, "message": message, "exit": int(code)}, str)
    else:
        sys.stderr.write(f"error: {message}\n")
    return code


def _state_guarded(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """The `state` commands' boundary: every error is an exit code and one line, never a traceback."""

    @functools.wraps(func)
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except (state.StateError, OSError) as exc:
            return _state_fail(args, exc)
        except Exception as exc:  # the command boundary: never a traceback
            return _state_fail(args, RuntimeError(f"unexpected {type(exc).__name__}: {exc} (please report this)"))

    return run


def _project_name() -> str:
    """The Pulumi project name (URNs carry it): `name:` of Pulumi.yaml."""
    try:
        data = yaml.safe_load((project_dir() / "Pulumi.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        data = None
    name = data.get("name") if isinstance(data, dict) else None
    return name if isinstance(name, str) and name else "gpufleet"


def cmd_state_backup(args: argparse.Namespace) -> int:
    """Export the stack's state; exit 5 without the Pulumi CLI, 1 when the export is unusable, 2 bad --keep."""
    try:
        b = state.backup(args.stack, args.dir, keep=args.keep, pulumi=args.pulumi, cwd=project_dir())
    except (state.StateError, OSError) as exc:
        return _state_fail(args, exc)
    emit(
        args.json,
        {"ok": True, **b.as_dict()},
        lambda d: (
            f"wrote {d['path']} ({d['resources']} resources, sha256 {d['sha256'][:12]})"
            + (f"; removed {len(d['removed'])} old backup(s)" if d["removed"] else "")
            + (f"; left {len(d['unknown_age'])} backup(s) of unknown age (time in the future)" if d["unknown_age"]
               else "")
        ),
    )
    return Exit.OK


def cmd_state_list(args: argparse.Namespace) -> int:
    """List backups (known times oldest first, then unknown age)."""
    try:
        files = state.list_backups(args.dir, args.stack)
        rows = [{"path": str(f), "bytes": f.stat().st_size,
                 "taken": (t.strftime("%Y-%m-%dT%H:%M:%SZ") if (t := state.backup_time(f)) else None)} for f in files]
    except OSError as exc:
        return _state_fail(args, exc)
    emit(
        args.json,
        {"backups": rows},
        lambda d: table([(b["path"], b["bytes"], b["taken"] or "unknown (future)") for b in d["backups"]],
                        ["backup", "bytes", "taken"]),
    )
    return Exit.OK


def cmd_state_restore(args: argparse.Namespace) -> int:
    """Check the backup, ask (stack, resources, age), save the current state, then import."""
    try:
        plan = state.read_restore(args.stack, args.file, _project_name())
    except state.StateError as exc:
        return _state_fail(args, exc)
    prompt = (f"import {args.file} as the state of stack {args.stack}: {plan.facts.resources} resources "
              f"({plan.facts.managed} besides the stack and providers), backup age {plan.age()}; the current "
              f"state is saved to {state.backup_dir(args.dir, args.stack)} first")
    if not confirm(prompt, args.yes):
        return Exit.ABORTED
    try:
        saved = state.restore(args.stack, args.file, pulumi=args.pulumi, cwd=project_dir(), project=_project_name(),
                              backup_to=args.dir, plan=plan)
    except (state.StateError, OSError) as exc:
        return _state_fail(args, exc)
    emit(args.json, {"ok": True, "stack": args.stack, "file": str(args.file), "resources": plan.facts.resources,
                     "previous_state": str(saved.path) if saved else None},
         lambda d: f"imported {d['file']} into stack {d['stack']} ({d['resources']} resources); the state it replaced "
                   f"is in {d['previous_state']}; next: `pulumi preview` should show no changes")
    return Exit.OK
