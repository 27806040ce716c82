"""`gpufleet image build` pieces that run without mmdebstrap: partition table, ramdisk archive, first-boot
data, the provisioning server's "done" switch, the renderer's image arguments, the CLI's input checks.

Outside tools judge our bytes: util-linux `partx` reads the partition table, GNU `cpio` lists the ramdisk,
GNU `tar` lists the first-boot tarball, `ssh-keygen` reads the generated host key. The full build (twice,
same sha256) and a deploy to a VM are lab tests: tests/lab/test_image_build.py, tests/lab/test_deploy_vm.py.
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from infra.bundle.lock import Lock
from infra.cli import main
from infra.commands.provision import record_in_lock
from infra.model.load import parse_site
from infra.provision.firstboot import HostKeyStore, firstboot_tar, networkd_file
from infra.provision.httpd import mark_done
from infra.provision.image import (
    MIB,
    PART_START,
    BuiltFile,
    ImageError,
    ImageResult,
    ImageSpec,
    _cpio_newc,
    build_ramdisk,
    disk_guid,
    disk_partitions,
    fs_size,
    gpt,
    mmdebstrap_cmd,
    module_closure,
    pins_from,
)
from infra.provision.render import ImageRecord, kernel_args, local_script, render_site
from tests.unit.factories import make_site

SHA = "ab" * 32


def _site() -> dict[str, Any]:
    site = make_site()
    site["segments"][0]["provisioning"] = {"host": "pxe01", "address": "10.0.0.5"}
    site["nodes"][0] |= {"image": "debian-12-node", "root_disk": {"serial": "GPF0001"}, "boot_mode": "bios"}
    site["admin_keys"] = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB2mFp1y0Yj9c1QkTn3mBNGkDd1w0p4a0G1e4bS2o1Xq admin@x"]
    return site


@pytest.mark.skipif(shutil.which("partx") is None, reason="util-linux partx not installed")
def test_partition_table_is_a_gpt_partx_reads_from_either_header(tmp_path: Path) -> None:
    """util-linux (libblkid) checks both CRCs; with the primary header destroyed it reads the backup one."""
    disk = tmp_path / "d.img"
    root_size = 100 * MIB
    total = PART_START + root_size + MIB
    with disk.open("wb") as f:
        f.truncate(total)
        for offset, data in gpt(total // 512, disk_partitions("debian-12-node", root_size), disk_guid("x")):
            f.seek(offset)
            f.write(data)
    cols = "NR,START,SECTORS,TYPE,UUID,NAME"

    def read() -> list[list[str]]:
        out = subprocess.run(["partx", "--show", "-g", "-o", cols, str(disk)], capture_output=True, text=True,
                             check=True).stdout
        return [line.split() for line in out.splitlines()]

    rows = read()
    guid = {p.name: p.guid for p in disk_partitions("debian-12-node", root_size)}
    # Type GUIDs: Linux data and EFI system partition (UEFI spec 2.10 table 5.14), BIOS boot (GRUB manual).
    assert rows == [
        ["1", str(66 * MIB // 512), str(root_size // 512), "0fc63daf-8483-4772-8e79-3d69d8477de4", guid["root"],
         "root"],
        ["2", str(2 * MIB // 512), str(64 * MIB // 512), "c12a7328-f81f-11d2-ba4b-00a0c93ec93b", guid["esp"], "esp"],
        ["3", str(MIB // 512), str(MIB // 512), "21686148-6449-6e6f-744e-656564454649", guid["bios"], "bios"],
    ]
    with disk.open("r+b") as f:  # the protective MBR: one 0xEE entry, boot signature
        head = f.read(512)
        assert head[450] == 0xEE and head[510:] == b"\x55\xaa"
        f.seek(512)
        f.write(bytes(512))  # destroy the primary header: the backup at the last sector must carry the table
    assert read() == rows
    # Same name, same bytes: the GUIDs come from the image name, never from a random source.
    assert disk_partitions("debian-12-node", root_size) == disk_partitions("debian-12-node", root_size)
    assert disk_guid("a") != disk_guid("b")


def test_module_closure_loads_dependencies_first(tmp_path: Path) -> None:
    # modules.dep(5): "module: dependencies…", each line the full dependency list of that module.
    (tmp_path / "modules.dep").write_text(
        "kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko\n"
        "kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko\n"
        "kernel/net/core/failover.ko:\n"
        "kernel/drivers/block/virtio_blk.ko:\n"
    )
    order = module_closure(tmp_path, ["virtio_net", "virtio_blk", "not_shipped"])
    assert order.index("kernel/net/core/failover.ko") < order.index("kernel/drivers/net/net_failover.ko")
    assert order.index("kernel/drivers/net/net_failover.ko") < order.index("kernel/drivers/net/virtio_net.ko")
    assert sorted(order) == sorted(set(order)) and len(order) == 4


@pytest.mark.skipif(shutil.which("cpio") is None, reason="GNU cpio not installed")
def test_ramdisk_archive_is_a_newc_cpio_gnu_cpio_lists(tmp_path: Path) -> None:
    raw = _cpio_newc([("bin", 0o040755, b"", ""), ("init", 0o100755, b"#!/bin/sh\n", ""),
                      ("bin/sh", 0o120777, b"", "busybox")], 1735689600)
    (tmp_path / "a.cpio").write_bytes(raw)
    listing = subprocess.run(["cpio", "-t", "-v", "--quiet", "-F", str(tmp_path / "a.cpio")],
                             capture_output=True, text=True, check=True).stdout
    names = [line.split()[8] for line in listing.splitlines()]
    assert names == ["bin", "init", "bin/sh"]
    assert "bin/sh -> busybox" in listing
    assert _cpio_newc([("init", 0o100755, b"x", "")], 1) == _cpio_newc([("init", 0o100755, b"x", "")], 1)


@pytest.mark.skipif(shutil.which("cpio") is None, reason="GNU cpio not installed")
def test_ramdisk_carries_every_library_the_init_sources_and_the_efivarfs_module(tmp_path: Path) -> None:
    # A root as the image build leaves it: busybox, and a kernel whose modules.dep (the format depmod writes:
    # `path: dependencies`) has efivarfs as a module (Debian 12's CONFIG_EFIVAR_FS=m) besides a disk driver.
    root = tmp_path / "root"
    moddir = root / "lib/modules/6.1.0-57-cloud-amd64"
    for rel in ("kernel/fs/efivarfs/efivarfs.ko", "kernel/drivers/block/virtio_blk.ko"):
        (moddir / rel).parent.mkdir(parents=True, exist_ok=True)
        (moddir / rel).write_bytes(b"\x7fELF")
    (moddir / "modules.dep").write_text("kernel/fs/efivarfs/efivarfs.ko:\nkernel/drivers/block/virtio_blk.ko:\n")
    (root / "bin").mkdir()
    (root / "bin/busybox").write_bytes(b"\x7fELF")
    build_ramdisk(root, tmp_path / "initrd.img", 1735689600)
    (tmp_path / "a.cpio").write_bytes(gzip.decompress((tmp_path / "initrd.img").read_bytes()))
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["cpio", "-i", "-d", "--quiet", "-F", str(tmp_path / "a.cpio")], cwd=out, check=True)
    init = (out / "init").read_text()
    sourced = re.findall(r"^\. (/lib/gpufleet/\S+)$", init, flags=re.M)
    assert "/lib/gpufleet/efi.sh" in sourced
    for lib in sourced:
        assert (out / lib.lstrip("/")).is_file(), lib
    order = (moddir.relative_to(root) / "gpufleet.order")
    assert "kernel/fs/efivarfs/efivarfs.ko" in (out / order).read_text().split()
    assert (out / moddir.relative_to(root) / "kernel/fs/efivarfs/efivarfs.ko").is_file()


def test_spec_refuses_values_that_would_reach_mmdebstraps_command_line() -> None:
    good = ImageSpec("debian-12-node", "copy:///var/cache/repo")
    good.check()
    for bad in (
        ImageSpec("Debian 12", "copy:///r"),
        ImageSpec("n", "copy:///r ./\ndeb http://evil/ x"),
        ImageSpec("n", "copy:///r", packages=("bash;rm -rf /",)),
        ImageSpec("n", "copy:///r", packages=()),
        ImageSpec("n", "copy:///r", pins=(("bash", "5 1"),)),
        ImageSpec("n", "copy:///r", suite="../x"),
    ):
        with pytest.raises(ImageError):
            bad.check()


def test_pins_become_apt_preferences_and_are_removed_from_the_image(tmp_path: Path) -> None:
    spec = ImageSpec("n", "copy:///r", pins=(("bash", "5.2.15-2+b7"),))
    cmd = mmdebstrap_cmd(spec, tmp_path / "root", tmp_path / "prefs")
    assert f"--setup-hook=upload {tmp_path / 'prefs'} /etc/apt/preferences.d/gpufleet-image" in cmd
    assert '--customize-hook=rm -f "$1/etc/apt/preferences.d/gpufleet-image"' in cmd
    assert cmd[-1] == "deb [trusted=yes] copy:///r ./"


def test_manifest_round_trips_into_pins(tmp_path: Path) -> None:
    f = BuiltFile("images/n.img", 3 << 20, SHA)
    res = ImageResult("n", 1700000000, "u", f, f, f, {"bash": "5.2", "zlib1g": "1:1.2.13"})
    (tmp_path / "n.json").write_text(res.to_json())
    assert pins_from(tmp_path / "n.json") == (1700000000, (("bash", "5.2"), ("zlib1g", "1:1.2.13")))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ImageError):
        pins_from(tmp_path / "bad.json")


def test_fs_size_leaves_headroom_in_whole_mib() -> None:
    for used in (0, 1, 400_000_000):
        size = fs_size(used)
        assert size % (1 << 20) == 0 and size >= used * 1.3 + (128 << 20) - (1 << 20)


def test_renderer_gives_the_ramdisk_the_locked_hash_and_the_service_urls() -> None:
    site = parse_site(_site())
    node, seg = site.nodes[0], site.segments_by_name[site.nodes[0].segment]
    args = kernel_args(node, seg, "http://10.0.0.5:8081", {"debian-12-node": ImageRecord(7 << 20, SHA)})
    mac = node.macs[0].replace(":", "-")
    assert f"gpufleet.image_sha256={SHA}" in args
    assert f"gpufleet.image_size={7 << 20}" in args
    assert f"gpufleet.done_url=http://10.0.0.5:8081/done/{mac}" in args
    assert f"gpufleet.firstboot_url=http://10.0.0.5:8081/firstboot/{mac}.tar.gz" in args
    # Without a lock record the ramdisk gets no hash, and it refuses to write (deploy_init.sh).
    assert not [a for a in kernel_args(node, seg, "http://10.0.0.5:8081") if "sha256" in a]
    assert "sanboot --no-describe --drive 0x80" in local_script(node)


def test_done_switches_the_script_to_local_boot_and_drops_the_private_key(tmp_path: Path) -> None:
    site = parse_site(_site())
    (svc, *_) = render_site(site, images={"debian-12-node": ImageRecord(1 << 20, SHA)})
    for rel, text in svc.http_files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    mac = site.nodes[0].macs[0].replace(":", "-")
    (tmp_path / "firstboot").mkdir()
    (tmp_path / "firstboot" / f"{mac}.tar.gz").write_bytes(b"secret")
    assert "kernel " in (tmp_path / "ipxe" / f"{mac}.ipxe").read_text()
    assert not mark_done(tmp_path, "../../etc")
    assert not mark_done(tmp_path, "52-54-00-00-00-99")  # no node: nothing changes
    assert mark_done(tmp_path, mac)
    assert (tmp_path / "ipxe" / f"{mac}.ipxe").read_text() == svc.http_files[f"ipxe/local/{mac}.ipxe"]
    assert not (tmp_path / "firstboot" / f"{mac}.tar.gz").exists()


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen not installed")
def test_firstboot_data_carries_the_stores_key_and_is_deterministic(tmp_path: Path) -> None:
    raw = _site()
    site = parse_site(raw)
    node = site.nodes[0]
    store = HostKeyStore(tmp_path / "keys")
    key = store.get(node.hostname)
    assert store.get(node.hostname) == key  # generated once, then the same
    fp = subprocess.run(["ssh-keygen", "-l", "-f", str(tmp_path / "keys" / node.hostname / "ssh_host_ed25519_key")],
                        capture_output=True, text=True, check=True).stdout
    assert "ED25519" in fp
    tar = firstboot_tar(site, node, key)
    assert tar == firstboot_tar(site, node, key)
    (tmp_path / "fb.tar.gz").write_bytes(tar)
    listing = subprocess.run(["tar", "-tvzf", str(tmp_path / "fb.tar.gz")], capture_output=True, text=True,
                             check=True).stdout
    modes = {line.split()[-1].rstrip("/"): line.split()[0] for line in listing.splitlines()}
    assert modes["etc/ssh/ssh_host_ed25519_key"] == "-rw-------"
    assert modes["root/.ssh"] == "drwx------" and modes["root"] == "drwx------"
    members = subprocess.run(["tar", "-xzOf", str(tmp_path / "fb.tar.gz"), "etc/ssh/ssh_host_ed25519_key.pub",
                              "root/.ssh/authorized_keys", "etc/hostname"], capture_output=True, text=True,
                             check=True).stdout
    assert key.public in members and raw["admin_keys"][0] in members and node.hostname in members
    assert gzip.decompress(tar)  # gzip the ramdisk's busybox can unpack
    net = networkd_file(node, site.segments_by_name[node.segment])
    assert f"MACAddress={node.macs[0]}" in net and f"Address={node.address}/" in net


def test_cli_image_build_refuses_bad_input_with_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["image", "build", "Bad Name", "--repo", "copy:///r", "--out", str(tmp_path)]) == 2
    assert main(["image", "build", "n", "--repo", "ftp://x", "--out", str(tmp_path)]) == 2
    assert main(["image", "build", "n", "--repo", "copy:///r", "--out", str(tmp_path),
                 "--lock", str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err
    assert "image name" in err and "repository" in err and "--lock" in err
    assert "Traceback" not in err


def test_build_is_recorded_in_the_lock_and_replaced_by_a_rebuild(tmp_path: Path) -> None:
    lock_file = tmp_path / "lock.json"
    lock_file.write_text(Lock("site", [], []).to_json())
    out = tmp_path / "out"
    for rel, data in (("images/n.img", b"disk"), ("images/n.json", b"{}"), ("deploy/vmlinuz", b"k"),
                      ("deploy/initrd.img", b"i")):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data)

    def res(sha: str) -> ImageResult:
        return ImageResult("n", 1, "u", BuiltFile("images/n.img", 4, sha), BuiltFile("deploy/vmlinuz", 1, SHA),
                           BuiltFile("deploy/initrd.img", 1, SHA), {})

    record_in_lock(lock_file, res(SHA), out, ["iso"])
    record_in_lock(lock_file, res("cd" * 32), out, ["iso"])
    arts = json.loads(lock_file.read_text())["artifacts"]
    assert sorted(a["path"] for a in arts) == ["files/provision/deploy/initrd.img", "files/provision/deploy/vmlinuz",
                                                "files/provision/images/n.img", "files/provision/images/n.json"]
    disk = next(a for a in arts if a["path"] == "files/provision/images/n.img")
    assert (disk["sha256"], disk["size"], disk["segments"]) == ("cd" * 32, 4, ["iso"])
    # The other files' hashes are computed from the files themselves.
    kernel = next(a for a in arts if a["path"] == "files/provision/deploy/vmlinuz")
    assert kernel["sha256"] == "8254c329a92850f6d539dd376f4816ee2764517da5e0235514af433164480d7a"  # sha256(b"k")
