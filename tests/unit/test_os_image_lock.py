"""OS images in the lock: recorded by `image build --lock`, kept across `gpufleet lock`, required by `validate`;
and the provisioning server's handling of a deploy that reports FAILED."""

from __future__ import annotations

import hashlib
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from functools import partial
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.bundle.lock import (
    OS_IMAGE_KIND,
    Artifact,
    Lock,
    LockError,
    carry_os_images,
    lock_path_for,
    unlocked_images,
)
from infra.cli import main
from infra.commands.provision import record_in_lock
from infra.model.load import parse_site
from infra.provision.httpd import Handler
from infra.provision.image import BuiltFile, ImageResult
from infra.provision.render import ImageRecord, render_site
from tests.unit.factories import make_site

SHA = "ab" * 32


def _raw() -> dict[str, Any]:
    site = make_site()
    site["segments"][0]["provisioning"] = {"host": "pxe01", "address": "10.0.0.5"}
    site["nodes"][0] |= {"image": "debian-12-node", "root_disk": {"serial": "GPF0001"}, "boot_mode": "uefi"}
    return site


def _built(tmp_path: Path, name: str = "debian-12-node") -> tuple[ImageResult, Path]:
    out = tmp_path / "out"
    files = {f"images/{name}.img": b"disk", f"images/{name}.json": b"{}", "deploy/vmlinuz": b"k",
             "deploy/initrd.img": b"i"}
    for rel, data in files.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data)
    disk_sha = hashlib.sha256(b"disk").hexdigest()
    res = ImageResult(name, 1735689600, "u", BuiltFile(f"images/{name}.img", 4, disk_sha),
                      BuiltFile("deploy/vmlinuz", 1, SHA), BuiltFile("deploy/initrd.img", 1, SHA),
                      {"systemd": "252.39-1~deb12u2", "grub-efi-amd64-signed": "1+2.06+13+deb12u2"})
    return res, out


def test_the_build_records_name_sha256_size_and_package_set(tmp_path: Path) -> None:
    lock_file = tmp_path / "lock.json"
    lock_file.write_text(Lock("site", [], []).to_json())
    res, out = _built(tmp_path)
    record_in_lock(lock_file, res, out, ["iso"])
    data = json.loads(lock_file.read_text())
    assert data["os_images"] == [{
        "name": "debian-12-node", "sha256": hashlib.sha256(b"disk").hexdigest(), "size": 4, "epoch": 1735689600,
        "packages": ["grub-efi-amd64-signed=1+2.06+13+deb12u2", "systemd=252.39-1~deb12u2"], "segments": ["iso"],
    }]
    assert Lock.from_json(lock_file.read_text()).to_json() == lock_file.read_text()  # round trip, same bytes
    # A lock without images keeps the exact text it had before os_images existed.
    assert "os_images" not in Lock("site", [], []).to_json()


@pytest.mark.parametrize("bad", [
    {"os_images": {}},
    {"os_images": [{"name": "x"}]},
    {"os_images": [{"name": "x", "sha256": SHA, "size": "4", "epoch": 1, "packages": [], "segments": []}]},
    {"os_images": [{"name": "x", "sha256": SHA, "size": 4, "epoch": 1, "packages": [1], "segments": []}]},
])
def test_a_malformed_os_images_entry_is_refused(bad: dict[str, Any]) -> None:
    text = json.dumps({"format": 1, "site": "s", "declared": [], "artifacts": []} | bad)
    with pytest.raises(LockError, match="os_images"):
        Lock.from_json(text)


def test_a_relock_keeps_the_images_and_widens_their_segments_to_the_nodes(tmp_path: Path) -> None:
    lock_file = tmp_path / "lock.json"
    lock_file.write_text(Lock("site", [], []).to_json())
    res, out = _built(tmp_path)
    record_in_lock(lock_file, res, out, [])
    res2, out2 = _built(tmp_path / "b", "spare-image")
    record_in_lock(lock_file, res2, out2, ["iso"])
    old = Lock.from_json(lock_file.read_text())
    site = parse_site(_raw())
    deb = Artifact("deb", "podman", "4.3.1", "apt/podman.deb", 1, SHA, "http://deb", (site.nodes[0].segment,), True)
    new = Lock("site", [], [deb])
    carry_os_images(old, new, site)
    assert {a.name for a in new.artifacts if a.kind == OS_IMAGE_KIND} == {
        "debian-12-node", "debian-12-node.json", "debian-12-node:deploy-kernel", "debian-12-node:deploy-initrd",
        "spare-image", "spare-image.json", "spare-image:deploy-kernel", "spare-image:deploy-initrd"}
    assert deb in new.artifacts
    seg = site.nodes[0].segment
    images = {i.name: i for i in new.os_images}
    assert images["debian-12-node"].segments == (seg,)  # the node's segment: its bundle carries the image
    assert all(a.segments == (seg,) for a in new.artifacts if a.name.startswith("debian-12-node"))
    assert images["spare-image"].segments == ("iso",)
    assert new.notes == ["os-image spare-image: no node names it (kept from the previous lock)"]
    assert images["debian-12-node"].packages == old.os_images[0].packages
    assert unlocked_images(site, new) == []
    # The bundle of the node's segment gets the disk image and deploy files.
    assert {a.path for a in new.for_segment(seg) if a.kind == OS_IMAGE_KIND} == {
        "files/provision/images/debian-12-node.img", "files/provision/images/debian-12-node.json",
        "files/provision/deploy/vmlinuz", "files/provision/deploy/initrd.img"}


def test_validate_refuses_a_node_whose_image_is_not_locked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stack = tmp_path / "Pulumi.t.yaml"
    stack.write_text(yaml.safe_dump({"config": {"gpufleet:site": _raw()}}))
    lock_file = lock_path_for(stack)
    assert main(["validate", "--stack-file", str(stack)]) == 2  # no lock at all
    err = capsys.readouterr().err
    assert "config.gpufleet:site.nodes[0].image: OS image 'debian-12-node' is not locked: there is no lock file" in err
    assert "gpufleet image build debian-12-node" in err and "Traceback" not in err

    lock_file.write_text(Lock("t", [], []).to_json())
    assert main(["validate", "--stack-file", str(stack), "--json"]) == 2  # a lock without the image
    data = json.loads(capsys.readouterr().out)
    assert [p["path"] for p in data["problems"]] == ["config.gpufleet:site.nodes[0].image"]
    assert "has no os_images entry" in data["problems"][0]["message"]

    res, out = _built(tmp_path)
    record_in_lock(lock_file, res, out, [])
    assert main(["validate", "--stack-file", str(stack)]) == 0

    lock_file.write_text("{not json")
    assert main(["validate", "--stack-file", str(stack)]) == 2
    assert "cannot be read" in capsys.readouterr().err


def test_lock_check_names_an_unlocked_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stack = tmp_path / "Pulumi.t.yaml"
    stack.write_text(yaml.safe_dump({"config": {"gpufleet:site": _raw()}}))
    lock_path_for(stack).write_text(Lock("t", [], []).to_json())
    assert main(["lock", "--check", "--stack-file", str(stack)]) == 1
    assert "nodes[0].image debian-12-node: not in the lock" in capsys.readouterr().out


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Path, str]]:
    site = parse_site(_raw())
    (svc, *_) = render_site(site, images={"debian-12-node": ImageRecord(1 << 20, SHA)})
    for rel, text in svc.http_files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    mac = site.nodes[0].macs[0].replace(":", "-")
    (tmp_path / "firstboot").mkdir()
    (tmp_path / "firstboot" / f"{mac}.tar.gz").write_bytes(b"secret")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(tmp_path)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", tmp_path, mac
    finally:
        httpd.shutdown()
        httpd.server_close()


def _post(url: str, body: str) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body.encode(), method="POST"), timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_a_failed_deploy_is_recorded_and_switches_nothing(served: tuple[str, Path, str]) -> None:
    base, root, mac = served
    install = (root / "ipxe" / f"{mac}.ipxe").read_text()
    # What deploy_init.sh's report_failed sends (busybox wget --post-data, reason with `+` for blanks).
    body = "status=failed&reason=root+disk+hint+'path:/dev/disk/by-id/virtio-X'+matches+0+disks"
    assert _post(f"{base}/done/{mac}", body) == 202
    assert (root / "failed" / f"{mac}.txt").read_text() == (
        "root disk hint 'path:/dev/disk/by-id/virtio-X' matches 0 disks\n")
    assert (root / "ipxe" / f"{mac}.ipxe").read_text() == install  # still "install": the next boot retries
    assert (root / "firstboot" / f"{mac}.tar.gz").exists()
    assert _post(f"{base}/done/52-54-00-00-00-99", body) == 404  # no such node
    # Then the retry succeeds: the script switches to local boot, the private key is deleted.
    assert _post(f"{base}/done/{mac}", f"sha256={SHA}") == 204
    assert (root / "ipxe" / f"{mac}.ipxe").read_text() == (root / "ipxe" / "local" / f"{mac}.ipxe").read_text()
    assert not (root / "firstboot" / f"{mac}.tar.gz").exists()


def test_gpufleet_lock_rewrites_the_lock_and_keeps_the_images(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    stack = tmp_path / "Pulumi.t.yaml"
    stack.write_text(yaml.safe_dump({"config": {"gpufleet:site": _raw()}}))
    lock_file = lock_path_for(stack)
    lock_file.write_text(Lock("t", [], []).to_json())
    res, out = _built(tmp_path)
    record_in_lock(lock_file, res, out, [])
    before = Lock.from_json(lock_file.read_text())
    deb = Artifact("deb", "podman", "4.3.1", "apt/podman.deb", 1, SHA, "http://deb", ("s",), True)
    # The resolver (network) stands in for a fresh resolution that knows nothing of images.
    monkeypatch.setattr("infra.commands.lock.resolve", lambda site, opts: Lock("t", [], [deb]))
    assert main(["lock", "--stack-file", str(stack)]) == 0
    after = Lock.from_json(lock_file.read_text())
    assert deb in after.artifacts
    assert [i.name for i in after.os_images] == ["debian-12-node"]
    assert after.os_images[0].packages == before.os_images[0].packages
    assert len([a for a in after.artifacts if a.kind == OS_IMAGE_KIND]) == 4
    assert main(["validate", "--stack-file", str(stack)]) == 0
    capsys.readouterr()
