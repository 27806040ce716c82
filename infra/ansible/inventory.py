"""Inventory of a run, built from the plan (pure: the same plan gives the same inventory)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from infra.model.site import Site
from infra.plan.node import NodePlan
from infra.plan.rolevars import host_vars

GROUP = "gpufleet_nodes"


def host_entry(plan: NodePlan, site: Site) -> dict[str, Any]:
    """Connection variables plus every role variable of one node."""
    return {
        "ansible_host": str(plan.node.address),
        "ansible_user": plan.node.ssh_user,
        # Already root: skip sudo on every task (one process less per module).
        "ansible_become": plan.node.ssh_user != "root",
        **host_vars(plan, site),
    }


def build_inventory(site: Site, nodes: Iterable[NodePlan]) -> dict[str, Any]:
    """YAML/JSON inventory with the nodes in the `gpufleet_nodes` group."""
    return {"all": {"children": {GROUP: {"hosts": {n.hostname: host_entry(n, site) for n in nodes}}}}}
