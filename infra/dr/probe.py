"""The probe over SSH: the collection's read-only probe program, sent on stdin to `python3 -` on a node.

One program (`plugins/module_utils/gpufleet_probe.py`) reads every node, whether it runs as the
`gpu_validate` module in a play or here over SSH (Ansible already needs python3 on the node). What it
reads comes from the plan (`infra.plan.nodestate.probe_spec`); what differs is `infra.plan.nodestate.compare`.
"""

from __future__ import annotations

import json
from functools import cache

from infra.model.load import project_dir
from infra.plan.node import NodePlan
from infra.plan.nodestate import probe_spec

PROBE_PROGRAM = ("plugins", "module_utils", "gpufleet_probe.py")


@cache
def probe_source() -> str:
    """The probe program's source (the collection's module_utils file, read once per process)."""
    return project_dir().joinpath(*PROBE_PROGRAM).read_text(encoding="utf-8")


def remote_program(plan: NodePlan) -> str:
    """The probe program for one node: the collection's probe plus a call with the node's spec."""
    spec = json.dumps(probe_spec(plan).as_dict(), sort_keys=True)
    return f"{probe_source()}\n\nmain({json.dumps(spec)})\n"
