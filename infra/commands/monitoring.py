"""`gpufleet monitoring render|check` and `gpufleet status`: metrics configuration and the site view."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from infra.commands.hostplay import converge_hosts, role_problems
from infra.commands.site import add_stack_args, site_from_args
from infra.console import Exit, emit
from infra.observe import probe, render, server, status
from infra.plan.node import plan_site


def register(sub: Any) -> None:
    """Register `monitoring` and `status`."""
    p = sub.add_parser("monitoring", help="Prometheus configuration, SLO rules and alert tests derived from the stack")
    msub = p.add_subparsers(dest="monitoring_command", required=True, metavar="ACTION")
    r = msub.add_parser("render", help="write every monitoring file of the stack into a directory")
    add_stack_args(r, json_flag=False)
    r.add_argument("--out", type=Path, required=True, help="directory to write into")
    r.set_defaults(func=cmd_render)
    c = msub.add_parser("check", help="render, then `promtool check config|rules` and `promtool test rules`")
    add_stack_args(c, json_flag=False)
    c.set_defaults(func=cmd_check)
    cv = msub.add_parser(
        "converge",
        help="install and run each segment's Prometheus, Alertmanager and SLO probe on the host the stack names",
        description="Runs playbooks/monitoring.yml (role monitoring_server) over the stack's "
        "observability.prometheus hosts. Exit 0 when every host converged, 1 when one failed.",
    )
    add_stack_args(cv)
    cv.add_argument("--host", action="append", help="only this Prometheus host (repeatable)")
    cv.add_argument("--check", action="store_true", help="check mode with diff: report, change nothing")
    cv.set_defaults(func=cmd_converge)
    pr = msub.add_parser("probe", help="run the SLO probe: one small streaming request per endpoint and interval")
    pr.add_argument("--config", type=Path, required=True, help="probe.json written by `monitoring render`")
    pr.add_argument("--rounds", type=int, help="stop after this many rounds (default: run until stopped)")
    pr.set_defaults(func=cmd_probe)

    s = sub.add_parser(
        "status",
        help="one screen per site: nodes up, each service's SLO figures against its objectives, firing alerts",
        description="Asks the site view's Prometheus (observability.site_view of the stack). Exit 0 when every "
        "node is up, every service within its objectives and no alert fires; 3 otherwise; 5 when Prometheus "
        "cannot be reached.",
    )
    add_stack_args(s)
    s.add_argument("--prometheus", help="base URL of Prometheus (default: the stack's site view)")
    s.set_defaults(func=cmd_status)


def _write(out: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def cmd_render(args: argparse.Namespace) -> int:
    """Write the files."""
    plan = plan_site(site_from_args(args))
    files = render.files(plan)
    _write(args.out, files)
    sys.stdout.write(f"wrote {len(files)} files under {args.out}\n")
    return Exit.OK


def promtool_checks(out: Path, segments: list[str]) -> list[tuple[str, subprocess.CompletedProcess[str]]]:
    """Run promtool over a rendered tree: every prometheus.yml, the rules and their unit tests."""
    runs = []
    for seg in segments:
        cmd = ["promtool", "check", "config", f"{seg}/prometheus.yml"]
        runs.append((" ".join(cmd), subprocess.run(cmd, cwd=out, capture_output=True, text=True, check=False)))
    for cmd in (["promtool", "check", "rules", "rules.yml"], ["promtool", "test", "rules", "rules.test.yml"]):
        runs.append((" ".join(cmd), subprocess.run(cmd, cwd=out, capture_output=True, text=True, check=False)))
    return runs


def cmd_check(args: argparse.Namespace) -> int:
    """Render into a temporary directory and let promtool judge it."""
    if shutil.which("promtool") is None:
        sys.stderr.write("error: promtool is not installed (Debian: apt-get install prometheus)\n")
        return Exit.UNAVAILABLE
    plan = plan_site(site_from_args(args))
    with tempfile.TemporaryDirectory(prefix="gpufleet-monitoring-") as tmp:
        out = Path(tmp)
        # prometheus.yml names its rules file relative to where promtool runs (the tree's root).
        _write(out, render.files(plan, rules_path=str(out / "rules.yml")))
        failed = False
        for cmd, p in promtool_checks(out, [p.segment for p in plan.site.observability.prometheus]):
            ok = p.returncode == 0
            failed |= not ok
            sys.stdout.write(f"{'ok  ' if ok else 'FAIL'} {cmd}\n")
            if not ok:
                sys.stdout.write((p.stdout + p.stderr).strip()[-2000:] + "\n")
    return Exit.FAILED if failed else Exit.OK


def cmd_status(args: argparse.Namespace) -> int:
    """Print the site's status; exit 3 when anything is outside its target."""
    plan = plan_site(site_from_args(args))
    base = args.prometheus or status.site_view_url(plan)
    if base is None:
        sys.stderr.write("error: the stack declares no observability.site_view; pass --prometheus URL\n")
        return Exit.INVALID
    try:
        result = status.collect(plan, base)
    except status.PrometheusError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return Exit.UNAVAILABLE
    emit(args.json, result.as_dict(), status.render)
    return Exit.OK if result.ok else Exit.DRIFT


def check_role_arguments(inventory: dict[str, Any]) -> list[str]:
    """Every violation of the monitoring_server role's argument spec, checked on the controller before a run."""
    return role_problems(inventory, server.GROUP, server.ROLE)


def cmd_converge(args: argparse.Namespace) -> int:
    """Converge the Prometheus hosts (check mode with --check)."""
    site = site_from_args(args)
    plan = plan_site(site)
    names = [h.name for h in server.monitoring_hosts(site)]
    unknown = sorted(set(args.host or []) - set(names))
    if unknown:
        sys.stderr.write(
            f"error: --host {', '.join(unknown)}: not a Prometheus host of the stack "
            f"(observability.prometheus: {', '.join(names) or 'none'})\n"
        )
        return Exit.INVALID
    hosts = args.host or names
    if not hosts:
        sys.stderr.write("error: the stack declares no observability.prometheus host\n")
        return Exit.INVALID
    with tempfile.TemporaryDirectory(prefix="gpufleet-monitoring-") as tmp:
        app = Path(tmp) / "gpufleet-slo-probe.pyz"
        app.write_bytes(server.probe_zipapp())
        inventory = server.inventory(plan, str(app), hosts)
        return converge_hosts(args, site, "monitoring.yml", inventory, hosts, group=server.GROUP, role=server.ROLE,
                              label="monitoring")


def cmd_probe(args: argparse.Namespace) -> int:
    """Serve the probe's metrics on its loopback address and probe until stopped (what the zipapp runs)."""
    argv = ["--config", str(args.config)] + (["--rounds", str(args.rounds)] if args.rounds is not None else [])
    return probe.main(argv)
