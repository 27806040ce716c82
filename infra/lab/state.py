"""The running lab's state file (/var/lib/gpufleet/lab/state.json) and the lock around changes."""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from infra.lab.config import Paths


def load(paths: Paths) -> dict[str, Any] | None:
    """The state of the running lab, or None when no lab is up."""
    try:
        data: dict[str, Any] = json.loads(paths.state_file.read_text(encoding="utf-8"))
        return data
    except FileNotFoundError:
        return None


def save(paths: Paths, state: dict[str, Any]) -> None:
    """Write the state atomically."""
    paths.state.mkdir(parents=True, exist_ok=True)
    tmp = paths.state_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, paths.state_file)


def clear(paths: Paths) -> None:
    """Forget the lab (after `down`)."""
    paths.state_file.unlink(missing_ok=True)


@contextmanager
def locked(paths: Paths) -> Iterator[None]:
    """Serialise lab changes between `gpufleet lab` runs and the BMC notifier."""
    paths.state.mkdir(parents=True, exist_ok=True)
    with open(paths.lock_file, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
