"""One play over a stack's service hosts (Prometheus hosts, provisioning hosts): check, run, report.

`gpufleet monitoring converge` and `gpufleet provision converge` share it: the role's argument spec is checked
on the controller for every host before anything runs (exit 1 with every problem, nothing run), then one
ansible-runner play, reported per host; exit 0 when every host converged, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from typing import Any

from infra.ansible import rolespecs
from infra.ansible.runner import Progress, run_playbook
from infra.console import Exit, emit
from infra.model.site import Site
from infra.ssh import SshSettings


def role_problems(inventory: dict[str, Any], group: str, role: str) -> list[str]:
    """Every violation of `role`'s argument spec by the variables of the hosts of inventory group `group`."""
    hosts = inventory["all"]["children"][group]["hosts"]
    return [line for host, hostvars in hosts.items() for line in rolespecs.problems(host, [role], hostvars)]


def converge_hosts(args: argparse.Namespace, site: Site, playbook: str, inventory: dict[str, Any],
                   hosts: list[str], *, group: str, role: str, label: str) -> int:
    """Check the role's arguments, run `playbook` over `hosts` (check mode with args.check), report."""
    found = role_problems(inventory, group, role)
    if found:
        sys.stderr.write("error: role variables the role does not accept (nothing was run):\n  "
                         + "\n  ".join(found) + "\n")
        return Exit.FAILED
    result = run_playbook(playbook, inventory, hosts, ssh=SshSettings.of(site), check=args.check,
                          progress=None if args.json else Progress(hosts), label=label)
    emit(args.json, result.as_dict(), render_run)
    return Exit.OK if result.succeeded else Exit.FAILED


def provisioning_notes(site: Site, hostnames: Iterable[str]) -> list[str]:
    """A note for each host of `hostnames` that is a segment's provisioning host, naming the command for it.

    `gpufleet converge` of such a node runs the node roles only; its provisioning service has its own step.
    """
    names = set(hostnames)
    return [f"note: {seg.provisioning.host} is segment {seg.name}'s provisioning host; its provisioning service "
            f"(dnsmasq, iPXE, HTTP) is converged by `gpufleet provision converge --segment {seg.name}`"
            for seg in site.segments if seg.provisioning is not None and seg.provisioning.host in names]


def render_run(d: dict[str, Any]) -> str:
    """Text report of a run: each host ok/FAILED with its changed and failed tasks."""
    lines = []
    for host, h in d["hosts"].items():
        state = "ok" if h["succeeded"] else "FAILED"
        lines.append(f"{host}: {state}, {len(h['changed_tasks'])} changed{' (check mode)' if d['check'] else ''}")
        lines += [f"  changed: {t}" for t in h["changed_tasks"]]
        lines += [f"  failed: {f['task']}: {f['msg']}" for f in h["failures"]]
    return "\n".join(lines) + "\n"
