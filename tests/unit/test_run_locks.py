"""Controller-side locks per stack and node (infra/ansible/locks.py): two converges of one node never overlap.

The first "converge" is a child process holding the locks as `gpufleet converge` does (through
`node_locks`, with its own command line); the second is the real CLI, which must fail at once naming it,
or a second holder that waits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from infra.ansible import locks
from infra.console import Exit
from infra.model.load import load_site

HOLD = textwrap.dedent(
    """
    import sys
    from infra.ansible.locks import node_locks
    with node_locks(sys.argv[1], sys.argv[2:]):
        print("held", flush=True)
        sys.stdin.read()  # until the test closes our stdin
    """
)


def _holder(tmp_path: Path, stack: str, *nodes: str) -> subprocess.Popen[str]:
    env = {**os.environ, "GPUFLEET_RUNS_DIR": str(tmp_path / "runs")}
    p = subprocess.Popen(
        [sys.executable, "-c", HOLD, stack, *nodes], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    assert p.stdout is not None and p.stdout.readline() == "held\n"
    return p


def _release(p: subprocess.Popen[str]) -> None:
    assert p.stdin is not None
    p.stdin.close()
    p.wait(timeout=30)


def test_second_converge_of_a_locked_node_fails_at_once_naming_the_holder(tmp_path: Path) -> None:
    site = load_site(stack="lab")
    first = _holder(tmp_path, site.name, "lab-gpu02", "lab-gpu01")
    try:
        env = {**os.environ, "GPUFLEET_RUNS_DIR": str(tmp_path / "runs")}
        p = subprocess.run(
            [str(Path(sys.executable).parent / "gpufleet"), "converge", "--stack", "lab", "--node", "lab-gpu01",
             "--json"],
            capture_output=True, text=True, env=env, timeout=300, check=False,
        )
        assert p.returncode == Exit.UNAVAILABLE, p.stdout + p.stderr
        err = json.loads(p.stdout or p.stderr)
        assert err["node"] == "lab-gpu01"
        # The holder's pid and what it runs (its arguments: the stack and nodes it holds).
        assert f"pid {first.pid} on " in err["holder"] and "lab-gpu02 lab-gpu01" in err["holder"]
        assert "--wait-lock" in p.stdout + p.stderr
        # Nothing ran: no run directory was made for the refused converge.
        assert not list((tmp_path / "runs").glob("run-*"))
    finally:
        _release(first)


def test_waiting_converge_takes_the_locks_when_the_first_run_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GPUFLEET_RUNS_DIR", str(tmp_path / "runs"))
    first = _holder(tmp_path, "site-a", "n1")
    try:
        busy = rf"node n1 is being acted on by another run: pid {first.pid} "
        with pytest.raises(locks.LockBusy, match=busy), locks.node_locks("site-a", ["n2", "n1"]):
            pass
        # n2 was taken before n1 was found busy: all or nothing, so it is free again.
        with locks.node_locks("site-a", ["n2"]):
            pass
        # Another stack's node of the same name is another lock.
        with locks.node_locks("site-b", ["n1"]):
            pass
        killer = subprocess.Popen(["sh", "-c", f"sleep 2; kill {first.pid}"])
        with locks.node_locks("site-a", ["n1", "n2"], wait_s=120) as me:
            assert me.pid == os.getpid()
            assert json.loads((locks.lock_dir("site-a") / "n1.lock").read_text())["pid"] == os.getpid()
        killer.wait()
    finally:
        first.kill()
        first.wait()


def test_wait_ends_with_the_holder_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUFLEET_RUNS_DIR", str(tmp_path / "runs"))
    first = _holder(tmp_path, "site-a", "n1")
    try:
        busy = r"after waiting 1s: pid \d+ on .* holds"
        with pytest.raises(locks.LockBusy, match=busy), locks.node_locks("site-a", ["n1"], wait_s=1):
            pass
    finally:
        _release(first)
