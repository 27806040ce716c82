"""Locks so that two runs never act on one node at once (issue 21).

Two layers. On the controller, one flock per stack and node, under `<runs dir>/locks/<site>/<node>.lock`:
`gpufleet converge` takes the lock of every node it selects before any host is touched, so a second
converge (or a rebuild) of a node of the same stack fails at once naming the holder, or waits with
`--wait-lock SECONDS`. Per node rather than one per stack: under `pulumi up` every node is its own
`gpufleet converge --node N`, and those run in parallel. A flock ends with its process, even on SIGKILL:
there is never a stale lock to clean up.

On the node, the play's first task (`gpufleet.fleet.run_lock`, playbooks/node.yml) takes
/run/gpufleet/converge.lock and holds it while the controller's connection lives: this covers runs from
another controller or another stack file naming the same node. The controller's holder record (pid,
start, command) is passed to it so the message on either side names the same run.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

from infra.console import CommandError, Exit, runs_dir

POLL_S = 0.5
NODE_GRACE_S = 15
"""The node-side lock waits at least this long: the holder of a run that just ended notices within a second
that its connection closed, and the next run (`rebuild`'s validate after its converge) must not fail on it."""


@dataclass(frozen=True)
class Holder:
    """Who holds a lock: enough to find the process and tell what it is doing."""

    controller: str
    pid: int
    started: str
    command: str

    @classmethod
    def me(cls) -> Holder:
        """The holder record of the running process."""
        return cls(
            controller=socket.gethostname(),
            pid=os.getpid(),
            started=_process_start(os.getpid()),
            command=" ".join(["gpufleet", *sys.argv[1:]])[:300],
        )

    def describe(self) -> str:
        """One line naming the holder."""
        return f"pid {self.pid} on {self.controller} started {self.started} ({self.command})"

    def as_vars(self) -> dict[str, str]:
        """The record the node-side lock keeps (strings only)."""
        return {k: str(v) for k, v in asdict(self).items()}


class LockBusy(CommandError):
    """A node is locked by another run (exit 5: try again later)."""

    def __init__(self, node: str, holder: str, path: Path, waited_s: float) -> None:
        waited = f" after waiting {waited_s:.0f}s" if waited_s else ""
        super().__init__(
            Exit.UNAVAILABLE,
            f"node {node} is being acted on by another run{waited}: {holder} holds {path}; let it finish, or "
            f"pass --wait-lock SECONDS to wait for it",
            node=node,
            holder=holder,
            lock=str(path),
        )


def _process_start(pid: int) -> str:
    """When `pid` started (UTC, ISO 8601), from /proc (boot time + start ticks)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        btime = next(
            int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime")
        )
        ticks = os.sysconf("SC_CLK_TCK")
        started = btime + int(fields[19]) / ticks
    except (OSError, StopIteration, IndexError, ValueError):
        started = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started))


def lock_dir(stack: str) -> Path:
    """The directory of a stack's node locks (`stack` is the site's name: an RFC 1123 label)."""
    return runs_dir() / "locks" / stack


def _read_holder(f: IO[str]) -> str:
    f.seek(0)
    try:
        h = Holder(**json.loads(f.read() or "{}"))
    except (TypeError, ValueError):
        return "a run that has not recorded itself yet"
    return h.describe()


@contextlib.contextmanager
def node_locks(stack: str, nodes: Sequence[str], *, wait_s: float = 0.0) -> Iterator[Holder]:
    """Hold the controller-side lock of every node in `nodes` (of stack `stack`) for the body of the `with`.

    All or nothing: when one is held elsewhere, those taken so far are let go and, until `wait_s` has
    passed, all are tried again; then `LockBusy` names the node and its holder. Locks are taken in sorted
    order, one attempt each, so two runs over overlapping node sets never deadlock.
    """
    d = lock_dir(stack)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    me = Holder.me()
    start = time.monotonic()
    while True:
        taken: list[IO[str]] = []
        busy: tuple[str, str, Path] | None = None
        for node in sorted(set(nodes)):
            path = d / f"{node}.lock"
            f: IO[str] = path.open("a+", encoding="utf-8")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                busy = (node, _read_holder(f), path)
                f.close()
                break
            taken.append(f)
        if busy is None:
            break
        for f in taken:
            f.close()
        waited = time.monotonic() - start
        if waited >= wait_s:
            raise LockBusy(busy[0], busy[1], busy[2], waited if wait_s else 0.0)
        time.sleep(min(POLL_S, wait_s - waited))
    try:
        for f in taken:
            f.seek(0)
            f.truncate()
            f.write(json.dumps(asdict(me), sort_keys=True))
            f.flush()
        yield me
    finally:
        for f in taken:
            f.close()
