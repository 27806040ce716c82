"""Finding and stopping local processes (guards against recycled PIDs), and keeping a run's children bounded.

Shared by the Ansible runner (every process of a run) and the lab (BMC emulator and notifier).

A run's processes are found by a marker in their environment (`RUN_ENV=<id>`), not by their command line or
process group: ansible-playbook runs in a session of its own under a pty (ansible-runner), each Ansible
worker calls setsid (WorkerProcess._detach), and the SSH ControlPersist master daemonizes — but all of them,
and every command they start, inherit the environment. `Reaper` is the guard for the one death no handler
sees, SIGKILL: a small watchdog process in a session of its own that holds the read end of a pipe from us.
When we die, the kernel closes our end; the watchdog reads EOF and stops every process carrying the run's
marker. PR_SET_PDEATHSIG alone would not do: it covers one direct child (ansible-playbook), not the workers
and their SSH clients, and it fires when the *thread* that forked the child ends, not the process.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType

RUN_ENV = "GPUFLEET_RUN"
"""Environment variable naming the run a process belongs to (set in ansible-playbook's environment)."""

STOP_BOUND_S = 30.0
"""A run's processes are gone at most this long after they are stopped (SIGTERM, then SIGKILL, re-scanned)."""


def cmdline_contains(pid: int | None, needle: str) -> bool:
    """Is `pid` alive with `needle` in its command line (a recycled PID running something else is not)."""
    if not pid:
        return False
    try:
        return needle.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def pids_mentioning(needle: str) -> list[int]:
    """Every process but this one whose command line contains `needle`."""
    return [
        int(p.name)
        for p in Path("/proc").iterdir()
        if p.name.isdigit() and int(p.name) != os.getpid() and cmdline_contains(int(p.name), needle)
    ]


def environ_has(pid: int, name: str, value: str) -> bool:
    """Is `pid` alive with exactly `name=value` in its environment (unreadable ones — other users — are not)."""
    entry = f"{name}={value}".encode()
    try:
        return entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def pids_with_env(name: str, value: str) -> list[int]:
    """Every process but this one whose environment holds `name=value`."""
    me = os.getpid()
    return [
        int(p.name)
        for p in Path("/proc").iterdir()
        if p.name.isdigit() and int(p.name) != me and environ_has(int(p.name), name, value)
    ]


def parent_of(pid: int) -> int | None:
    """The parent PID of `pid` (None when it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: the fields after its last ')' are fixed.
    return int(stat.rsplit(")", 1)[1].split()[1])


def terminate(pids: Iterable[int], running: Callable[[int], bool], grace_s: float = 5.0) -> list[int]:
    """SIGTERM every pid at once, wait up to `grace_s` while `running`, SIGKILL the rest; returns those killed."""
    pending = [p for p in pids if running(p)]
    for pid in pending:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while (pending := [p for p in pending if running(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in pending:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return pending


def stop_run(value: str, *, grace_s: float = 5.0, bound_s: float = STOP_BOUND_S) -> int:
    """Stop every process marked `RUN_ENV=value`, re-scanning until none is left; returns how many were found.

    A process may fork while it is being stopped (a worker starting ssh): each round stops what the scan
    finds, and the loop ends when a scan finds nothing or `bound_s` has passed.
    """
    seen: set[int] = set()
    deadline = time.monotonic() + bound_s
    while (found := pids_with_env(RUN_ENV, value)) and time.monotonic() < deadline:
        seen.update(found)
        left = max(0.0, min(grace_s, deadline - time.monotonic()))
        terminate(found, lambda pid: environ_has(pid, RUN_ENV, value), grace_s=left)
        # SIGKILLed processes are gone once their parent reaps them; orphans are reaped by init at once.
        time.sleep(0.05)
    return len(seen)


def die_with_parent(sig: signal.Signals = signal.SIGTERM) -> Callable[[], None]:
    """A `preexec_fn` for a child that must not outlive us: PR_SET_PDEATHSIG (Linux) with `sig`.

    For a child that stops cleanly on `sig` and is the only process to stop — a `gpufleet` command run as a
    step (it has its own Reaper for what it starts). The signal comes when the forking *thread* ends, so call
    it only from a thread that waits for the child. If we died before the child set it, the child ends at once.
    """
    parent = os.getpid()
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child only makes the call

    def preexec() -> None:
        prctl(1, int(sig), 0, 0, 0)  # PR_SET_PDEATHSIG = 1
        if os.getppid() != parent:
            os.kill(os.getpid(), sig)

    return preexec


class Reaper:
    """A watchdog that stops every process of run `value` once this process ends, however it ends.

    Start it before the run's first child, close it after the run (`with Reaper(v): ...`). The watchdog runs
    `python -m infra.procs reap <value>` in a session of its own (so a signal to our process group or
    terminal spares it) with the read end of a pipe as stdin; we keep the write end, close-on-exec, so no
    child of ours holds it. Our exit, even by SIGKILL, closes it: the watchdog then runs `stop_run`.
    """

    def __init__(self, value: str) -> None:
        self.value = value
        read, self._write = os.pipe()  # both close-on-exec: only the watchdog gets `read`, as its stdin
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "infra.procs", "reap", value],
                stdin=read,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                env={k: v for k, v in os.environ.items() if k != RUN_ENV},
            )
        finally:
            os.close(read)

    def close(self, timeout_s: float = STOP_BOUND_S + 5) -> None:
        """End the watch: the watchdog stops what is left of the run and exits (waited for)."""
        if self._write >= 0:
            os.close(self._write)
            self._write = -1
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=timeout_s)

    def __enter__(self) -> Reaper:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _reap(value: str) -> None:
    """The watchdog: block until the pipe on stdin reaches EOF (our parent closed it or died), then stop the run."""
    # Ctrl-C at the terminal is not for us (our parent decides); SIGTERM/SIGHUP (shutdown, a stopped unit) mean
    # stop the run now rather than wait for the pipe.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def now(_signum: int, _frame: object) -> None:
        raise InterruptedError

    for sig in (signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, now)
    with contextlib.suppress(InterruptedError):
        while os.read(0, 4096):
            pass
    stop_run(value)


if __name__ == "__main__" and sys.argv[1:2] == ["reap"] and len(sys.argv) == 3:
    _reap(sys.argv[2])
