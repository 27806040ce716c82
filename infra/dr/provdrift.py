"""Drift of the segments' provisioning hosts: what `gpufleet provision converge` would change on each.

A provisioning host (dnsmasq DHCP/TFTP, the iPXE scripts, kernels and images it serves over HTTP) is not a
node: the node probe does not read it and the node roles do not manage it. What it should serve is what
`roles/provisioning` writes from `infra.provision.service.inventory` (the one derivation of its variables,
shared with `provision converge`), so its drift is that play in check mode with diff, read per host:

- every task that would change (a hand-edited dnsmasq configuration, a stopped or disabled dnsmasq unit, a
  package at another version, a served iPXE script, kernel or image with other bytes);
- the path of every file it would rewrite. Diff bodies are never reported: a file on the provisioning host
  may hold anything (the first-boot data beside the scripts holds private host keys), and the paths say
  where to look.

A host the play cannot reach is `unreachable`; a host whose variables cannot be derived (an image not in the
lock, an unset version) or whose play failed is `check-failed` with the reason: both mean "not read", never
"clean".
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from infra.ansible import rolespecs
from infra.ansible.runner import HostResult, RunResult, run_playbook
from infra.bundle.lock import Lock
from infra.dr.drift import CheckOutcome, NodeDrift, with_check
from infra.model.site import Site
from infra.provision import service
from infra.provision.render import RenderError
from infra.provision.service import ProvisioningHost, ProvisioningInputError
from infra.ssh import SshSettings

PLAYBOOK = "provisioning.yml"
"""The play `gpufleet provision converge` runs (playbooks/provisioning.yml)."""

# Runs the provisioning play in check mode with diff over `hosts` of `inventory` (ansible-runner in the
# product, a fake in unit tests).
PlayRunner = Callable[[dict[str, Any], list[str]], RunResult]

NOT_CHECKED = "not checked"


@dataclass
class ProvisioningDrift(NodeDrift):
    """Drift of one segment's provisioning host (`hostname`), read by the provisioning play's check mode."""

    segment: str = ""

    @property
    def status(self) -> str:
        """clean, drift, unreachable, check-failed, or "not checked" (`--no-check`: there is no probe of it)."""
        if self.reachable and self.check == "not run":
            return NOT_CHECKED
        return super().status

    def as_dict(self) -> dict[str, Any]:
        """JSON form: a node's, with the segment it serves."""
        return {"segment": self.segment, **super().as_dict()}


def play_runner(site: Site) -> PlayRunner:
    """The product's runner: ansible-runner over the stack's pinned-key SSH, check mode with diff, quiet."""
    ssh = SshSettings.of(site)

    def run(inventory: dict[str, Any], hosts: list[str]) -> RunResult:
        return run_playbook(PLAYBOOK, inventory, hosts, ssh=ssh, check=True, label="provisioning-drift")

    return run


def hosts_for(site: Site, segments: Iterable[str] | None = None) -> list[ProvisioningHost]:
    """The provisioning hosts of `segments` (every segment with `provisioning` when None), in stack order."""
    return service.provisioning_hosts(site, None if segments is None else sorted(set(segments)))


def _one_line(msg: str, limit: int = 200) -> str:
    first = (msg.strip().splitlines() or [""])[0]
    return first if len(first) <= limit else first[: limit - 1] + "…"


def _read(report: ProvisioningDrift, h: HostResult | None) -> None:
    """Fill one host's report from its check-mode result: task names and file paths, no diff body."""
    if h is None:
        report.check = "failed: the play gave no result for this host"
        return
    if h.unreachable:
        report.reachable = False
        report.error = "; ".join(_one_line(f["msg"]) for f in h.failures) or "unreachable"
        return
    if h.failed:
        why = "; ".join(f"{f['task']}: {_one_line(f['msg'])}" for f in h.failures) or "the play failed"
        report.check = f"failed: {why}"
        return
    outcome = CheckOutcome(would_change=tuple(h.changed_tasks), files=tuple(h.files_changed))
    report.items = with_check([], outcome, want="as converged from the stack")
    report.check = "ran"


def provisioning_drift(
    site: Site,
    hosts: list[ProvisioningHost],
    lock: Lock | None,
    lock_name: str = "the lock",
    *,
    check: bool = True,
    run: PlayRunner | None = None,
) -> list[ProvisioningDrift]:
    """Drift of each provisioning host: one check-mode run of the provisioning play over all of them.

    Args:
        site: The stack.
        hosts: The provisioning hosts to read (`hosts_for`).
        lock: The stack's lock (the images' sha256), None when there is none.
        lock_name: The lock's file name, for messages.
        check: False (`--no-check`): nothing is run, each host is "not checked".
        run: The play runner (default: `play_runner(site)`).

    """
    reports = {h.name: ProvisioningDrift(h.name, segment=h.segment) for h in hosts}
    if not check or not hosts:
        return list(reports.values())
    t0 = time.monotonic()
    # Variables per host, so one segment's bad input (an image missing from the lock) leaves the others read.
    inventory: dict[str, Any] = {"all": {"children": {service.GROUP: {"hosts": {}}}}}
    entries = inventory["all"]["children"][service.GROUP]["hosts"]
    for h in hosts:
        try:
            one = service.inventory(site, lock, [h], lock_name)
        except (ProvisioningInputError, RenderError) as exc:
            reports[h.name].check = f"failed: {exc}"
            continue
        hostvars = one["all"]["children"][service.GROUP]["hosts"][h.name]
        problems = rolespecs.problems(h.name, [service.ROLE], hostvars)
        if problems:
            reports[h.name].check = "failed: role variables the role does not accept: " + "; ".join(problems)
            continue
        entries[h.name] = hostvars
    names = list(entries)
    if names:
        result = (run or play_runner(site))(inventory, names)
        for name in names:
            _read(reports[name], result.hosts.get(name))
    share = (time.monotonic() - t0) / max(1, len(hosts))
    for r in reports.values():
        r.seconds = share
    return list(reports.values())
