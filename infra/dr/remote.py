"""Run read-only programs on a node over SSH with the stack's pinned host keys (never trust-on-first-use)."""

from __future__ import annotations

import json
from dataclasses import dataclass

from infra import ssh as ssh_client
from infra.dr.probe import remote_program
from infra.model.site import Node, Site
from infra.plan.node import NodePlan
from infra.plan.nodestate import NodeState
from infra.ssh import SshSettings


class RemoteError(Exception):
    """A node could not be reached or the probe failed; `kind` is `unreachable`, `hostkey` or `probe`."""

    def __init__(self, hostname: str, kind: str, message: str) -> None:
        self.hostname = hostname
        self.kind = kind
        super().__init__(f"{hostname}: {message}")


def ssh_argv(site: Site, node: Node, command: str | None = None, *, connect_timeout: int = 5) -> list[str]:
    """`ssh … -l USER -- ADDRESS [COMMAND]` for a node (infra.ssh.argv: pinned keys, strict checking, batch mode)."""
    return ssh_client.argv(
        SshSettings.of(site), str(node.address), command, user=node.ssh_user, connect_timeout=connect_timeout
    )


@dataclass(frozen=True)
class SshResult:
    """Outcome of one SSH command."""

    returncode: int
    stdout: str
    stderr: str


def ssh(site: Site, node: Node, command: str, *, stdin: str = "", timeout: float = 60) -> SshResult:
    """Run `command` (one string, see infra.ssh.shell_command) on the node through its login shell."""
    try:
        p = ssh_client.run(ssh_argv(site, node, command), host=node.hostname, stdin=stdin.encode(), timeout=timeout)
    except ssh_client.SshError as exc:
        raise RemoteError(node.hostname, "hostkey" if exc.kind == "hostkey" else "unreachable", exc.detail) from None
    return SshResult(p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace"))


def reachable(site: Site, node: Node, *, timeout: float = 10) -> bool:
    """True when SSH with the pinned host key answers."""
    try:
        return ssh(site, node, "true", timeout=timeout).returncode == 0
    except RemoteError:
        return False


def wait_ssh(site: Site, node: Node, *, timeout: float = 600, interval: float = 1.0) -> float:
    """Poll until SSH answers; returns seconds waited. A host key mismatch stops at once (it won't heal)."""
    try:
        return ssh_client.wait(SshSettings.of(site), str(node.address), user=node.ssh_user, timeout=timeout,
                               interval=interval)
    except ssh_client.SshError as exc:
        raise RemoteError(node.hostname, "hostkey" if exc.kind == "hostkey" else "unreachable", exc.detail) from None


def probe(site: Site, plan: NodePlan, *, timeout: float = 120) -> NodeState:
    """Read the node's actual state with the collection's probe program (see `infra.dr.probe`)."""
    res = ssh(site, plan.node, "python3 -", stdin=remote_program(plan), timeout=timeout)
    if res.returncode != 0:
        raise RemoteError(plan.hostname, "probe", f"probe failed (exit {res.returncode}): {res.stderr.strip()[-300:]}")
    try:
        data = json.loads(res.stdout)
    except ValueError:
        raise RemoteError(plan.hostname, "probe", "probe output is not JSON") from None
    return NodeState.from_json(plan.hostname, data)
