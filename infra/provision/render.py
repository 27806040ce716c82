"""Pure rendering of a segment's provisioning service: dnsmasq.conf, the iPXE scripts, what the roots hold.

No I/O here. Every value placed into a file comes from a grammar-checked model field; the renderer checks
each one again against the narrow grammar of where it goes (a second layer: a model change that widened a
field must not become a newline in dnsmasq.conf or a `${...}` expansion in an iPXE script).

References for the syntax (checked against what Debian 12 ships):
- dnsmasq(8), dnsmasq 2.90 (Debian 12 `dnsmasq-base`): `--dhcp-range` (`static` and `proxy` modes),
  `--dhcp-host` (sets the `known` tag), `--dhcp-ignore=tag:!known`, `--dhcp-match=set:<tag>,option:client-arch,<n>`,
  `--dhcp-userclass`, `--dhcp-boot`, `--pxe-service` (proxy-DHCP), `--enable-tftp`, `--tftp-root`, `--port=0`.
- RFC 4578 section 2.1 (DHCP option 93, client system architecture): 0 = x86 BIOS, 7 = EFI BC (x86-64),
  9 = EFI x86-64.
- iPXE: https://ipxe.org/howto/chainloading (iPXE sends DHCP user class "iPXE"; break the PXE → iPXE loop by
  answering iPXE clients with a script URL), https://ipxe.org/scripting, https://ipxe.org/cmd/kernel,
  https://ipxe.org/cmd/initrd, https://ipxe.org/cfgtype/hexhyp (`${netX/mac:hexhyp}` = `52-54-00-12-34-56`),
  https://ipxe.org/cfg/netx (`netX` is the network device that was opened last).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from infra.model.site import IMAGE_NAME, MAC, NAME, Node, ProvisioningMode, RootDiskHint, Segment, Site

#: Where the role puts the roots on the provisioning host (the defaults of roles/provisioning).
TFTP_ROOT = "/srv/gpufleet/provision/tftp"
HTTP_ROOT = "/srv/gpufleet/provision/http"
LEASE_FILE = "/var/lib/gpufleet/provision/dnsmasq.leases"
#: Where roles/provisioning installs infra/provision/httpd.py (the HTTP server, and the `--arm` step).
HTTPD_PATH = "/usr/local/lib/gpufleet/provision_httpd.py"
#: iPXE builds served over TFTP to firmware that is not iPXE yet (Debian 12 package `ipxe`, /usr/lib/ipxe).
BIOS_LOADER = "undionly.kpxe"
UEFI_LOADER = "ipxe.efi"
IPXE_PACKAGE_DIR = "/usr/lib/ipxe"
#: The deploy ramdisk every node boots into for an install (built by a later phase; see docs/bare-metal.md).
DEPLOY_KERNEL = "deploy/vmlinuz"
DEPLOY_INITRD = "deploy/initrd.img"

# The model's own grammars, checked again here: a value that bypassed the model must not reach a file.
_HOSTNAME = _SEGMENT = NAME
_MAC = MAC
_IMAGE = IMAGE_NAME
_ROOT_PATH = re.compile(r"^/[A-Za-z0-9._/-]*$")
# One kernel argument value: no blanks (they separate arguments), no quotes, no `$`/`{}` (iPXE expansion).
_KERNEL_ARG = re.compile(r"^[A-Za-z0-9._:/,=+-]+$")


@dataclass(frozen=True)
class ImageRecord:
    """A built OS image as the lock records it: what the deploy ramdisk checks the written bytes against."""

    size: int
    sha256: str


_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class RenderError(ValueError):
    """A value does not fit the grammar of the file it would go into (a gpufleet bug or a bypassed model)."""


def _check(value: str, grammar: re.Pattern[str], what: str) -> str:
    if not grammar.fullmatch(value):
        raise RenderError(f"{what} {value!r} cannot be placed into a provisioning file")
    return value


def script_name(mac: str) -> str:
    """File name of a node's iPXE script under `ipxe/`: the MAC as iPXE's `hexhyp` prints it."""
    return _check(mac, _MAC, "MAC").replace(":", "-") + ".ipxe"


@dataclass(frozen=True)
class SegmentService:
    """Everything one segment's provisioning host serves."""

    segment: str
    """Segment name."""
    host: str
    """Host that runs the service."""
    address: IPv4Address
    """Its address on the segment: dnsmasq listens there, the HTTP server binds there."""
    http_port: int
    """Port of the HTTP server."""
    mode: ProvisioningMode
    """`dhcp` or `proxy`."""
    dnsmasq_conf: str
    """dnsmasq configuration (`dnsmasq --test -C` accepts it)."""
    http_files: dict[str, str]
    """Text files under the HTTP root by relative path: `boot.ipxe` and `ipxe/<mac>.ipxe` per node."""
    tftp_files: tuple[str, ...]
    """Files the TFTP root holds, copied from the `ipxe` package (IPXE_PACKAGE_DIR)."""
    nodes: tuple[str, ...]
    """Hostnames with a reservation, in stack order."""

    @property
    def base_url(self) -> str:
        """URL of the HTTP root."""
        return f"http://{self.address}:{self.http_port}"


def root_disk_arg(hint: RootDiskHint | None) -> str | None:
    """The root disk hint as one kernel argument value (`serial:…`, `size_gb:…`, `path:…`)."""
    if hint is None:
        return None
    if hint.serial is not None:
        value = f"serial:{hint.serial}"
    elif hint.path is not None:
        value = f"path:{hint.path}"
    else:
        value = f"size_gb:{hint.size_gb}"
    return _check(value, _KERNEL_ARG, "root disk hint")


def kernel_args(
    node: Node, segment: Segment, base_url: str, images: Mapping[str, ImageRecord] | None = None
) -> list[str]:
    """Kernel command line of a node's deploy boot: its identity, address, image and disk hint.

    With the image's lock record, also its sha256 and size (the ramdisk checks the written bytes against
    them), and the URLs of the node's first-boot data and of the service's "done" endpoint.
    """
    host = _check(node.hostname, _HOSTNAME, "hostname")
    mac = _check(node.macs[0], _MAC, "MAC")
    net = IPv4Network(segment.cidr)
    gateway = str(segment.gateway) if segment.gateway is not None else ""
    args = [
        # The boot interface by MAC, pxelinux/Ironic style (`01-` = Ethernet).
        f"BOOTIF=01-{mac.replace(':', '-')}",
        # Kernel `ip=` syntax: client::gateway:netmask:hostname:device:autoconf (no device: the BOOTIF one).
        f"ip={node.address}::{gateway}:{net.netmask}:{host}::off",
        f"gpufleet.node={host}",
        f"gpufleet.boot_mode={node.boot_mode.value}",
    ]
    if node.image is not None:
        image = _check(node.image, _IMAGE, "image name")
        args += [f"gpufleet.image={image}", f"gpufleet.image_url={base_url}/images/{image}.img"]
        rec = (images or {}).get(image)
        if rec is not None:
            args += [
                f"gpufleet.image_sha256={_check(rec.sha256, _SHA256, 'image sha256')}",
                f"gpufleet.image_size={int(rec.size)}",
                f"gpufleet.firstboot_url={base_url}/{firstboot_name(mac)}",
                f"gpufleet.done_url={base_url}/done/{mac.replace(':', '-')}",
            ]
    disk = root_disk_arg(node.root_disk)
    if disk is not None:
        args.append(f"gpufleet.root_disk={disk}")
    # Serial last: it becomes /dev/console, so the ramdisk's output reaches a BMC's serial-over-LAN.
    args += ["console=tty0", "console=ttyS0,115200n8"]
    for a in args:
        _check(a, _KERNEL_ARG, "kernel argument")
    return args


def firstboot_name(mac: str) -> str:
    """Path of a node's first-boot data under the HTTP root (removed by the service once the node is done)."""
    return "firstboot/" + _check(mac, _MAC, "MAC").replace(":", "-") + ".tar.gz"


def local_script_name(mac: str) -> str:
    """Path of a node's "boot from disk" script: the service copies it over `ipxe/<mac>.ipxe` when done."""
    return "ipxe/local/" + script_name(mac)


def install_script_name(mac: str) -> str:
    """Where the provisioning host keeps a node's install script; only arming copies it to `ipxe/<mac>.ipxe`.

    `SegmentService.http_files` carries it as `ipxe/<mac>.ipxe` (a rendered directory served as is is
    armed for every imaged node: what a one-off test boot wants); roles/provisioning writes it here.
    """
    return "ipxe/install/" + script_name(mac)


def local_script(node: Node) -> str:
    """The iPXE script of an installed node: boot its local disk."""
    host = _check(node.hostname, _HOSTNAME, "hostname")
    mac = _check(node.macs[0], _MAC, "MAC")
    lines = ["#!ipxe", f"# gpufleet: {host} ({mac}) is installed: boot from its disk. Written by the service.",
             f"echo gpufleet: {host} is installed, booting from disk"]
    if node.boot_mode.value == "bios":
        # BIOS: the first hard disk through the BIOS (ipxe.org/cmd/sanboot); if that fails, back to firmware.
        lines.append("sanboot --no-describe --drive 0x80 || exit")
    else:
        # UEFI: return to the firmware, which tries the next boot entry (the disk).
        lines.append("exit")
    return "\n".join([*lines, ""])


def node_script(
    node: Node, segment: Segment, base_url: str, images: Mapping[str, ImageRecord] | None = None
) -> str:
    """The iPXE script a node gets by its MAC: boot the deploy ramdisk, or hand back to the firmware."""
    host = _check(node.hostname, _HOSTNAME, "hostname")
    mac = _check(node.macs[0], _MAC, "MAC")
    head = [
        "#!ipxe",
        f"# gpufleet: {host} ({mac}), segment {segment.name}. Rendered from the stack; do not edit.",
    ]
    if node.image is None:
        # No image in the stack: this node is not network-installed; `exit` returns to the firmware,
        # which tries its next boot device (the local disk).
        return "\n".join(
            [*head, f"echo gpufleet: {host} has no OS image in the stack, booting the next device", "exit", ""]
        )
    cmdline = " ".join(kernel_args(node, segment, base_url, images))
    return "\n".join(
        [
            *head,
            f"echo gpufleet: network install of {host}",
            # `initrd=` names the initrd for the EFI stub; BIOS kernels ignore it (ipxe.org/cmd/kernel).
            f"kernel {base_url}/{DEPLOY_KERNEL} initrd=initrd.img {cmdline} || goto failed",
            f"initrd --name initrd.img {base_url}/{DEPLOY_INITRD} || goto failed",
            "boot || goto failed",
            ":failed",
            f"echo gpufleet: network install of {host} failed, handing back to the firmware",
            "exit 1",
            "",
        ]
    )


def default_script(base_url: str) -> str:
    """The script every iPXE client is told to run: chain its own per-MAC script, or refuse."""
    return "\n".join(
        [
            "#!ipxe",
            "# gpufleet: chain the per-node script of the MAC that booted; rendered from the stack, do not edit.",
            f"chain --autofree {base_url}/ipxe/${{netX/mac:hexhyp}}.ipxe || goto unknown",
            ":unknown",
            # Only a MAC the stack declares has a script: anything else does not boot from this service.
            "echo gpufleet: no provisioning entry for ${netX/mac}, refusing to boot from the network",
            "exit 1",
            "",
        ]
    )


def dnsmasq_conf(
    site: Site,
    segment: Segment,
    address: IPv4Address,
    http_port: int,
    *,
    tftp_root: str = TFTP_ROOT,
    lease_file: str = LEASE_FILE,
) -> str:
    """dnsmasq.conf of one segment's provisioning host: reservations for that segment's nodes only."""
    prov = segment.provisioning
    if prov is None:
        raise RenderError(f"segment {segment.name!r} has no provisioning service")
    seg = _check(segment.name, _SEGMENT, "segment name")
    net = IPv4Network(segment.cidr)
    base_url = f"http://{address}:{http_port}"
    boot_url = f"{base_url}/boot.ipxe"
    _check(boot_url, _KERNEL_ARG, "boot URL")
    proxy = prov.mode is ProvisioningMode.PROXY
    lines = [
        f"# gpufleet: provisioning service of segment {seg} on {prov.host} ({address}), mode {prov.mode.value}.",
        "# Rendered from the stack; do not edit. Syntax: dnsmasq(8), 2.90.",
        "# DHCP and TFTP only: port=0 turns the DNS server off.",
        "port=0",
        "# Only this segment's address; bind-interfaces lets other dnsmasq instances run beside it.",
        f"listen-address={address}",
        "bind-interfaces",
        f"dhcp-leasefile={_check(lease_file, _ROOT_PATH, 'lease file')}",
        "log-dhcp",
    ]
    if proxy:
        lines += [
            "# Proxy-DHCP: the site's own DHCP server gives addresses; this one adds boot information only.",
            f"dhcp-range={net.network_address},proxy,{net.netmask}",
        ]
    else:
        lines += [
            "# Static reservations only: no dynamic pool, a machine the stack does not name gets no address.",
            f"dhcp-range={net.network_address},static,{net.netmask},12h",
            f"dhcp-option=option:router{',' + str(segment.gateway) if segment.gateway is not None else ''}",
            "dhcp-option=option:dns-server" + "".join(f",{d}" for d in segment.dns),
        ]
        if segment.mtu != 1500:
            lines.append(f"dhcp-option=option:mtu,{segment.mtu}")
    lines.append(f"# Reservations: the first MAC of each node of segment {seg} (its PXE interface).")
    for node in site.nodes:
        if node.segment != segment.name:
            continue
        host = _check(node.hostname, _HOSTNAME, "hostname")
        mac = _check(node.macs[0], _MAC, "MAC")
        lines.append(f"dhcp-host={mac},{host}" if proxy else f"dhcp-host={mac},{node.address},{host}")
    lines += [
        "# Unknown MACs (no dhcp-host above, so no `known` tag) get no answer at all.",
        "dhcp-ignore=tag:!known",
        "# Firmware that is not iPXE yet: RFC 4578 client architecture 7/9 is x86-64 UEFI, anything else BIOS.",
        "dhcp-match=set:efi64,option:client-arch,7",
        "dhcp-match=set:efi64,option:client-arch,9",
        "# iPXE says so in its user class; it is then sent the script URL (breaks the PXE -> iPXE loop).",
        "dhcp-userclass=set:ipxe,iPXE",
        "enable-tftp",
        f"tftp-root={_check(tftp_root, _ROOT_PATH, 'TFTP root')}",
    ]
    if proxy:
        lines += [
            "pxe-prompt=gpufleet,0",
            f'pxe-service=tag:!ipxe,x86PC,"gpufleet iPXE (BIOS)",{BIOS_LOADER}',
            f'pxe-service=tag:!ipxe,BC_EFI,"gpufleet iPXE (UEFI)",{UEFI_LOADER}',
            f'pxe-service=tag:!ipxe,x86-64_EFI,"gpufleet iPXE (UEFI)",{UEFI_LOADER}',
            f'pxe-service=tag:ipxe,x86PC,"gpufleet",{boot_url}',
            f'pxe-service=tag:ipxe,BC_EFI,"gpufleet",{boot_url}',
            f'pxe-service=tag:ipxe,x86-64_EFI,"gpufleet",{boot_url}',
        ]
    else:
        lines += [
            f"dhcp-boot=tag:!ipxe,tag:!efi64,{BIOS_LOADER}",
            f"dhcp-boot=tag:!ipxe,tag:efi64,{UEFI_LOADER}",
            f"dhcp-boot=tag:ipxe,{boot_url}",
        ]
    return "\n".join(lines) + "\n"


def provisioning_address(site: Site, segment: Segment) -> IPv4Address:
    """Address of a segment's provisioning host: its node or mirror entry, or the dedicated host's address."""
    prov = segment.provisioning
    if prov is None:
        raise RenderError(f"segment {segment.name!r} has no provisioning service")
    for n in site.nodes:
        if n.hostname == prov.host:
            return n.address
    for m in site.mirrors:
        if m.name == prov.host:
            return m.address
    if prov.address is None:
        raise RenderError(f"provisioning host {prov.host!r} of segment {segment.name!r} has no address")
    return prov.address


def render_segment(
    site: Site,
    segment: Segment,
    *,
    tftp_root: str = TFTP_ROOT,
    lease_file: str = LEASE_FILE,
    images: Mapping[str, ImageRecord] | None = None,
) -> SegmentService:
    """Everything one segment's provisioning host serves."""
    prov = segment.provisioning
    if prov is None:
        raise RenderError(f"segment {segment.name!r} has no provisioning service")
    address = provisioning_address(site, segment)
    base_url = f"http://{address}:{prov.http_port}"
    nodes = [n for n in site.nodes if n.segment == segment.name]
    http_files = {"boot.ipxe": default_script(base_url)}
    for n in nodes:
        http_files[f"ipxe/{script_name(n.macs[0])}"] = node_script(n, segment, base_url, images)
        http_files[local_script_name(n.macs[0])] = local_script(n)
    return SegmentService(
        segment=segment.name,
        host=prov.host,
        address=address,
        http_port=prov.http_port,
        mode=prov.mode,
        dnsmasq_conf=dnsmasq_conf(site, segment, address, prov.http_port, tftp_root=tftp_root, lease_file=lease_file),
        http_files=http_files,
        tftp_files=(BIOS_LOADER, UEFI_LOADER),
        nodes=tuple(n.hostname for n in nodes),
    )


def render_site(
    site: Site,
    *,
    tftp_root: str = TFTP_ROOT,
    lease_file: str = LEASE_FILE,
    images: Mapping[str, ImageRecord] | None = None,
) -> list[SegmentService]:
    """The provisioning service of every segment that declares one, in stack order."""
    return [
        render_segment(site, s, tftp_root=tftp_root, lease_file=lease_file, images=images)
        for s in site.segments
        if s.provisioning is not None
    ]
