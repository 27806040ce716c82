"""Running host commands for the lab: every call has a timeout, failures say what ran and what it printed."""

from __future__ import annotations

import logging
import subprocess
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
