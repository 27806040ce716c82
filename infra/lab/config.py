"""What the lab builds, derived from the lab stack: hosts, bridges, paths — pure, no I/O beyond reading the stack.

The lab refuses any address outside 198.18.0.0/15 (RFC 2544 benchmarking range) or loopback for the
BMC: this machine's own network must never be touched by a lab bridge or probed by a test.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from dataclasses import dataclass, field
from enum import StrEnum
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, ip_address
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from infra.model.catalogue import resolve
from infra.model.load import read_stack_config, stack_path
from infra.model.rules import Problem
from infra.model.site import BootMode, Site

LAB_KEY = "gpufleet:lab"
LAB_NET = IPv4Network("198.18.0.0/15")
STATE_ROOT = Path("/var/lib/gpufleet/lab")
CACHE_ROOT = Path("/var/cache/gpufleet/lab")
STATE_ENV = "GPUFLEET_LAB_STATE_DIR"  # a second lab (another stack) keeps its state elsewhere
#: Namespace of the VM domains' UUIDs: the same node name always gets the same UUID (its Redfish system id).
VM_UUID_NS = uuid.UUID("6a1c1d0e-2b5f-4c49-9a53-8f0d3c2e7a10")
#: A virtio disk's serial is at most 20 bytes (QEMU's virtio-blk ID length); the model's serial grammar is wider.
VM_SERIAL = re.compile(r"^[A-Za-z0-9._-]{1,20}$")
VM_MEMORY_MIB = (512, 8192)
VM_DISK_GIB = (2, 64)
_VM_KEYS = {"name", "memory_mib", "disk_gib"}


class LabConfigError(Exception):
    """The lab stack cannot be brought up as asked (bad address, missing key); nothing was touched."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("lab stack refused:\n" + "\n".join(f"  - {p}" for p in problems))


class HostKind(StrEnum):
    """What a lab host plays."""

    NODE = "node"  # a GPU node of the stack (simulated GPUs)
    MIRROR = "mirror"  # a segment mirror (apt repo, registry, file store)
    OUTSIDE = "outside"  # the "internet/upstream" that connected nodes may reach


@dataclass(frozen=True)
class Bridge:
    """One Linux bridge per stack segment (and per fabric); the lab host holds `address` on it."""

    segment: str
    name: str
    address: IPv4Interface
    airgapped: bool


@dataclass(frozen=True)
class FabricLink:
    """A node's fabric port in the lab: an extra veth, its host side on the fabric's bridge."""

    bridge: str
    host_if: str
    """Host-side name of the veth (nspawn `--network-veth-extra`), enslaved to `bridge` once it exists."""
    netdev: str
    """The port's interface name inside the host (the stack's `fabric_ports[].netdev`)."""
    address: IPv4Interface


@dataclass(frozen=True)
class LabHost:
    """One nspawn host."""

    name: str
    kind: HostKind
    segment: str
    address: IPv4Interface
    gateway: IPv4Address | None
    gpus: dict[str, Any] | None = None  # the lab-only gpus.json written into a node
    fabric: tuple[FabricLink, ...] = ()

    @property
    def serves(self) -> bool:
        """Mirror and outside-world hosts serve apt, registry and files."""
        return self.kind is not HostKind.NODE


@dataclass(frozen=True)
class Paths:
    """Where the lab keeps its state (hosts, keys, SSH) and its caches."""

    state: Path = STATE_ROOT
    cache: Path = CACHE_ROOT

    @classmethod
    def from_env(cls) -> Paths:
        """Default paths, or the state directory named by GPUFLEET_LAB_STATE_DIR."""
        return cls(state=Path(os.environ[STATE_ENV])) if os.environ.get(STATE_ENV) else cls()

    @property
    def state_file(self) -> Path:
        """JSON with PIDs, mounts, bridges of the running lab."""
        return self.state / "state.json"

    @property
    def lock_file(self) -> Path:
        """Serialises `lab up/down` and the BMC notifier."""
        return self.state / "lab.lock"

    @property
    def ssh_dir(self) -> Path:
        """Controller key, OpenSSH config, known_hosts."""
        return self.state / "ssh"

    @property
    def ssh_key(self) -> Path:
        """Controller private key (root on every lab host accepts it)."""
        return self.ssh_dir / "id_ed25519"

    @property
    def keys_dir(self) -> Path:
        """Exported apt signing keyrings (`signed-by` on nodes)."""
        return self.state / "keys"

    @property
    def gnupg_dir(self) -> Path:
        """One GNUPGHOME per serving host (kept across `down` so keyrings stay stable)."""
        return self.state / "gnupg"

    @property
    def hosts_dir(self) -> Path:
        """Per-host overlay upper/work/root and console log."""
        return self.state / "hosts"

    @property
    def srv_dir(self) -> Path:
        """Per serving host: bind-mounted as /srv/gpufleet inside it (apt/, files/, registry/)."""
        return self.state / "srv"

    @property
    def rootfs_dir(self) -> Path:
        """Unpacked base root filesystems, one directory per flavour and cache key."""
        return self.state / "rootfs"

    @property
    def bmc_dir(self) -> Path:
        """sushy-emulator config and state, notifier log."""
        return self.state / "bmc"

    @property
    def bmc_password(self) -> Path:
        """The BMC password file the stack's `bmc.password` SecretRef names (mode 0600)."""
        return self.state / "bmc-password"

    @property
    def debs_dir(self) -> Path:
        """Debian packages fetched once from Debian's registry (seed of every lab repo)."""
        return self.cache / "debs"

    @property
    def standins_dir(self) -> Path:
        """Built stand-in NVIDIA packages."""
        return self.cache / "standins"

    @property
    def vm_dir(self) -> Path:
        """VM nodes: disks, consoles, libvirt's private configuration and logs, the VM BMC's config and log."""
        return self.state / "vm"

    @property
    def files_dir(self) -> Path:
        """Extra files published under http://HOST/files/ (models/, wheels/) on every serving host."""
        return self.cache / "files"


@dataclass(frozen=True)
class BmcListen:
    """Where the Redfish emulator listens (loopback only)."""

    address: IPv4Address
    port: int


@dataclass(frozen=True)
class LabVm:
    """One VM node (`gpufleet:lab.vm_nodes`): a site node played by a libvirt/QEMU domain, not an nspawn host.

    Everything but its size comes from the site: the first MAC (the PXE NIC), the segment's bridge, the root-disk
    hint's serial as the blank disk's serial (so the deploy ramdisk picks that disk by the stack's own hint).
    """

    name: str
    segment: str
    bridge: str
    mac: str
    address: IPv4Interface
    disk_serial: str
    memory_mib: int = 1536
    disk_gib: int = 4


@dataclass(frozen=True)
class LabSpec:
    """Everything `lab up` needs, derived from the site and the `gpufleet:lab` key."""

    stack: str
    site: Site
    bridges: tuple[Bridge, ...]
    hosts: tuple[LabHost, ...]
    bmc: BmcListen
    known_hosts: Path
    ssh_config: Path
    keyrings: dict[str, Path] = field(default_factory=dict)  # serving host → exported keyring path
    vms: tuple[LabVm, ...] = ()
    """VM nodes (libvirt domains on the segment bridges), not in `hosts`."""
    vm_bmc: BmcListen | None = None
    """Where the VM nodes' Redfish BMC (sushy-emulator, libvirt driver) listens; None without VM nodes."""

    def host(self, name: str) -> LabHost:
        """The host called `name` (KeyError with the known names otherwise)."""
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(f"no lab host {name!r}; known: {', '.join(h.name for h in self.hosts)}")

    def bridge(self, segment: str) -> Bridge:
        """The bridge of a segment."""
        return next(b for b in self.bridges if b.segment == segment)

    @property
    def nodes(self) -> tuple[LabHost, ...]:
        """GPU node hosts only."""
        return tuple(h for h in self.hosts if h.kind is HostKind.NODE)


def bridge_name(segment: str) -> str:
    """Interface name of a segment's bridge (Linux caps names at 15 characters)."""
    name = f"gpfl-{segment}"
    if len(name) <= 15:
        return name
    return "gpfl-" + hashlib.sha256(segment.encode()).hexdigest()[:10]


def fabric_bridge_name(fabric: str) -> str:
    """Interface name of a fabric's bridge (`gpfl-f-<fabric>`, hashed when too long)."""
    return bridge_name("f-" + fabric)


def fabric_if_name(host: str, index: int) -> str:
    """Host-side name of a node's `index`-th fabric veth (nspawn and Linux cap names at 15 characters)."""
    name = f"vf{index}-{host}"
    if len(name) <= 15:
        return name
    return f"vf{index}-" + hashlib.sha256(host.encode()).hexdigest()[:10]


def _in_lab_net(value: str | IPv4Address | IPv4Network, where: str) -> list[Problem]:
    try:
        net = IPv4Network(str(value), strict=False)
    except ValueError:
        return []  # a name, not an address: nothing to route
    if not net.subnet_of(LAB_NET):
        return [Problem(where, f"{value} is outside {LAB_NET}",
                        "the lab only uses 198.18.0.0/15 (RFC 2544); pick an address from it")]
    return []


def check_addresses(site: Site, lab: dict[str, Any]) -> list[Problem]:
    """Every address the lab would configure or probe must be in 198.18.0.0/15; the BMC must be loopback."""
    problems: list[Problem] = []
    for i, s in enumerate(site.segments):
        problems += _in_lab_net(s.cidr, f"segments[{i}].cidr")
        if s.gateway:
            problems += _in_lab_net(s.gateway, f"segments[{i}].gateway")
        if s.egress_probe:
            problems += _in_lab_net(s.egress_probe, f"segments[{i}].egress_probe")
        for j, n in enumerate(s.egress_allow):
            problems += _in_lab_net(n, f"segments[{i}].egress_allow[{j}]")
        for j, d in enumerate(s.dns):
            problems += _in_lab_net(d, f"segments[{i}].dns[{j}]")
        for j, t in enumerate(s.ntp):
            problems += _in_lab_net(t, f"segments[{i}].ntp[{j}]")
        for j, src in enumerate(s.sources):
            problems += _in_lab_net(urlparse(src.url).hostname or "", f"segments[{i}].sources[{j}].url")
    for i, m in enumerate(site.mirrors):
        problems += _in_lab_net(m.address, f"mirrors[{i}].address")
    for i, f in enumerate(site.fabrics):
        problems += _in_lab_net(f.cidr, f"fabrics[{i}].cidr")
    for i, node in enumerate(site.nodes):
        problems += _in_lab_net(node.address, f"nodes[{i}].address")
        for j, port in enumerate(node.fabric_ports):
            problems += _in_lab_net(port.address, f"nodes[{i}].fabric_ports[{j}].address")
            if not port.netdev:
                # A lab port is a veth the lab creates by name: a PCI address or MAC names nothing here.
                problems.append(Problem(f"nodes[{i}].fabric_ports[{j}]", "names no interface (`netdev`)",
                                        "lab fabric ports are veths: name them with netdev (e.g. fab0)"))
        if node.bmc:
            host = urlparse(node.bmc.endpoint).hostname or ""
            if not _is_loopback(host):
                problems.append(Problem(f"nodes[{i}].bmc.endpoint", f"{host} is not loopback",
                                        "lab BMCs are emulated on 127.0.0.1"))
    outside = (lab.get("outside_world") or {}).get("address")
    if outside is None:
        problems.append(Problem(f"{LAB_KEY}.outside_world.address", "missing",
                                "name the outside-world host address (198.18.0.0/15)"))
    else:
        problems += _in_lab_net(outside, f"{LAB_KEY}.outside_world.address")
    bmc = (lab.get("bmc_listen") or {}).get("address", "127.0.0.1")
    if not _is_loopback(str(bmc)):
        problems.append(Problem(f"{LAB_KEY}.bmc_listen.address", f"{bmc} is not loopback",
                                "the Redfish emulator listens on 127.0.0.1 only"))
    return problems


def _is_loopback(host: str) -> bool:
    try:
        return ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def gpus_json(site: Site, hostname: str) -> dict[str, Any]:
    """The lab-only GPU declaration of a node (read by the stand-in nvidia-smi, nvidia-ctk, dcgmi)."""
    node = site.nodes_by_name[hostname]
    entry = resolve(site.catalogue).gpus[node.gpu.model]
    gpus = []
    for i in range(node.gpu.count):
        digest = hashlib.sha256(f"{site.name}/{hostname}/{i}".encode()).hexdigest()
        uuid = f"GPU-{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:32]}"
        gpus.append({"index": i, "uuid": uuid, "pci_bus_id": f"00000000:{0x18 + 0x10 * i:02X}:00.0"})
    return {
        "simulated": True,
        "hostname": hostname,
        "model": node.gpu.model,
        "name": entry.product_name,
        "memory_mib": entry.smi_memory_mib,
        "nvswitch": node.gpu.nvswitch,
        "gpus": gpus,
    }


def vm_uuid(name: str) -> str:
    """A VM node's libvirt domain UUID, derived from its name: also its Redfish system id on the VM BMC."""
    return str(uuid.uuid5(VM_UUID_NS, name))


def _port(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535 else None


def _vm_size(entry: dict[str, Any], key: str, bounds: tuple[int, int], default: int, where: str,
             problems: list[Problem]) -> int:
    value = entry.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not bounds[0] <= value <= bounds[1]:
        problems.append(Problem(f"{where}.{key}", f"{value!r} is not a whole number in {bounds[0]}..{bounds[1]}",
                                f"set {key} to a number from {bounds[0]} to {bounds[1]}"))
        return default
    return value


def vm_nodes(site: Site, lab: dict[str, Any], bmc_port: int) -> tuple[list[LabVm], BmcListen | None, list[Problem]]:
    """The stack's VM nodes (`gpufleet:lab.vm_nodes`) and their BMC (`vm_bmc_listen`), or the problems.

    A VM node is a site node the lab plays with a libvirt domain instead of an nspawn host: it must be
    network-installable (`image`, `boot_mode: bios` — the lab's domains run SeaBIOS — and a `root_disk.serial`,
    which becomes the blank disk's serial), and its `bmc` must name the VM BMC and the domain's UUID.
    """
    raw = lab.get("vm_nodes")
    where = f"{LAB_KEY}.vm_nodes"
    if raw is None:
        return [], None, []
    if not isinstance(raw, list) or not raw:
        return [], None, [Problem(where, "is not a non-empty list",
                                  "list the VM nodes as [{name: <node>, memory_mib: 1536}] or remove the key")]
    problems: list[Problem] = []
    listen = lab.get("vm_bmc_listen")
    lw = f"{LAB_KEY}.vm_bmc_listen"
    port = _port(listen.get("port")) if isinstance(listen, dict) else None
    address = str(listen.get("address", "127.0.0.1")) if isinstance(listen, dict) else "127.0.0.1"
    if port is None:
        problems.append(Problem(f"{lw}.port", "missing or not a TCP port",
                                "give the VM nodes' BMC a port of its own, e.g. vm_bmc_listen: {port: 8012}"))
    elif port in (bmc_port, bmc_port + 1):
        problems.append(Problem(f"{lw}.port", f"{port} is the nspawn nodes' BMC or its notifier",
                                f"pick a port other than {bmc_port} and {bmc_port + 1}"))
    try:
        loopback = IPv4Address(address).is_loopback
    except ValueError:
        loopback = False  # a name (even `localhost`) is not what sushy binds: an IPv4 literal
    if not loopback:
        problems.append(Problem(f"{lw}.address", f"{address!r} is not a loopback IPv4 address",
                                "the VM BMC listens on 127.0.0.1 only"))
    url = f"http://{address}:{port}"
    vms: list[LabVm] = []
    seen: set[str] = set()
    for i, entry in enumerate(raw):
        w = f"{where}[{i}]"
        if not isinstance(entry, dict) or not set(entry) <= _VM_KEYS:
            problems.append(Problem(w, "is not a mapping of name, memory_mib, disk_gib",
                                    "write {name: <node>, memory_mib: 1536}"))
            continue
        name = entry.get("name")
        node = site.nodes_by_name.get(name) if isinstance(name, str) else None
        if node is None:
            problems.append(Problem(f"{w}.name", f"{name!r} is not a node of the site",
                                    "name a node of gpufleet:site.nodes"))
            continue
        if name in seen:
            problems.append(Problem(f"{w}.name", f"{name} is listed twice", "list each VM node once"))
            continue
        seen.add(node.hostname)
        i_node = site.nodes.index(node)
        nw = f"nodes[{i_node}]"
        if node.image is None:
            problems.append(Problem(f"{nw}.image", "unset", "a VM node starts blank and is network-installed: "
                                    "give it an image"))
        if node.boot_mode is not BootMode.BIOS:
            problems.append(Problem(f"{nw}.boot_mode", f"{node.boot_mode.value}: the lab's VM domains run SeaBIOS",
                                    "set boot_mode: bios"))
        serial = node.root_disk.serial if node.root_disk is not None else None
        if serial is None or not VM_SERIAL.fullmatch(serial):
            problems.append(Problem(f"{nw}.root_disk", "has no serial of at most 20 characters",
                                    "set root_disk: {serial: <letters, digits, ._- ; at most 20>}: the VM's disk "
                                    "gets that serial"))
        want_id = vm_uuid(node.hostname)
        if node.bmc is None or node.bmc.endpoint.rstrip("/") != url or node.bmc.system_id != want_id:
            problems.append(Problem(f"{nw}.bmc", "does not name the VM BMC and the domain",
                                    f"set endpoint: {url!r} and system_id: {want_id!r}"))
        memory = _vm_size(entry, "memory_mib", VM_MEMORY_MIB, 1536, w, problems)
        disk = _vm_size(entry, "disk_gib", VM_DISK_GIB, 4, w, problems)
        seg = site.segments_by_name[node.segment]
        vms.append(LabVm(node.hostname, node.segment, bridge_name(node.segment), node.macs[0].lower(),
                         IPv4Interface(f"{node.address}/{seg.cidr.prefixlen}"), serial or "", memory, disk))
    if problems:
        return [], None, problems
    assert port is not None  # a missing port is a problem above
    return vms, BmcListen(IPv4Address(address), port), []


def lab_spec(stack: str = "lab", path: Path | None = None) -> LabSpec:
    """Read the lab stack and derive hosts and bridges; raise LabConfigError/SiteError before touching anything."""
    from infra.model.load import load_site

    path = path or stack_path(stack)
    site = load_site(path=path)
    lab = read_stack_config(path).get(LAB_KEY) or {}
    if not site.lab_mode:
        raise LabConfigError([Problem("lab_mode", "is false", "only a stack with lab_mode: true can run in the lab")])
    problems = check_addresses(site, lab)
    bmc = lab.get("bmc_listen") or {}
    bmc_port = int(bmc.get("port", 8000))
    vms, vm_bmc, vm_problems = vm_nodes(site, lab, bmc_port)
    problems += vm_problems
    if problems:
        raise LabConfigError(problems)
    vm_names = {v.name for v in vms}
    bridges = []
    for s in site.segments:
        gw = s.gateway or next(s.cidr.hosts())
        bridges.append(Bridge(s.name, bridge_name(s.name), IPv4Interface(f"{gw}/{s.cidr.prefixlen}"), s.airgapped))
    seg = site.segments_by_name

    def iface(addr: IPv4Address, segment: str) -> IPv4Interface:
        return IPv4Interface(f"{addr}/{seg[segment].cidr.prefixlen}")

    # One bridge per fabric: only node-to-node traffic, so the lab host takes nothing in from it
    # (`airgapped` → its input chain drops new connections) and nftables routes nothing out of it.
    fabrics = site.fabrics_by_name
    for f in site.fabrics:
        bridges.append(Bridge(f"fabric:{f.name}", fabric_bridge_name(f.name),
                              IPv4Interface(f"{next(f.cidr.hosts())}/{f.cidr.prefixlen}"), True))
    hosts: list[LabHost] = []
    for n in site.nodes:
        if n.hostname in vm_names:
            continue  # a libvirt domain, not an nspawn host
        s = seg[n.segment]
        links = tuple(
            FabricLink(fabric_bridge_name(p.fabric), fabric_if_name(n.hostname, j), p.netdev or "",
                       IPv4Interface(f"{p.address}/{fabrics[p.fabric].cidr.prefixlen}"))
            for j, p in enumerate(n.fabric_ports)
        )
        hosts.append(LabHost(n.hostname, HostKind.NODE, n.segment, iface(n.address, n.segment),
                             None if s.airgapped else s.gateway, gpus_json(site, n.hostname), links))
    keyrings: dict[str, Path] = {}
    for m in site.mirrors:
        hosts.append(LabHost(m.name, HostKind.MIRROR, m.segment, iface(m.address, m.segment), None))
        keyrings[m.name] = Path(m.keyring)
    ow = lab["outside_world"]
    ow_seg = ow.get("segment") or next(s.name for s in site.segments if not s.airgapped)
    if seg[ow_seg].airgapped:
        raise LabConfigError([Problem(f"{LAB_KEY}.outside_world.segment", f"{ow_seg} is air-gapped",
                                      "put the outside world on a connected segment")])
    ow_addr = IPv4Address(ow["address"])
    ow_name = ow.get("name") or _outside_name(site, ow_addr)
    hosts.append(LabHost(ow_name, HostKind.OUTSIDE, ow_seg, iface(ow_addr, ow_seg), None))
    for s in site.segments:
        for src in s.sources:
            if urlparse(src.url).hostname == str(ow_addr):
                keyrings.setdefault(ow_name, Path(src.keyring))
    keyrings.setdefault(ow_name, STATE_ROOT / "keys" / f"{ow_name}.gpg")
    _check_unique(hosts, bridges, vms)
    return LabSpec(
        stack=stack,
        site=site,
        bridges=tuple(bridges),
        hosts=tuple(hosts),
        bmc=BmcListen(IPv4Address(bmc.get("address", "127.0.0.1")), bmc_port),
        known_hosts=Path(site.controller.known_hosts or STATE_ROOT / "ssh" / "known_hosts"),
        ssh_config=Path(site.controller.ssh_config or STATE_ROOT / "ssh" / "config"),
        keyrings=keyrings,
        vms=tuple(vms),
        vm_bmc=vm_bmc,
    )


def _outside_name(site: Site, addr: IPv4Address) -> str:
    """Name the outside-world host after the apt source that points at it (`lab-upstream`)."""
    for s in site.segments:
        for src in s.sources:
            if urlparse(src.url).hostname == str(addr):
                return src.name
    return "lab-outside"


def _check_unique(hosts: list[LabHost], bridges: list[Bridge], vms: list[LabVm] | None = None) -> None:
    problems: list[Problem] = []
    seen: dict[str, str] = {str(b.address.ip): f"bridge {b.name}" for b in bridges}
    for v in vms or []:
        ip = str(v.address.ip)
        if ip in seen:
            problems.append(Problem(v.name, f"address {ip} is also used by {seen[ip]}",
                                    "give each host its own address"))
        seen[ip] = v.name
    for h in hosts:
        ip = str(h.address.ip)
        if ip in seen:
            problems.append(Problem(h.name, f"address {ip} is also used by {seen[ip]}",
                                    "give each host its own address"))
        seen[ip] = h.name
        for link in h.fabric:
            fip = str(link.address.ip)
            if fip in seen:
                problems.append(Problem(h.name, f"fabric address {fip} is also used by {seen[fip]}",
                                        "the lab's fabric bridge holds the fabric network's first address: "
                                        "give the port another"))
            seen[fip] = f"{h.name} ({link.netdev})"
    names: dict[str, str] = {}
    for b in bridges:
        if b.name in names:
            problems.append(Problem(b.segment, f"bridge name {b.name} is also {names[b.name]}'s",
                                    "rename the segment or fabric"))
        names[b.name] = b.segment
    if problems:
        raise LabConfigError(problems)


def spec_digest(spec: LabSpec) -> str:
    """Stable digest of what the lab would build (hosts, addresses, GPUs), for status and idempotence."""
    data: list[Any] = [[h.name, h.kind.value, h.segment, str(h.address), str(h.gateway), h.gpus] for h in spec.hosts]
    # Fabric links only when a host has any, so the digest of a stack without fabrics stays what it was.
    data += [[h.name, [[x.bridge, x.host_if, x.netdev, str(x.address)] for x in h.fabric]]
             for h in spec.hosts if h.fabric]
    data.append([[b.name, str(b.address), b.airgapped] for b in spec.bridges])
    # VM nodes only when there are any, so the digest of an nspawn-only stack stays what it was.
    if spec.vms:
        data.append([[v.name, v.segment, v.bridge, v.mac, str(v.address), v.disk_serial, v.memory_mib, v.disk_gib]
                     for v in spec.vms])
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
