"""The exact command strings the Pulumi resources carry, run for real against the lab.

Needs the lab (`lab` fixture of tests/lab/conftest.py: `gpufleet lab up` done, root) and the CLI
commands of the contract: `provision-slot`, `bmc power|reimage` (BMC/DR), `wait-ssh`, the segment batch's
`converge --record --batch-slot` (over the node and its batch mates), `validate-node` (ROLES). Commands run
the way pulumi-command's local provider runs them: `/bin/sh -c <create>` in the resource's `dir`, with the
provider's environment.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from infra.components.node import STEPS
from infra.components.outcomes import RECORDS_ENV
from tests.pulumi.conftest import ROOT, run_program

pytestmark = pytest.mark.lab

# No inference service: the quickest full node lifecycle. The lab is shared, and this test reimages the
# node: pick another with GPUFLEET_PULUMI_LAB_NODE when someone else is using lab-gpu02.
NODE = os.environ.get("GPUFLEET_PULUMI_LAB_NODE", "lab-gpu02")
TIMEOUTS = {"bmc": 600, "wait-ssh": 700, "converge": 1800, "validate": 300}


def _why(p: subprocess.CompletedProcess[str]) -> str:
    """The failed tasks of a `--json` result, else the output's tail."""
    try:
        data = json.loads(p.stdout)
    except json.JSONDecodeError:
        return p.stdout[-2000:] + p.stderr[-2000:]
    hosts = data.get("hosts", []) if isinstance(data, dict) else []
    entries = list(hosts.values()) if isinstance(hosts, dict) else list(hosts)
    failures = [e.get("failures") for e in entries if isinstance(e, dict) and e.get("failures")]
    return json.dumps(failures or data, indent=1)[-3000:] + p.stderr[-1000:]


def _cwd(inputs: dict[str, Any]) -> str:
    # `dir` is relative to where the engine starts the provider: the directory Pulumi.yaml's `main` names.
    return str(ROOT / "infra" / inputs["dir"])


def _sh(command: str, cwd: str, timeout: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["/bin/sh", "-c", command], cwd=cwd, env=dict(os.environ), capture_output=True,
                          text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def node_steps(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, dict[str, Any]]]:
    """The node's steps; for "converge" the step that runs it: its segment batch's (one job for the batch)."""
    run = run_program("lab")
    steps = {step: run.reg(f"{NODE}-{step}").inputs for step in STEPS}
    p = run.plan.node(NODE)
    steps["converge"] = run.reg(f"{p.segment.name}-batch{p.batch}-converge").inputs
    # Records, converge slots and provisioning leases of this test only (the steps write them).
    records = tmp_path_factory.mktemp("records")
    old = os.environ.get(RECORDS_ENV)
    os.environ[RECORDS_ENV] = str(records)
    yield steps
    if old is None:
        os.environ.pop(RECORDS_ENV, None)
    else:
        os.environ[RECORDS_ENV] = old


def test_node_lifecycle_strings_succeed_in_order(lab: Any, node_steps: dict[str, dict[str, Any]]) -> None:
    """bmc (power on + reimage) → wait-ssh → converge → validate-node all exit 0; validate prints facts."""
    results = {}
    for step in STEPS:
        inputs = node_steps[step]
        p = _sh(inputs["create"], _cwd(inputs), TIMEOUTS[step])
        results[step] = p
        assert p.returncode == 0, f"{step}: {inputs['create']}\n{_why(p)}"
    batch = json.loads(results["converge"].stdout)  # what becomes the stack output `converge.<host>`
    assert {n["hostname"]: n["status"] for n in batch["nodes"]}[NODE] == "ok"
    facts = json.loads(results["validate"].stdout)  # what becomes the stack output `nodes.<host>`
    assert facts["node"] == NODE and facts["passed"] is True and facts["reachable"] is True
    assert facts["facts"]["gpus"]["ok"] and facts["facts"]["driver"]["ok"]


def test_steps_are_idempotent_on_a_converged_node(lab: Any, node_steps: dict[str, dict[str, Any]]) -> None:
    """The BMC step's update (power on), wait-ssh, converge and validate run again with exit 0."""
    bmc = node_steps["bmc"]
    assert _sh(bmc["update"], _cwd(bmc), TIMEOUTS["bmc"]).returncode == 0
    for step in ("wait-ssh", "converge", "validate"):
        inputs = node_steps[step]
        p = _sh(inputs["create"], _cwd(inputs), TIMEOUTS[step])
        assert p.returncode == 0, f"{step} (second run): {_why(p)}"
