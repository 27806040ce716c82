"""Rebuild one node and prove it came back the same.

fingerprint before → reimage (infra.bmc.lifecycle.reimage, the same function `gpufleet bmc reimage` runs:
power off, one-time PXE, power on, re-pin the new host key out of band and wait for SSH, disk back as boot
device if the BMC ignored "Once") → converge → validate → fingerprint after → compare.

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
from infra.bmc.connect import BmcClient, Preflight, client_for, preflight
from infra.bmc.errors import BmcError
from infra.bmc.lifecycle import reimage
from infra.bmc.redfish import Timeouts
from infra.dr import fingerprint as fp
from infra.dr.remote import RemoteError, probe, reachable, wait_ssh
from infra.dr.steps import StackRef, StepResult, converge, validate
from infra.model.site import Node, Site
from infra.plan.node import NodePlan
from infra.plan.nodestate import DriftItem, NodeState, compare
from infra.provision.firstboot import ArmError

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
    drift: list[DriftItem] = field(default_factory=list)  # the node after the rebuild against its plan
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
            "drift": [i.as_dict() for i in self.drift],
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
    bmc: Callable[[Node, Timeouts], BmcClient] = field(default=lambda n, t: client_for(n, t))


def plan_host_key_source(site: Site, node: Node, host_key: Path | None, ref: StackRef) -> hostkeys.HostKeySource:
    """Decide, before anything is touched, where the rebuilt node's new SSH host key will come from."""
    if host_key is not None:
        return hostkeys.FromFile(host_key)
    # A source the CLI layer registered for this stack (the lab registers its own for lab stacks: it
    # reads the key from the host's disk). Product code never asks whether the stack is a lab.
    registered = hostkeys.registered_source(ref.stack, ref.stack_file)
    if registered is not None:
        return registered
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
    arm: Callable[[], object] | None = None,
    progress: Callable[[str], None] = lambda _m: None,
) -> RebuildReport:
    """Rebuild a node end to end (see module docstring). Raises `Refused` when nothing was done.

    `arm` (image-based nodes) arms the network install on the provisioning host first; its failure is the
    failed step `arm`, before the BMC is touched.
    """
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

    # -- reimage: power off, one-time PXE, power on, new host key + SSH, boot device back if "Once" ignored ----
    t0 = time.monotonic()
    limit = ssh_timeout or float(site.reboot.timeout_s)

    def booted() -> str:
        """The host key step: pin the new key from its out-of-band source, wait until SSH answers with it."""
        t_boot = time.monotonic()
        while True:
            try:
                pinned = keys.pin(site, node)
                h.wait_ssh(site, node, max(1.0, limit - (time.monotonic() - t_boot)))
                return pinned
            except hostkeys.HostKeyError as exc:
                # The lab's disk may be mid-reimage (unmounted) when we read it: retry within the time limit.
                if keys.refreshable and time.monotonic() - t_boot < limit:
                    time.sleep(1)
                    continue
                raise _StepFailed("hostkey", str(exc)) from None
            except RemoteError as exc:
                if exc.kind == "hostkey" and keys.refreshable and time.monotonic() - t_boot < limit:
                    time.sleep(1)  # the lab's reimage finished after our read: read the key from disk again
                    continue
                raise _StepFailed("wait-ssh", str(exc)) from None

    def armed() -> None:
        assert arm is not None
        try:
            arm()
        except ArmError as exc:
            raise _StepFailed("arm", str(exc)) from None

    progress(f"{node.hostname}: reimage through {node.bmc.endpoint} (power off, one-time PXE, power on)")
    try:
        with h.bmc(node, Timeouts(power_timeout=power_timeout)) as bmc:
            result = reimage(bmc, arm=armed if arm is not None else None, booted=booted,
                             power_timeout=power_timeout, progress=progress)
    except _StepFailed as exc:
        return _fail(report, exc.step, exc.message, start)
    except BmcError as exc:
        return _fail(report, "bmc-reimage", str(exc), start)
    report.step("bmc-reimage", t0, **result.as_dict())

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
        after_state = h.probe(site, plan)
        after = fp.fingerprint(after_state)
    except RemoteError as exc:
        return _fail(report, "fingerprint-after", str(exc), start)
    fp.save(record_dir, ref.name, after)
    # The same comparison validate-node and drift make: the rebuilt node against its plan (a pending reboot
    # is the policy's business and is not listed; the fingerprint comparison below decides "identical").
    report.drift = [i for i in compare(plan, after_state) if i.kind != "reboot"]
    report.step("fingerprint-after", t0, drift=len(report.drift))
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


class _StepFailed(Exception):
    """A step inside the reimage (host key, SSH) failed; `step` names it in the report."""

    def __init__(self, step: str, message: str) -> None:
        self.step = step
        self.message = message
        super().__init__(message)


def _fail(report: RebuildReport, step: str, message: str, start: float) -> RebuildReport:
    report.ok = False
    report.failed_step = step
    report.message = message
    report.seconds = time.monotonic() - start
    return report
