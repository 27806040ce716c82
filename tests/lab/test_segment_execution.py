"""Segment-local execution on the lab: every segment's Ansible runs on a lab host of that segment.

The air-gapped segment runs on its mirror (lab-mirror), the connected one on lab-upstream. The controller
opens SSH connections to those two execution hosts only: nftables counters on this machine's output path
(locally generated packets, i.e. the controller's own) count TCP/22 packets per lab host during both runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from infra.ansible.converge import converge
from infra.cli import main
from infra.lab.segexec import SshCounters, authorize_execution_hosts, execution_stack
from infra.lab.session import Lab
from infra.model.load import load_site
from infra.plan.node import plan_site

pytestmark = pytest.mark.lab


def test_segment_local_first_converge_noop_and_one_hop(lab: Lab, tmp_path: Path) -> None:
    stack = execution_stack(lab.spec, lab.stack_file, tmp_path / "Pulumi.lab-segexec.yaml")
    site = load_site(path=stack)
    authorize_execution_hosts(lab.spec, lab.paths)
    assert main(["exec-host", "install", "--stack-file", str(stack), "--out", str(tmp_path / "rt"), "--json"]) == 0
    plan = plan_site(site)
    counters = SshCounters(lab.spec)
    counters.open()
    try:
        first = converge(site, list(plan.nodes), plan=plan)
        after_first = counters.read()
        noop = converge(site, list(plan.nodes), plan=plan)
        after_noop = counters.read()
    finally:
        counters.close()
    report = {
        "first": {n.hostname: (n.status, n.changed) for n in first.nodes},
        "noop": {n.hostname: (n.status, n.changed) for n in noop.nodes},
        "ssh_packets_after_first": after_first,
        "ssh_packets_after_noop": after_noop,
        "runs": [r.run_dir for r in first.runs + noop.runs],
    }
    print(json.dumps(report, indent=1))
    assert first.succeeded, report
    assert all(n.changed > 0 for n in first.nodes), report  # a first converge from the base OS changes every node
    assert noop.succeeded and all(n.changed == 0 for n in noop.nodes), report
    # Every wave went through an execution host.
    for run in first.runs + noop.runs:
        for run_dir in run.run_dir.split():
            assert json.loads((Path(run_dir) / "result.json").read_text())["execution_host"] in (
                "lab-mirror",
                "lab-upstream",
            )
    # One hop: the controller spoke SSH to the execution hosts only, never to a node.
    for node in ("lab-gpu01", "lab-gpu02", "lab-gpu03", "lab-gpu04"):
        assert after_noop[node] == 0, report
    assert after_noop["lab-mirror"] > 0 and after_noop["lab-upstream"] > 0, report
