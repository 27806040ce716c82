"""Finding and stopping local processes by their command line (guards against recycled PIDs).

Shared by the Ansible runner (leftover workers of a run) and the lab (BMC emulator and notifier).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterable
from pathlib import Path


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
