"""The node-side converge lock (plugins/modules/run_lock.py) in real local Ansible runs (issue 21).

Each play runs the module on this machine (local connection, tests/unit/ansible_local.py). The lock is
tied to a process the test starts and ends (`tie_pid`), standing in for the sshd session of the
controller's connection; one play checks the default, the nearest ancestor by name.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from infra.ansible.collection import link_collections
from infra.ansible.settings import project_root
from tests.unit.ansible_local import run_local_play

HOLDER_A = {"controller": "ctl-a", "pid": "4242", "started": "2026-12-04T23:00:00Z", "command": "gpufleet converge A"}
HOLDER_B = {"controller": "ctl-b", "pid": "777", "started": "2026-12-04T23:05:00Z", "command": "gpufleet converge B"}


def _play(tasks: list[dict[str, Any]], check: bool = False) -> list[dict[str, Any]]:
    return [{"name": "Lock", "hosts": "localhost", "gather_facts": False, "check_mode": check, "tasks": tasks}]


def _lock(path: Path, holder: dict[str, str], **extra: Any) -> dict[str, Any]:
    return {"gpufleet.fleet.run_lock": {"path": str(path), "holder": holder, **extra}}


def _free(path: Path) -> bool:
    with path.open("a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(f, fcntl.LOCK_UN)
        return True


def _wait_free(path: Path, bound_s: float = 60) -> bool:
    deadline = time.monotonic() + bound_s
    while not _free(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ANSIBLE_COLLECTIONS_PATH", str(link_collections(project_root(), tmp_path / "collections")))
    return tmp_path


def test_second_run_fails_naming_the_holder_and_takes_the_lock_once_the_first_ends(work: Path) -> None:
    lock = work / "run" / "converge.lock"
    tie = subprocess.Popen(["sleep", "600"])
    try:
        run_local_play(_play([_lock(lock, HOLDER_A, tie_pid=tie.pid)]), work)
        assert not _free(lock), "the lock is held after the task that took it has ended"
        busy = {
            **_lock(lock, HOLDER_B),
            "register": "second",
            "ignore_errors": True,
        }
        expect = {
            "ansible.builtin.assert": {
                "that": [
                    "second is failed",
                    "second.msg is search('held by pid 4242 on ctl-a started 2026-12-04T23:00:00Z')",
                    "second.msg is search('gpufleet converge A')",
                    "second.msg is search('--wait-lock')",
                ]
            }
        }
        run_local_play(_play([busy, expect]), work)
        # Check mode only looks: a held lock is reported, not failed on, and nothing is taken.
        looked = {**_lock(lock, HOLDER_B), "register": "looked"}
        run_local_play(_play([looked, {"ansible.builtin.assert": {"that": ["looked.held"]}}], check=True), work)
        tie.kill()
        tie.wait()
        # The first run's connection is gone: the lock comes free without anyone releasing it.
        assert _wait_free(lock)
    finally:
        tie.kill()
        tie.wait()


def test_waiting_run_takes_the_lock_when_the_holder_ends(work: Path) -> None:
    lock = work / "converge.lock"
    first, second = subprocess.Popen(["sleep", "600"]), subprocess.Popen(["sleep", "600"])
    try:
        run_local_play(_play([_lock(lock, HOLDER_A, tie_pid=first.pid)]), work)
        # End the first holder while the second run waits for it (started in the background: it blocks).
        killer = subprocess.Popen(["sh", "-c", f"sleep 3; kill {first.pid}"])
        taken = {**_lock(lock, HOLDER_B, tie_pid=second.pid, wait=120), "register": "taken"}
        run_local_play(_play([taken, {"ansible.builtin.assert": {"that": ["taken is not changed"]}}]), work)
        killer.wait()
        assert "ctl-b" in lock.read_text() and not _free(lock)
    finally:
        for p in (first, second):
            p.kill()
            p.wait()
    assert _wait_free(lock)


def test_default_tie_is_the_nearest_named_ancestor(work: Path) -> None:
    """Tied to the Ansible worker that ran the task (its name stands in for sshd): free once the run ends."""
    lock = work / "converge.lock"
    task = {**_lock(lock, HOLDER_A, tie_to=["ansible-playboo"]), "register": "taken"}
    run_local_play(_play([task, {"ansible.builtin.assert": {"that": ["taken.tie_pid | int > 0"]}}]), work)
    assert _wait_free(lock)
    assert os.path.exists(lock)
