"""`gpufleet image build` is reproducible: a second build from the first build's manifest (its exact
package versions and SOURCE_DATE_EPOCH) gives byte-identical image, deploy kernel and deploy ramdisk.

Needs root and mmdebstrap; reads only the local flat repository (tests/lab/image_fixtures.py). No lab
resources (bridges, VMs) are used, so no lock is needed; it takes ~2 min per build on 2 cores.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from infra.provision.image import digest
from tests.lab.image_fixtures import GPUFLEET, IMAGE, built_image, make_repo

pytestmark = pytest.mark.lab
__all__ = ["built_image"]  # the fixture, re-exported for pytest


def test_second_build_from_the_manifest_has_the_same_sha256(built_image: Path, tmp_path: Path) -> None:
    manifest = json.loads((built_image / "images" / f"{IMAGE}.json").read_text())
    lock = tmp_path / "lock.json"
    lock.write_text(json.dumps({"format": 1, "site": "s", "declared": [], "artifacts": [], "baseline": "empty",
                                "notes": []}))
    out = tmp_path / "again"
    res = subprocess.run(
        [*GPUFLEET, "image", "build", IMAGE, "--repo", f"copy://{make_repo()}",
         "--out", str(out), "--pins", str(built_image / "images" / f"{IMAGE}.json"), "--lock", str(lock),
         "--segment", "iso"],
        capture_output=True, text=True, timeout=1800, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    print(res.stdout)
    for rel in (f"images/{IMAGE}.img", "deploy/vmlinuz", "deploy/initrd.img", f"images/{IMAGE}.json"):
        assert digest(out / rel) == digest(built_image / rel), rel
    # The manifest names a kernel and the packages first boot needs, each pinned to one version.
    for pkg in ("systemd", "openssh-server", "grub-pc-bin", "grub-efi-amd64-signed", "shim-signed", "python3"):
        assert manifest["packages"].get(pkg), pkg
    # Recorded in the lock with the image's own sha256 and size, for the bundle to carry.
    arts = {a["path"]: a for a in json.loads(lock.read_text())["artifacts"]}
    disk = arts[f"files/provision/images/{IMAGE}.img"]
    assert (disk["size"], disk["sha256"]) == (manifest["disk"]["size"], manifest["disk"]["sha256"])
    assert disk["segments"] == ["iso"] and disk["kind"] == "os-image"
    # ... and as an OS image with the package set it was built from (what `gpufleet lock` keeps).
    (image,) = json.loads(lock.read_text())["os_images"]
    assert (image["name"], image["sha256"]) == (IMAGE, manifest["disk"]["sha256"])
    assert image["size"] == manifest["disk"]["size"]
    assert image["packages"] == sorted(f"{k}={v}" for k, v in manifest["packages"].items())
    # One image for both boot modes: a GPT with the root, an EFI system partition and a BIOS boot partition.
    with (out / f"images/{IMAGE}.img").open("rb") as f:
        head = f.read(1024)
    assert head[450] == 0xEE and head[512:520] == b"EFI PART"
