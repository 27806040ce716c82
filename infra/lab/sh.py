"""Running host commands for the lab: every call has a timeout, failures say what ran and what it printed."""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

log = logging.getLogger("gpufleet.lab")


class LabCommandError(Exception):
    """A host command failed or timed out."""


def run(
    cmd: Sequence[str | Path],
    *,
    timeout: float,
    check: bool = True,
    env: Mapping[str, str] | None = None,
    input: str | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command with a hard timeout (apt and friends have none of their own)."""
    argv = [str(c) for c in cmd]
    log.debug("run: %s", " ".join(argv))
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, input=input,
                              cwd=cwd, check=False)
    except subprocess.TimeoutExpired as exc:
        raise LabCommandError(f"timed out after {timeout:.0f}s: {' '.join(argv)}") from exc
    if check and proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        raise LabCommandError(f"exit {proc.returncode}: {' '.join(argv)}\n  " + "\n  ".join(tail))
    return proc


# Another apt/dpkg process (unattended-upgrades on a fresh machine, a second terminal) holds the dpkg
# lock: wait for it instead of failing at once. Tried on apt 2.6.1 (Debian 12): DPkg::Lock::Timeout
# makes `apt-get install` wait for /var/lib/dpkg/lock-frontend, but `apt-get update` still fails at
# once on a held /var/lib/apt/lists/lock ("Unable to lock directory"), so `apt_update` retries that.
APT_LOCK_TIMEOUT_S = 300
APT_LOCK_WAIT = ("-o", f"DPkg::Lock::Timeout={APT_LOCK_TIMEOUT_S}")
_APT_LOCK_ERRORS = ("Unable to lock directory", "Could not get lock")


def apt_update(env: Mapping[str, str] | None = None) -> bool:
    """`apt-get update`, waiting up to APT_LOCK_TIMEOUT_S while another apt process holds the lists lock."""
    deadline = time.monotonic() + APT_LOCK_TIMEOUT_S
    while True:
        r = run(["apt-get", *APT_LOCK_WAIT, "update", "-q"], timeout=600, env=env, check=False)
        if r.returncode == 0:
            return True
        text = f"{r.stdout}{r.stderr}"
        if not any(m in text for m in _APT_LOCK_ERRORS) or time.monotonic() > deadline:
            return False
        time.sleep(5)
