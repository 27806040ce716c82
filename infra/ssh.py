"""SSH to nodes: the argv every connection uses and the wait for a node's pinned host key."""

from __future__ import annotations

import subprocess
import time

from infra.ansible.settings import SshSettings
from infra.model.site import Site
from infra.plan.node import NodePlan


def ssh_command(site: Site, node: NodePlan, *command: str) -> list[str]:
    """The ssh argv for a node with the stack's config and pinned host keys (StrictHostKeyChecking=yes)."""
    ssh = SshSettings.of(site)
    return ["ssh", *ssh.args(), "-o", "ConnectTimeout=2", f"{node.node.ssh_user}@{node.node.address}", *command]


def wait_ssh(site: Site, node: NodePlan, timeout: float) -> tuple[bool, float, str]:
    """Poll SSH until a command runs with the pinned key; (ok, seconds, last error)."""
    start = time.monotonic()
    last = ""
    while True:
        try:
            p = subprocess.run(ssh_command(site, node, "true"), capture_output=True, text=True, timeout=10, check=False)
            if p.returncode == 0:
                return True, time.monotonic() - start, ""
            last = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"rc={p.returncode}"
        except subprocess.TimeoutExpired:
            last = "ssh timed out"
        if "REMOTE HOST IDENTIFICATION HAS CHANGED" in last or "Host key verification failed" in last:
            # A wrong host key never fixes itself by waiting: report it at once.
            return False, time.monotonic() - start, last
        if time.monotonic() - start >= timeout:
            return False, time.monotonic() - start, last
        time.sleep(0.5)
