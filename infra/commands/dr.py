"""`gpufleet rebuild`, `gpufleet drift`, `gpufleet fingerprint`, `gpufleet state backup|restore|list`."""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from infra.commands.site import add_stack_args, site_from_args
from infra.console import Exit, confirm, emit, table
from infra.dr import fingerprint as fp
from infra.dr import state
from infra.dr.drift import NodeDrift, drift
from infra.dr.rebuild import DEFAULT_RECORD_DIR, Refused, rebuild
from infra.dr.remote import RemoteError, probe
from infra.dr.steps import StackRef, check_with_roles
from infra.model.load import project_dir
from infra.model.site import Site
from infra.plan.node import plan_site

DEFAULT_BACKUP_DIR = Path("/var/backups/gpufleet/state")


def register(sub: Any) -> None:
    """Register rebuild, drift, fingerprint and state."""
    p = sub.add_parser("rebuild", help="reimage a node through its BMC, converge, validate, prove it is the same")
    add_stack_args(p)
    p.add_argument("--node", required=True)
    p.add_argument("--yes", action="store_true", help="do not ask (the node's disk is reinstalled)")
    p.add_argument(
        "--host-key",
        type=Path,
        help="the node's new SSH public host key from an out-of-band source (required on real sites)",
    )
    p.add_argument("--records", type=Path, default=DEFAULT_RECORD_DIR, help="fingerprint records folder")
    p.add_argument("--ssh-timeout", type=float, help="seconds to wait for SSH (default: the stack's reboot timeout)")
    p.set_defaults(func=cmd_rebuild)

    p = sub.add_parser("drift", help="what differs from the plan on each node (exit 3 when anything does)")
    add_stack_args(p)
    p.add_argument("--node", action="append", help="only this node (repeatable)")
    p.add_argument(
        "--no-check",
        action="store_true",
        help="probe only (packages, holds, services, GPUs, reboot); skip the roles' check mode",
    )
    p.set_defaults(func=cmd_drift)

    p = sub.add_parser("fingerprint", help="a node's fingerprint: package versions, managed files, services, GPUs")
    add_stack_args(p)
    p.add_argument("--node", required=True)
    p.add_argument("--record", action="store_true", help="save it as the baseline a later rebuild compares with")
    p.add_argument("--records", type=Path, default=DEFAULT_RECORD_DIR)
    p.set_defaults(func=cmd_fingerprint)

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


def _ref(args: argparse.Namespace) -> StackRef:
    return StackRef(args.stack, args.stack_file)


# -- rebuild ---------------------------------------------------------------------------------------------


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
    if not confirm(f"rebuild {args.node}: its disk is reinstalled through PXE, then converged", args.yes):
        return Exit.ABORTED

    def progress(msg: str) -> None:
        if not args.json:
            sys.stderr.write(f"… {msg}\n")

    try:
        report = rebuild(
            site,
            plan,
            _ref(args),
            record_dir=args.records,
            host_key=args.host_key,
            ssh_timeout=args.ssh_timeout,
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
        return "\n".join(lines)

    emit(args.json, report.as_dict(), render)
    if report.failed_step:
        return Exit.FAILED
    return Exit.OK if report.identical is not False else Exit.DRIFT


# -- drift -----------------------------------------------------------------------------------------------


def _cell(v: Any) -> str:
    return "(absent)" if v is None else str(v)


def _render_drift(d: dict[str, Any]) -> str:
    rows: list[tuple[str, ...]] = []
    for n in d["nodes"]:
        if n["status"] == "unreachable":
            rows.append((n["hostname"], "UNREACHABLE", "", "", n["error"]))
            continue
        if not n["items"]:
            extra = [] if n["check"] == "ran" else [f"check {n['check']}"]
            rows.append((n["hostname"], n["status"], "", "", "; ".join(extra + n.get("notes", []))))
        for i in n["items"]:
            rows.append((n["hostname"], i["kind"], i["item"], _cell(i["want"]), _cell(i["have"])))
    summary = (
        f"\n{d['drifted']} of {len(d['nodes'])} node(s) drifted, {d['unreachable']} unreachable ({d['seconds']:.1f} s)"
    )
    return table(rows, ["node", "kind", "item", "want", "have"]) + summary


def run_drift(args: argparse.Namespace) -> tuple[list[NodeDrift], float]:
    """The drift of the nodes the arguments name (benchmark entry point too)."""
    import time

    site = site_from_args(args)
    sp = plan_site(site)
    plans = [sp.node(h) for h in args.node] if args.node else list(sp.nodes)
    t0 = time.monotonic()
    reports = drift(site, plans, check=None if args.no_check else check_with_roles)
    return reports, time.monotonic() - t0


def cmd_drift(args: argparse.Namespace) -> int:
    """Exit 0 clean, 3 drift found, 1 a node could not be read."""
    reports, seconds = run_drift(args)
    data = {
        "nodes": [r.as_dict() for r in reports],
        "drifted": sum(r.drifted for r in reports),
        "unreachable": sum(not r.reachable for r in reports),
        "seconds": round(seconds, 2),
    }
    emit(args.json, data, _render_drift)
    if any(r.drifted for r in reports):
        return Exit.DRIFT
    return Exit.FAILED if any(r.status in ("unreachable", "check-failed") for r in reports) else Exit.OK


# -- fingerprint -----------------------------------------------------------------------------------------


def cmd_fingerprint(args: argparse.Namespace) -> int:
    """Print (and optionally record) a node's fingerprint."""
    site = site_from_args(args)
    try:
        plan = plan_site(site).node(args.node)
        data = fp.fingerprint(probe(site, plan))
    except RemoteError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return Exit.UNAVAILABLE
    if args.record:
        fp.save(args.records, _ref(args).name, data)

    def render(d: dict[str, Any]) -> str:
        rows = [("package", k, v or "(absent)") for k, v in d["packages"].items()]
        rows += [("file", k, v[:16]) for k, v in d["files"].items()]
        rows += [("service", k, f"{v['active']}, {v['enabled']}") for k, v in d["services"].items()]
        rows += [("gpu", g.get("index", "?"), f"{g.get('name')} {g.get('uuid')}") for g in d["gpus"]]
        return table(rows, ["kind", "item", "value"])

    emit(args.json, data, render)
    return Exit.OK


# -- state -----------------------------------------------------------------------------------------------


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
