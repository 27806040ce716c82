"""`gpufleet exec-host runtime | install | status`: the execution runtime of segment-local execution."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from infra import ssh
from infra.ansible.remote import runtime
from infra.ansible.remote.job import ExecHost, exec_host
from infra.commands.site import add_stack_args, site_from_args
from infra.console import CommandError, Exit, emit, table
from infra.model.site import Site
from infra.ssh import SshSettings

DEFAULT_OUT = Path(".gpufleet/exec-runtime")


def register(sub: Any) -> None:
    """Register `exec-host`."""
    p = sub.add_parser(
        "exec-host",
        help="execution hosts of segment-local execution: build and install their runtime",
        description="A segment with `execution: {host: ...}` runs its Ansible on that host: `converge` streams "
        "each job to it with ansible-runner's transmit/worker/process protocol over SSH. The host needs the "
        "runtime (ansible-core, ansible-runner, Mitogen at the controller's versions); roles travel with each job.",
    )
    esub = p.add_subparsers(dest="exec_command", required=True, metavar="ACTION")
    r = esub.add_parser("runtime", help="build the runtime artifact (reproducible tar.gz) and print its manifest")
    r.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"directory for the artifact (default {DEFAULT_OUT})")
    r.add_argument("--json", action="store_true", help="machine-readable JSON output")
    r.set_defaults(func=cmd_runtime)
    for name, func, text in (
        ("install", cmd_install, "install the runtime on each selected segment's execution host over SSH"),
        ("status", cmd_status, "is the runtime the controller needs installed on each execution host?"),
    ):
        i = esub.add_parser(name, help=text)
        add_stack_args(i)
        i.add_argument("--segment", help="only this segment's execution host")
        if name == "install":
            i.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the artifact is built/kept")
        i.set_defaults(func=func)


def _targets(site: Site, segment: str | None) -> list[ExecHost]:
    names = [segment] if segment else [s.name for s in site.segments]
    if segment and site.segment(segment) is None:
        known = ", ".join(s.name for s in site.segments)
        raise CommandError(Exit.INVALID, f"--segment: no segment {segment!r}; known: {known}")
    out = [t for n in names if (t := exec_host(site, n)) is not None]
    if not out:
        raise CommandError(
            Exit.INVALID,
            "no selected segment has an execution host: set `segments[].execution.host` in the stack "
            "(every segment runs Ansible on the controller now)",
        )
    return out


def cmd_runtime(args: argparse.Namespace) -> int:
    """Build the artifact."""
    path = runtime.build(args.out)
    data = {"artifact": str(path), **runtime.manifest().as_dict()}
    emit(
        args.json,
        data,
        lambda d: f"{d['artifact']}\nid {d['id']}, python {d['python']}\n"
        + "\n".join(f"  {k} {v}" for k, v in d["dists"].items()),
    )
    return Exit.OK


def cmd_install(args: argparse.Namespace) -> int:
    """Install the runtime on every selected execution host."""
    site = site_from_args(args)
    targets = _targets(site, args.segment)
    artifact = runtime.build(args.out)
    settings = SshSettings.of(site)
    rows = []
    failed = False
    for t in targets:
        try:
            rel = runtime.install(settings, t.address, user=t.user, runtime_dir=t.runtime_dir, artifact=artifact)
            rows.append({"segment": t.segment, "host": t.name, "address": t.address, "ok": True, "release": rel})
        except (runtime.RuntimeInstallError, ssh.SshError) as exc:
            failed = True
            rows.append({"segment": t.segment, "host": t.name, "address": t.address, "ok": False, "error": str(exc)})
    emit(
        args.json,
        {"runtime": runtime.manifest().runtime_id, "hosts": rows},
        lambda d: table(
            [(r["segment"], r["host"], r["address"], r.get("release") or "FAILED: " + r["error"]) for r in d["hosts"]],
            ["segment", "host", "address", "release"],
        ),
    )
    return Exit.FAILED if failed else Exit.OK


def cmd_status(args: argparse.Namespace) -> int:
    """Exit 1 when an execution host lacks the runtime release the controller's jobs need."""
    site = site_from_args(args)
    settings = SshSettings.of(site)
    rows = []
    for t in _targets(site, args.segment):
        marker = f"{t.release}/manifest.json"
        try:
            p = ssh.run(
                ssh.argv(settings, t.address, ssh.shell_command("test", "-f", marker), user=t.user),
                host=t.address,
                timeout=30,
            )
            state = "installed" if p.returncode == 0 else "missing"
        except ssh.SshError as exc:
            state = f"unreachable: {exc.detail}"
        rows.append({"segment": t.segment, "host": t.name, "address": t.address, "runtime": state})
    emit(
        args.json,
        {"runtime": runtime.manifest().runtime_id, "hosts": rows},
        lambda d: table(
            [(r["segment"], r["host"], r["address"], r["runtime"]) for r in d["hosts"]],
            ["segment", "host", "address", f"runtime {d['runtime']}"],
        ),
    )
    return Exit.OK if all(r["runtime"] == "installed" for r in rows) else Exit.FAILED
