"""The Redfish client and `gpufleet bmc` against sushy-tools' emulator (a Redfish implementation not ours).

Loopback only: the emulator listens on 127.0.0.1 with a free port, basic auth from an htpasswd file.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import requests
import yaml

from infra.bmc.connect import client_for, preflight
from infra.bmc.errors import BmcAuthError, BmcNotFound, BmcTimeout, BmcTlsError, BmcUnreachable, BmcUnsupported
from infra.bmc.redfish import BootTarget, PowerAction, RedfishClient, Timeouts
from infra.cli import main
from infra.model.load import load_site, project_dir

PASSWORD = "s3cret-Canary-7781"
MAC_A = "02:47:46:09:00:01"
MAC_B = "02:47:46:09:00:02"
FAST = Timeouts(connect=1.0, read=2.0, retries=1, backoff=0.05, poll_interval=0.2, power_timeout=20)

# The emulator applies power changes 1–11 s after the request (`random.randint(1, 11)` in its fake
# driver). The wrapper pins that draw to its minimum so these tests stay fast; the change is still
# asynchronous (pending until the next second), so the client must still poll. Lab tests see real delays.
_WRAPPER = """
import sys, types
import sushy_tools.emulator.resources.systems.fakedriver as fd
fd.random = types.SimpleNamespace(randint=lambda a, b: a)
from sushy_tools.emulator.main import main
sys.argv = ["sushy-emulator", "--config", sys.argv[1]]
sys.exit(main())
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Emulator:
    url: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path


def _start_emulator(tmp: Path, *, cert: Path | None = None, key: Path | None = None) -> Emulator:
    port = free_port()
    auth = tmp / "htpasswd"
    auth.write_text("admin:" + bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode() + "\n")
    systems = [
        {
            "uuid": "8a5e3c00-0000-4000-8000-00000000000a",
            "name": "node-a",
            "power_state": "Off",
            "external_notifier": False,
            "nics": [{"mac": MAC_A, "ip": "198.18.9.11"}],
        },
        {
            "uuid": "8a5e3c00-0000-4000-8000-00000000000b",
            "name": "node-b",
            "power_state": "On",
            "external_notifier": False,
            "nics": [{"mac": MAC_B, "ip": "198.18.9.12"}],
        },
    ]
    state = tmp / "state"
    state.mkdir(exist_ok=True)
    conf = tmp / "emulator.conf"
    lines = [
        "SUSHY_EMULATOR_LISTEN_IP = '127.0.0.1'",
        f"SUSHY_EMULATOR_LISTEN_PORT = {port}",
        "SUSHY_EMULATOR_FAKE_DRIVER = True",
        f"SUSHY_EMULATOR_STATE_DIR = {str(state)!r}",
        f"SUSHY_EMULATOR_AUTH_FILE = {str(auth)!r}",
        f"SUSHY_EMULATOR_FAKE_SYSTEMS = {systems!r}",
    ]
    if cert and key:
        lines += [f"SUSHY_EMULATOR_SSL_CERT = {str(cert)!r}", f"SUSHY_EMULATOR_SSL_KEY = {str(key)!r}"]
    conf.write_text("\n".join(lines) + "\n")
    log = tmp / "emulator.log"
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRAPPER, str(conf)],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    scheme = "https" if cert else "http"
    url = f"{scheme}://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"emulator exited: {log.read_text()[-2000:]}")
        try:
            with warnings.catch_warnings():
                # Readiness probe only: the TLS tests themselves verify certificates.
                warnings.simplefilter("ignore")
                requests.get(url + "/redfish/v1/", timeout=0.5, verify=False)
            return Emulator(url, port, proc, log)
        except requests.RequestException:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("emulator did not start in 20 s")


def _stop(emu: Emulator) -> None:
    emu.proc.terminate()
    try:
        emu.proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        emu.proc.kill()
        emu.proc.wait()


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    emu = _start_emulator(tmp_path_factory.mktemp("sushy"))
    yield emu
    _stop(emu)


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gpufleet test BMC")])
    now = datetime.datetime.now(datetime.UTC)
    import ipaddress

    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "bmc.crt", tmp / "bmc.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


@pytest.fixture(scope="module")
def tls_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Emulator, Path]]:
    tmp = tmp_path_factory.mktemp("sushy-tls")
    cert, key = _self_signed(tmp)
    emu = _start_emulator(tmp, cert=cert, key=key)
    yield emu, cert
    _stop(emu)


def client(emu: Emulator, system: str | None = "node-a", password: str = PASSWORD, **kw: Any) -> RedfishClient:
    return RedfishClient(emu.url, "admin", password, system_id=system, timeouts=kw.pop("timeouts", FAST), **kw)


def make_stack(
    tmp: Path,
    endpoint: str,
    *,
    password: str = PASSWORD,
    system: str = "node-a",
    mac: str = MAC_A,
    ca_bundle: str | None = None,
    lab_mode: bool = True,
) -> Path:
    """A copy of the lab stack whose lab-gpu01 BMC is the test emulator (password in a 0600 file).

    The controller's SSH files point into `tmp`, so nothing here can touch a running lab's known_hosts.
    """
    data = yaml.safe_load((project_dir() / "stacks" / "Pulumi.lab.yaml").read_text())
    data["config"]["gpufleet:site"]["lab_mode"] = lab_mode
    data["config"]["gpufleet:site"]["controller"] = {
        "known_hosts": str(tmp / "known_hosts"),
        "ssh_config": str(tmp / "ssh_config"),
    }
    secret = tmp / "bmc-password"
    secret.write_text(password + "\n")
    secret.chmod(0o600)
    node = data["config"]["gpufleet:site"]["nodes"][0]
    node["macs"] = [mac]
    node["bmc"] = {
        "endpoint": endpoint,
        "system_id": system,
        "username": "admin",
        "password": {"file": str(secret)},
        **({"ca_bundle": ca_bundle} if ca_bundle else {}),
    }
    path = tmp / "Pulumi.bmctest.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


# --- client against the emulator ----------------------------------------------------------------------


def test_login_falls_back_to_basic_auth_when_no_session_service(emulator: Emulator) -> None:
    """The emulator has no SessionService: the client authenticates with basic auth and reads the system."""
    with client(emulator) as c:
        assert c.auth_mode == "basic"
        assert c.system()["Name"] == "node-a"


def test_system_resolved_by_name_uuid_or_single_member(emulator: Emulator) -> None:
    """`system_id` may be the Name or the UUID; an unknown one names the systems that exist."""
    with client(emulator, system="8a5e3c00-0000-4000-8000-00000000000b") as c:
        assert c.system()["Name"] == "node-b"
    with client(emulator, system="nope") as c, pytest.raises(BmcNotFound) as exc:
        c.system()
    assert "node-a" in str(exc.value) and "node-b" in str(exc.value)
    with client(emulator, system=None) as c, pytest.raises(BmcNotFound, match="2 systems"):
        c.system()


def test_power_on_off_reset_poll_until_applied(emulator: Emulator) -> None:
    """Power changes are asynchronous: on/off/reset return only once the BMC reports the target state."""
    with client(emulator) as c:
        c.set_power(PowerAction.OFF)
        on = c.set_power(PowerAction.ON)
        assert (on.before, on.after, on.reset_type, on.changed) == ("Off", "On", "On", True)
        assert c.power_state() == "On"
        reset = c.set_power(PowerAction.RESET)
        assert reset.reset_type == "ForceRestart" and reset.after == "On"
        off = c.set_power(PowerAction.GRACEFUL_OFF)
        assert (off.reset_type, off.after) == ("GracefulShutdown", "Off")
        assert c.power_state() == "Off"


def test_power_on_is_idempotent(emulator: Emulator) -> None:
    """`on` on a running system sends no reset request at all."""
    with client(emulator, system="node-b") as c:
        c.set_power(PowerAction.ON)
        before = c.requests_made
        again = c.set_power(PowerAction.ON)
        assert again.changed is False and again.reset_type is None
        # One GET of the system, nothing else.
        assert c.requests_made - before == 1


def test_reset_of_powered_off_system_powers_it_on(emulator: Emulator) -> None:
    """A reset cannot restart what is not running: an Off system is powered on instead."""
    with client(emulator) as c:
        c.set_power(PowerAction.OFF)
        r = c.set_power(PowerAction.RESET)
        assert (r.before, r.reset_type, r.after) == ("Off", "On", "On")


def test_reset_type_must_be_advertised(emulator: Emulator) -> None:
    """Reset types outside the system's AllowableValues are refused before anything is sent."""
    with client(emulator) as c:
        assert "ForceRestart" in c.allowed_resets()
        with pytest.raises(BmcUnsupported, match="PowerCycle"):
            c.reset("PowerCycle")


def test_boot_override_once_reads_back_what_the_bmc_reports(emulator: Emulator) -> None:
    """PXE once is applied; the emulator's Continuous answer is reported, not hidden."""
    with client(emulator) as c:
        result = c.set_boot_override(BootTarget.PXE)
        assert result.target == "Pxe"
        assert c.system()["Boot"]["BootSourceOverrideTarget"] == "Pxe"
        assert result.enabled == "Continuous" and result.honoured_once is False
        back = c.set_boot_override(BootTarget.HDD)
        assert back.target == "Hdd"
        with pytest.raises(BmcUnsupported, match="Floppy"):
            c.set_boot_override("Floppy")


def test_inventory_lists_macs(emulator: Emulator) -> None:
    """Inventory reads identity and the MACs of the system's EthernetInterfaces."""
    with client(emulator) as c:
        inv = c.inventory()
    assert inv.name == "node-a" and inv.uuid.endswith("00a") and inv.macs == (MAC_A,)
    assert inv.manufacturer == "Sushy Emulator"


# --- errors ---------------------------------------------------------------------------------------


def test_wrong_password_is_a_clear_error_without_retry_storm(emulator: Emulator) -> None:
    """A refused password raises BmcAuthError after one authenticated request and never shows the password."""
    c = client(emulator, password="wrong-" + PASSWORD)
    with pytest.raises(BmcAuthError) as exc:
        c.login()
    # Service root (no auth) + one authenticated request; no retries that could lock the account.
    assert c.requests_made == 2
    assert "refused" in str(exc.value) and PASSWORD not in str(exc.value)


def test_unreachable_bmc_is_reported_quickly() -> None:
    """A closed loopback port gives BmcUnreachable (after the few connect retries), not a traceback."""
    port = free_port()
    t0 = time.monotonic()
    with pytest.raises(BmcUnreachable, match="cannot connect"):
        RedfishClient(f"http://127.0.0.1:{port}", "admin", PASSWORD, timeouts=FAST).login()
    assert time.monotonic() - t0 < 10


def test_bmc_that_never_answers_times_out() -> None:
    """A server that accepts connections but never answers raises BmcTimeout (read timeouts not retried)."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(8)  # the kernel completes the handshake; nobody ever reads or answers
        port = srv.getsockname()[1]
        t0 = time.monotonic()
        with pytest.raises(BmcTimeout, match="no answer"):
            RedfishClient(
                f"http://127.0.0.1:{port}", "admin", PASSWORD, timeouts=Timeouts(connect=1, read=0.5, retries=2)
            ).login()
        assert time.monotonic() - t0 < 1.5  # one read timeout, no retry


def test_tls_verification_fails_then_passes_with_ca_bundle(tls_emulator: tuple[Emulator, Path]) -> None:
    """A self-signed BMC certificate is refused by default and accepted with its CA bundle."""
    emu, cert = tls_emulator
    with pytest.raises(BmcTlsError, match="ca_bundle"):
        RedfishClient(emu.url, "admin", PASSWORD, system_id="node-a", timeouts=FAST).login()
    with RedfishClient(emu.url, "admin", PASSWORD, system_id="node-a", verify=str(cert), timeouts=FAST) as c:
        assert c.system()["Name"] == "node-a"


# --- node → client, preflight, CLI -----------------------------------------------------------------


def test_preflight_checks_credentials_and_pxe_mac(emulator: Emulator, tmp_path: Path) -> None:
    """Preflight passes for the right system, and refuses a system whose MACs are not the node's."""
    good = load_site(path=make_stack(tmp_path, emulator.url)).nodes[0]
    assert preflight(good, FAST).ok and preflight(good, FAST).mac_matches is True
    wrong = load_site(path=make_stack(tmp_path, emulator.url, system="node-b")).nodes[0]
    p = preflight(wrong, FAST)
    assert not p.ok and p.kind == "identity" and MAC_A in p.problem
    bad = load_site(path=make_stack(tmp_path, emulator.url, password="nope")).nodes[0]
    p = preflight(bad, FAST)
    assert not p.ok and p.kind == "auth"


def test_client_for_reads_password_from_secret_ref(emulator: Emulator, tmp_path: Path) -> None:
    """The node's SecretRef file supplies the password; the CA bundle becomes the verify setting."""
    node = load_site(path=make_stack(tmp_path, emulator.url, ca_bundle="/etc/ssl/bmc-ca.pem")).nodes[0]
    c = client_for(node, FAST)
    assert c.verify == "/etc/ssl/bmc-ca.pem"
    assert c._password == PASSWORD


def test_cli_power_is_idempotent_and_json(emulator: Emulator, tmp_path: Path) -> None:
    """`gpufleet bmc power --state on` changes power once, then reports nothing to do."""
    stack = str(make_stack(tmp_path, emulator.url))
    code, out, _ = run_cli("bmc", "power", "--stack-file", stack, "--node", "lab-gpu01", "--state", "on", "--json")
    assert code == 0 and json.loads(out)["after"] == "On"
    code, out, _ = run_cli("bmc", "power", "--stack-file", stack, "--node", "lab-gpu01", "--state", "on", "--json")
    data = json.loads(out)
    assert code == 0 and data["changed"] is False and data["reset_type"] is None


def test_cli_reimage_requires_yes_and_reimages(emulator: Emulator, tmp_path: Path) -> None:
    """Without --yes (no terminal) reimage exits 4 and touches nothing; with --yes it sets PXE and resets."""
    stack = str(make_stack(tmp_path, emulator.url))
    with client(emulator) as c:
        c.set_boot_override(BootTarget.HDD)
    code, _, err = run_cli("bmc", "reimage", "--stack-file", stack, "--node", "lab-gpu01")
    assert code == 4 and "--yes" in err
    with client(emulator) as c:
        assert c.system()["Boot"]["BootSourceOverrideTarget"] == "Hdd"
    code, out, _ = run_cli(
        "bmc", "reimage", "--stack-file", stack, "--node", "lab-gpu01", "--yes", "--boot-grace", "0.5", "--json"
    )
    data = json.loads(out)
    assert code == 0 and data["boot"]["target"] == "Pxe" and data["power"]["after"] == "On"
    assert data["power_off"]["after"] == "Off"
    # sushy-tools' fake driver keeps the override and reports Continuous (its PATCH handler ignores
    # BootSourceOverrideEnabled: sushy_tools/emulator/main.py, 2.2.0): the disk is set back.
    assert data["once_ignored"] is True and data["restored"]["target"] == "Hdd"
    assert _boot_target(emulator) == "Hdd"


def test_cli_errors_have_exit_codes_and_no_secret(emulator: Emulator, tmp_path: Path) -> None:
    """Wrong password and unreachable BMC exit 5 with a message; unknown node exits 2."""
    stack = str(make_stack(tmp_path, emulator.url, password="wrong-pw"))
    code, out, _ = run_cli("bmc", "status", "--stack-file", stack, "--node", "lab-gpu01", "--json")
    assert code == 5 and json.loads(out)["nodes"][0]["error"] == "auth"
    code, _, err = run_cli("bmc", "inventory", "--stack-file", stack, "--node", "lab-gpu01")
    assert code == 5 and "refused" in err and "wrong-pw" not in err
    closed = str(make_stack(tmp_path.parent, f"http://127.0.0.1:{free_port()}"))
    code, out, _ = run_cli("bmc", "power", "--stack-file", closed, "--node", "lab-gpu01", "--state", "on", "--json")
    assert code == 5 and json.loads(out)["error"] == "unreachable"
    code, _, err = run_cli("bmc", "power", "--stack-file", stack, "--node", "gpu99", "--state", "on")
    assert code == 2 and "lab-gpu01" in err


def test_cli_inventory_flags_mac_mismatch(emulator: Emulator, tmp_path: Path) -> None:
    """Inventory exits 1 when the BMC's system does not carry the node's PXE MAC."""
    stack = str(make_stack(tmp_path, emulator.url, system="node-b"))
    code, out, _ = run_cli("bmc", "inventory", "--stack-file", stack, "--node", "lab-gpu01", "--json")
    data = json.loads(out)
    assert code == 1 and data["mac_matches"] is False and data["macs"] == [MAC_B]


def test_emulator_log_has_no_password(emulator: Emulator) -> None:
    """Nothing the client sent put the password into the BMC's log."""
    assert PASSWORD not in emulator.log.read_text(errors="replace")


# --- rebuild: refuse up-front, and the full flow with the emulator as BMC ---------------------------------

HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl root@new"


class Recorder:
    """Rebuild hooks that record what was called; the probe answers from a list of states."""

    def __init__(self, states: list[dict[str, str | None]]) -> None:
        self.calls: list[str] = []
        self.states = states

    def hooks(self) -> Any:
        from infra.dr.rebuild import Hooks
        from infra.dr.steps import StepResult
        from infra.plan.nodestate import NodeState

        def probe(_s: Any, p: Any) -> NodeState:
            self.calls.append("probe")
            return NodeState(p.hostname, self.states.pop(0), (), {"/etc/x": "a" * 64}, {}, (), False)

        def step(name: str) -> Any:
            def fn(*_a: Any) -> StepResult:
                self.calls.append(name)
                return StepResult(True, 0.0, 0)

            return fn

        return Hooks(
            probe=probe,
            reachable=lambda s, n: self.calls.append("reachable") or True,
            wait_ssh=lambda s, n, t: self.calls.append("wait_ssh") or 0.0,
            converge=step("converge"),
            validate=step("validate"),
        )


def _rebuild(stack: Path, rec: Recorder, **kw: Any) -> Any:
    from infra.dr.rebuild import rebuild
    from infra.dr.steps import StackRef
    from infra.plan.node import plan_site

    site = load_site(path=stack)
    return rebuild(
        site, plan_site(site).node("lab-gpu01"), StackRef(None, stack), hooks=rec.hooks(), power_timeout=20, **kw
    )


def _boot_target(emu: Emulator) -> str:
    with client(emu) as c:
        return str(c.system()["Boot"]["BootSourceOverrideTarget"])


@pytest.mark.parametrize("case", ["wrong-password", "unreachable", "no-host-key"])
def test_rebuild_refuses_up_front_and_touches_nothing(emulator: Emulator, tmp_path: Path, case: str) -> None:
    """Bad credentials, a dead BMC or no out-of-band host key: Refused, no SSH, no BMC change, no key pinned."""
    from infra.dr.rebuild import Refused

    with client(emulator) as c:
        c.set_boot_override(BootTarget.HDD)
    endpoint = f"http://127.0.0.1:{free_port()}" if case == "unreachable" else emulator.url
    stack = make_stack(tmp_path, endpoint, password="wrong" if case == "wrong-password" else PASSWORD, lab_mode=False)
    rec = Recorder([])
    with pytest.raises(Refused) as exc:
        _rebuild(stack, rec, record_dir=tmp_path / "fp")
    assert exc.value.kind == ("hostkey" if case == "no-host-key" else "bmc")
    assert rec.calls == []
    assert _boot_target(emulator) == "Hdd"
    assert not (tmp_path / "known_hosts").exists() and not (tmp_path / "fp").exists()
    assert PASSWORD not in str(exc.value)


def test_rebuild_full_flow_identical(emulator: Emulator, tmp_path: Path) -> None:
    """PXE once + reset through the BMC, key pinned, converge, validate, same fingerprint; disk boot restored."""
    stack = make_stack(tmp_path, emulator.url, lab_mode=False)
    key = tmp_path / "new_host_key.pub"
    key.write_text(HOST_KEY + "\n")
    pkgs = {"nvidia-driver": "570.133.20-1"}
    rec = Recorder([dict(pkgs), dict(pkgs)])
    report = _rebuild(stack, rec, record_dir=tmp_path / "fp", host_key=key)
    assert report.ok and report.identical is True and report.baseline == "live", report.as_dict()
    assert rec.calls == ["reachable", "probe", "wait_ssh", "converge", "validate", "probe"]
    steps = [s["step"] for s in report.steps]
    assert steps == ["preflight", "fingerprint-before", "bmc-reimage", "converge", "validate", "fingerprint-after"]
    reimage = report.steps[2]
    assert reimage["boot"]["target"] == "Pxe" and reimage["power"]["after"] == "On"
    assert reimage["host_key"].startswith("SHA256:") and reimage["once_ignored"] is True
    # The emulator kept PXE as Continuous: the rebuild put the disk back so the next reboot doesn't reinstall.
    assert _boot_target(emulator) == "Hdd"
    assert "lab-gpu01,198.18.1.11 ssh-ed25519 AAAAC3" in (tmp_path / "known_hosts").read_text()


def test_rebuild_reports_each_difference(emulator: Emulator, tmp_path: Path) -> None:
    """A node that comes back different is not ok, and every difference is listed."""
    stack = make_stack(tmp_path, emulator.url, lab_mode=False)
    key = tmp_path / "k.pub"
    key.write_text(HOST_KEY)
    rec = Recorder(
        [{"nvidia-driver": "570.133.20-1", "podman": "4.3.1"}, {"nvidia-driver": "580.65.06-1", "podman": "4.3.1"}]
    )
    report = _rebuild(stack, rec, record_dir=tmp_path / "fp", host_key=key)
    assert report.ok is False and report.identical is False and report.failed_step == ""
    assert [(d.kind, d.item, d.before, d.after) for d in report.differences] == [
        ("package", "nvidia-driver", "570.133.20-1", "580.65.06-1")
    ]


def test_cli_reimage_pins_out_of_band_host_key(emulator: Emulator, tmp_path: Path) -> None:
    """`bmc reimage --host-key` pins the given key after the reset; a bad key file stops before the BMC."""
    stack = str(make_stack(tmp_path, emulator.url))
    bad = tmp_path / "bad.pub"
    bad.write_text("not a key\n")
    with client(emulator) as c:
        c.set_boot_override(BootTarget.HDD)
    code, out, _ = run_cli(
        "bmc", "reimage", "--stack-file", stack, "--node", "lab-gpu01", "--yes", "--host-key", str(bad), "--json"
    )
    assert code == 2 and json.loads(out)["error"] == "hostkey" and _boot_target(emulator) == "Hdd"
    good = tmp_path / "good.pub"
    good.write_text(HOST_KEY + "\n")
    code, out, _ = run_cli(
        "bmc", "reimage", "--stack-file", stack, "--node", "lab-gpu01", "--yes", "--host-key", str(good),
        "--boot-grace", "0", "--json",
    )
    assert code == 0 and json.loads(out)["host_key"].startswith("SHA256:")
    assert "lab-gpu01,198.18.1.11 ssh-ed25519" in (tmp_path / "known_hosts").read_text()
