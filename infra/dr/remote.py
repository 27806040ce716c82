"""Run read-only programs on a node over SSH with the stack's pinned host keys (never trust-on-first-use)."""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass

from infra.dr.probe import NodeState, remote_program
from infra.model.site import Node, Site
from infra.plan.node import NodePlan


class RemoteError(Exception):
    """A node could not be reached or the probe failed; `kind` is `unreachable`, `hostkey` or `probe`."""

    def __init__(self, hostname: str, kind: str, message: str) -> None:
        self.hostname = hostname
        self.kind = kind
        super().__init__(f"{hostname}: {message}")


def ssh_argv(site: Site, node: Node, *, connect_timeout: int = 5) -> list[str]:
    """`ssh` arguments for a node: the controller's config and pinned known_hosts, strict checking, batch mode."""
    argv = ["ssh"]
    if site.controller.ssh_config:
        argv += ["-F", site.controller.ssh_config]
    argv += [
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        f"ConnectTimeout={connect_timeout}",
        "-o",
        "ServerAliveInterval=5",
        "-o",
        "ServerAliveCountMax=3",
    ]
    if site.controller.known_hosts:
        argv += ["-o", f"UserKnownHostsFile={site.controller.known_hosts}"]
    return [*argv, "-l", node.ssh_user, str(node.address)]


@dataclass(frozen=True)
class SshResult:
    """Outcome of one SSH command."""

    returncode: int
    stdout: str
    stderr: str


def ssh(site: Site, node: Node, command: str, *, stdin: str = "", timeout: float = 60) -> SshResult:
    """Run `command` on the node (through the login shell there, as ssh does)."""
    try:
        p = subprocess.run(
            [*ssh_argv(site, node), command], input=stdin, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        raise RemoteError(node.hostname, "unreachable", f"ssh did not finish in {timeout:.0f} s") from None
    except FileNotFoundError:
        raise RemoteError(node.hostname, "unreachable", "the `ssh` client is not installed") from None
    if p.returncode == 255:
        err = p.stderr.strip().splitlines()
        text = err[-1] if err else "ssh failed"
        kind = "hostkey" if "host key" in p.stderr.lower() or "HOST IDENTIFICATION" in p.stderr else "unreachable"
        raise RemoteError(node.hostname, kind, text)
    return SshResult(p.returncode, p.stdout, p.stderr)


def reachable(site: Site, node: Node, *, timeout: float = 10) -> bool:
    """True when SSH with the pinned host key answers."""
    try:
        return ssh(site, node, "true", timeout=timeout).returncode == 0
    except RemoteError:
        return False


def wait_ssh(site: Site, node: Node, *, timeout: float = 600, interval: float = 1.0) -> float:
    """Poll until SSH answers; returns seconds waited. A host key mismatch stops at once (it won't heal)."""
    start = time.monotonic()
    last = ""
    while time.monotonic() - start < timeout:
        try:
            if ssh(site, node, "true", timeout=15).returncode == 0:
                return time.monotonic() - start
        except RemoteError as exc:
            if exc.kind == "hostkey":
                raise
            last = str(exc)
        time.sleep(interval)
    raise RemoteError(node.hostname, "unreachable", f"no SSH after {timeout:.0f} s ({last})")


def probe(site: Site, plan: NodePlan, *, timeout: float = 120) -> NodeState:
    """Read the node's actual state (see `infra.dr.probe`)."""
    res = ssh(site, plan.node, "python3 -", stdin=remote_program(plan), timeout=timeout)
    if res.returncode != 0:
        raise RemoteError(plan.hostname, "probe", f"probe failed (exit {res.returncode}): {res.stderr.strip()[-300:]}")
    try:
        data = json.loads(res.stdout)
    except ValueError:
        raise RemoteError(plan.hostname, "probe", "probe output is not JSON") from None
    return NodeState.from_json(plan.hostname, data)
