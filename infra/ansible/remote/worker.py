"""The execution host's side of a job: `ansible-runner worker` under a supervisor (stdlib only).

Shipped in the execution runtime as `bin/gpufleet-worker` and run by the controller over SSH. It runs
`ansible-runner worker` with the connection's stdin/stdout, so the job's stream passes through untouched,
and watches the connection: the controller holds the connection's input open for the whole job, so end of
input (controller killed, network lost) or being re-parented (sshd's session ended) means nobody relays the
job any more. The job's processes (ansible-runner, ansible-playbook in a session of its own, its forked
workers) all name the job's private data dir on their command lines; they are then stopped, so no Ansible
runs on past one poll + `GRACE_S` without a controller. The same happens when the job outlives its time limit.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

POLL_S = 1.0
GRACE_S = 5.0
# The worker writes a keepalive line at least this often, so a connection that silently died (no TCP reset)
# fails ssh's ServerAlive checks and the stream's readers within a bound even during one long task.
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


def supervise(runner: str, job_dir: str, timeout_s: float, stdin_fd: int = 0) -> int:
    """Run `runner worker` for `job_dir`; stop the job when the controller is gone or time runs out.

    The controller keeps its end of the connection's stdin open until the job is over, so end of input here
    while the worker still runs means the controller is gone (killed, or the connection dropped). That is
    the signal that works over SSH: an ssh client whose controller died does not exit (OpenSSH ignores
    SIGPIPE and drops the output it can no longer write), so sshd's session lives on, but the client does
    pass on end of input at once. Re-parenting (sshd's session ended) and the time limit stop the job too.
    However the worker ends, nothing naming the job dir runs on afterwards and the job dir is gone.
    """
    parent = os.getppid()
    # --delete: the job dir (inventory, secrets file) is removed before and after the job.
    child = subprocess.Popen(
        [runner, "worker", "--private-data-dir", job_dir, "--delete", "--keepalive-seconds", str(KEEPALIVE_S)],
        stdin=subprocess.PIPE,
    )
    closed = threading.Event()

    def pump() -> None:
        # The transmit stream goes through to the worker untouched; then we only wait for end of input.
        sink = child.stdin
        while True:
            try:
                chunk = os.read(stdin_fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            if sink is not None:
                try:
                    sink.write(chunk)
                    sink.flush()
                except OSError:  # the worker has read its job and stopped reading
                    sink = None
        closed.set()

    threading.Thread(target=pump, daemon=True).start()
    start = time.monotonic()
    rc: int | None = None
    while rc is None:
        try:
            rc = child.wait(timeout=POLL_S)
        except subprocess.TimeoutExpired:
            if closed.is_set() or os.getppid() != parent or time.monotonic() - start > timeout_s:
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
