"""A real network boot through the rendered provisioning service.

On a throwaway bridge (198.18.9.1/24, unused by the lab stacks: they use 198.18.1-2.0/24 and
198.19.x for the second lab), dnsmasq runs the config `infra.provision.render` wrote for a test stack,
Python's http.server serves the rendered iPXE scripts plus a kernel and initrd, and QEMU (TCG; KVM does
not work on this machine kind) boots with `-boot n`: the iPXE ROM of its virtio NIC (Debian `ipxe-qemu`)
does DHCP, gets the reserved address, chains boot.ipxe → the per-MAC script → kernel + initrd. The
initrd's /init prints the kernel command line to the serial port and powers off, so the node-specific
arguments are seen arriving. A second VM with a MAC the stack does not name gets no answer. The same
boot also runs in proxy-DHCP mode beside a stand-in site DHCP server, and from UEFI firmware that is not
iPXE (OVMF's own PXE client), which the service chain-loads into `ipxe.efi` over TFTP.

Kernel and busybox come from Debian's apt only (`apt-get download`), built once into a cache directory.
Run under the lab lock: `flock /tmp/gpufleet-lab.lock pytest -m lab tests/lab/test_provision_vm.py`.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from infra.model.load import parse_site
from infra.provision.render import BIOS_LOADER, UEFI_LOADER, render_site
from tests.unit.factories import make_site

pytestmark = pytest.mark.lab

BRIDGE = "gpf-prov0"
BRIDGE_ADDR = "198.18.9.1"
CIDR = "198.18.9.0/24"
KNOWN_MAC = "52:54:00:9a:00:21"
OTHER_MAC = "52:54:00:9a:00:22"  # reserved for another node of the segment: must not matter to the first
UNKNOWN_MAC = "52:54:00:9a:00:99"
MARKER = "GPUFLEET-NETBOOT-OK"
CACHE = Path(os.environ.get("GPUFLEET_VM_CACHE", "/var/cache/gpufleet/provision-vm"))
# QEMU's default ROM of virtio-net-pci (Debian: from ipxe-qemu, found through QEMU's data path); naming
# pxe-virtio.rom instead left the VM without network I/O here.
ROM = Path("/usr/lib/ipxe/qemu/efi-virtio.rom")
# UEFI firmware (Debian `ovmf`) and the iPXE builds the service chain-loads (Debian `ipxe`).
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
IPXE_DIR = Path("/usr/lib/ipxe")

INIT = f"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /dev
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t devtmpfs devtmpfs /dev
exec >/dev/console 2>&1
echo "{MARKER} cmdline: $(/bin/busybox cat /proc/cmdline)"
/bin/busybox poweroff -f
"""


def _need(cond: bool, why: str) -> None:
    if not cond:
        pytest.skip(why)


def _run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300, **kw)  # type: ignore[call-overload, no-any-return]


def _boot_files() -> tuple[Path, Path]:
    """Debian's cloud kernel and a busybox initrd whose /init prints the command line (cached)."""
    deps = _run(["apt-cache", "depends", "linux-image-cloud-amd64"]).stdout
    kpkg = next(line.split(":", 1)[1].strip() for line in deps.splitlines() if "Depends: linux-image-" in line)
    out = CACHE / kpkg
    kernel, initrd = out / "vmlinuz", out / "initrd.img"
    if kernel.exists() and initrd.exists():
        return kernel, initrd
    work = CACHE / "work"
    shutil.rmtree(work, ignore_errors=True)
    (work / "deb").mkdir(parents=True)
    os.chmod(work / "deb", 0o777)  # apt-get download runs as _apt when it can
    _run(["apt-get", "download", kpkg, "busybox-static"], cwd=work / "deb")
    for deb in (work / "deb").glob("*.deb"):
        _run(["dpkg-deb", "-x", str(deb), str(work / "x")])
    root = work / "initrd"
    (root / "bin").mkdir(parents=True)
    shutil.copy2(work / "x" / "bin" / "busybox", root / "bin" / "busybox")
    (root / "init").write_text(INIT)
    os.chmod(root / "init", 0o755)
    files = "\n".join(sorted(str(p.relative_to(root)) for p in root.rglob("*"))) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    with (out / "initrd.img.tmp").open("wb") as f:
        subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], input=files.encode(), stdout=f, cwd=root, check=True)
    shutil.copy2(next((work / "x" / "boot").glob("vmlinuz-*")), out / "vmlinuz.tmp")
    (out / "initrd.img.tmp").rename(initrd)
    (out / "vmlinuz.tmp").rename(kernel)
    shutil.rmtree(work)
    return kernel, initrd


def _stack(http_port: int) -> dict[str, object]:
    """A test site: one segment on the throwaway bridge, a dedicated provisioning host, two nodes."""
    site = make_site()
    site["segments"] = [
        {
            "name": "prov",
            "cidr": CIDR,
            "provisioning": {"host": "gpf-prov", "address": BRIDGE_ADDR, "mode": "dhcp", "http_port": http_port},
        }
    ]
    site["mirrors"] = []
    site["services"] = []
    base = site["nodes"][0]

    def bmc(host: str) -> dict[str, object]:  # each node its own BMC (two nodes on one BMC need system ids)
        return {**base["bmc"], "endpoint": f"https://bmc-{host}.example"}

    site["nodes"] = [
        base
        | {
            "hostname": "vm-node1",
            "bmc": bmc("vm-node1"),
            "segment": "prov",
            "address": "198.18.9.21",
            "macs": [KNOWN_MAC],
            "boot_mode": "bios",
            "image": "debian-12-gpu",
            "root_disk": {"serial": "QM00001"},
        },
        base
        | {"hostname": "vm-node2", "bmc": bmc("vm-node2"), "segment": "prov", "address": "198.18.9.22",
           "macs": [OTHER_MAC]},
    ]
    return site


class _Quiet(http.server.SimpleHTTPRequestHandler):
    requests: ClassVar[list[str]] = []

    def log_message(self, format: str, *args: object) -> None:
        _Quiet.requests.append(self.path)


@contextlib.contextmanager
def _bridge() -> Iterator[None]:
    subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True, check=False)  # a crashed earlier run
    try:
        _run(["ip", "link", "add", BRIDGE, "type", "bridge"])
        _run(["ip", "addr", "add", f"{BRIDGE_ADDR}/24", "dev", BRIDGE])
        _run(["ip", "link", "set", BRIDGE, "up"])
        yield
    finally:
        for i in range(2):
            subprocess.run(["ip", "link", "del", f"{BRIDGE}t{i}"], capture_output=True, check=False)
        subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True, check=False)


def _tap(i: int) -> str:
    name = f"{BRIDGE}t{i}"
    _run(["ip", "tuntap", "add", name, "mode", "tap"])
    _run(["ip", "link", "set", name, "master", BRIDGE, "up"])
    return name


def _qemu(tap: str, mac: str, serial: Path, uefi_vars: Path | None = None) -> subprocess.Popen[bytes]:
    """A diskless VM booting from the network: SeaBIOS + the NIC's iPXE ROM, or (uefi_vars) OVMF's own PXE."""
    nic = f"virtio-net-pci,netdev=n0,mac={mac}"
    firmware: list[str] = []
    if uefi_vars is not None:
        # No option ROM: OVMF's built-in UEFI PXE client boots, as a server's firmware would (not iPXE).
        nic += ",romfile="
        firmware = ["-drive", f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
                    "-drive", f"if=pflash,format=raw,file={uefi_vars}"]  # fmt: skip
    return subprocess.Popen(
        [
            "qemu-system-x86_64", "-accel", "tcg", "-m", "512", "-smp", "1",
            "-display", "none", "-monitor", "none", "-no-reboot", "-boot", "n", *firmware,
            "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
            "-device", nic,
            "-serial", f"file:{serial}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip


def _wait(pred: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return True
        time.sleep(0.5)
    return False


def _stop(p: subprocess.Popen[bytes] | None) -> None:
    if p is not None and p.poll() is None:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)


# The stand-in for a site's own DHCP server in the proxy-mode test: a pool plus a reservation, no boot options.
SITE_DHCP_ADDR = "198.18.9.2"
SITE_DHCP = """port=0
listen-address={addr}
bind-interfaces
dhcp-range=198.18.9.100,198.18.9.150,255.255.255.0,1h
dhcp-host={mac},198.18.9.21
dhcp-leasefile={leases}
log-dhcp
"""


def _dnsmasq(conf: Path, log: Path) -> subprocess.Popen[bytes]:
    """dnsmasq in the foreground with a config file, its log in a file (pid file beside it)."""
    return subprocess.Popen(
        ["dnsmasq", "--no-daemon", f"--conf-file={conf}", f"--pid-file={conf.with_suffix('.pid')}",
         f"--log-facility={log}", "--user=root"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip


@contextlib.contextmanager
def _service(
    tmp_path: Path, mode: str, boot_mode: str = "bios"
) -> Iterator[tuple[Path, list[subprocess.Popen[bytes]]]]:
    """Bridge, HTTP root, and dnsmasq with the config rendered for the test stack in `mode`.

    Yields the dnsmasq log and a list the test appends its QEMU processes to; everything (VMs, dnsmasq
    instances, HTTP server, taps, bridge) is torn down on the way out, also when the test fails.
    """
    _need(os.geteuid() == 0, "needs root (bridge, tap devices, DHCP port 67)")
    for tool in ("dnsmasq", "qemu-system-x86_64", "cpio", "apt-get", "dpkg-deb", "ip"):
        _need(shutil.which(tool) is not None, f"{tool} is not installed (./scripts/setup.sh --test)")
    _need(ROM.exists(), f"{ROM} is missing (apt-get install ipxe-qemu)")
    kernel, initrd = _boot_files()
    _Quiet.requests.clear()
    http_root = tmp_path / "http"
    (http_root / "deploy").mkdir(parents=True)
    shutil.copy2(kernel, http_root / "deploy" / "vmlinuz")
    shutil.copy2(initrd, http_root / "deploy" / "initrd.img")
    (tmp_path / "tftp").mkdir()
    log = tmp_path / "dnsmasq.log"
    procs: list[subprocess.Popen[bytes]] = []
    httpd = None
    with _bridge():
        try:
            handler = functools.partial(_Quiet, directory=str(http_root))
            httpd = http.server.ThreadingHTTPServer((BRIDGE_ADDR, 0), handler)
            threading.Thread(target=httpd.serve_forever, daemon=True).start()
            stack = _stack(httpd.server_address[1])
            stack["segments"][0]["provisioning"]["mode"] = mode  # type: ignore[index]
            stack["nodes"][0]["boot_mode"] = boot_mode  # type: ignore[index]
            (svc,) = render_site(
                parse_site(stack), tftp_root=str(tmp_path / "tftp"), lease_file=str(tmp_path / "leases")
            )
            for rel, text in svc.http_files.items():
                (http_root / rel).parent.mkdir(parents=True, exist_ok=True)
                (http_root / rel).write_text(text)
            if mode == "proxy":
                _run(["ip", "addr", "add", f"{SITE_DHCP_ADDR}/24", "dev", BRIDGE])
                site_conf = tmp_path / "site-dhcp.conf"
                leases = tmp_path / "site.leases"
                site_conf.write_text(SITE_DHCP.format(addr=SITE_DHCP_ADDR, mac=KNOWN_MAC, leases=leases))
                procs.append(_dnsmasq(site_conf, tmp_path / "site-dhcp.log"))
            conf = tmp_path / "dnsmasq.conf"
            conf.write_text(svc.dnsmasq_conf)
            procs.append(_dnsmasq(conf, log))
            ready = "proxy on subnet" if mode == "proxy" else "static leases only"
            assert _wait(lambda: log.exists() and ready in log.read_text(), 15), (
                log.read_text() if log.exists() else procs[-1].stderr.read().decode()  # type: ignore[union-attr]
            )
            yield log, procs
        finally:
            for p in reversed(procs):
                _stop(p)
            if httpd is not None:
                httpd.shutdown()
                httpd.server_close()


def _boot_known(tmp_path: Path, log: Path, procs: list[subprocess.Popen[bytes]], uefi_vars: Path | None = None) -> str:
    """Boot the VM with the known MAC; return its kernel command line as the initrd printed it."""
    serial = tmp_path / "known.serial"
    started = time.monotonic()
    procs.append(_qemu(_tap(0), KNOWN_MAC, serial, uefi_vars))
    booted = _wait(lambda: MARKER in serial.read_text(errors="replace") if serial.exists() else False, 150)
    text = serial.read_text(errors="replace") if serial.exists() else ""
    assert booted, f"no marker on the serial port\n--- serial\n{text[-3000:]}\n--- dnsmasq\n{log.read_text()}"
    print(f"network boot to userspace: {time.monotonic() - started:.1f} s")  # reported, never asserted
    _stop(procs.pop())
    cmdline = next(line for line in text.splitlines() if MARKER in line)
    for arg in (
        "gpufleet.node=vm-node1",
        "ip=198.18.9.21::",
        "BOOTIF=01-52-54-00-9a-00-21",
        "gpufleet.image=debian-12-gpu",
        "gpufleet.root_disk=serial:QM00001",
        f"gpufleet.boot_mode={'uefi' if uefi_vars else 'bios'}",
    ):
        assert arg in cmdline, (arg, cmdline)
    assert "vm-node2" not in cmdline
    assert "/boot.ipxe" in _Quiet.requests
    assert "/ipxe/52-54-00-9a-00-21.ipxe" in _Quiet.requests, _Quiet.requests
    return cmdline


def test_known_mac_network_boots_with_its_own_arguments_unknown_mac_gets_nothing(tmp_path: Path) -> None:
    with _service(tmp_path, "dhcp") as (log, procs):
        # A MAC the stack names: DHCP → reserved address → boot.ipxe → its script → kernel + initrd.
        _boot_known(tmp_path, log, procs)
        dhcp = log.read_text()
        assert f"DHCPACK(gpf-prov0) 198.18.9.21 {KNOWN_MAC} vm-node1" in dhcp, dhcp

        # A MAC the stack does not name: dnsmasq ignores it, nothing is fetched, no kernel runs.
        serial = tmp_path / "unknown.serial"
        seen = len(_Quiet.requests)
        procs.append(_qemu(_tap(1), UNKNOWN_MAC, serial))
        ignored = _wait(lambda: f"{UNKNOWN_MAC} ignored" in log.read_text(), 60)
        time.sleep(5)  # give a wrong answer time to show up before judging
        assert ignored, log.read_text()
        unknown_lines = [line for line in log.read_text().splitlines() if UNKNOWN_MAC in line]
        assert not [line for line in unknown_lines if "DHCPOFFER" in line or "DHCPACK" in line], unknown_lines
        assert _Quiet.requests[seen:] == []
        assert "Linux version" not in (serial.read_text(errors="replace") if serial.exists() else "")


def test_proxy_mode_boots_beside_the_sites_own_dhcp(tmp_path: Path) -> None:
    """The site's DHCP server gives the address; the rendered proxy-DHCP config only adds the boot path."""
    with _service(tmp_path, "proxy") as (log, procs):
        _boot_known(tmp_path, log, procs)
        site_log = (tmp_path / "site-dhcp.log").read_text()
        assert f"DHCPACK(gpf-prov0) 198.18.9.21 {KNOWN_MAC}" in site_log, site_log
        proxy = log.read_text()
        assert f"PXE(gpf-prov0) {KNOWN_MAC} proxy" in proxy, proxy
        assert "DHCPACK" not in proxy  # proxy-DHCP never hands out an address


def test_uefi_firmware_pxe_is_chain_loaded_into_ipxe_over_tftp(tmp_path: Path) -> None:
    """Firmware that is not iPXE (OVMF's UEFI PXE, no NIC ROM) gets ipxe.efi by TFTP, then the same HTTP path."""
    _need(OVMF_CODE.exists() and OVMF_VARS.exists(), f"{OVMF_CODE} is missing (apt-get install ovmf)")
    _need((IPXE_DIR / "ipxe.efi").exists(), f"{IPXE_DIR / 'ipxe.efi'} is missing (apt-get install ipxe)")
    with _service(tmp_path, "dhcp", boot_mode="uefi") as (log, procs):
        tftp = tmp_path / "tftp"
        for loader in (BIOS_LOADER, UEFI_LOADER):
            shutil.copy2(IPXE_DIR / loader, tftp / loader)  # what roles/provisioning places there
        uefi_vars = tmp_path / "OVMF_VARS.fd"
        shutil.copy2(OVMF_VARS, uefi_vars)
        _boot_known(tmp_path, log, procs, uefi_vars)
        sent = [line for line in log.read_text().splitlines() if "dnsmasq-tftp" in line and " sent " in line]
        # RFC 4578 architecture 7 (EFI x86-64) → the UEFI build; the BIOS one is never sent.
        assert any(line.endswith(f"sent {tftp / 'ipxe.efi'} to 198.18.9.21") for line in sent), sent
        assert not [line for line in sent if "undionly.kpxe" in line], sent
