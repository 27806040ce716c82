"""roles/base/files/dpkg_recover.py waits for dpkg's locks before finishing interrupted transactions (issue 21).

A second converge ran `dpkg --configure -a` into the first run's live transaction and failed. Here the
first run is a process holding /var/lib/dpkg/lock-frontend and lock the way apt does (fcntl write locks;
apt-pkg's GetLock) in a scratch admin dir; `dpkg` is a stub on PATH that logs its calls and answers
`--audit` from a file, which the "first run" empties when it finishes, as dpkg does.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "roles" / "base" / "files" / "dpkg_recover.py"

# Holds both locks like apt during an install, until its stdin closes; then the transaction is complete.
FIRST_RUN = textwrap.dedent(
    """
    import fcntl, os, sys
    admin = sys.argv[1]
    fds = [os.open(os.path.join(admin, n), os.O_RDWR | os.O_CREAT) for n in ("lock-frontend", "lock")]
    for fd in fds:
        fcntl.lockf(fd, fcntl.LOCK_EX)
    print("holding", flush=True)
    sys.stdin.read()
    open(os.path.join(admin, "audit"), "w").close()          # its transaction finished
    with open(os.path.join(admin, "calls"), "a") as f:
        f.write("first run done\\n")
    """
)


def _setup(tmp_path: Path, audit: str) -> tuple[Path, dict[str, str]]:
    admin = tmp_path / "dpkg"
    admin.mkdir()
    (admin / "audit").write_text(audit)
    stub = tmp_path / "bin" / "dpkg"
    stub.parent.mkdir()
    stub.write_text(
        "#!/bin/sh\n"
        f'echo "dpkg $* frontend_locked=${{DPKG_FRONTEND_LOCKED:-}}" >> {admin}/calls\n'
        f'case "$*" in *--audit*) cat {admin}/audit ;; *--configure*) : > {admin}/audit ;; esac\n'
    )
    stub.chmod(stub.stat().st_mode | stat.S_IXUSR)
    return admin, {**os.environ, "PATH": f"{stub.parent}:{os.environ['PATH']}"}


def _first_run(admin: Path) -> subprocess.Popen[str]:
    p = subprocess.Popen(
        [sys.executable, "-c", FIRST_RUN, str(admin)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert p.stdout is not None and p.stdout.readline() == "holding\n"
    return p


def _recover(admin: Path, env: dict[str, str], timeout: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), str(timeout), str(admin)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _calls(admin: Path) -> list[str]:
    return (admin / "calls").read_text().splitlines() if (admin / "calls").exists() else []


def test_waits_for_the_running_transaction_and_then_finds_nothing_left(tmp_path: Path) -> None:
    admin, env = _setup(tmp_path, "The following packages are only half configured: nvidia-driver\n")
    first = _first_run(admin)
    rec = _recover(admin, env, timeout=300)
    try:
        # While the first run holds the locks, recovery has not touched dpkg at all.
        with pytest.raises(subprocess.TimeoutExpired):
            rec.wait(timeout=3)
        assert _calls(admin) == []
    finally:
        assert first.stdin is not None
        first.stdin.close()
        first.wait(timeout=30)
    out, err = rec.communicate(timeout=60)
    assert rec.returncode == 0, err
    # It looked again after the first run had finished, and left the finished transaction alone.
    assert out.strip() == "NOTHING"
    assert _calls(admin) == ["first run done", f"dpkg --admindir={admin} --audit frontend_locked="]


def test_finishes_an_abandoned_transaction_as_a_frontend(tmp_path: Path) -> None:
    admin, env = _setup(tmp_path, "The following packages are only half configured: nvidia-driver\n")
    rec = _recover(admin, env, timeout=300)
    out, err = rec.communicate(timeout=60)
    assert rec.returncode == 0, err
    assert out.strip() == "FINISHED"
    assert _calls(admin)[-1] == f"dpkg --admindir={admin} --configure -a frontend_locked=1"


def test_gives_up_after_its_timeout_naming_the_holder(tmp_path: Path) -> None:
    admin, env = _setup(tmp_path, "half configured\n")
    first = _first_run(admin)
    try:
        _out, err = _recover(admin, env, timeout=1).communicate(timeout=60)
        assert f"held by pid {first.pid} (python" in err and _calls(admin) == []
    finally:
        first.kill()
        first.wait()
