"""Segment-local execution on the lab: every segment's Ansible runs on a lab host of that segment.

The air-gapped segment runs on its mirror (lab-mirror), the connected one on lab-upstream. The controller
opens SSH connections to those two execution hosts only: nftables counters on this machine's output path
(locally generated packets, i.e. the controller's own) count TCP/22 packets per lab host during both runs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from infra import procs
from infra.ansible.converge import converge, wait_ssh
from infra.ansible.remote import runtime
from infra.cli import main
from infra.lab import lab as lab_mod
from infra.lab.segexec import SshCounters, authorize_execution_hosts, prepare
from infra.lab.session import Lab
from infra.model.load import load_site
from infra.plan.node import plan_site

pytestmark = pytest.mark.lab


def test_segment_local_first_converge_noop_and_one_hop(lab: Lab, tmp_path: Path) -> None:
    stack = prepare(lab.spec, lab.paths, lab.stack_file, tmp_path)
    site = load_site(path=stack)
    # The runtime the air-gapped execution host runs came from its mirror: the lock's files, served by lab-mirror's
    # nginx (imported from the runtime bundle), fetched by the installer there and recorded with their sha256.
    release = runtime.spec()
    assert main(["exec-host", "status", "--stack-file", str(stack)]) == 0
    served = lab.ssh("lab-mirror", "cat /var/log/nginx/access.log").stdout
    fetched = [f.filename for f in release.files if f"GET /files/gpufleet-exec/{f.filename} " in served]
    assert sorted(fetched) == sorted(f.filename for f in release.files), served[-2000:]
    recorded = lab.ssh("lab-mirror", f"cat /opt/gpufleet-exec/releases/{release.runtime_id}/runtime.json").stdout
    assert json.loads(recorded) == release.as_dict()
    plan = plan_site(site)
    # Earlier tests may have converged the nodes already: an out-of-band edit of a file the roles manage gives
    # every node something to change in the first converge, whatever state the lab is in (done before the
    # SSH counters start, which count only the converges).
    for n in plan.nodes:
        r = lab.ssh(n.hostname, "echo '# edited out of band' >> /etc/sysctl.d/90-gpufleet.conf")
        assert r.returncode == 0, r.stderr
    counters = SshCounters(lab.spec)
    counters.open()
    try:
        first = converge(plan, list(plan.nodes))
        after_first = counters.read()
        noop = converge(plan, list(plan.nodes))
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
    assert all(n.changed > 0 for n in first.nodes), report  # every node had something to change
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


def _left(lab: Lab, host: str, pattern: str) -> list[str]:
    """Command lines of processes on a lab host matching `pattern` (pgrep -af), minus the pgrep itself."""
    r = lab.ssh(host, f"pgrep -af {pattern} || true", timeout=30)
    return [line for line in r.stdout.splitlines() if line.strip() and "pgrep" not in line]


def test_sigkill_of_converge_leaves_no_ansible_on_execution_hosts_and_a_rerun_finishes(
    lab: Lab, tmp_path: Path
) -> None:
    stack = prepare(lab.spec, lab.paths, lab.stack_file, tmp_path)
    gpufleet = str(Path(sys.executable).parent / "gpufleet")
    # A converge that has work to do: the first node of each segment gets a fresh base OS.
    for node in ("lab-gpu01", "lab-gpu03"):
        lab_mod.power_off(lab.spec, lab.paths, node)
        lab_mod.power_on(lab.spec, lab.paths, node, reimage=True)
    authorize_execution_hosts(lab.spec, lab.paths)  # the reimaged nodes forgot the execution hosts' keys
    site = load_site(path=stack)
    for node in ("lab-gpu01", "lab-gpu03"):
        ok, _, err = wait_ssh(site, plan_site(site).node(node), 120)
        assert ok, err
    proc = subprocess.Popen(
        [gpufleet, "converge", "--stack-file", str(stack), "--node", "lab-gpu01", "--node", "lab-gpu03", "--json"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    # Wait until both execution hosts run Ansible for the job, then kill the controller outright.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if all(_left(lab, h, "ansible-playbook") for h in ("lab-mirror", "lab-upstream")):
            break
        time.sleep(1)
    else:
        proc.kill()
        pytest.fail("the jobs never started on the execution hosts")
    time.sleep(5)  # mid-run
    os.kill(proc.pid, signal.SIGKILL)
    killed = time.monotonic()
    proc.wait()
    gone: dict[str, float] = {}
    watch = {"lab-mirror": "/opt/gpufleet-exec/jobs/", "lab-upstream": "/opt/gpufleet-exec/jobs/",
             "lab-gpu01": "mitogen", "lab-gpu03": "mitogen"}  # the nodes: Mitogen's interpreters of the job
    while time.monotonic() - killed < 90 and len(gone) < len(watch):
        for h, pattern in watch.items():
            if h not in gone and not _left(lab, h, pattern):
                gone[h] = round(time.monotonic() - killed, 1)
        time.sleep(1)
    leftovers = {h: _left(lab, h, pattern) for h, pattern in watch.items()}
    jobs = {h: lab.ssh(h, "ls -A /opt/gpufleet-exec/jobs").stdout.split() for h in ("lab-mirror", "lab-upstream")}
    # The local side: the controller's ssh clients to the execution hosts died with their pipes.
    local_ssh = [p for p in procs.pids_mentioning("gpufleet-worker") if procs.cmdline_contains(p, "ssh")]
    report = {"seconds_until_gone": gone, "leftovers": leftovers, "job_dirs": jobs, "local_ssh": local_ssh}
    print(json.dumps(report, indent=1))
    assert all(v == [] for v in leftovers.values()), report
    assert jobs == {"lab-mirror": [], "lab-upstream": []}, report  # no job dir (no secrets file) stays behind
    assert gone["lab-mirror"] <= 30 and gone["lab-upstream"] <= 30, report
    assert local_ssh == [], report
    # A re-run finishes the job (the roles recover an interrupted package run).
    again_plan = plan_site(site)
    again = converge(again_plan, [again_plan.node("lab-gpu01"), again_plan.node("lab-gpu03")])
    assert again.succeeded, again.as_dict()
