"""The deploy ramdisk's root-disk selection (infra/provision/deploy_disk.sh), run by a real shell against a fake
sysfs tree.

The ramdisk runs it under busybox `sh` (ash); the tests run it under the host's busybox when installed and
under `/bin/sh` (dash), so a bashism fails here. The fake tree has the layout of Linux's sysfs
(Documentation/ABI/stable/sysfs-block: `size` in 512-byte sectors; `/sys/block/<disk>` a symlink into
`/sys/devices/…` under the disk's PCI device; virtio-blk's `serial` attribute on the disk,
drivers/block/virtio_blk.c; NVMe: `wwid` and `nsid` on the namespace, `serial` and `model` on the controller
the namespace's `device` link points to, drivers/nvme/host/sysfs.c, space-padded to 20 and 40 bytes as the
NVMe Base Specification 2.0 (Identify Controller, SN and MN fields) defines them; SCSI/ATA: `device/wwid` with
the NAA designator, drivers/scsi/scsi_sysfs.c).

The expected names are the ones udev gives these devices on Debian 12 (systemd 252.39,
/lib/udev/rules.d/60-persistent-storage.rules, quoted in deploy_disk.sh): `virtio-<serial>`,
`nvme-<wwid>`, `nvme-<model>_<serial>` with whitespace runs replaced by `_`, `wwn-0x<naa>`, and path_id's
`pci-<addr>`, `virtio-pci-<addr>`, `pci-<addr>-nvme-<nsid>`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from infra.provision.image import DISK_LIB

SHELLS = [s for s in (["busybox", "sh"], ["/bin/sh"]) if shutil.which(s[0])]

GIB = 1 << 30


def _disk(
    sys: Path,
    dev: str,
    name: str,
    sectors: int,
    attrs: dict[str, str] | None = None,
    device: dict[str, str] | None = None,
    device_dir: str | None = None,
) -> None:
    """A disk at sys/devices/<dev>/block/<name> (or <dev>/<name> for NVMe), linked from sys/block/<name>."""
    real = sys / "devices" / dev / name
    real.mkdir(parents=True)
    (real / "size").write_text(f"{sectors}\n")
    for k, v in (attrs or {}).items():
        (real / k).write_text(v + "\n")
    if device is not None:
        ddir = sys / "devices" / (device_dir or dev)
        ddir.mkdir(parents=True, exist_ok=True)
        for k, v in device.items():
            (ddir / k).write_text(v + "\n")
        os.symlink(os.path.relpath(ddir, real), real / "device")
    (sys / "block").mkdir(exist_ok=True)
    os.symlink(os.path.relpath(real, sys / "block"), sys / "block" / name)


@pytest.fixture
def fake_sys(tmp_path: Path) -> Path:
    sys = tmp_path / "sys"
    _disk(sys, "pci0000:00/0000:00:04.0/virtio1/block", "vda", 4 * GIB // 512, {"serial": "GPFROOT01"})
    _disk(sys, "pci0000:00/0000:00:05.0/virtio2/block", "vdb", 4 * GIB // 512, {"serial": "GPFDATA01"})
    _disk(
        sys,
        "pci0000:00/0000:00:06.0/nvme/nvme0",
        "nvme0n1",
        1_000_204_886_016 // 512,
        {"wwid": "eui.0025388b91b2c3d4", "nsid": "1"},
        device={"serial": "S5GXNX0T123456      ", "model": "Samsung SSD 980 PRO 1TB" + " " * 17},
        device_dir="pci0000:00/0000:00:06.0/nvme/nvme0",
    )
    _disk(
        sys,
        "pci0000:00/0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0/block",
        "sda",
        480_103_981_056 // 512,
        device={"wwid": "naa.5000C500A1B2C3D4", "model": "SAMSUNG MZ7LH480"},
        device_dir="pci0000:00/0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0",
    )
    _disk(sys, "virtual/block", "loop0", 0)
    return sys


def _pick(shell: list[str], sys: Path, hint: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*shell, "-c", f'. "{DISK_LIB}"; pick_disk "$1"', "pick", hint],
        env={"SYS": str(sys), "PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def _names(shell: list[str], sys: Path, func: str, disk: str) -> list[str]:
    res = subprocess.run(
        [*shell, "-c", f'. "{DISK_LIB}"; {func} "$1"', func, disk],
        env={"SYS": str(sys), "PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return res.stdout.split()


@pytest.mark.parametrize("shell", SHELLS, ids=[s[0] for s in SHELLS])
def test_udev_names_are_derived_from_sysfs(shell: list[str], fake_sys: Path) -> None:
    assert _names(shell, fake_sys, "disk_ids", "vda") == ["virtio-GPFROOT01"]
    assert _names(shell, fake_sys, "disk_ids", "nvme0n1") == [
        "nvme-eui.0025388b91b2c3d4",
        "nvme-Samsung_SSD_980_PRO_1TB_S5GXNX0T123456",
        "nvme-Samsung_SSD_980_PRO_1TB_S5GXNX0T123456_1",
    ]
    assert _names(shell, fake_sys, "disk_ids", "sda") == ["wwn-0x5000c500a1b2c3d4"]
    assert _names(shell, fake_sys, "disk_paths", "vda") == ["pci-0000:00:04.0", "virtio-pci-0000:00:04.0"]
    assert _names(shell, fake_sys, "disk_paths", "nvme0n1") == ["pci-0000:00:06.0-nvme-1"]
    # SATA by-path (`pci-…-ata-1`) needs the ATA port number udev's path_id reads: not derived, never guessed.
    assert _names(shell, fake_sys, "disk_paths", "sda") == []


@pytest.mark.parametrize("shell", SHELLS, ids=[s[0] for s in SHELLS])
@pytest.mark.parametrize(
    ("hint", "disk"),
    [
        ("serial:GPFDATA01", "vdb"),
        ("serial:S5GXNX0T123456", "nvme0n1"),
        ("size_gb:1000", "nvme0n1"),
        ("size_gb:480", "sda"),
        ("path:/dev/vda", "vda"),
        ("path:/dev/disk/by-id/virtio-GPFROOT01", "vda"),
        ("path:/dev/disk/by-id/nvme-Samsung_SSD_980_PRO_1TB_S5GXNX0T123456", "nvme0n1"),
        ("path:/dev/disk/by-id/nvme-eui.0025388b91b2c3d4", "nvme0n1"),
        ("path:/dev/disk/by-id/wwn-0x5000c500a1b2c3d4", "sda"),
        ("path:/dev/disk/by-path/pci-0000:00:05.0", "vdb"),
        ("path:/dev/disk/by-path/virtio-pci-0000:00:04.0", "vda"),
        ("path:/dev/disk/by-path/pci-0000:00:06.0-nvme-1", "nvme0n1"),
    ],
)
def test_a_hint_picks_exactly_its_disk(shell: list[str], fake_sys: Path, hint: str, disk: str) -> None:
    res = _pick(shell, fake_sys, f"{hint}")
    assert (res.returncode, res.stdout.strip()) == (0, disk), res.stderr


@pytest.mark.parametrize("shell", SHELLS, ids=[s[0] for s in SHELLS])
@pytest.mark.parametrize(
    ("hint", "why"),
    [
        ("size_gb:4", "matches 2 disks (vda vdb)"),  # two 4 GiB disks: ambiguous
        ("", "matches 4 disks"),  # no hint, several disks
        ("serial:NOPE", "matches 0 disks"),
        ("path:/dev/disk/by-id/virtio-GPFROOT0", "matches 0 disks"),  # a prefix is not a match
        ("path:/dev/disk/by-path/pci-0000:00:1f.2-ata-1", "matches 0 disks"),
        ("path:/dev/sdz", "matches 0 disks"),
        ("path:/dev/loop0", "matches 0 disks"),  # not a candidate disk
        ("path:/dev/disk/by-uuid/0b1c", "only /dev/disk/by-id and /dev/disk/by-path"),
        ("label:root", "unknown root disk hint"),
    ],
)
def test_an_ambiguous_or_unmatched_hint_fails_with_the_reason(
    shell: list[str], fake_sys: Path, hint: str, why: str
) -> None:
    res = _pick(shell, fake_sys, hint)
    assert res.returncode == 1 and res.stdout == "", res.stdout
    assert why in res.stderr, res.stderr
    if "matches" in why:
        # The reason lists what each disk is known as, so the operator can correct the hint.
        assert "vda=[GPFROOT01;virtio-GPFROOT01,pci-0000:00:04.0,virtio-pci-0000:00:04.0]" in res.stderr


def test_some_shell_ran() -> None:
    assert SHELLS, "neither busybox nor /bin/sh: the selection logic was not run"
