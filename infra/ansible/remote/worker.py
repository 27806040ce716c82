"""The execution host's side of a job: `ansible-runner worker` under a supervisor (stdlib only).

Shipped in the execution runtime as `bin/gpufleet-worker` and run by the controller over SSH. It runs
`ansible-runner worker` with the connection's stdin/stdout, so the job's stream passes through untouched,
and watches the connection: sshd starts the command as its child and, when the controller's connection
drops (controller killed, network lost), sshd's session ends and this process is re-parented. The job's
processes (ansible-runner, ansible-playbook in a session of its own, its forked workers) all name the job's
private data dir on their command lines; they are then stopped, so no Ansible runs on past `GRACE_S` + one
poll without a controller relaying its events (the worker's keepalive lines make a dead controller's ssh client
exit within `KEEPALIVE_S` even while one task runs long). The same happens when the job outlives its time limit.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

POLL_S = 1.0
GRACE_S = 5.0
# The worker writes a keepalive line at least this often: a controller that is gone (its ssh client dead
# of SIGPIPE on the next line it is handed) is noticed within this bound even during one long task.
KEEPALIVE_S = 5


def _mentioning(needle: bytes) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if needle in (p / "cmdline").read_bytes():
                out.append(int(p.name))
    return out


def stop_job(job_dir: str, grace_s: float = GRACE_S) -> int:
    """SIGTERM every process naming `job_dir`, SIGKILL what is left after `grace_s`; returns how many were found."""
    needle = job_dir.encode()
    pids = _mentioning(needle)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while _mentioning(needle) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in _mentioning(needle):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return len(pids)


def supervise(runner: str, job_dir: str, timeout_s: float) -> int:
    """Run `runner worker` for `job_dir`; stop the job if the parent goes away or time runs out.

    However the worker ends (finished, failed on a closed pipe, stopped here), nothing naming the job dir
    runs on afterwards and the job dir is gone.
    """
    parent = os.getppid()
    # --delete: the job dir (inventory, secrets file) is removed before and after the job.
    child = subprocess.Popen(
        [runner, "worker", "--private-data-dir", job_dir, "--delete", "--keepalive-seconds", str(KEEPALIVE_S)]
    )
    start = time.monotonic()
    rc: int | None = None
    while rc is None:
        try:
            rc = child.wait(timeout=POLL_S)
        except subprocess.TimeoutExpired:
            if os.getppid() != parent or time.monotonic() - start > timeout_s:
                stop_job(job_dir)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.wait(timeout=GRACE_S)
                rc = 124
    # ansible-playbook runs in a session of its own: a worker that died (e.g. writing to a connection that
    # is gone) leaves it running unless it is stopped here.
    stop_job(job_dir)
    # A killed worker cannot run its own --delete: the job's secrets file must not stay behind.
    shutil.rmtree(job_dir, ignore_errors=True)
    return rc


def main(argv: list[str]) -> int:
    """`gpufleet-worker RUNNER JOB_DIR TIMEOUT_S`."""
    if len(argv) != 3:
        sys.stderr.write("usage: gpufleet-worker RUNNER JOB_DIR TIMEOUT_S\n")
        return 2
    return supervise(argv[0], argv[1], float(argv[2]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
