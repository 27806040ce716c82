"""Reimage one node through its BMC: the one function `gpufleet bmc reimage` (so Pulumi's BMC step) and `rebuild` run.

arm the network install (image-based nodes: the provisioning host's script for the node's MAC and its
first-boot data; before the BMC is touched, so a refusal changes nothing) → power off (confirmed) →
one-time PXE override → power on (confirmed; a dropped power-on sent again) →
host key step → if the BMC did not honour "Once" (the override is still PXE once the node has booted),
put the disk back as boot device, so the node's next reboot does not reinstall it again.

Why the override is set while the node is off (the order Ironic uses: power off, set boot device, power
on): a BMC that reboots the host on its own between the PATCH and our reset would spend the one-time
override on that boot, and ours would come up from disk ("Once" lost). With the node off, the next boot
is the one we start.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from infra.bmc.connect import BmcClient
from infra.bmc.errors import BmcError
from infra.bmc.redfish import BootOverride, BootTarget, PowerAction, PowerResult

# How long `bmc reimage` (no way to see the node boot) watches the override for the BMC to clear it.
DEFAULT_BOOT_GRACE = 300.0


@dataclass(frozen=True)
class ReimageResult:
    """What a reimage did, step by step."""

    boot: BootOverride
    """The PXE override as the BMC reported it right after the request."""
    power_off: PowerResult
    power_on: PowerResult
    override_after: tuple[str, str]
    """(target, enabled) once the node booted (or the grace ran out)."""
    once_ignored: bool
    """The override was still PXE after the node booted: the BMC did not honour "Once"."""
    restored: BootOverride | None
    """The boot device put back (disk) when `once_ignored`."""
    host_key: str | None
    """SHA256 fingerprint of the pinned new host key, if the host key step ran."""
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        """JSON form (`power` is the power-on, the step that starts the reinstall)."""
        return {
            "boot": self.boot.as_dict(),
            "power_off": self.power_off.as_dict(),
            "power": self.power_on.as_dict(),
            "override_after": {"target": self.override_after[0], "enabled": self.override_after[1]},
            "once_ignored": self.once_ignored,
            "restored": self.restored.as_dict() if self.restored else None,
            "host_key": self.host_key,
            "seconds": round(self.seconds, 2),
        }


def _pxe_pending(target: str, enabled: str) -> bool:
    return target == BootTarget.PXE.value and enabled != "Disabled"


def reimage(
    client: BmcClient,
    *,
    arm: Callable[[], object] | None = None,
    booted: Callable[[], str] | None = None,
    host_key: Callable[[], str] | None = None,
    power_timeout: float | None = None,
    boot_grace: float = DEFAULT_BOOT_GRACE,
    sleep: Callable[[float], None] = time.sleep,
    progress: Callable[[str], None] = lambda _m: None,
) -> ReimageResult:
    """Reinstall the node behind `client` (a logged-in Redfish or IPMI client) from PXE.

    Args:
        client: the node's BMC, logged in.
        arm: points the node's network boot at its install (infra.provision.firstboot.arm_install); without
            it the PXE boot runs whatever the provisioning service answers. Its exceptions propagate before
            any BMC request.
        booted: returns once the node has booted the new image (rebuild: pin the new host key from its
            out-of-band source and wait for SSH with it), with the key's fingerprint. The override is then
            checked once. Its exceptions propagate, after the boot device was put back if still PXE.
        host_key: pins an operator-given host key (`bmc reimage --host-key`); returns its fingerprint.
            Without `booted`, the override is watched for `boot_grace` seconds for the BMC to clear it.
        power_timeout: seconds each power change may take (default: the client's).
        boot_grace: without `booted`: how long the firmware may take to reach the PXE boot.
        sleep: sleep function (tests).
        progress: one line per step, for people watching.

    Raises:
        BmcError: a BMC step failed (nothing after it ran).

    """
    start = time.monotonic()
    if arm is not None:
        progress("arming the network install")
        arm()
    progress("power off")
    off = client.set_power(PowerAction.OFF, timeout=power_timeout)
    progress("one-time PXE boot override")
    boot = client.set_boot_override(BootTarget.PXE, enabled="Once")
    progress("power on")
    on = client.set_power(PowerAction.ON, timeout=power_timeout)
    fingerprint = host_key() if host_key is not None else None
    if booted is not None:
        try:
            fingerprint = booted()
        except Exception:
            # The firmware had the whole wait to read the override; a node left on a persistent PXE override
            # would reinstall at every reboot, so put the disk back before reporting the failure.
            with contextlib.suppress(BmcError):
                if _pxe_pending(*client.current_boot()):
                    client.set_boot_override(BootTarget.HDD, enabled="Once")
            raise
        after = client.current_boot()
    else:
        progress(f"waiting up to {boot_grace:.0f} s for the BMC to use the one-time override")
        deadline = time.monotonic() + boot_grace
        after = client.current_boot()
        while _pxe_pending(*after) and time.monotonic() < deadline:
            sleep(client.timeouts.poll_interval)
            after = client.current_boot()
    ignored = _pxe_pending(*after)
    restored = None
    if ignored:
        progress(f"BMC kept the PXE override ({after[1]}): boot device back to disk")
        restored = client.set_boot_override(BootTarget.HDD, enabled="Once")
    return ReimageResult(
        boot=boot,
        power_off=off,
        power_on=on,
        override_after=after,
        once_ignored=ignored,
        restored=restored,
        host_key=fingerprint,
        seconds=time.monotonic() - start,
    )
