"""VM nodes for the lab: libvirt/QEMU (TCG) domains with blank disks, behind sushy-tools' libvirt driver.

A VM node is what a rack server is to gpufleet: a blank disk, a NIC on its segment's bridge with the stack's
MAC, and a Redfish BMC. The BMC is sushy-emulator (PyPI `sushy-tools`) with its **libvirt driver** — the one
Metal3/Ironic development environments use: boot override, power and reset act on the domain's firmware
boot order and on the domain itself, so an install goes through SeaBIOS, the NIC's iPXE ROM, the deploy
kernel, the disk and GRUB like on hardware. No notifier tricks for these nodes.

This machine has no systemd as PID 1 and KVM does not work (../shared/notes/lab.md): libvirtd and virtlogd
run in the foreground as our own processes (stopped by PID), with a private /etc/libvirt in their own mount
namespace where qemu runs as root, and every domain is `type='qemu'` (TCG).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from infra import procs
from infra.lab.config import LabVm, gpus_json, vm_uuid
from infra.lab.hosts import CAPABILITIES_FACT
from infra.lab.sh import LabCommandError
from infra.lab.standins import DESCRIPTION, StandIn, build_deb
from infra.model.site import Site

SUSHY_VENV = Path("/var/cache/gpufleet/sushy-venv")
SUSHY_VERSION = "2.2.0"
VIRSH = ("virsh", "-c", "qemu:///system")
#: Host tools a VM node needs (command → Debian package).
VM_PACKAGES = {
    "qemu-system-x86_64": "qemu-system-x86",
    "libvirtd": "libvirt-daemon",
    "virtlogd": "libvirt-daemon",
    "virsh": "libvirt-clients",
    "unshare": "util-linux",
}

_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_SERIAL = re.compile(r"^[A-Za-z0-9._-]{1,20}$")

DOMAIN_XML = """<domain type='qemu'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <memory unit='MiB'>{memory}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <on_reboot>restart</on_reboot>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw' cache='unsafe'/>
      <source file={disk}/><target dev='vda' bus='virtio'/><serial>{serial}</serial>
    </disk>
    <interface type='bridge'><source bridge={bridge}/><mac address={mac}/><model type='virtio'/></interface>
    <serial type='file'><source path={console} append='on'/></serial>
  </devices>
</domain>
"""


@dataclass(frozen=True)
class VmNode:
    """One VM node: a libvirt domain named like the stack's node, its disk serial the stack's root-disk hint."""

    name: str
    mac: str
    bridge: str
    disk_serial: str
    disk_gib: int = 4
    memory_mib: int = 1024

    def __post_init__(self) -> None:
        for value, grammar, what in ((self.name, _NAME, "name"), (self.mac, _MAC, "MAC"),
                                     (self.bridge, _NAME, "bridge"), (self.disk_serial, _SERIAL, "disk serial")):
            if not grammar.fullmatch(value):
                raise ValueError(f"VM node {what} {value!r} is outside its grammar")

    @property
    def uuid(self) -> str:
        """The domain's UUID, derived from its name: also its Redfish system id."""
        return vm_uuid(self.name)

    @classmethod
    def of(cls, v: LabVm) -> VmNode:
        """The domain of a lab stack's VM node (`gpufleet:lab.vm_nodes`)."""
        return cls(name=v.name, mac=v.mac, bridge=v.bridge, disk_serial=v.disk_serial, disk_gib=v.disk_gib,
                   memory_mib=v.memory_mib)

    def domain_xml(self, disk: Path, console: Path) -> str:
        """The libvirt domain XML: persistent boot order disk first (the operator guidance for real servers)."""
        return DOMAIN_XML.format(
            name=escape(self.name), uuid=self.uuid, memory=self.memory_mib, disk=quoteattr(str(disk)),
            serial=escape(self.disk_serial), bridge=quoteattr(self.bridge), mac=quoteattr(self.mac),
            console=quoteattr(str(console)),
        )  # fmt: skip


def missing_tools() -> list[str]:
    """Debian packages a VM node needs that are not installed (empty: all there)."""
    return sorted({pkg for cmd, pkg in VM_PACKAGES.items() if shutil.which(cmd) is None})


def free_port(address: str = "127.0.0.1") -> int:
    """A TCP port free on `address` now (the caller binds it right after)."""
    with socket.socket() as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def virsh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """One virsh command against the system libvirtd."""
    p = subprocess.run([*VIRSH, *args], capture_output=True, text=True, timeout=120, check=False)
    if check and p.returncode != 0:
        raise LabCommandError(f"virsh {' '.join(args)}: {p.stderr.strip()}")
    return p


def _stop(p: subprocess.Popen[bytes]) -> None:
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(15)


def _wait(pred: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return True
        time.sleep(0.5)
    return False


def _libvirtd_argv(work: Path) -> list[str]:
    """The command line of libvirtd over a fresh private /etc/libvirt in `work` (made here), where qemu runs as root."""
    etc = work / "etc-libvirt"
    shutil.rmtree(etc, ignore_errors=True)
    # Built from nothing, not copied from /etc/libvirt: the daemons need no system configuration (setup.sh
    # installs libvirt-daemon, not libvirt-daemon-system, whose services and default NAT network a lab must
    # not bring along), and a host's own libvirt settings (autostarted networks, hooks) never reach the lab.
    (etc / "qemu").mkdir(parents=True)
    # qemu as root: the disks and consoles live in the lab's state directory, owned by root.
    (etc / "qemu.conf").write_text('user = "root"\ngroup = "root"\nremember_owner = 0\n')
    for d in ("/var/log/libvirt", "/run/libvirt"):
        os.makedirs(d, exist_ok=True)
    return ["unshare", "-m", "sh", "-c", f"mount --bind {etc} /etc/libvirt && exec libvirtd"]


@contextlib.contextmanager
def libvirt(work: Path) -> Iterator[None]:
    """Run virtlogd + libvirtd in the foreground (our PIDs), with a private /etc/libvirt where qemu runs as root."""
    procs = [subprocess.Popen(["virtlogd"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    procs.append(subprocess.Popen(_libvirtd_argv(work), stdout=(work / "libvirtd.log").open("wb"),
                                  stderr=subprocess.STDOUT))
    try:
        if not _wait(lambda: virsh("version", check=False).returncode == 0, 30):
            raise LabCommandError(f"libvirtd did not answer in 30 s; see {work / 'libvirtd.log'}")
        yield
    finally:
        for p in reversed(procs):
            _stop(p)


def sushy_exe() -> Path:
    """sushy-emulator from its own venv over Debian's python3-libvirt (made with pip from PyPI if missing)."""
    exe = SUSHY_VENV / "bin" / "sushy-emulator"
    if not exe.exists():
        subprocess.run(["/usr/bin/python3", "-m", "venv", "--system-site-packages", str(SUSHY_VENV)], check=True)
        subprocess.run([str(SUSHY_VENV / "bin" / "pip"), "install", "-q", f"sushy-tools=={SUSHY_VERSION}"],
                       check=True, timeout=600)
    return exe


@contextlib.contextmanager
def bmc(work: Path, nodes: list[VmNode]) -> Iterator[str]:
    """A Redfish BMC for the VM nodes (sushy libvirt driver on 127.0.0.1, a free port); yields its URL."""
    port = free_port()
    conf = work / "sushy.conf"
    uuids = ", ".join(repr(n.uuid) for n in nodes)
    conf.write_text(
        f"SUSHY_EMULATOR_LISTEN_IP = '127.0.0.1'\nSUSHY_EMULATOR_LISTEN_PORT = {port}\n"
        f"SUSHY_EMULATOR_LIBVIRT_URI = 'qemu:///system'\nSUSHY_EMULATOR_ALLOWED_INSTANCES = [{uuids}]\n"
    )
    proc = subprocess.Popen([str(sushy_exe()), "--config", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=(work / "sushy.log").open("wb"))
    url = f"http://127.0.0.1:{port}"
    try:
        probe = ["curl", "-sf", f"{url}/redfish/v1/Systems"]
        if not _wait(lambda: subprocess.run(probe, capture_output=True).returncode == 0, 30):
            raise LabCommandError(f"sushy-emulator did not answer in 30 s; see {work / 'sushy.log'}")
        yield url
    finally:
        _stop(proc)


@contextlib.contextmanager
def nodes(work: Path, vms: list[VmNode]) -> Iterator[dict[str, Path]]:
    """Define the VM nodes (blank sparse disks, powered off); yields name → serial console log. Undefined after.

    sushy's libvirt driver finds a domain's disk through libvirt's storage API: a transient pool over `work`.
    """
    pool = "gpf-vm-pool"
    for vm in vms:  # leftovers of an interrupted run (libvirt keeps transient pools and domains in /run/libvirt)
        virsh("destroy", vm.name, check=False)
        virsh("undefine", vm.name, check=False)
    virsh("pool-destroy", pool, check=False)
    consoles = {}
    try:
        virsh("pool-create-as", pool, "dir", "--target", str(work))
        for vm in vms:
            disk = work / f"{vm.name}.raw"
            with disk.open("wb") as f:
                f.truncate(vm.disk_gib << 30)
            consoles[vm.name] = work / f"{vm.name}.console.log"
            xml = work / f"{vm.name}.xml"
            xml.write_text(vm.domain_xml(disk, consoles[vm.name]))
            virsh("define", str(xml))
        yield consoles
    finally:
        for vm in vms:
            virsh("destroy", vm.name, check=False)
            virsh("undefine", vm.name, check=False)
        virsh("pool-destroy", pool, check=False)


# ---- VM nodes of a lab stack (`gpufleet lab up`): the same pieces, as detached processes the lab's state records,
# so they outlive the `lab up` command and `lab down` stops them by PID.

LIBVIRTD_NEEDLE = "libvirtd"
VIRTLOGD_NEEDLE = "virtlogd"
SUSHY_NEEDLE = "sushy-emulator"


def _spawn(argv: list[str], log: Path) -> int:
    with log.open("ab") as f:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True).pid


def start_libvirt(work: Path) -> dict[str, int]:
    """Start virtlogd + libvirtd as `libvirt()` runs them, but detached (own session); returns their PIDs.

    Raises:
        LabCommandError: libvirtd did not answer within 30 s (both are stopped again).

    """
    pids = {"virtlogd_pid": _spawn(["virtlogd"], work / "virtlogd.log")}
    # `unshare` execs sh, which execs libvirtd: the PID is libvirtd's.
    pids["libvirtd_pid"] = _spawn(_libvirtd_argv(work), work / "libvirtd.log")
    if not _wait(lambda: virsh("version", check=False).returncode == 0, 30):
        stop_libvirt(pids)
        raise LabCommandError(f"libvirtd did not answer in 30 s; see {work / 'libvirtd.log'}")
    return pids


def libvirt_alive(pids: dict[str, int]) -> bool:
    """Are the recorded libvirtd and virtlogd still running."""
    return procs.cmdline_contains(pids.get("libvirtd_pid"), LIBVIRTD_NEEDLE) and \
        procs.cmdline_contains(pids.get("virtlogd_pid"), VIRTLOGD_NEEDLE)


def stop_libvirt(pids: dict[str, int]) -> None:
    """Stop libvirtd, then virtlogd (by PID, each checked against its command line)."""
    for key, needle in (("libvirtd_pid", LIBVIRTD_NEEDLE), ("virtlogd_pid", VIRTLOGD_NEEDLE)):
        pid = pids.get(key)
        if pid:
            procs.terminate([pid], partial(_runs, needle), grace_s=15)


def _runs(needle: str, pid: int) -> bool:
    return procs.cmdline_contains(pid, needle)


def pool_name(stack: str) -> str:
    """The lab's transient storage pool over its VM directory (sushy's libvirt driver finds disks through it)."""
    return f"gpfl-{stack}-pool"[:60]


def define(work: Path, vms: list[VmNode], pool: str) -> dict[str, Path]:
    """Define the VM nodes that are not defined yet (blank sparse disk when it has none); name → console log.

    Idempotent: a defined domain and an existing disk are kept (a second `lab up` must not wipe an installed
    node), so only a node `lab down` removed starts blank again.
    """
    if virsh("pool-info", pool, check=False).returncode != 0:
        virsh("pool-create-as", pool, "dir", "--target", str(work))
    consoles = {}
    for vm in vms:
        disk = work / f"{vm.name}.raw"
        consoles[vm.name] = work / f"{vm.name}.console.log"
        if virsh("dominfo", vm.name, check=False).returncode == 0:
            continue
        if not disk.exists():
            with disk.open("wb") as f:
                f.truncate(vm.disk_gib << 30)
        xml = work / f"{vm.name}.xml"
        xml.write_text(vm.domain_xml(disk, consoles[vm.name]))
        virsh("define", str(xml))
    return consoles


def undefine(names: list[str], pool: str) -> None:
    """Power off and undefine the domains, drop the pool (each step tolerates what is already gone)."""
    for name in names:
        virsh("destroy", name, check=False)
        virsh("undefine", name, check=False)
    virsh("pool-destroy", pool, check=False)


def domain_state(name: str) -> str:
    """`virsh domstate` of a domain (`running`, `shut off`, …), or `undefined`."""
    p = virsh("domstate", name, check=False)
    return p.stdout.strip() if p.returncode == 0 else "undefined"


def qemu_pids(work: Path) -> list[int]:
    """QEMU processes running a disk of `work` (left by a libvirtd that died before destroying its domains)."""
    return [p for p in procs.pids_mentioning(str(work) + "/") if procs.cmdline_contains(p, "qemu-system")]


def sushy_config(nodes: list[VmNode], address: str, port: int, auth_file: Path | None) -> str:
    """sushy-emulator's configuration (Python syntax): libvirt driver, only these domains, basic auth if given."""
    lines = [
        "# Written by gpufleet: Redfish BMC of the lab's VM nodes (sushy-tools, libvirt driver).",
        f"SUSHY_EMULATOR_LISTEN_IP = {address!r}",
        f"SUSHY_EMULATOR_LISTEN_PORT = {int(port)}",
        "SUSHY_EMULATOR_LIBVIRT_URI = 'qemu:///system'",
        f"SUSHY_EMULATOR_ALLOWED_INSTANCES = {[n.uuid for n in nodes]!r}",
    ]
    if auth_file is not None:
        lines.append(f"SUSHY_EMULATOR_AUTH_FILE = {str(auth_file)!r}")
    return "\n".join(lines) + "\n"


def start_bmc(work: Path, nodes: list[VmNode], address: str, port: int, auth_file: Path | None,
              auth: tuple[str, str] | None = None) -> int:
    """Start the VM nodes' sushy-emulator (libvirt driver) detached on address:port; returns its PID.

    Raises:
        LabCommandError: it did not answer within 30 s (it is stopped again).

    """
    conf = work / "sushy.conf"
    conf.write_text(sushy_config(nodes, address, port, auth_file))
    pid = _spawn([str(sushy_exe()), "--config", str(conf)], work / "sushy.log")
    probe = ["curl", "-sf", *(["-u", f"{auth[0]}:{auth[1]}"] if auth else []),
             f"http://{address}:{port}/redfish/v1/Systems"]
    if not _wait(lambda: subprocess.run(probe, capture_output=True, check=False).returncode == 0, 30):
        stop_bmc(pid)
        raise LabCommandError(f"sushy-emulator (libvirt) did not answer in 30 s; see {work / 'sushy.log'}")
    return pid


def bmc_alive(pid: int | None) -> bool:
    """Is the recorded VM BMC still running."""
    return procs.cmdline_contains(pid, SUSHY_NEEDLE)


def stop_bmc(pid: int | None) -> None:
    """Stop the VM BMC (by PID, checked against its command line)."""
    if pid:
        procs.terminate([pid], lambda p: procs.cmdline_contains(p, SUSHY_NEEDLE), grace_s=10)


def boot_order(name: str) -> str:
    """The persistent domain's first boot device as libvirt holds it: `network` or `hd`."""
    xml = virsh("dumpxml", "--inactive", name).stdout
    nic = xml.split("<interface", 1)[1].split("</interface>", 1)[0] if "<interface" in xml else ""
    return "network" if "<boot order='1'/>" in nic else "hd"


#: The lab-only package that makes a VM node a lab GPU node (clearly labelled, like the NVIDIA stand-ins).
DECLARATIONS_PACKAGE = "gpufleet-lab-vm-declarations"
#: VM nodes run a real kernel: everything a server does works, except loading an NVIDIA module (the stand-in
#: driver ships none and there is no GPU). Declared the way any node declares it (docs/roles.md).
VM_CAPABILITIES = {"kernel_modules": False}
_DECLARE_UNIT = """[Unit]
Description=Declare this VM node's simulated GPUs ({what})
DefaultDependencies=no
After=local-fs.target
Before=ssh.service multi-user.target
ConditionPathExists=!/etc/gpufleet-lab/gpus.json

[Service]
Type=oneshot
ExecStart=/bin/sh -ec 'h=$(cat /etc/hostname); f=/usr/lib/gpufleet-lab/vm-gpus/$h.json; \\
  if [ -f "$f" ]; then mkdir -p /etc/gpufleet-lab; cp "$f" /etc/gpufleet-lab/gpus.json; fi'

[Install]
WantedBy=multi-user.target
"""


def declarations(site: Site, hostnames: list[str]) -> StandIn:
    """The VM nodes' declarations as one stand-in package baked into their image (so a reinstall keeps them).

    What the lab writes into an nspawn node's tree, a VM node carries in its image: the capabilities fact
    (VM_CAPABILITIES) and each VM node's simulated GPUs (`gpus_json`, chosen at boot by the hostname the
    install's first-boot data set). The version is a digest of the content, so a changed stack rebuilds it.
    """
    files: dict[str, tuple[str, int]] = {
        CAPABILITIES_FACT: (json.dumps(VM_CAPABILITIES, indent=2, sort_keys=True) + "\n", 0o644),
        "lib/systemd/system/gpufleet-lab-vm-declare.service": (_DECLARE_UNIT.format(what=DESCRIPTION), 0o644),
    }
    for host in sorted(hostnames):
        files[f"usr/lib/gpufleet-lab/vm-gpus/{host}.json"] = (
            json.dumps(gpus_json(site, host), indent=2, sort_keys=True) + "\n", 0o644)
    digest = hashlib.sha256(json.dumps(sorted(files.items())).encode()).hexdigest()[:12]
    return StandIn(name=DECLARATIONS_PACKAGE, version=f"1.0+{digest}", files=files,
                   postinst=("#!/bin/sh\nset -e\nif [ \"$1\" = configure ]; then\n"
                             "  deb-systemd-helper enable gpufleet-lab-vm-declare.service >/dev/null || true\nfi\n"))


def declarations_deb(site: Site, hostnames: list[str], out_dir: Path, work: Path) -> Path:
    """Build the declarations package (`declarations`) into out_dir; returns the .deb."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return build_deb(declarations(site, hostnames), out_dir, work)
