"""Step outcomes that `pulumi up` leaves on the controller: rollout records and decommission records.

Under `pulumi up` every node step is its own process, so the rolling policy cannot live in one
loop as in `gpufleet converge` (infra.ansible.rollout). Instead each converge/validate step records
its exit status here (`gpufleet rollout-record`), and the guard step between two batches of a
segment (`gpufleet rollout-guard`) counts the segment's failed nodes from these records.

Layout under `records_dir()` (env GPUFLEET_RECORDS_DIR, default /var/lib/gpufleet/records):
`rollout/<stack>/<node>.<step>.json` (the latest outcome of that step),
`decommission/<stack>/<node>-<UTC time>.json` (one per decommission, never overwritten) and
`slots/<stack>/` (controller-wide bounds of `pulumi up`: `batch-<i>.lock` files held with `flock` by the
converge batch steps running, `reimage/<node>.json` leases of the nodes between power-on and SSH).

The bounds live here, on the controller, and not in the resource graph: a chain of `depends_on` that
serialises N-at-a-time across a whole site is as deep as the site is large, and the Python SDK walks every
dependency path recursively on each dependency it declares (`resource_cycle_breaker._with_transitive_deps`),
which fails with RecursionError past ~1,000 steps and costs time in proportion to the path (docs/scale.md).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from infra.plan.node import NodePlan, SitePlan

RECORDS_ENV = "GPUFLEET_RECORDS_DIR"
DEFAULT_RECORDS_DIR = Path("/var/lib/gpufleet/records")
RECORDED_STEPS = ("converge", "validate")

# Stack and node names become path components: Pulumi stack names and the model's hostname grammar,
# nothing that could climb out of the records directory.
_STACK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
_NODE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


class RecordError(ValueError):
    """A stack or node name that cannot name a record file."""


def records_dir() -> Path:
    """Where outcome records live (env GPUFLEET_RECORDS_DIR overrides)."""
    return Path(os.environ.get(RECORDS_ENV) or DEFAULT_RECORDS_DIR)


def check_names(stack: str, node: str) -> None:
    """Raise RecordError unless both names are safe as path components."""
    if not _STACK.match(stack) or stack in {".", ".."}:
        raise RecordError(f"--stack {stack!r} is not a stack name (letters, digits, '_', '.', '-')")
    if not _NODE.match(node):
        raise RecordError(f"--node {node!r} is not a hostname (lowercase letters, digits, '-')")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    # Atomic: nodes of one batch record side by side, and the guard may read at any moment.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def now() -> str:
    """UTC time as ISO 8601 (record contents and decommission file names)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class StepOutcome:
    """The latest recorded exit status of one node's converge or validate step."""

    node: str
    step: str
    rc: int
    at: str

    @property
    def failed(self) -> bool:
        """Any non-zero exit is a failed node."""
        return self.rc != 0


def record_step(stack: str, node: NodePlan, step: str, rc: int, base: Path | None = None,
                detail: dict[str, Any] | None = None) -> Path:
    """Write the outcome of `step` on `node` (replacing the previous one) and return the file.

    `detail` (a batch converge's per-node status and failed tasks) is kept beside the exit status, so the
    record says why a node failed, not only that it did.
    """
    if step not in RECORDED_STEPS:
        raise RecordError(f"--step {step!r}: one of {', '.join(RECORDED_STEPS)}")
    check_names(stack, node.hostname)
    path = (base or records_dir()) / "rollout" / stack / f"{node.hostname}.{step}.json"
    data: dict[str, Any] = {"stack": stack, "node": node.hostname, "segment": node.segment.name,
                            "batch": node.batch, "step": step, "rc": rc, "at": now()}
    if detail:
        data["detail"] = detail
    _write_json(path, data)
    return path


def read_outcomes(stack: str, node: str, base: Path | None = None) -> list[StepOutcome]:
    """The node's latest recorded outcomes (none when its steps never ran through `pulumi up`)."""
    check_names(stack, node)
    out = []
    for step in RECORDED_STEPS:
        path = (base or records_dir()) / "rollout" / stack / f"{node}.{step}.json"
        try:
            data = json.loads(path.read_text())
            out.append(StepOutcome(node, step, int(data["rc"]), str(data.get("at", ""))))
        except FileNotFoundError:
            continue
        except (ValueError, KeyError, TypeError) as exc:
            # A record we cannot read is not a success: count the node as failed, say which file.
            out.append(StepOutcome(node, step, -1, f"unreadable record {path}: {exc}"))
    return out


@dataclass(frozen=True)
class SegmentTally:
    """Failed nodes of one segment up to and including a batch, against the segment's budget."""

    segment: str
    batch: int
    max_failures: int
    failed: list[str]
    """Nodes whose latest converge or validate record failed."""
    unknown: list[str]
    """Nodes without any record (their steps have not run through `pulumi up` since records exist)."""

    @property
    def exceeded(self) -> bool:
        """More failed nodes than `rollout.max_failures` allows: later batches must not start."""
        return len(self.failed) > self.max_failures

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"segment": self.segment, "batch": self.batch, "max_failures": self.max_failures,
                "failed": self.failed, "unknown": self.unknown, "exceeded": self.exceeded}


def tally(plan: SitePlan, stack: str, segment: str, batch: int | None = None, base: Path | None = None) -> SegmentTally:
    """Count the segment's failed nodes in batches ≤ `batch` (all batches when None), as the records say.

    Failures are counted over the segment, not per batch, as `gpufleet converge` does (infra.ansible.rollout):
    a node that failed in an earlier rollout and was never repaired still uses up the budget.
    """
    nodes: Sequence[NodePlan] = [n for n in plan.nodes if n.segment.name == segment
                                 and (batch is None or n.batch <= batch)]
    if not nodes:
        known = sorted({n.segment.name for n in plan.nodes})
        raise RecordError(f"--segment {segment!r} has no nodes (batch ≤ {batch}); segments with nodes: "
                          + ", ".join(known))
    failed, unknown = [], []
    for n in nodes:
        outcomes = read_outcomes(stack, n.hostname, base)
        if any(o.failed for o in outcomes):
            failed.append(n.hostname)
        elif not outcomes:
            unknown.append(n.hostname)
    return SegmentTally(segment, batch if batch is not None else max(n.batch for n in nodes),
                        plan.site.rollout.max_failures, failed, unknown)


def write_decommission(stack: str, node: str, data: dict[str, Any], base: Path | None = None) -> Path:
    """Write one decommission record (never overwrites an earlier one) and return its path."""
    check_names(stack, node)
    at = now()
    path = (base or records_dir()) / "decommission" / stack / f"{node}-{at.replace(':', '')}.json"
    n = 1
    while path.exists():  # two decommissions within a second (destroy after a failed attempt)
        path = path.with_name(f"{node}-{at.replace(':', '')}-{n}.json")
        n += 1
    _write_json(path, {"stack": stack, "node": node, "at": at, **data})
    return path


def _slots(stack: str, base: Path | None) -> Path:
    if not _STACK.match(stack) or stack in {".", ".."}:
        raise RecordError(f"--stack {stack!r} is not a stack name (letters, digits, '_', '.', '-')")
    return (base or records_dir()) / "slots" / stack


@contextmanager
def batch_slot(stack: str, width: int, *, base: Path | None = None, poll_s: float = 1.0,
               waiting: Callable[[], object] | None = None) -> Iterator[int]:
    """Hold one of `width` controller-wide converge slots of the stack while the block runs; yield its number.

    A slot is an exclusive `flock` on `slots/<stack>/batch-<i>.lock`: the kernel drops it when the holder
    exits, however it exits, so a killed `pulumi up` leaves no slot taken. Waits (polling every `poll_s`)
    while all `width` are held; `waiting` is called once when it has to wait.
    """
    if width < 1:
        raise RecordError(f"rollout.max_parallel_batches must be ≥ 1, not {width}")
    folder = _slots(stack, base)
    folder.mkdir(parents=True, exist_ok=True)
    told = False
    while True:
        for i in range(width):
            f = (folder / f"batch-{i}.lock").open("a")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                continue
            try:
                yield i
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
                f.close()
            return
        if waiting is not None and not told:
            waiting()
            told = True
        time.sleep(poll_s)


def _lease_dir(stack: str, base: Path | None) -> Path:
    return _slots(stack, base) / "reimage"


def live_leases(stack: str, base: Path | None = None, at: float | None = None) -> dict[str, float]:
    """Nodes holding a reimage lease that has not expired, with its expiry (epoch seconds)."""
    folder = _lease_dir(stack, base)
    t = time.time() if at is None else at
    out: dict[str, float] = {}
    for path in folder.glob("*.json") if folder.is_dir() else []:
        try:
            expires = float(json.loads(path.read_text())["expires"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a half-written or foreign file holds no slot
        if expires > t:
            out[path.stem] = expires
    return out


def take_reimage_lease(stack: str, node: str, width: int, ttl_s: float, *, base: Path | None = None,
                       poll_s: float = 2.0, timeout_s: float = 0.0,
                       waiting: Callable[[list[str]], object] | None = None) -> bool:
    """Wait until fewer than `width` other nodes hold a live lease, then lease a slot to `node` for `ttl_s`.

    The BMC step takes the lease before powering on/reimaging; the node's `wait-ssh` step gives it back
    when it ends (`release_reimage_lease`), and a lease nobody gives back (the run was killed in between)
    expires after `ttl_s`. Counting and writing happen under one `flock`, so two steps cannot both take the
    last slot. Returns False when `timeout_s` (> 0) passed without a free slot.
    """
    check_names(stack, node)
    folder = _lease_dir(stack, base)
    folder.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s if timeout_s > 0 else None
    told = False
    while True:
        with (folder / ".lock").open("a") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            held = [n for n in live_leases(stack, base) if n != node]
            if len(held) < width:
                _write_json(folder / f"{node}.json", {"node": node, "expires": time.time() + ttl_s, "at": now()})
                return True
        if deadline is not None and time.monotonic() >= deadline:
            return False
        if waiting is not None and not told:
            waiting(sorted(held))
            told = True
        time.sleep(poll_s)


def release_reimage_lease(stack: str, node: str, base: Path | None = None) -> bool:
    """Give the node's reimage lease back; True when it held one."""
    check_names(stack, node)
    try:
        (_lease_dir(stack, base) / f"{node}.json").unlink()
    except FileNotFoundError:
        return False
    return True
