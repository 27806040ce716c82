"""Role arguments checked on the controller, once per run, against each role's meta/argument_specs.yml.

Ansible checks a role's arguments with an extra task on every host each time the role is included.
gpufleet checks them here instead, with Ansible's own validator and the same spec files, for every
node of the run before any host is touched; playbooks/node.yml then includes the roles with
`rolespec_validate: false`. A role used outside gpufleet still validates its arguments as usual.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from infra.ansible.settings import project_root


class RoleArgumentError(ValueError):
    """A node's role variables do not satisfy a role's argument spec (a gpufleet bug, never user input)."""


@cache
def role_options(role: str, root: Path | None = None) -> dict[str, Any]:
    """The `main` entry point's options of a role."""
    path = (root or project_root()) / "roles" / role / "meta" / "argument_specs.yml"
    spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    options: dict[str, Any] = spec["argument_specs"]["main"].get("options", {})
    return options


def problems(host: str, roles: Iterable[str], hostvars: Mapping[str, Any]) -> list[str]:
    """Every argument-spec violation of one host's variables, one line each (empty: all good)."""
    from ansible.module_utils.common.arg_spec import ArgumentSpecValidator

    out = []
    for role in roles:
        options = role_options(role)
        params = {k: v for k, v in hostvars.items() if k in options}
        result = ArgumentSpecValidator(options).validate(params)
        out += [f"{host}: role {role}: {msg}" for msg in result.error_messages]
    return out


def check_inventory(inventory: Mapping[str, Any], group: str) -> None:
    """Raise RoleArgumentError listing every violation of every host of `group` in an inventory."""
    found: list[str] = []
    for host, hostvars in inventory["all"]["children"][group]["hosts"].items():
        found += problems(host, hostvars.get("gpufleet_roles", []), hostvars)
    if found:
        raise RoleArgumentError(
            "the plan produced role variables the roles do not accept (nothing was run):\n  " + "\n  ".join(found)
        )
