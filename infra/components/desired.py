"""What a node should be, as Pulumi `triggers`: a readable summary plus a content hash (`DesiredState`).

`pulumi preview --diff` shows the summary's changed keys (driver 570.133.20 → 580.95.05) and the
hash catches everything else that affects the node (a role edit, a host variable, the lock file).
Expensive parts (the role tree, the lock file) are hashed once per program run, not per node.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra.model.site import Site
from infra.plan.desired import DesiredState
from infra.plan.node import NodePlan, content_hash, tree_hash
from infra.plan.rolevars import host_vars

HostVars = Callable[[NodePlan, Site], dict[str, Any]]

# The node's real Ansible host variables, imported directly: an import error must fail the program,
# never silently switch to another function (that would change every node's content hash and
# re-converge the whole fleet on the next `pulumi up`).
HOST_VARS: HostVars = host_vars


def lock_path(project: Path, stack: str) -> Path:
    """The stack's lock file (`stacks/Pulumi.<stack>.lock.json`, written by `gpufleet lock`)."""
    return project / "stacks" / f"Pulumi.{stack}.lock.json"


def file_hash(path: Path) -> str:
    """sha256 of a file, or "" when it does not exist (no lock yet)."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return ""


@dataclass(frozen=True)
class Fingerprints:
    """Hashes shared by every node of one program run (computed once)."""

    role_tree: str
    """sha256 over roles/ and playbooks/."""
    lock: str
    """sha256 of the stack's lock file, "" without one."""

    @classmethod
    def of(cls, project: Path, stack: str) -> Fingerprints:
        """Hash the project's role tree and the stack's lock file."""
        return cls(role_tree=tree_hash(project), lock=file_hash(lock_path(project, stack)))


def desired_state(plan: NodePlan, site: Site, prints: Fingerprints, host_vars: HostVars) -> DesiredState:
    """The node's desired state with the content hash of its host variables, role tree and lock."""
    return DesiredState.of(plan, content_hash(host_vars(plan, site), prints.role_tree, prints.lock))


def converge_trigger(plan: NodePlan, site: Site, prints: Fingerprints, host_vars: HostVars) -> dict[str, str]:
    """Readable desired state plus `content_hash` (`DesiredState.as_trigger`): any change re-runs the converge step."""
    return desired_state(plan, site, prints, host_vars).as_trigger()


def provision_trigger(plan: NodePlan) -> dict[str, str]:
    """What only a reinstall can change: the OS and the PXE interface. A change here rebuilds the node."""
    return {"os": plan.node.os.value, "pxe_mac": plan.node.macs[0]}
