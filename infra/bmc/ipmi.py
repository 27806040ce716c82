"""IPMI for BMCs without Redfish, by shelling out to `ipmitool` (Debian package `ipmitool`).

Kept small on purpose: power state/on/off/soft/reset and the one-time boot device. IPMI over LAN
(RMCP+, `-I lanplus`) is weaker than Redfish over TLS: use it only on an isolated management network.
The password reaches ipmitool through the `IPMI_PASSWORD` environment variable (`-E`), never the
command line, so it never shows in `ps` or logs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from infra.bmc.errors import (
    BmcAuthError,
    BmcError,
    BmcProtocolError,
    BmcTimeout,
    BmcUnreachable,
    BmcUnsupported,
)
from infra.bmc.redfish import (
    BootOverride,
    BootTarget,
    Inventory,
    PowerAction,
    PowerResult,
    Timeouts,
    confirm_power,
    poll_power,
)

_BOOTDEV = {
    BootTarget.PXE.value: "pxe",
    BootTarget.HDD.value: "disk",
    BootTarget.CD.value: "cdrom",
    BootTarget.BIOS.value: "bios",
}

# `chassis bootparam get 5` "Boot Device Selector" texts (lower-case) → Redfish target.
_SELECTOR = {
    BootTarget.PXE.value: "force pxe",
    BootTarget.HDD.value: "force boot from default hard-drive",
    BootTarget.CD.value: "force boot from cd/dvd",
    BootTarget.BIOS.value: "force boot into bios setup",
}


class IpmiClient:
    """One IPMI BMC (one system). Same methods the CLI and rebuild use on `RedfishClient`.

    Args:
        endpoint: `ipmi://host[:port]` (port 623 by default).
        username: BMC user.
        password: BMC password (only ever put in the child's environment).
        timeouts: figures (connect = ipmitool's per-try timeout, retries = its retries).
        sleep: sleep function.
        cipher_suite: RMCP+ cipher suite (3 = HMAC-SHA1 + AES-CBC-128, the one every BMC offers).

    """

    def __init__(
        self,
        endpoint: str,
        username: str,
        password: str,
        *,
        timeouts: Timeouts | None = None,
        sleep: Callable[[float], None] = time.sleep,
        cipher_suite: int = 3,
    ) -> None:
        parts = urlsplit(endpoint)
        if parts.scheme != "ipmi" or not parts.hostname:
            raise ValueError(f"{endpoint!r} is not an IPMI endpoint; write it as ipmi://host[:port]")
        self.endpoint = endpoint
        self.host = parts.hostname
        self.port = parts.port or 623
        self.timeouts = timeouts or Timeouts()
        self.auth_mode = "rmcp+"
        self.requests_made = 0
        self._username = username
        self._password = password
        self._sleep = sleep
        self._cipher = cipher_suite
        self._boot_requested: tuple[str, str] | None = None

    def __enter__(self) -> IpmiClient:
        self.login()
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def _run(self, *args: str) -> str:
        exe = shutil.which("ipmitool")
        if exe is None:
            raise BmcUnsupported(self.endpoint, "`ipmitool` is not installed", "apt-get install ipmitool")
        argv = [
            exe,
            "-v",
            "-I",
            "lanplus",
            "-C",
            str(self._cipher),
            "-H",
            self.host,
            "-p",
            str(self.port),
            "-U",
            self._username,
            "-E",
            "-N",
            str(max(1, int(self.timeouts.connect))),
            "-R",
            str(max(1, self.timeouts.retries)),
            *args,
        ]
        env = {**os.environ, "IPMI_PASSWORD": self._password}
        self.requests_made += 1
        limit = (self.timeouts.connect + 1) * (self.timeouts.retries + 1) * 3 + 5
        try:
            p = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=limit, check=False)
        except subprocess.TimeoutExpired:
            raise BmcTimeout(self.endpoint, f"ipmitool did not finish in {limit:.0f} s") from None
        if p.returncode != 0:
            raise self._error(p.stderr)
        return p.stdout

    def _error(self, stderr: str) -> BmcError:
        text = stderr.lower()
        if "rakp 2 hmac is invalid" in text or "unauthorized name" in text or "insufficient privilege" in text:
            return BmcAuthError(
                self.endpoint,
                f"credentials for user {self._username!r} refused",
                "check the password the node's `bmc.password` SecretRef points at",
            )
        if "get auth capabilities error" in text or "unable to establish" in text:
            return BmcUnreachable(
                self.endpoint,
                "no IPMI answer (RMCP+ on UDP)",
                "check the management network path, the address and port, and that IPMI over LAN is enabled on the BMC",
            )
        last = [ln for ln in stderr.strip().splitlines() if ln.strip()][-1:] or ["ipmitool failed"]
        return BmcProtocolError(self.endpoint, last[0][:200])

    def login(self) -> None:
        """Open one session (reads the power state): reachability and credentials in one step."""
        self.power_state()

    def close(self) -> None:
        """Nothing to close: ipmitool opens and closes a session per call."""

    def power_state(self) -> str:
        """`On` or `Off`, in Redfish spelling."""
        out = self._run("chassis", "power", "status")
        return "On" if "is on" in out.lower() else "Off"

    def system(self) -> dict[str, Any]:
        """A Redfish-shaped summary (PowerState, Boot) so status output is the same for both protocols."""
        state = self.power_state()
        target, enabled = self._boot_requested or ("", "")
        return {
            "PowerState": state,
            "Boot": {"BootSourceOverrideTarget": target or None, "BootSourceOverrideEnabled": enabled or None},
        }

    def macs(self, system: Any = None) -> tuple[str, ...]:
        """IPMI has no standard host NIC inventory: empty (the MAC check is skipped, not failed)."""
        return ()

    def allowed_resets(self, system: Any = None) -> tuple[str, ...]:
        """What ipmitool's `chassis power` offers, in Redfish names."""
        return ("On", "ForceOff", "GracefulShutdown", "ForceRestart")

    def wait_power(self, want: str, timeout: float | None = None) -> tuple[str, float]:
        """Poll until the power state is `want`."""
        return poll_power(
            self.power_state, want, endpoint=self.endpoint, timeouts=self.timeouts, timeout=timeout, sleep=self._sleep
        )

    def set_power(self, action: PowerAction, *, wait: bool = True, timeout: float | None = None) -> PowerResult:
        """Ensure a power state; idempotent like the Redfish client (`on` when on sends nothing)."""
        start = time.monotonic()
        before = self.power_state()
        command: str | None
        if action is PowerAction.ON:
            want, command, reset_type = "On", (None if before == "On" else "on"), "On"
        elif action is PowerAction.OFF:
            want, command, reset_type = "Off", (None if before == "Off" else "off"), "ForceOff"
        elif action is PowerAction.GRACEFUL_OFF:
            want, command, reset_type = "Off", (None if before == "Off" else "soft"), "GracefulShutdown"
        else:
            want = "On"
            command, reset_type = ("on", "On") if before == "Off" else ("reset", "ForceRestart")
        if command is not None:
            self._run("chassis", "power", command)
        after, resent = before, 0
        if wait and command is not None:
            # A power-on accepted while the BMC is still powering off can be dropped: confirm, then resend.
            after, _, resent = confirm_power(
                self.power_state,
                want,
                send=self._power_on if command == "on" else None,
                endpoint=self.endpoint,
                timeouts=self.timeouts,
                timeout=timeout,
                sleep=self._sleep,
            )
        return PowerResult(
            action=action.value,
            before=before,
            after=after,
            reset_type=reset_type if command else None,
            changed=command is not None,
            seconds=round(time.monotonic() - start, 2),
            resent=resent,
        )

    def set_boot_override(
        self, target: BootTarget | str, *, enabled: str = "Once", mode: str | None = None
    ) -> BootOverride:
        """`chassis bootdev` (next boot only unless `enabled` is Continuous), read back with bootparam 5."""
        value = str(target)
        dev = _BOOTDEV.get(value)
        if dev is None:
            raise BmcUnsupported(
                self.endpoint, f"boot target {value!r} not offered over IPMI", "IPMI offers: " + ", ".join(_BOOTDEV)
            )
        args = ["chassis", "bootdev", dev]
        options = [o for o, on in (("persistent", enabled == "Continuous"), ("efiboot", mode == "UEFI")) if on]
        if options:
            args.append("options=" + ",".join(options))
        self._run(*args)
        out = self._run("chassis", "bootparam", "get", "5").lower()
        reported = next((k for k, selector in _SELECTOR.items() if selector in out), "")
        if reported != value:
            raise BmcProtocolError(
                self.endpoint, f"boot device not applied: asked {value}, BMC reports {reported or 'no override'}"
            )
        persisted = "Continuous" if "all future boots" in out else "Once"
        self._boot_requested = (reported, persisted)
        return BootOverride(
            target=reported, enabled=persisted, requested_enabled=enabled, allowed_targets=tuple(_BOOTDEV)
        )

    def _power_on(self) -> None:
        self._run("chassis", "power", "on")

    def current_boot(self) -> tuple[str, str]:
        """(target, Once|Continuous) of the boot flags now; ("None", "Disabled") once the BMC cleared them."""
        out = self._run("chassis", "bootparam", "get", "5").lower()
        if "boot flag invalid" in out:
            return "None", "Disabled"
        reported = next((k for k, selector in _SELECTOR.items() if selector in out), "None")
        return reported, "Continuous" if "all future boots" in out else "Once"

    def inventory(self) -> Inventory:
        """What IPMI's `mc info` and `mc guid` tell: BMC vendor and product, system GUID."""
        info = _fields(self._run("mc", "info"))
        guid = _fields(self._run("mc", "guid")).get("System GUID", "")
        return Inventory(
            system_id="",
            name="",
            uuid=guid,
            manufacturer=info.get("Manufacturer Name", ""),
            model=info.get("Product Name", ""),
            serial="",
            power_state=self.power_state(),
            bios_version="",
            macs=(),
            boot={},
        )


def _fields(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            out.setdefault(k.strip(), v.strip())
    return out
