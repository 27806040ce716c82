"""`gpufleet image build`: a node OS disk image and the deploy ramdisk, reproducibly, from one apt repository.

The image is a raw disk image built without loop devices or block devices: mmdebstrap installs the
packages into a directory, mke2fs `-d` turns that directory into a file system, and the partition table is
written into a plain file (`gpt`). One image serves both boot modes: a GPT with the root file system as
partition 1 (last on the disk, so the node can grow it), an EFI system partition (2, left blank: the deploy
ramdisk formats it) and a BIOS boot partition (3, where GRUB's i386-pc core image goes on a GPT disk). The
bootloader is *not* in the image: the deploy ramdisk installs GRUB for the node's boot mode on the node's own
disk (the disk's size and the firmware are only known there).

Reproducible: `SOURCE_DATE_EPOCH` for mmdebstrap and the packages' maintainer scripts; every mtime set to
it; apt's download directories owned by root; a fixed file-system UUID and hash seed; mke2fs's and
debugfs's clock faked (`E2FSPROGS_FAKE_TIME`); every inode's ctime/atime set to the epoch by debugfs; a
fixed disk signature; the ramdisk's cpio sorted with fixed mtimes and gzip without name or time. Two builds
from the same repository and package pins give the same sha256 (tests/lab/test_image_build.py).

References: mmdebstrap(1) 1.3.5 (Debian 12: `--variant`, `--include`, `--setup-hook`/`--customize-hook`,
`upload`, `copy://` mirrors, SOURCE_DATE_EPOCH), mke2fs(8) 1.47.0 (`-d`, `-U`, `-E hash_seed=,root_owner=`),
debugfs(8) (`set_inode_field`), apt_preferences(5) (Pin-Priority 1001),
https://reproducible-builds.org/docs/source-date-epoch/, UEFI Specification 2.10 section 5.3 (GUID Partition
Table: header, entries, protective MBR) and 13.3.3 (EFI system partition type GUID), GRUB manual "BIOS
installation" (the BIOS boot partition GUID).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
import uuid
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from infra.model.site import IMAGE_NAME

#: Packages of the minimal node image: a kernel, systemd with networkd, SSH, Python (Ansible), the
#: bootloader files the deploy ramdisk installs from (grub-pc-bin for BIOS; grub-efi-amd64-bin for UEFI,
#: with Debian's Secure Boot chain: shim-signed and grub-efi-amd64-signed, signed by Microsoft's UEFI CA and
#: Debian's key), dosfstools (the ramdisk formats the EFI system partition), sfdisk and e2fsprogs (growing the
#: root partition), busybox-static (the deploy ramdisk's userland comes from the same build).
DEFAULT_PACKAGES = (
    "linux-image-cloud-amd64",
    "systemd",
    "systemd-sysv",
    "dbus",
    "openssh-server",
    "python3",
    "sudo",
    "iproute2",
    "netbase",
    "grub-pc-bin",
    "grub2-common",
    "grub-efi-amd64-bin",
    "grub-efi-amd64-signed",
    "shim-signed",
    "dosfstools",
    "e2fsprogs",
    "fdisk",
    "initramfs-tools",
    "busybox-static",
)
#: 2025-01-01T00:00:00Z: the default build time every file gets (overridden by the lock or --epoch).
DEFAULT_EPOCH = 1735689600
MIB = 1 << 20
SECTOR = 512
#: Image layout (byte offsets): BIOS boot partition at 1 MiB (1 MiB: GRUB's i386-pc core image), EFI system
#: partition at 2 MiB (64 MiB: FAT32 needs 65525 clusters; shim + GRUB take ~4 MB), the root file system
#: from 66 MiB to 1 MiB before the end (the last MiB holds the backup GPT; the ramdisk moves it to the end
#: of the real disk and grows the root).
BIOS_START, BIOS_SIZE = 1 * MIB, 1 * MIB
ESP_START, ESP_SIZE = 2 * MIB, 64 * MIB
PART_START = ESP_START + ESP_SIZE
#: GPT partition type GUIDs: Linux filesystem data, EFI system partition (UEFI spec), BIOS boot (GRUB).
TYPE_LINUX = "0fc63daf-8483-4772-8e79-3d69d8477de4"
TYPE_ESP = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"
TYPE_BIOS = "21686148-6449-6e6f-744e-656564454649"
#: Namespace for the file-system UUID: the same image name gets the same UUID in every build.
_UUID_NS = uuid.UUID("6f1c2a4e-93b5-4d1e-8f47-2b1d0c9e5a71")
#: Deploy ramdisk modules (names; dependencies are added from modules.dep): virtio disks and NICs for VM
#: nodes, NVMe/SATA/SCSI disks and common server NICs for real ones (those the kernel package ships).
RAMDISK_MODULES = (
    "virtio_pci", "virtio_blk", "virtio_net", "virtio_scsi", "sd_mod", "nvme", "ahci", "ata_piix",
    "e1000", "e1000e", "igb", "ixgbe", "i40e", "ice", "mlx5_core", "bnxt_en",
    # The EFI system partition: mounted by the ramdisk for grub-install (FAT with Debian's default code page
    # 437 and iocharset utf8).
    "vfat", "nls_cp437", "nls_utf8", "nls_ascii",
    # The UEFI variable store, for the node's NVRAM boot entry (a module in Debian 12's kernels,
    # CONFIG_EFIVAR_FS=m in linux-image-*-cloud-amd64 6.1).
    "efivarfs",
)
_PKG = re.compile(r"^[a-z0-9][a-z0-9+.-]*(=[A-Za-z0-9.+~:-]+)?$")
_SUITE = re.compile(r"^[a-z0-9][a-z0-9.-]*$")
# An apt source line the build passes to mmdebstrap: a URL (http/https/copy/file) and a suite/`./`.
_REPO = re.compile(r"^(https?|copy|file)://[A-Za-z0-9._~:/%@+-]+$")


class ImageError(Exception):
    """The image cannot be built as asked (bad input or a tool failed); the message says which and why."""


@dataclass(frozen=True)
class ImageSpec:
    """What an image is built from."""

    name: str
    """Image name (the stack's `nodes[].image`)."""
    repo: str
    """URL of a flat apt repository (`Packages` at its root): the mirror, or `copy:///dir` for a local one."""
    packages: tuple[str, ...] = DEFAULT_PACKAGES
    """Packages, optionally pinned `name=version` (a lock's pins make a rebuild exact)."""
    suite: str = "bookworm"
    """Debian suite (selects mmdebstrap's defaults; the flat repository itself has no suites)."""
    epoch: int = DEFAULT_EPOCH
    """SOURCE_DATE_EPOCH: every timestamp in the image."""
    pins: tuple[tuple[str, str], ...] = ()
    """Exact versions of every package (a previous build's manifest): apt must install exactly these."""

    def check(self) -> None:
        """Raise ImageError for a value that must not reach mmdebstrap's command line."""
        if not IMAGE_NAME.fullmatch(self.name):
            raise ImageError(f"image name {self.name!r}: lowercase letters, digits and ._- only (max 63)")
        if not _REPO.fullmatch(self.repo):
            raise ImageError(f"repository {self.repo!r}: give http(s)://, file:// or copy:// URL of a flat apt repo")
        if not _SUITE.fullmatch(self.suite):
            raise ImageError(f"suite {self.suite!r} is not a Debian suite name")
        bad = [p for p in self.packages if not _PKG.fullmatch(p)]
        if bad or not self.packages:
            raise ImageError(f"package list: {', '.join(bad) or 'empty'}: give `name` or `name=version` entries")
        badpin = [f"{n}={v}" for n, v in self.pins if not _PKG.fullmatch(f"{n}={v}")]
        if badpin:
            raise ImageError(f"pins: {', '.join(badpin[:5])}: not `name=version`")
        if self.epoch < 0:
            raise ImageError("SOURCE_DATE_EPOCH must not be negative")


@dataclass(frozen=True)
class BuiltFile:
    """One output file, as the lock records it."""

    path: str
    """Relative to the output directory (and to the provisioning HTTP root)."""
    size: int
    sha256: str


@dataclass
class ImageResult:
    """What one build produced."""

    name: str
    epoch: int
    fs_uuid: str
    """UUID of the root file system (the bootloader config and fstab name it)."""
    disk: BuiltFile
    kernel: BuiltFile
    initrd: BuiltFile
    packages: dict[str, str]
    """Installed package → version: the pins that rebuild this image exactly."""
    seconds: float = 0.0
    used_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        """Deterministic JSON (no timings: those go to the build log, not the lock); `pins_from` reads it."""
        d = asdict(self)
        del d["seconds"], d["notes"]
        return json.dumps(d, indent=2, sort_keys=True) + "\n"


def pins_from(manifest: Path) -> tuple[int, tuple[tuple[str, str], ...]]:
    """Epoch and package pins of a previous build's manifest (`images/<name>.json`)."""
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
        return int(data["epoch"]), tuple(sorted((str(k), str(v)) for k, v in data["packages"].items()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ImageError(f"{manifest}: not an image manifest ({exc})") from None


def manifest_rel(name: str) -> str:
    """Path of an image's manifest (packages, epoch, files) beside the image."""
    return f"images/{name}.json"


def image_rel(name: str) -> str:
    """Path of an image under the HTTP root and in a bundle (the renderer's `images/<name>.img`)."""
    return f"images/{name}.img"


def fs_uuid(name: str) -> str:
    """The root file system's UUID: derived from the image name, so it is the same in every build."""
    return str(uuid.uuid5(_UUID_NS, name))


def _run(cmd: Sequence[str], *, env: dict[str, str] | None = None, timeout: int = 1800,
         input_text: str | None = None) -> str:
    try:
        res = subprocess.run(list(cmd), capture_output=True, text=True, check=False, timeout=timeout,
                             env=env, input=input_text)
    except FileNotFoundError:
        raise ImageError(f"{cmd[0]} is not installed (Debian: see scripts/setup.sh)") from None
    except subprocess.TimeoutExpired:
        raise ImageError(f"{cmd[0]} did not finish in {timeout} s") from None
    if res.returncode != 0:
        tail = "\n".join((res.stderr or res.stdout).strip().splitlines()[-15:])
        raise ImageError(f"{cmd[0]} failed (exit {res.returncode}):\n{tail}")
    return res.stdout


def digest(path: Path) -> tuple[int, str]:
    """Size and sha256 of a file."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return path.stat().st_size, h.hexdigest()


def preferences(pins: Sequence[tuple[str, str]]) -> str:
    """The `apt_preferences(5)` text pinning each package to its version."""
    return "".join(f"Package: {n}\nPin: version {v}\nPin-Priority: 1001\n\n" for n, v in pins)


def mmdebstrap_cmd(spec: ImageSpec, root: Path, prefs: Path | None = None) -> list[str]:
    """The mmdebstrap call: packages into `root`, then the node-image customisations inside the chroot."""
    hooks = [
        # Host identity must not leak into the image: mmdebstrap copies the build host's hostname and
        # resolv.conf; the node's own come with its first-boot data.
        'rm -f "$1/etc/hostname" "$1/etc/resolv.conf"',
        # No host keys in an image every node shares: the deploy ramdisk injects the node's own key.
        'rm -f "$1"/etc/ssh/ssh_host_*',
        'chroot "$1" systemctl enable systemd-networkd.service',
        # apt's and dpkg's logs carry build times; the caches are the build's, not the node's.
        'rm -rf "$1"/var/log/apt/* "$1"/var/log/dpkg.log "$1"/var/log/alternatives.log',
        'rm -f "$1"/var/cache/ldconfig/aux-cache',
        # The build's repository is not the node's: a node installed from this image would otherwise keep a
        # `copy://` source that does not exist on it, and its first `apt-get update` fails. The node's
        # sources come from its stack (roles/base); the build's indexes go with it.
        'printf "# gpufleet image: no sources here; they come from the stack of the node (roles/base).\\n" '
        '> "$1/etc/apt/sources.list"',
        'rm -rf "$1"/etc/apt/sources.list.d/* "$1"/var/lib/apt/lists/*',
    ]
    setup = []
    if prefs is not None:
        # apt preferences with priority 1001 force the pinned versions (apt_preferences(5)), for the
        # essential set mmdebstrap picks itself as well as for the listed packages; removed afterwards so
        # the node's own apt is not pinned by the build.
        setup = ['mkdir -p "$1/etc/apt/preferences.d"', f"upload {prefs} /etc/apt/preferences.d/gpufleet-image"]
        hooks.append('rm -f "$1/etc/apt/preferences.d/gpufleet-image"')
    cmd = [
        "mmdebstrap", "--variant=apt", "--mode=root", "--format=directory", "--quiet",
        "--include=" + ",".join(spec.packages),
        # The repository is the only source: nothing else is reachable on an air-gapped build host.
        "--aptopt=Acquire::Languages \"none\"",
    ]
    cmd += [f"--setup-hook={h}" for h in setup]
    cmd += [f"--customize-hook={h}" for h in hooks]
    cmd += [spec.suite, str(root), f"deb [trusted=yes] {spec.repo} ./"]
    return cmd


# The ESP by its fixed partition GUID (its FAT volume id is made on the node); `nofail`: a BIOS node whose
# ESP was never formatted still boots.
_FSTAB = ("# gpufleet image: the root file system by its fixed UUID, the EFI system partition by its GPT GUID.\n"
          "UUID={uuid} / ext4 errors=remount-ro 0 1\nPARTUUID={esp} /boot/efi vfat umask=0077,nofail 0 1\n")
# sshd offers only the ed25519 key the deploy ramdisk injected (the key gpufleet pinned); a node deployed
# without one gets a fresh key from ssh-keygen -A instead of an sshd that cannot start.
_SSHD_CONF = "# gpufleet: the node's pinned host key only.\nHostKey /etc/ssh/ssh_host_ed25519_key\n"
_SSH_KEYGEN_DROPIN = "[Service]\nExecStartPre=\nExecStartPre=/usr/bin/ssh-keygen -A\nExecStartPre=/usr/sbin/sshd -t\n"


def customize(root: Path, spec: ImageSpec) -> None:
    """Files the image needs that no package writes, then every mtime set to the epoch."""
    esp = next(p.guid for p in disk_partitions(spec.name, 0) if p.type_guid == TYPE_ESP)
    (root / "etc/fstab").write_text(_FSTAB.format(uuid=fs_uuid(spec.name), esp=esp), encoding="utf-8")
    (root / "boot/efi").mkdir(parents=True, exist_ok=True)
    (root / "etc/ssh/sshd_config.d").mkdir(parents=True, exist_ok=True)
    (root / "etc/ssh/sshd_config.d/gpufleet.conf").write_text(_SSHD_CONF, encoding="utf-8")
    dropin = root / "etc/systemd/system/ssh.service.d"
    dropin.mkdir(parents=True, exist_ok=True)
    (dropin / "gpufleet-hostkeys.conf").write_text(_SSH_KEYGEN_DROPIN, encoding="utf-8")
    # apt's download directories are owned by `_apt` or root depending on how apt last ran in the build
    # (seen: two builds differing only there); apt re-owns them itself when it runs on the node.
    for rel in ("var/cache/apt/archives/partial", "var/lib/apt/lists/partial"):
        if (root / rel).is_dir():
            os.chown(root / rel, 0, 0)
    # Empty machine-id: systemd makes one at first boot (each node its own).
    (root / "etc/machine-id").write_text("", encoding="utf-8")
    clamp_mtimes(root, spec.epoch)


def clamp_mtimes(root: Path, epoch: int) -> None:
    """Set every file's, directory's and symlink's mtime (and atime) to the epoch.

    All of them, not only those newer than the epoch: a build step that touches a directory (the pins'
    apt preferences file, created and removed) would otherwise leave it at the epoch in one build and at
    the package's own mtime in another.
    """
    for dirpath, dirnames, filenames in os.walk(root):
        for n in [*dirnames, *filenames]:
            os.utime(os.path.join(dirpath, n), (epoch, epoch), follow_symlinks=False)
    os.utime(root, (epoch, epoch))


def tree_bytes(root: Path) -> int:
    """Bytes of regular files under `root` (hard links once)."""
    seen: set[int] = set()
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for n in files:
            st = os.lstat(os.path.join(dirpath, n))
            if st.st_ino not in seen:
                seen.add(st.st_ino)
                total += st.st_size
    return total


def fs_size(used: int) -> int:
    """File-system size for `used` bytes of files: 30 % + 128 MiB headroom, whole MiB (the node grows it)."""
    return ((int(used * 1.3) + (128 << 20)) >> 20) << 20


def _debugfs_quote(rel: str) -> str:
    if '"' in rel or "\n" in rel:
        raise ImageError(f"file name {rel!r} in the image cannot be given to debugfs")
    return f'"{rel}"'


def _times_script(root: Path, epoch: int, work: Path) -> Path:
    """A debugfs script setting ctime and atime of every path under `root` to the epoch."""
    lines = []
    for dirpath, dirnames, filenames in os.walk(root):
        names = [*dirnames, *filenames]
        if dirpath == str(root):
            names.insert(0, "")
        for n in names:
            rel = "/" + os.path.relpath(os.path.join(dirpath, n), root) if n else "/"
            q = _debugfs_quote(rel)
            lines += [f"sif {q} ctime @{epoch}", f"sif {q} atime @{epoch}"]
    work.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return work


def make_disk(root: Path, disk: Path, spec: ImageSpec, used: int) -> None:
    """Raw disk image: GPT (root ext4 made from `root`, blank ESP, BIOS boot partition), whole MiB."""
    size = fs_size(used)
    fs = disk.with_suffix(".ext4")
    env = {**os.environ, "E2FSPROGS_FAKE_TIME": str(spec.epoch), "SOURCE_DATE_EPOCH": str(spec.epoch)}
    u = fs_uuid(spec.name)
    fs.unlink(missing_ok=True)
    _run(["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-L", "gpufleet-root", "-U", u,
          "-E", f"hash_seed={u},root_owner=0:0,lazy_itable_init=0,lazy_journal_init=0",
          "-d", str(root), str(fs), f"{size >> 10}k"], env=env)
    # mke2fs -d copies each source file's ctime (and atime), which no one can set: put the epoch into
    # every inode afterwards with debugfs (same clock faked, so the superblock's write time is the epoch).
    _run(["debugfs", "-w", "-f", str(_times_script(root, spec.epoch, work=disk.with_suffix(".sif"))), str(fs)],
         env=env)
    disk.with_suffix(".sif").unlink()
    total = PART_START + size + MIB
    with disk.open("wb") as f:
        f.truncate(total)
        for offset, data in gpt(total // SECTOR, disk_partitions(spec.name, size), disk_guid(spec.name)):
            f.seek(offset)
            f.write(data)
    with fs.open("rb") as src, disk.open("r+b") as dst:
        dst.seek(PART_START)
        while chunk := src.read(1 << 22):
            dst.write(chunk)
    fs.unlink()


@dataclass(frozen=True)
class Partition:
    """One GPT entry: number (1-based), first and last sector (inclusive), type and unique GUID, name."""

    number: int
    first: int
    last: int
    type_guid: str
    guid: str
    name: str


def disk_guid(name: str) -> str:
    """The image's GPT disk GUID: derived from its name (a random one would break reproducibility)."""
    return str(uuid.uuid5(_UUID_NS, f"{name}:disk"))


def disk_partitions(name: str, root_size: int) -> list[Partition]:
    """The image's three partitions; root first (`/dev/<disk>1` on the node) though last on the disk."""
    def guid(part: str) -> str:
        return str(uuid.uuid5(_UUID_NS, f"{name}:{part}"))

    return [
        Partition(1, PART_START // SECTOR, (PART_START + root_size) // SECTOR - 1, TYPE_LINUX, guid("root"), "root"),
        Partition(2, ESP_START // SECTOR, (ESP_START + ESP_SIZE) // SECTOR - 1, TYPE_ESP, guid("esp"), "esp"),
        Partition(3, BIOS_START // SECTOR, (BIOS_START + BIOS_SIZE) // SECTOR - 1, TYPE_BIOS, guid("bios"), "bios"),
    ]


#: GPT entries: 128 of 128 bytes (32 sectors), the UEFI spec's minimum array size and what every tool writes.
_ENTRIES, _ENTRY_SIZE = 128, 128


def _gpt_header(current: int, backup: int, entries_lba: int, total: int, disk: str, entries_crc: int) -> bytes:
    """One GPT header sector (UEFI spec 2.10, table 5.5), CRC32 over its 92 bytes with the CRC field zero."""
    first_usable = 2 + _ENTRIES * _ENTRY_SIZE // SECTOR
    fields = [b"EFI PART", (0x00010000).to_bytes(4, "little"), (92).to_bytes(4, "little"), bytes(4), bytes(4),
              current.to_bytes(8, "little"), backup.to_bytes(8, "little"), first_usable.to_bytes(8, "little"),
              (total - first_usable).to_bytes(8, "little"), uuid.UUID(disk).bytes_le, entries_lba.to_bytes(8, "little"),
              _ENTRIES.to_bytes(4, "little"), _ENTRY_SIZE.to_bytes(4, "little"), entries_crc.to_bytes(4, "little")]
    head = b"".join(fields)
    crc = zlib.crc32(head)
    return (head[:16] + crc.to_bytes(4, "little") + head[20:]).ljust(SECTOR, b"\0")


def gpt(total: int, parts: Sequence[Partition], disk: str) -> list[tuple[int, bytes]]:
    """(byte offset, data) pieces of a GPT for a disk of `total` sectors: protective MBR, primary, backup.

    Protective MBR: one partition of type 0xEE from sector 1 over the whole disk (capped at 2^32-1 sectors),
    not marked bootable (UEFI spec 5.2.3). Entries sorted by number; unused entries are zero.
    """
    table = bytearray(_ENTRIES * _ENTRY_SIZE)
    for p in parts:
        name = p.name.encode("utf-16-le")[:72]
        entry = (uuid.UUID(p.type_guid).bytes_le + uuid.UUID(p.guid).bytes_le + p.first.to_bytes(8, "little")
                 + p.last.to_bytes(8, "little") + bytes(8) + name.ljust(72, b"\0"))
        table[(p.number - 1) * _ENTRY_SIZE:p.number * _ENTRY_SIZE] = entry
    crc = zlib.crc32(table)
    entry_sectors = len(table) // SECTOR
    pmbr_entry = (bytes([0x00, 0x00, 0x02, 0x00, 0xEE, 0xFF, 0xFF, 0xFF]) + (1).to_bytes(4, "little")
                  + min(total - 1, 0xFFFFFFFF).to_bytes(4, "little"))
    pmbr = bytes(446) + pmbr_entry + bytes(48) + b"\x55\xaa"
    return [
        (0, pmbr),
        (SECTOR, _gpt_header(1, total - 1, 2, total, disk, crc)),
        (2 * SECTOR, bytes(table)),
        ((total - 1 - entry_sectors) * SECTOR, bytes(table)),
        ((total - 1) * SECTOR, _gpt_header(total - 1, 1, total - 1 - entry_sectors, total, disk, crc)),
    ]


def installed_packages(root: Path) -> dict[str, str]:
    """Package → version installed in `root` (dpkg's own database)."""
    out = _run(["dpkg-query", f"--admindir={root}/var/lib/dpkg", "-W", "-f", "${Package}=${Version}\\n"])
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def module_closure(moddir: Path, names: Sequence[str]) -> list[str]:
    """Module files (relative to `moddir`) for `names` and what they depend on, dependencies first."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (moddir / "modules.dep").read_text(encoding="utf-8").splitlines():
        if ":" not in line:
            continue
        mod, rest = line.split(":", 1)
        deps[mod] = rest.split()
        base = Path(mod).name.split(".ko")[0]
        by_name[base] = mod
        by_name[base.replace("-", "_")] = mod
    order: list[str] = []

    def visit(mod: str) -> None:
        if mod in order:
            return
        # modules.dep lists the full (transitive) dependency set; load those of each first.
        for d in reversed(deps.get(mod, [])):
            visit(d)
        order.append(mod)

    for n in names:
        if n in by_name:  # built in, or not shipped by this kernel flavour
            visit(by_name[n])
    return order


def _cpio_newc(entries: list[tuple[str, int, bytes, str]], epoch: int) -> bytes:
    """A newc cpio archive: (name, mode, data, symlink target) entries, fixed owners and mtimes."""
    out = bytearray()
    for ino, (name, mode, data, target) in enumerate([*entries, ("TRAILER!!!", 0, b"", "")], start=1):
        body = target.encode() if target else data
        nb = name.encode() + b"\0"
        hdr = "070701" + "".join(f"{v:08x}" for v in (
            ino if name != "TRAILER!!!" else 0, mode, 0, 0, 1, epoch if mode else 0, len(body),
            0, 0, 0, 0, len(nb), 0))
        out += hdr.encode() + nb
        out += b"\0" * (-(110 + len(nb)) % 4)
        out += body + b"\0" * (-len(body) % 4)
    return bytes(out)


_INIT = Path(__file__).with_name("deploy_init.sh")
#: The root-disk selection the init sources (separate so tests run it against a fake sysfs tree).
DISK_LIB = Path(__file__).with_name("deploy_disk.sh")
#: The UEFI variable reading the init sources (separate so tests run it against a fake efivarfs directory).
EFI_LIB = Path(__file__).with_name("deploy_efi.sh")


def build_ramdisk(root: Path, initrd: Path, epoch: int) -> None:
    """The deploy initramfs: busybox from the image build, the kernel's disk/NIC modules, the deploy init."""
    kver = sorted(p.name for p in (root / "lib/modules").iterdir())[-1]
    moddir = root / "lib/modules" / kver
    mods = module_closure(moddir, RAMDISK_MODULES)
    entries: list[tuple[str, int, bytes, str]] = []
    dirs = {"bin", "sbin", "dev", "proc", "sys", "mnt", "tmp", "run", "etc", "lib", "lib/modules",
            f"lib/modules/{kver}", "lib/gpufleet"}
    files: dict[str, tuple[int, bytes]] = {
        "init": (0o100755, _INIT.read_bytes()),
        "lib/gpufleet/disk.sh": (0o100644, DISK_LIB.read_bytes()),
        "lib/gpufleet/efi.sh": (0o100644, EFI_LIB.read_bytes()),
        "bin/busybox": (0o100755, (root / "bin/busybox").read_bytes()),
        # Load order for the init (one path per line, dependencies first).
        f"lib/modules/{kver}/gpufleet.order": (0o100644, "".join(m + "\n" for m in mods).encode()),
    }
    for m in mods:
        files[f"lib/modules/{kver}/{m}"] = (0o100644, (moddir / m).read_bytes())
        parts = Path(f"lib/modules/{kver}/{m}").parents
        dirs.update(str(p) for p in parts if str(p) != ".")
    links = {"bin/sh": "busybox"}
    for d in sorted(dirs):
        entries.append((d, 0o040755, b"", ""))
    for name in sorted(files):
        mode, data = files[name]
        entries.append((name, mode, data, ""))
    for name in sorted(links):
        entries.append((name, 0o120777, b"", links[name]))
    raw = _cpio_newc(entries, epoch)
    # mtime=0 and no file name in the gzip header: the same input gives the same bytes.
    with initrd.open("wb") as f, gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0, compresslevel=6) as gz:
        gz.write(raw)


def build(spec: ImageSpec, out: Path, work: Path) -> ImageResult:
    """Build the disk image and the deploy kernel + ramdisk into `out` (HTTP-root layout)."""
    spec.check()
    start = time.monotonic()
    root = work / "root"
    if root.exists():
        shutil.rmtree(root)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "SOURCE_DATE_EPOCH": str(spec.epoch), "LC_ALL": "C.UTF-8", "TZ": "UTC"}
    prefs = None
    if spec.pins:
        prefs = work / "preferences"
        prefs.write_text(preferences(spec.pins), encoding="utf-8")
    _run(mmdebstrap_cmd(spec, root, prefs), env=env, timeout=3600)
    customize(root, spec)
    packages = installed_packages(root)
    used = tree_bytes(root)
    disk = out / image_rel(spec.name)
    kernel = out / "deploy/vmlinuz"
    initrd = out / "deploy/initrd.img"
    for p in (disk, kernel, initrd):
        p.parent.mkdir(parents=True, exist_ok=True)
    make_disk(root, disk, spec, used)
    vmlinuz = sorted((root / "boot").glob("vmlinuz-*"))
    if not vmlinuz:
        raise ImageError("the package list installs no kernel (add linux-image-cloud-amd64 or linux-image-amd64)")
    shutil.copyfile(vmlinuz[-1], kernel)
    build_ramdisk(root, initrd, spec.epoch)
    shutil.rmtree(root)

    def rec(p: Path) -> BuiltFile:
        size, sha = digest(p)
        return BuiltFile(str(p.relative_to(out)), size, sha)

    result = ImageResult(spec.name, spec.epoch, fs_uuid(spec.name), rec(disk), rec(kernel), rec(initrd), packages,
                         seconds=time.monotonic() - start, used_bytes=used)
    (out / manifest_rel(spec.name)).write_text(result.to_json(), encoding="utf-8")
    return result
