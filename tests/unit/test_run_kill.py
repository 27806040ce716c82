"""A run's Ansible processes end with gpufleet, however it ends (issue 21: SIGKILL left ansible-playbook running).

Each test starts a real run (`run_playbook` of a play that sleeps on localhost, local connection) in a child
Python process, as `gpufleet converge` would, then kills or signals that process and polls /proc until no
process of the run is left. Every process of the run, and the watchdog, inherit the environment variable
the test sets in the child, which is how the test finds them without trusting the code under test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from infra import procs

BOUND_S = 90.0  # generous: a bound on how long a run may outlive gpufleet, not a timing figure

DRIVER = textwrap.dedent(
    """
    import sys
    from infra.ansible.runner import RunInterrupted, run_playbook
    from infra.ssh import SshSettings
    inv = {"all": {"hosts": {"localhost": {"ansible_connection": "local",
                                           "ansible_python_interpreter": sys.executable}}}}
    try:
        r = run_playbook(sys.argv[1], inv, ["localhost"], ssh=SshSettings(None, None), label="killtest")
    except RunInterrupted as exc:
        print("INTERRUPTED", exc, flush=True)
        sys.exit(130)
    print("DONE", r.status, flush=True)
    """
)

PLAY = """\
- name: Long run
  hosts: all
  gather_facts: false
  tasks:
    - name: Sleep like a long package install
      ansible.builtin.command: sleep 600
      changed_when: false
"""


def _tagged(tag: str) -> list[int]:
    return procs.pids_with_env("GPF_KILLTEST", tag)


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _start(tmp_path: Path) -> tuple[subprocess.Popen[str], str]:
    tag = uuid.uuid4().hex
    play = tmp_path / "long.yml"
    play.write_text(PLAY)
    env = {**os.environ, "GPF_KILLTEST": tag, "GPUFLEET_RUNS_DIR": str(tmp_path / "runs")}
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(play)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    # The run is under way once the task's `sleep` runs (ansible-playbook → worker → module → sleep).
    deadline = time.monotonic() + BOUND_S
    while not any(_comm(p) == "sleep" for p in _tagged(tag)):
        assert driver.poll() is None, driver.communicate()[0]
        assert time.monotonic() < deadline, "the run never reached its sleep task"
        time.sleep(0.2)
    return driver, tag


def _wait_gone(tag: str) -> list[tuple[int, str]]:
    deadline = time.monotonic() + BOUND_S
    while (left := _tagged(tag)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return [(p, _comm(p)) for p in left]


def _cleanup(tag: str) -> None:
    for pid in _tagged(tag):
        os.kill(pid, signal.SIGKILL)


def test_sigkill_of_the_controller_leaves_no_ansible_running(tmp_path: Path) -> None:
    driver, tag = _start(tmp_path)
    try:
        before = {_comm(p) for p in _tagged(tag)}
        # The run as it is before the kill: ansible-playbook, its worker and the task's command.
        assert "sleep" in before and any(c.startswith("ansible-playboo") for c in before), before
        driver.kill()
        driver.wait()
        assert _wait_gone(tag) == []
    finally:
        _cleanup(tag)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_stop_the_run_and_name_the_interrupted_node(tmp_path: Path, sig: signal.Signals) -> None:
    driver, tag = _start(tmp_path)
    try:
        driver.send_signal(sig)
        out, _ = driver.communicate(timeout=BOUND_S)
        assert driver.returncode == 130, out
        assert f"stopped on {sig.name}" in out and "interrupted mid-task: localhost (in 'Sleep like a long" in out
        # Only the driver itself was left to end; everything it started is gone once it returns.
        assert _wait_gone(tag) == []
    finally:
        _cleanup(tag)


STEP_PARENT = textwrap.dedent(
    """
    import subprocess, sys
    from infra import procs
    child = subprocess.Popen(["sleep", "600"], preexec_fn=procs.die_with_parent())
    print(child.pid, flush=True)
    child.wait()
    """
)


def test_a_step_child_gets_sigterm_when_its_parent_is_killed() -> None:
    """`gpufleet rebuild` runs `gpufleet converge` as a child (infra/dr/steps.py): it must not outlive a SIGKILL."""
    parent = subprocess.Popen([sys.executable, "-c", STEP_PARENT], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    try:
        assert _comm(child) == "sleep"
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + BOUND_S
        while _comm(child) == "sleep" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _comm(child) != "sleep"
    finally:
        if _comm(child) == "sleep":
            os.kill(child, signal.SIGKILL)
