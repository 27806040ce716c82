#!/usr/bin/python
"""Read-only probe of a GPU node (the collection's module form of plugins/module_utils/gpufleet_probe.py)."""

from __future__ import annotations

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.gpufleet.fleet.plugins.module_utils.gpufleet_probe import probe

DOCUMENTATION = r"""
module: gpu_validate
short_description: Read what a GPU node runs, for gpufleet to compare with the plan (read-only)
description:
  - Runs dpkg-query/apt-mark or rpm, systemctl, nvidia-smi, nvidia-ctk and HTTP health probes, hashes the
    managed configuration files; changes nothing.
  - The same program runs over SSH for C(gpufleet drift) and C(gpufleet fingerprint); the comparison with the
    plan is done by gpufleet on the controller (infra.plan.nodestate.compare).
options:
  packages: {type: list, elements: str, default: [], description: Names of the pinned packages.}
  services: {type: list, elements: str, default: [], description: Systemd units the plan expects.}
  globs: {type: list, elements: str, default: [], description: Managed paths (globs relative to /) to hash.}
  marker: {type: str, default: Ansible managed, description: Files under /etc carrying it are hashed too.}
  state_files: {type: list, elements: str, default: [], description: Paths written by roles but not configuration.}
  record_file: {type: path, required: true, description: Hashes of the managed files recorded by the last converge.}
  smi_fields: {type: str, required: true, description: nvidia-smi --query-gpu fields.}
  cdi: {type: bool, default: true, description: List CDI devices with nvidia-ctk.}
  endpoints: {type: list, elements: dict, default: [], description: Inference endpoints (name, port, path).}
  fact_file: {type: path, required: true, description: Driver state file written by nvidia_driver.}
author: gpufleet
"""


def main() -> None:
    """Ansible entry point."""
    module = AnsibleModule(
        argument_spec={
            "packages": {"type": "list", "elements": "str", "default": []},
            "services": {"type": "list", "elements": "str", "default": []},
            "globs": {"type": "list", "elements": "str", "default": []},
            "marker": {"type": "str", "default": "Ansible managed"},
            "state_files": {"type": "list", "elements": "str", "default": []},
            "record_file": {"type": "path", "required": True},
            "smi_fields": {"type": "str", "required": True},
            "cdi": {"type": "bool", "default": True},
            "endpoints": {"type": "list", "elements": "dict", "default": []},
            "fact_file": {"type": "path", "required": True},
        },
        supports_check_mode=True,
    )
    module.exit_json(changed=False, state=probe(module.params))


if __name__ == "__main__":
    main()
