"""A libvirt VM node behind sushy-tools' libvirt driver: install and reinstall through its Redfish BMC.

The VM is a libvirt `type='qemu'` domain (TCG) whose persistent boot order is its disk, like a server set
up by the operator guidance in docs/bare-metal.md; its NIC is on the throwaway bridge gpf-prov0 and its
blank disk carries the stack's serial hint. sushy-emulator (PyPI `sushy-tools`, its libvirt driver, the
one Metal3/Ironic development environments use) is its BMC on 127.0.0.1; gpufleet's own Redfish client
(infra/bmc/redfish.py) asks it for a one-time PXE boot and power, exactly as for a real BMC. The driver
acts on the domain's boot order (NIC first) and power (create/destroy), so the boot goes through the VM's
real firmware. Then:

1. install: BMC PXE + power on → deploy ramdisk → image written, verified → done → disk → SSH answers
   with the key store's key;
2. reinstall (what `gpufleet rebuild` does to a real node): the install script is re-armed, BMC PXE +
   reset → the whole disk is rewritten (a file written after the first install is gone) → SSH answers
   with the *same* key, through the same unchanged known_hosts file (StrictHostKeyChecking=yes).

libvirtd and virtlogd are started by the test (foreground processes, stopped by PID), with a private
/etc/libvirt in their own mount namespace (qemu runs as root: pytest's temporary directories are 0700).
sushy-tools runs from /var/cache/gpufleet/sushy-venv (a venv over Debian's python3-libvirt, made by the
test with pip from PyPI if missing). Under the VM lock:
`GPUFLEET_IMAGE_OUT=DIR flock /tmp/gpufleet-vm.lock pytest -m lab -s tests/lab/test_deploy_vm_bmc.py`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

from infra.bmc.redfish import PowerAction, RedfishClient
from infra.commands.provision import image_records, write_firstboot
from infra.model.load import parse_site
from infra.provision.firstboot import HostKeyStore
from infra.provision.httpd import Handler
from infra.provision.render import render_site
from tests.lab.image_fixtures import IMAGE, built_image
from tests.lab.test_provision_vm import BRIDGE, BRIDGE_ADDR, KNOWN_MAC, _bridge, _dnsmasq, _stack, _stop, _wait

pytestmark = pytest.mark.lab
__all__ = ["built_image"]  # the fixture, re-exported for pytest

NODE_ADDR = "198.18.9.21"
DISK_SERIAL = "GPFROOT01"
DOMAIN = "gpf-vm-node1"
UUID = "9a000021-0000-4000-8000-000000000021"
SUSHY_VENV = Path("/var/cache/gpufleet/sushy-venv")
SUSHY_VERSION = "2.2.0"
VIRSH = ["virsh", "-c", "qemu:///system"]

DOMAIN_XML = """<domain type='qemu'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <memory unit='MiB'>1024</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <on_reboot>restart</on_reboot>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw' cache='unsafe'/>
      <source file='{disk}'/><target dev='vda' bus='virtio'/><serial>{serial}</serial>
    </disk>
    <interface type='bridge'><source bridge='{bridge}'/><mac address='{mac}'/><model type='virtio'/></interface>
    <serial type='file'><source path='{console}' append='on'/></serial>
  </devices>
</domain>
"""


def _need(cond: bool, why: str) -> None:
    if not cond:
        pytest.skip(why)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _sushy() -> Path:
    exe = SUSHY_VENV / "bin" / "sushy-emulator"
    if not exe.exists():
        subprocess.run(["/usr/bin/python3", "-m", "venv", "--system-site-packages", str(SUSHY_VENV)], check=True)
        subprocess.run([str(SUSHY_VENV / "bin" / "pip"), "install", "-q", f"sushy-tools=={SUSHY_VERSION}"],
                       check=True, timeout=600)
    return exe


@contextlib.contextmanager
def _libvirt(tmp: Path) -> Iterator[None]:
    """virtlogd + libvirtd in the foreground (our PIDs), with a private /etc/libvirt where qemu runs as root."""
    etc = tmp / "etc-libvirt"
    shutil.copytree("/etc/libvirt", etc)
    (etc / "qemu.conf").write_text('user = "root"\ngroup = "root"\nremember_owner = 0\n')
    for d in ("/var/log/libvirt", "/run/libvirt"):
        os.makedirs(d, exist_ok=True)
    procs = [subprocess.Popen(["virtlogd"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    procs.append(subprocess.Popen(
        ["unshare", "-m", "sh", "-c", f"mount --bind {etc} /etc/libvirt && exec libvirtd"],
        stdout=(tmp / "libvirtd.log").open("wb"), stderr=subprocess.STDOUT,
    ))  # fmt: skip
    try:
        assert _wait(lambda: subprocess.run([*VIRSH, "version"], capture_output=True).returncode == 0, 30)
        yield
    finally:
        for p in reversed(procs):
            _stop(p)


def _console(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _deploy(console: Path, since: int, started: float) -> tuple[str, float]:
    """Wait for the deploy's end on the console after byte `since`; return that part and the seconds taken."""
    done = _wait(lambda: "gpufleet-deploy: deploy of vm-node1 done" in _console(console)[since:]
                 or "gpufleet-deploy: FAILED" in _console(console)[since:], 600)
    text = _console(console)[since:]
    assert done and "FAILED" not in text, f"--- console\n{text[-4000:]}"
    return text, time.monotonic() - started


def _keyscan() -> list[list[str]]:
    res = subprocess.run(["ssh-keyscan", "-T", "3", "-t", "ed25519", NODE_ADDR], capture_output=True, text=True,
                         check=False)
    return [line.split()[1:3] for line in res.stdout.splitlines() if line and not line.startswith("#")]


def test_vm_node_is_installed_and_reinstalled_through_its_redfish_bmc_with_the_same_host_key(
    built_image: Path, tmp_path: Path
) -> None:
    _need(os.geteuid() == 0, "needs root (bridge, libvirt, DHCP port 67)")
    for tool in ("dnsmasq", "qemu-system-x86_64", "libvirtd", "virtlogd", "virsh", "unshare", "ssh-keyscan"):
        _need(shutil.which(tool) is not None, f"{tool} is not installed (./scripts/setup.sh --test)")
    _need(subprocess.run(["/usr/bin/python3", "-c", "import libvirt"], capture_output=True).returncode == 0,
          "Debian's python3-libvirt is not installed (./scripts/setup.sh --test)")
    sushy = _sushy()

    admin = tmp_path / "admin"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(admin)], check=True)
    http_root = tmp_path / "http"
    for rel in (f"images/{IMAGE}.img", "deploy/vmlinuz", "deploy/initrd.img"):
        (http_root / rel).parent.mkdir(parents=True, exist_ok=True)
        os.link(built_image / rel, http_root / rel)
    records = image_records(built_image)
    disk = tmp_path / "disk.raw"
    with disk.open("wb") as f:
        f.truncate(4 << 30)
    console = tmp_path / "console.log"
    log = tmp_path / "dnsmasq.log"
    port = _free_port()
    conf = tmp_path / "sushy.conf"
    conf.write_text(
        f"SUSHY_EMULATOR_LISTEN_IP = '127.0.0.1'\nSUSHY_EMULATOR_LISTEN_PORT = {port}\n"
        f"SUSHY_EMULATOR_LIBVIRT_URI = 'qemu:///system'\nSUSHY_EMULATOR_ALLOWED_INSTANCES = ['{UUID}']\n"
    )
    procs: list[subprocess.Popen[bytes]] = []
    httpd = None
    with _bridge(), _libvirt(tmp_path):
        try:
            httpd = ThreadingHTTPServer((BRIDGE_ADDR, 0), functools.partial(Handler, directory=str(http_root)))
            threading.Thread(target=httpd.serve_forever, daemon=True).start()
            raw = _stack(httpd.server_address[1])
            raw["nodes"][0] |= {"image": IMAGE, "root_disk": {"serial": DISK_SERIAL}, "boot_mode": "bios"}  # type: ignore[index]
            raw["admin_keys"] = [(tmp_path / "admin.pub").read_text().strip()]
            site = parse_site(raw)
            (svc,) = render_site(site, tftp_root=str(tmp_path), lease_file=str(tmp_path / "leases"), images=records)
            store = HostKeyStore(tmp_path / "keys")
            mac = KNOWN_MAC.replace(":", "-")

            def arm() -> None:
                """What the provisioning role/`gpufleet provision render` writes: the install script + data."""
                for rel, text in svc.http_files.items():
                    (http_root / rel).parent.mkdir(parents=True, exist_ok=True)
                    (http_root / rel).write_text(text)
                out = tmp_path / "rendered"
                write_firstboot(out, site, svc, store)
                (http_root / "firstboot").mkdir(exist_ok=True)
                shutil.copy2(out / svc.segment / "http" / "firstboot" / f"{mac}.tar.gz", http_root / "firstboot")

            arm()
            (tmp_path / "dnsmasq.conf").write_text(svc.dnsmasq_conf)
            procs.append(_dnsmasq(tmp_path / "dnsmasq.conf", log))
            assert _wait(lambda: log.exists() and "static leases only" in log.read_text(), 15)
            # Leftovers of an interrupted run (libvirt keeps transient pools and domains in /run/libvirt).
            for cmd in (["destroy", DOMAIN], ["undefine", DOMAIN], ["pool-destroy", "gpf-vm-pool"]):
                subprocess.run([*VIRSH, *cmd], capture_output=True, check=False)
            # sushy's libvirt driver finds the disk by its storage volume: a pool over the test directory.
            subprocess.run([*VIRSH, "pool-create-as", "gpf-vm-pool", "dir", "--target", str(tmp_path)],
                           check=True, capture_output=True)
            xml = tmp_path / "domain.xml"
            xml.write_text(DOMAIN_XML.format(name=DOMAIN, uuid=UUID, disk=disk, serial=DISK_SERIAL, bridge=BRIDGE,
                                             mac=KNOWN_MAC, console=console))
            subprocess.run([*VIRSH, "define", str(xml)], check=True, capture_output=True)
            procs.append(subprocess.Popen([str(sushy), "--config", str(conf)], stdout=subprocess.DEVNULL,
                                          stderr=(tmp_path / "sushy.log").open("wb")))
            endpoint = f"http://127.0.0.1:{port}"
            assert _wait(lambda: subprocess.run(["curl", "-sf", f"{endpoint}/redfish/v1/Systems"],
                                                capture_output=True).returncode == 0, 30)

            with RedfishClient(endpoint, "", "", system_id=UUID, verify=False) as bmc:
                assert bmc.power_state() == "Off"
                # 1. Install: one-time PXE + power on, as for any node.
                started = time.monotonic()
                override = bmc.set_boot_override("Pxe", enabled="Once")
                dom = subprocess.run([*VIRSH, "dumpxml", "--inactive", DOMAIN], capture_output=True, text=True,
                                     check=True).stdout
                assert "<boot order='1'/>" in dom.split("<interface", 1)[1].split("</interface>", 1)[0], dom
                bmc.set_power(PowerAction.ON)
                text, deployed = _deploy(console, 0, started)
                assert f"written bytes verified: sha256 {records[IMAGE].sha256}" in text
                assert _wait(lambda: _keyscan() != [], 420), _console(console)[-3000:]
                to_ssh = time.monotonic() - started
                pinned = store.get("vm-node1").public.split()[:2]
                assert _keyscan() == [pinned]
                known = tmp_path / "known_hosts"
                known.write_text(f"{NODE_ADDR} {' '.join(pinned)}\n")
                known_before = known.read_bytes()

                def ssh(cmd: str) -> str:
                    res = subprocess.run(
                        ["ssh", "-i", str(admin), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                         "-o", f"UserKnownHostsFile={known}", "-o", "ConnectTimeout=10", f"root@{NODE_ADDR}", cmd],
                        capture_output=True, text=True, timeout=60, check=False,
                    )  # fmt: skip
                    assert res.returncode == 0, res.stderr
                    return res.stdout

                assert ssh("hostname; touch /root/written-after-install").split() == ["vm-node1"]

                # 2. Reinstall through the BMC: re-arm, one-time PXE, reset.
                arm()
                assert "kernel " in (http_root / "ipxe" / f"{mac}.ipxe").read_text()
                since = len(_console(console))
                started = time.monotonic()
                bmc.set_boot_override("Pxe", enabled="Once")
                bmc.set_power(PowerAction.RESET)
                text, redeployed = _deploy(console, since, started)
                assert f"written bytes verified: sha256 {records[IMAGE].sha256}" in text
                assert _wait(lambda: _keyscan() != [], 420), _console(console)[-3000:]
                rebuilt = time.monotonic() - started
                assert _keyscan() == [pinned]  # the same key: no known_hosts edit
                assert ssh("hostname; ls /root/written-after-install 2>/dev/null || echo gone").split() == [
                    "vm-node1", "gone"]
                assert known.read_bytes() == known_before
            print(json.dumps({"bmc_override_reported": override.enabled, "blank_to_deployed_s": round(deployed, 1),
                              "blank_to_ssh_s": round(to_ssh, 1), "reinstall_deployed_s": round(redeployed, 1),
                              "reinstall_to_ssh_s": round(rebuilt, 1)}))
        finally:
            subprocess.run([*VIRSH, "destroy", DOMAIN], capture_output=True, check=False)
            subprocess.run([*VIRSH, "undefine", DOMAIN], capture_output=True, check=False)
            subprocess.run([*VIRSH, "pool-destroy", "gpf-vm-pool"], capture_output=True, check=False)
            for p in reversed(procs):
                _stop(p)
            if httpd is not None:
                httpd.shutdown()
                httpd.server_close()
    assert not Path(f"/sys/class/net/{BRIDGE}").exists()
