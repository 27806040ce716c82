"""Inventory of a run, built from the plan (pure), and the one encoder for everything handed to Ansible.

Ansible evaluates `{{ … }}` and `{% … %}` in every string it takes from an inventory or a vars file.
Stack values are validated (infra.model), but nothing that reaches Ansible may depend on that alone:
every string leaf written for Ansible goes through `unsafe()`, which wraps it as
`{"__ansible_unsafe": "…"}` — ansible-core's JSON form of an unsafe (never templated) string
(`ansible/_internal/_json/_profiles/_legacy.py`, ansible-core 2.19, read by the inventory and the
`-e @file` loader alike). Booleans, numbers, lists and mappings keep their types, so `when:`, loops
and argument specs work unchanged; an unsafe string prints, compares and templates into other
strings as its literal text, it is just never evaluated.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from infra.model.site import Site
from infra.plan.node import NodePlan
from infra.plan.rolevars import host_vars

GROUP = "gpufleet_nodes"
UNSAFE_KEY = "__ansible_unsafe"


def host_entry(plan: NodePlan, site: Site) -> dict[str, Any]:
    """Connection variables plus every role variable of one node (plain values; see `unsafe`)."""
    return {
        "ansible_host": str(plan.node.address),
        "ansible_user": plan.node.ssh_user,
        # Already root: skip sudo on every task (one process less per module).
        "ansible_become": plan.node.ssh_user != "root",
        **host_vars(plan, site),
    }


def build_inventory(site: Site, nodes: Iterable[NodePlan]) -> dict[str, Any]:
    """Inventory with the nodes in the `gpufleet_nodes` group, as plain Python values.

    This is what the argument specs are checked against; write it for Ansible only through
    `write_json` (which marks every string unsafe).
    """
    return {"all": {"children": {GROUP: {"hosts": {n.hostname: host_entry(n, site) for n in nodes}}}}}


def subset(inventory: Mapping[str, Any], hosts: Iterable[str]) -> dict[str, Any]:
    """The same inventory with only `hosts` (their entries reused, not built again)."""
    entries = inventory["all"]["children"][GROUP]["hosts"]
    return {"all": {"children": {GROUP: {"hosts": {h: entries[h] for h in hosts}}}}}


def unsafe(value: Any) -> Any:
    """`value` with every string leaf marked unsafe for Ansible; other types kept as they are.

    Mapping keys stay plain strings (JSON keys cannot carry the marker; ansible-core 2.19 does not
    template keys — tests/unit/test_inventory_unsafe.py runs a hostile key through real Ansible).

    Raises:
        TypeError: a value of a type that has no faithful JSON form (better than a silent `str()`).

    """
    if isinstance(value, str):
        return {UNSAFE_KEY: value}
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"Ansible variable keys must be strings, got {type(k).__name__}: {k!r}")
            out[k] = unsafe(v)
        return out
    if isinstance(value, list | tuple):
        return [unsafe(v) for v in value]
    raise TypeError(f"no Ansible form for a {type(value).__name__} value")


def ansible_json(data: Mapping[str, Any]) -> str:
    """The JSON text of an inventory or vars file, every string leaf unsafe (the only door into Ansible)."""
    return json.dumps(unsafe(data), indent=1, sort_keys=True)


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write an inventory or an `-e @file` vars file for Ansible through `ansible_json`."""
    path.write_text(ansible_json(data), encoding="utf-8")
