"""Only a reimage arms a node's install: roles/provisioning re-runs never do (issue 20).

The role's script tasks run for real (ansible-playbook, local connection) into a temporary HTTP root;
arming and the deploy's done report are infra/provision/httpd.py, the file the role installs.
"""

from __future__ import annotations

import json
import shlex
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.bmc.lifecycle import reimage
from infra.bmc.redfish import BootTarget, PowerAction, PowerResult, Timeouts
from infra.model.load import parse_site
from infra.provision.firstboot import ArmError, HostKeyStore, arm_install
from infra.provision.httpd import ArmError as ServerArmError
from infra.provision.httpd import arm, mark_done
from infra.provision.render import HTTP_ROOT, HTTPD_PATH, ImageRecord, SegmentService, install_script_name, render_site
from tests.unit.ansible_local import run_local_play
from tests.unit.test_bmc import HOST_KEY, Emulator, Recorder, _boot_target, _rebuild, emulator, make_stack, run_cli
from tests.unit.test_bmc import client as bmc_client
from tests.unit.test_image import SHA, _site

ROOT = Path(__file__).resolve().parents[2]
ROLE = ROOT / "roles" / "provisioning"
__all__ = ["emulator"]  # the BMC emulator fixture, re-exported for pytest


def _service() -> tuple[SegmentService, str]:
    site = parse_site(_site())
    (svc, *_) = render_site(site, images={"debian-12-node": ImageRecord(1 << 20, SHA)})
    return svc, site.nodes[0].macs[0].replace(":", "-")


def converge_scripts(tmp: Path, root: Path, files: dict[str, str]) -> str:
    """roles/provisioning's script tasks, as its converge runs them, on a local HTTP root (also the VM lab test's)."""
    role_vars: dict[str, Any] = yaml.safe_load((ROLE / "vars" / "main.yml").read_text())
    role_vars |= {"provisioning_http_root": str(root), "provisioning_http_files": files}
    play = [{
        "name": "Scripts", "hosts": "localhost", "gather_facts": False, "vars": role_vars,
        "tasks": [{"name": "Role scripts", "ansible.builtin.include_tasks": str(ROLE / "tasks" / "scripts.yml")}],
    }]  # fmt: skip
    (root / "ipxe" / "local").mkdir(parents=True, exist_ok=True)
    (root / "ipxe" / "install").mkdir(parents=True, exist_ok=True)
    return run_local_play(play, tmp)


def test_converges_never_rearm_only_arming_does(tmp_path: Path) -> None:
    svc, mac = _service()
    root = tmp_path / "http"
    live = root / "ipxe" / f"{mac}.ipxe"
    install_text = svc.http_files[f"ipxe/{mac}.ipxe"]
    local_text = svc.http_files[f"ipxe/local/{mac}.ipxe"]
    assert "kernel " in install_text and "kernel " not in local_text

    # A stale node's files (no longer in the stack) are swept; a new node starts on "boot from disk".
    (root / "firstboot").mkdir(parents=True)
    (root / "ipxe" / "install").mkdir(parents=True)
    stale = ["ipxe/52-54-00-00-00-99.ipxe", "ipxe/install/52-54-00-00-00-99.ipxe", "firstboot/52-54-00-00-00-99.tar.gz"]
    for rel in stale:
        (root / rel).write_text("old")
    converge_scripts(tmp_path, root, svc.http_files)
    assert (root / install_script_name(mac.replace("-", ":"))).read_text() == install_text
    assert live.read_text() == local_text
    assert not any((root / rel).exists() for rel in stale)

    # Arming (what reimage/rebuild run over SSH) switches to the install and places the first-boot data.
    arm(root, mac, b"first-boot")
    assert live.read_text() == install_text
    fb = root / "firstboot" / f"{mac}.tar.gz"
    assert fb.read_bytes() == b"first-boot" and stat.S_IMODE(fb.stat().st_mode) == 0o600

    # A converge while armed keeps the install armed (and its data) ...
    converge_scripts(tmp_path, root, svc.http_files)
    assert live.read_text() == install_text and fb.exists()
    # ... the deploy's done report switches to the disk, and a converge afterwards does not re-arm.
    assert mark_done(root, mac)
    converge_scripts(tmp_path, root, svc.http_files)
    assert live.read_text() == local_text and not fb.exists()


def test_arm_refuses_bad_macs_and_nodes_without_an_install_script(tmp_path: Path) -> None:
    (tmp_path / "ipxe" / "install").mkdir(parents=True)
    with pytest.raises(ServerArmError, match="hexhyp"):
        arm(tmp_path, "../../etc/passwd", b"")
    with pytest.raises(ServerArmError, match="no install script"):
        arm(tmp_path, "52-54-00-00-00-01", b"x")
    assert not (tmp_path / "firstboot").exists() and not (tmp_path / "ipxe" / "52-54-00-00-00-01.ipxe").exists()


def test_arm_command_line_reads_the_firstboot_data_from_stdin(tmp_path: Path) -> None:
    (tmp_path / "ipxe" / "install").mkdir(parents=True)
    (tmp_path / "ipxe" / "install" / "52-54-00-00-00-01.ipxe").write_text("#!ipxe\nkernel x\n")
    script = ROOT / "infra" / "provision" / "httpd.py"
    run = [sys.executable, str(script), "--root", str(tmp_path), "--arm"]
    ok = subprocess.run([*run, "52-54-00-00-00-01"], input=b"data", capture_output=True, check=False)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "firstboot" / "52-54-00-00-00-01.tar.gz").read_bytes() == b"data"
    bad = subprocess.run([*run, "52-54-00-00-00-02"], input=b"", capture_output=True, check=False)
    assert bad.returncode == 1 and b"no install script" in bad.stderr


def test_the_role_installs_the_server_the_controller_arms_with() -> None:
    """The role ships a copy (collections carry only roles/): it must be byte-identical to the tested module."""
    role_vars = yaml.safe_load((ROLE / "vars" / "main.yml").read_text())
    assert role_vars["_provisioning_httpd"] == HTTPD_PATH
    assert (ROLE / "files" / "provision_httpd.py").read_bytes() == (ROOT / "infra/provision/httpd.py").read_bytes()


def test_arm_install_runs_the_installed_server_over_ssh_with_the_nodes_data(tmp_path: Path) -> None:
    """The controller's arm: pinned-key SSH to the provisioning host, `--arm <mac>`, the first-boot tarball on stdin."""
    site = parse_site(_site())
    node = site.nodes[0]
    svc, mac = _service()
    root = tmp_path / "http"
    (root / "ipxe" / "install").mkdir(parents=True)
    (root / "ipxe" / "install" / f"{mac}.ipxe").write_text(svc.http_files[f"ipxe/{mac}.ipxe"])
    store = HostKeyStore(tmp_path / "keys")
    seen: list[list[str]] = []

    def fake_ssh(argv: list[str], *, host: str, stdin: bytes, timeout: float) -> subprocess.CompletedProcess[bytes]:
        """Stands in for the provisioning host: runs the remote command locally, on a temporary HTTP root."""
        seen.append(argv)
        words = shlex.split(argv[-1])
        assert words[:2] == ["python3", HTTPD_PATH] and words[2:4] == ["--root", HTTP_ROOT]
        local = [sys.executable, str(ROOT / "infra/provision/httpd.py"), "--root", str(root), *words[4:]]
        return subprocess.run(local, input=stdin, capture_output=True, check=False)

    public = arm_install(site, node, store, run=fake_ssh)
    assert public == store.get(node.hostname).public
    (argv,) = seen
    assert argv[0] == "ssh" and "StrictHostKeyChecking=yes" in argv and argv[-2] == "10.0.0.5"
    assert (root / "ipxe" / f"{mac}.ipxe").read_text() == svc.http_files[f"ipxe/{mac}.ipxe"]
    (tmp_path / "fb.tar.gz").write_bytes((root / "firstboot" / f"{mac}.tar.gz").read_bytes())
    listing = subprocess.run(["tar", "-xOzf", str(tmp_path / "fb.tar.gz"), "etc/ssh/ssh_host_ed25519_key.pub"],
                             capture_output=True, text=True, check=True).stdout
    assert listing.strip() == public

    # The host refuses (no install script for the MAC: the role has not run since the node was added).
    (root / "ipxe" / "install" / f"{mac}.ipxe").unlink()
    with pytest.raises(ArmError, match=r"refused to arm.*no install script"):
        arm_install(site, node, store, run=fake_ssh)
    # A node that is not network-installed is never armed (no SSH at all).
    plain = parse_site(_site() | {"nodes": [_site()["nodes"][0] | {"image": None}]})
    with pytest.raises(ArmError, match="not network-installed"):
        arm_install(plain, plain.nodes[0], store, run=fake_ssh)
    assert len(seen) == 2


class _Bmc:
    """A BMC that records requests (the reimage's order is what is checked)."""

    def __init__(self, calls: list[str]) -> None:
        self.calls = calls
        self.timeouts = Timeouts()

    def set_power(self, action: PowerAction, timeout: float | None = None) -> PowerResult:
        self.calls.append(f"power {action.value}")
        return PowerResult(action.value, "Off", "On", None, True, 0.0)

    def set_boot_override(self, target: Any, enabled: str = "Once") -> Any:
        self.calls.append(f"boot {getattr(target, 'value', target)}")
        return None

    def current_boot(self) -> tuple[str, str]:
        return ("None", "Disabled")


def test_reimage_arms_before_the_bmc_is_touched_and_a_refusal_touches_nothing() -> None:
    calls: list[str] = []
    reimage(_Bmc(calls), arm=lambda: calls.append("arm"), booted=lambda: "SHA256:x")  # type: ignore[arg-type]
    assert calls == ["arm", "power off", "boot Pxe", "power on"]

    calls.clear()

    def refuse() -> None:
        raise ArmError("provisioning host down")

    with pytest.raises(ArmError):
        reimage(_Bmc(calls), arm=refuse, booted=lambda: "SHA256:x")  # type: ignore[arg-type]
    assert calls == []


def test_rebuild_stops_at_a_refused_arm_before_the_bmc(emulator: Emulator, tmp_path: Path) -> None:
    """`rebuild` of an image node arms first: a refusal is the failed step `arm`; the BMC keeps its disk boot."""
    with bmc_client(emulator) as c:
        c.set_boot_override(BootTarget.HDD)
        power = c.power_state()
    stack = make_stack(tmp_path, emulator.url, lab_mode=False)
    key = tmp_path / "host_key.pub"
    key.write_text(HOST_KEY + "\n")
    rec = Recorder([{"nvidia-driver": "570.133.20-1"}])

    def refuse() -> None:
        rec.calls.append("arm")
        raise ArmError("lab-gpu01: provisioning host lab-gpu02 refused to arm the install (exit 1): no install script")

    report = _rebuild(stack, rec, record_dir=tmp_path / "fp", host_key=key, arm=refuse)
    assert report.failed_step == "arm" and "no install script" in report.message
    assert rec.calls == ["reachable", "probe", "arm"]
    with bmc_client(emulator) as c:
        assert c.system()["Boot"]["BootSourceOverrideTarget"] == "Hdd"
        assert c.power_state() == power


def _image_stack(tmp_path: Path, endpoint: str) -> Path:
    """The BMC test stack with lab-gpu01 network-installed, served by lab-gpu02 (a node of its segment)."""
    path = make_stack(tmp_path, endpoint, lab_mode=False)
    data = yaml.safe_load(path.read_text())
    site = data["config"]["gpufleet:site"]
    site["segments"][0]["provisioning"]["host"] = "lab-gpu02"
    site["nodes"][0] |= {"image": "debian-12-node", "boot_mode": "bios", "root_disk": {"serial": "GPF0001"}}
    path.write_text(yaml.safe_dump(data))
    return path


def test_bmc_reimage_of_an_image_node_arms_first_and_pins_the_stores_key(
    emulator: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`gpufleet bmc reimage` (Pulumi's BMC step): arm before the BMC; a refused arm sends nothing to the BMC."""
    stack = str(_image_stack(tmp_path, emulator.url))
    keys = tmp_path / "keys"
    with bmc_client(emulator) as c:
        c.set_boot_override(BootTarget.HDD)
    armed: list[tuple[str, str]] = []

    def refuse(site: Any, node: Any, store: HostKeyStore) -> str:
        raise ArmError(f"{node.hostname}: cannot reach provisioning host lab-gpu02: Connection refused")

    monkeypatch.setattr("infra.commands.bmc.arm_install", refuse)
    argv = ["bmc", "reimage", "--stack-file", stack, "--node", "lab-gpu01", "--yes", "--keys", str(keys),
            "--boot-grace", "0", "--json"]
    code, out, _ = run_cli(*argv)
    assert code == 1 and json.loads(out)["error"] == "arm", out
    assert _boot_target(emulator) == "Hdd" and not (tmp_path / "known_hosts").exists()

    def record(site: Any, node: Any, store: HostKeyStore) -> str:
        armed.append((node.hostname, _boot_target(emulator)))  # the BMC has not been asked for PXE yet
        return store.get(node.hostname).public

    monkeypatch.setattr("infra.commands.bmc.arm_install", record)
    code, out, _ = run_cli(*argv)
    assert code == 0, out
    assert armed == [("lab-gpu01", "Hdd")]
    stored = HostKeyStore(keys).get("lab-gpu01").public.split()
    assert f"lab-gpu01,198.18.1.11 {stored[0]} {stored[1]}" in (tmp_path / "known_hosts").read_text()
