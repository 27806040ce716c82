"""Rebuild one node and prove it came back the same.

fingerprint before → BMC one-time PXE + reset → re-pin the new host key (out of band) → wait for SSH →
converge → validate → fingerprint after → compare.

Everything that can refuse is checked before the BMC is touched: the node has a BMC, its password
resolves, the BMC answers and accepts the credentials, the BMC's system carries the node's PXE MAC,
and there is a safe source for the node's new SSH host key. A refused rebuild changes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infra import hostkeys
from infra.bmc.connect import Preflight, client_for, preflight
from infra.bmc.errors import BmcError
from infra.bmc.redfish import BootTarget, PowerAction, Timeouts
from infra.dr import fingerprint as fp
from infra.dr.probe import NodeState
from infra.dr.remote import RemoteError, probe, reachable, wait_ssh
from infra.dr.steps import StackRef, StepResult, converge, validate
from infra.model.site import Node, Site
from infra.plan.node import NodePlan

DEFAULT_RECORD_DIR = Path("/var/lib/gpufleet/dr/fingerprints")


class Refused(Exception):
    """The rebuild was refused before anything was touched; `kind` says why (bmc, hostkey, config)."""

    def __init__(self, kind: str, message: str) -> None:
        self.kind = kind
        super().__init__(message)


@dataclass
class RebuildReport:
    """What a rebuild did, step by step, and whether the node came back identical."""

    hostname: str
    steps: list[dict[str, Any]] = field(default_factory=list)
    baseline: str = ""  # live | recorded | none
    identical: bool | None = None
    differences: list[fp.Difference] = field(default_factory=list)
    ok: bool = False
    failed_step: str = ""
    message: str = ""
    seconds: float = 0.0

    def step(self, name: str, t0: float, **info: Any) -> None:
        """Record a finished step with its duration."""
        self.steps.append({"step": name, "seconds": round(time.monotonic() - t0, 2), **info})

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "hostname": self.hostname,
            "ok": self.ok,
            "identical": self.identical,
            "baseline": self.baseline,
            "failed_step": self.failed_step,
            "message": self.message,
            "seconds": round(self.seconds, 2),
            "steps": self.steps,
            "differences": [d.as_dict() for d in self.differences],
        }


@dataclass
class Hooks:
    """The side effects of a rebuild, replaceable in tests (defaults: the real thing)."""

    preflight: Callable[[Node], Preflight] = field(default=lambda n: preflight(n))
    probe: Callable[[Site, NodePlan], NodeState] = field(default=lambda s, p: probe(s, p))
    reachable: Callable[[Site, Node], bool] = field(default=lambda s, n: reachable(s, n))
    wait_ssh: Callable[[Site, Node, float], float] = field(default=lambda s, n, t: wait_ssh(s, n, timeout=t))
    converge: Callable[[StackRef, str], StepResult] = field(default=lambda r, h: converge(r, h))
    validate: Callable[[StackRef, str], StepResult] = field(default=lambda r, h: validate(r, h))


def plan_host_key_source(site: Site, node: Node, host_key: Path | None, ref: StackRef) -> hostkeys.HostKeySource:
    """Decide, before anything is touched, where the rebuilt node's new SSH host key will come from."""
    if host_key is not None:
        return hostkeys.FromFile(host_key)
    if site.lab_mode:
        try:
            return hostkeys.lab_source(ref.stack, ref.stack_file)
        except hostkeys.HostKeyError as exc:
            raise Refused("hostkey", str(exc)) from None
    raise Refused(
        "hostkey",
        (
            f"{node.hostname}: a reimaged node gets a new SSH host key, and gpufleet never trusts a new key blindly. "
            "Pass --host-key FILE with the public host key from an out-of-band source (the key your installer "
            "was given, its key drop, or the BMC console's `ssh-keygen -lf` output checked by a person); "
            "see docs/dr-runbook.md"
        ),
    )


def rebuild(
    site: Site,
    plan: NodePlan,
    ref: StackRef,
    *,
    record_dir: Path = DEFAULT_RECORD_DIR,
    host_key: Path | None = None,
    ssh_timeout: float | None = None,
    power_timeout: float = 300,
    hooks: Hooks | None = None,
    progress: Callable[[str], None] = lambda _m: None,
) -> RebuildReport:
    """Rebuild a node end to end (see module docstring). Raises `Refused` when nothing was done."""
    h = hooks or Hooks()
    node = plan.node
    report = RebuildReport(plan.hostname)
    start = time.monotonic()
    if node.bmc is None:
        raise Refused("config", f"{node.hostname} has no `bmc:` in the stack; it cannot be rebuilt remotely")

    # -- refuse up-front ------------------------------------------------------------------------------
    t0 = time.monotonic()
    pre = h.preflight(node)
    if not pre.ok:
        raise Refused("bmc", f"BMC check failed, nothing was done: {pre.problem}")
    keys = plan_host_key_source(site, node, host_key, ref)
    try:
        keys.check(site, node)
    except hostkeys.HostKeyError as exc:
        raise Refused("hostkey", str(exc)) from None
    report.step("preflight", t0, power=pre.power_state, mac_matches=pre.mac_matches, hostkey=keys.describe())

    # -- fingerprint before ---------------------------------------------------------------------------
    t0 = time.monotonic()
    before: dict[str, Any] | None = None
    if h.reachable(site, node):
        progress(f"{node.hostname}: fingerprint before")
        before = fp.fingerprint(h.probe(site, plan))
        fp.save(record_dir, ref.name, before)
        report.baseline = "live"
    else:
        before = fp.load(record_dir, ref.name, node.hostname)
        report.baseline = "recorded" if before else "none"
    report.step("fingerprint-before", t0, baseline=report.baseline)

    # -- BMC: one-time PXE + reset --------------------------------------------------------------------
    t0 = time.monotonic()
    progress(f"{node.hostname}: one-time PXE boot + reset through {node.bmc.endpoint}")
    try:
        with client_for(node, Timeouts(power_timeout=power_timeout)) as bmc:
            boot = bmc.set_boot_override(BootTarget.PXE, enabled="Once")
            power = bmc.set_power(PowerAction.RESET, timeout=power_timeout)
    except BmcError as exc:
        return _fail(report, "bmc-reimage", str(exc), start)
    report.step("bmc-reimage", t0, boot=boot.as_dict(), power=power.as_dict())

    # -- new host key, SSH ----------------------------------------------------------------------------
    t0 = time.monotonic()
    limit = ssh_timeout or float(site.reboot.timeout_s)
    pinned = ""
    while True:
        try:
            pinned = keys.pin(site, node)
            h.wait_ssh(site, node, max(1.0, limit - (time.monotonic() - t0)))
            break
        except hostkeys.HostKeyError as exc:
            # The lab's disk may be mid-reimage (unmounted) when we read it: retry within the time limit.
            if keys.refreshable and time.monotonic() - t0 < limit:
                time.sleep(1)
                continue
            return _fail(report, "hostkey", str(exc), start)
        except RemoteError as exc:
            if exc.kind == "hostkey" and keys.refreshable and time.monotonic() - t0 < limit:
                time.sleep(1)  # the lab's reimage finished after our read: read the key from disk again
                continue
            return _fail(report, "wait-ssh", str(exc), start)
    report.step("hostkey+wait-ssh", t0, pinned=pinned)

    if not boot.honoured_once:
        # The BMC kept PXE as a persistent override (the emulator always does): put the disk back first,
        # or the node's next reboot would reinstall it again.
        t0 = time.monotonic()
        try:
            with client_for(node) as bmc:
                bmc.set_boot_override(BootTarget.HDD, enabled="Once")
        except BmcError as exc:
            return _fail(report, "boot-restore", str(exc), start)
        report.step("boot-restore", t0, reason=f"BMC reported {boot.enabled} for a Once request")

    # -- converge, validate ---------------------------------------------------------------------------
    for name, fn in (("converge", h.converge), ("validate", h.validate)):
        progress(f"{node.hostname}: {name}")
        t0 = time.monotonic()
        res = fn(ref, node.hostname)
        report.step(name, t0, exit_code=res.code)
        if not res.ok:
            return _fail(report, name, f"`gpufleet {name}` failed (exit {res.code}):\n{res.output}", start)

    # -- fingerprint after, compare -------------------------------------------------------------------
    t0 = time.monotonic()
    try:
        after = fp.fingerprint(h.probe(site, plan))
    except RemoteError as exc:
        return _fail(report, "fingerprint-after", str(exc), start)
    fp.save(record_dir, ref.name, after)
    report.step("fingerprint-after", t0)
    if before is not None:
        report.differences = fp.compare(before, after)
        report.identical = not report.differences
    report.ok = report.identical is not False
    report.message = (
        "identical fingerprint"
        if report.identical
        else "no fingerprint from before to compare with (node was down, none recorded); validated"
        if report.identical is None
        else f"{len(report.differences)} difference(s)"
    )
    report.seconds = time.monotonic() - start
    return report


def _fail(report: RebuildReport, step: str, message: str, start: float) -> RebuildReport:
    report.ok = False
    report.failed_step = step
    report.message = message
    report.seconds = time.monotonic() - start
    return report
