"""The IPMI path (`ipmitool`) against OpenIPMI's `ipmi_sim`, a real IPMI-over-LAN implementation.

ipmi_sim speaks RMCP+ (sessions, authentication) itself; the "hardware" behind it is a small chassis
control script keeping power and boot device in files. Loopback only. Needs the Debian packages
`ipmitool` and `openipmi`; skipped with that reason when they are absent.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.bmc.errors import BmcAuthError, BmcUnreachable, BmcUnsupported
from infra.bmc.ipmi import IpmiClient
from infra.bmc.lifecycle import reimage
from infra.bmc.redfish import BootTarget, PowerAction, Timeouts
from infra.cli import main
from infra.model.load import project_dir

pytestmark = pytest.mark.skipif(
    not (shutil.which("ipmi_sim") and shutil.which("ipmitool")),
    reason="needs Debian packages ipmitool and openipmi (ipmi_sim)",
)

PASSWORD = "ipmi-Canary-4410"
FAST = Timeouts(connect=1, retries=1, poll_interval=0.1, power_timeout=10)

CHASSIS = """#!/bin/sh
# Stand-in hardware for ipmi_sim: power and boot device in files next to this script.
dir=$(dirname "$0")
op=$1; shift
echo "$op $*" >> "$dir/chassis.log"
case $op in
  get)
    for p in "$@"; do
      case $p in
        power) echo "power:$(cat "$dir/power" 2>/dev/null || echo 0)";;
        boot) echo "boot:$(cat "$dir/boot" 2>/dev/null || echo default)";;
      esac
    done;;
  set)
    while [ $# -gt 1 ]; do
      case $1 in
        power) echo "$2" > "$dir/power";;
        reset) echo 1 > "$dir/power";;
        boot) echo "$2" > "$dir/boot";;
        shutdown) echo 0 > "$dir/power";;
      esac
      shift 2
    done;;
esac
"""


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    tmp = tmp_path_factory.mktemp("ipmi")
    port = free_udp_port()
    script = tmp / "chassis.sh"
    script.write_text(CHASSIS)
    script.chmod(0o755)
    (tmp / "state").mkdir()
    (tmp / "lan.conf").write_text(f"""name "gpufleet-test"
set_working_mc 0x20
  startlan 1
    addr 127.0.0.1 {port}
    priv_limit admin
    allowed_auths_callback none md2 md5 straight
    allowed_auths_user none md2 md5 straight
    allowed_auths_operator none md2 md5 straight
    allowed_auths_admin none md2 md5 straight
    guid a123456789abcdefa123456789abcdef
  endlan
  chassis_control "{script}"
  user 2 true "admin" "{PASSWORD}" admin 10 none md2 md5 straight
""")
    (tmp / "sim.emu").write_text(
        "mc_setbmc 0x20\nmc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02 persist_sdr\nmc_enable 0x20\n"
    )
    proc = subprocess.Popen(
        ["ipmi_sim", "-c", str(tmp / "lan.conf"), "-f", str(tmp / "sim.emu"), "-s", str(tmp / "state"), "-n"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    endpoint = f"ipmi://127.0.0.1:{port}"
    deadline = time.monotonic() + 15
    while True:
        try:
            IpmiClient(endpoint, "admin", PASSWORD, timeouts=FAST).login()
            break
        except Exception:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise
            time.sleep(0.2)
    yield endpoint, tmp
    proc.terminate()
    proc.wait(timeout=5)


def test_power_on_off_soft_reset_and_idempotence(sim: tuple[str, Path]) -> None:
    """Power actions reach the chassis; `on` when on sends no power command."""
    endpoint, tmp = sim
    c = IpmiClient(endpoint, "admin", PASSWORD, timeouts=FAST)
    c.set_power(PowerAction.OFF)
    on = c.set_power(PowerAction.ON)
    assert (on.before, on.after, on.changed) == ("Off", "On", True)
    log_before = (tmp / "chassis.log").read_text().count("set ")
    again = c.set_power(PowerAction.ON)
    assert again.changed is False and (tmp / "chassis.log").read_text().count("set ") == log_before
    assert c.set_power(PowerAction.RESET).reset_type == "ForceRestart"
    off = c.set_power(PowerAction.GRACEFUL_OFF)
    assert (off.reset_type, off.after) == ("GracefulShutdown", "Off")
    assert c.set_power(PowerAction.RESET).reset_type == "On"  # reset of an off system powers it on


def test_boot_override_once_and_persistent(sim: tuple[str, Path]) -> None:
    """`chassis bootdev` sets PXE for the next boot only; what the BMC reads back is reported, not assumed."""
    endpoint, tmp = sim
    c = IpmiClient(endpoint, "admin", PASSWORD, timeouts=FAST)
    once = c.set_boot_override(BootTarget.PXE)
    assert (once.target, once.enabled, once.honoured_once) == ("Pxe", "Once", True)
    assert (tmp / "boot").read_text().strip() == "pxe"
    persistent = c.set_boot_override(BootTarget.HDD, enabled="Continuous")
    # ipmi_sim keeps no persistence flag: the client reports the BMC's answer, not what was asked.
    assert (persistent.target, persistent.enabled, persistent.honoured_once) == ("Hdd", "Once", False)
    with pytest.raises(BmcUnsupported):
        c.set_boot_override(BootTarget.UEFI_HTTP)


def test_wrong_password_unknown_user_and_closed_port(sim: tuple[str, Path]) -> None:
    """Refused credentials are BmcAuthError; nothing listening is BmcUnreachable; the password never in messages."""
    endpoint, _ = sim
    with pytest.raises(BmcAuthError) as exc:
        IpmiClient(endpoint, "admin", "wrong-pw", timeouts=FAST).login()
    assert PASSWORD not in str(exc.value)
    with pytest.raises(BmcAuthError):
        IpmiClient(endpoint, "nobody", PASSWORD, timeouts=FAST).login()
    with pytest.raises(BmcUnreachable):
        IpmiClient(f"ipmi://127.0.0.1:{free_udp_port()}", "admin", PASSWORD, timeouts=FAST).login()


def test_password_only_in_child_environment(sim: tuple[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """ipmitool gets the password via IPMI_PASSWORD (-E), never in its argv."""
    endpoint, _ = sim
    seen: list[tuple[list[str], dict[str, str]]] = []
    real = subprocess.run

    def spy(argv: list[str], **kw: Any) -> Any:
        seen.append((list(argv), dict(kw.get("env") or {})))
        return real(argv, **kw)

    monkeypatch.setattr(subprocess, "run", spy)
    IpmiClient(endpoint, "admin", PASSWORD, timeouts=FAST).power_state()
    argv, env = seen[0]
    assert "-E" in argv and not any(PASSWORD in a for a in argv) and env["IPMI_PASSWORD"] == PASSWORD


def test_cli_power_and_status_over_ipmi(sim: tuple[str, Path], tmp_path: Path) -> None:
    """A node whose bmc endpoint is ipmi:// works through the same `gpufleet bmc` commands."""
    endpoint, _ = sim
    data = yaml.safe_load((project_dir() / "stacks" / "Pulumi.lab.yaml").read_text())
    secret = tmp_path / "pw"
    secret.write_text(PASSWORD)
    secret.chmod(0o600)
    data["config"]["gpufleet:site"]["nodes"][0]["bmc"] = {
        "protocol": "ipmi",
        "endpoint": endpoint,
        "username": "admin",
        "password": {"file": str(secret)},
    }
    stack = tmp_path / "Pulumi.ipmi.yaml"
    stack.write_text(yaml.safe_dump(data))

    def cli(*argv: str) -> tuple[int, Any]:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            code = main(list(argv))
        return code, json.loads(out.getvalue())

    code, d = cli("bmc", "power", "--stack-file", str(stack), "--node", "lab-gpu01", "--state", "off", "--json")
    assert code == 0 and d["after"] == "Off"
    code, d = cli("bmc", "status", "--stack-file", str(stack), "--node", "lab-gpu01", "--json")
    assert code == 0 and d["nodes"][0]["power"] == "Off" and d["nodes"][0]["auth"] == "rmcp+"


def test_reimage_over_ipmi(sim: tuple[str, Path]) -> None:
    """The one reimage function drives an IPMI BMC too; the node is not left on a PXE override."""
    endpoint, _ = sim
    c = IpmiClient(endpoint, "admin", PASSWORD, timeouts=FAST)
    c.set_power(PowerAction.ON)
    result = reimage(c, boot_grace=0.5)
    assert (result.power_off.after, result.boot.target, result.power_on.after) == ("Off", "Pxe", "On")
    assert result.once_ignored == (result.restored is not None)
    assert c.current_boot()[0] != "Pxe"
