"""Shared by the image and deploy lab tests: a local flat apt repository and one image build from it.

The repository is made from Debian's own archive (the only registry these machines reach): one
mmdebstrap run against deb.debian.org installs the image's package set into a throwaway root and copies
the .deb files apt downloaded out of its cache; `dpkg-scanpackages --multiversion` indexes them. It is
cached under /var/cache/gpufleet/image-repo (GPUFLEET_IMAGE_REPO), like a lab mirror's flat repository.
Builds then read only that directory (`copy://`): no network.

"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from infra.provision.image import DEFAULT_PACKAGES

#: The gpufleet CLI of this interpreter (not whichever `gpufleet` is first on PATH, maybe another checkout's).
GPUFLEET = [sys.executable, "-m", "infra.cli"]
REPO = Path(os.environ.get("GPUFLEET_IMAGE_REPO", "/var/cache/gpufleet/image-repo"))
UPSTREAM = "http://deb.debian.org/debian"
#: Debian 12 with its point-release and security updates, like the lab's node base (infra/lab/rootfs.py): an
#: image older than the lab's repositories cannot install their packages (a security update of curl wants the
#: updated libssl3 the lab base has and the repository therefore does not carry).
SOURCES = (f"deb {UPSTREAM} bookworm main", f"deb {UPSTREAM} bookworm-updates main",
           "deb http://deb.debian.org/debian-security bookworm-security main")
IMAGE = "debian-12-node"


def need_build_tools() -> None:
    """Skip unless root with mmdebstrap, mke2fs, debugfs, dpkg-scanpackages."""
    if os.geteuid() != 0:
        pytest.skip("needs root (mmdebstrap --mode=root)")
    for tool in ("mmdebstrap", "mke2fs", "debugfs", "dpkg-scanpackages"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (./scripts/setup.sh --test)")


def _indexed() -> set[str]:
    index = REPO / "Packages"
    if not index.is_file():
        return set()
    return {line.split(":", 1)[1].strip() for line in index.read_text(encoding="utf-8").splitlines()
            if line.startswith("Package:")}


def make_repo(packages: Sequence[str] = DEFAULT_PACKAGES) -> Path:
    """The flat repository with every package an image of `packages` needs (made once, then reused).

    A cached repository that lacks a package the default list gained since (e.g. the UEFI bootloader
    packages), or was made from other sources, is filled up: the download runs again into the same pool
    (the newest version of each package wins in a build), and the index is rebuilt.
    """
    stamp = REPO / ".sources"
    made_from = stamp.read_text(encoding="utf-8").splitlines() if stamp.is_file() else []
    if set(packages) <= _indexed() and made_from == list(SOURCES):
        return REPO
    pool = REPO / "pool"
    pool.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mmdebstrap", "--variant=apt", "--mode=root", "--quiet", "--include=" + ",".join(packages),
         "--skip=essential/unlink", '--setup-hook=mkdir -p "$1"/var/cache/apt/archives',
         f"--customize-hook=sync-out /var/cache/apt/archives {pool}", "bookworm", "/dev/null", *SOURCES],
        check=True, capture_output=True, timeout=1200,
    )  # fmt: skip
    index = subprocess.run(["dpkg-scanpackages", "--multiversion", "pool"], cwd=REPO, check=True,
                           capture_output=True, timeout=300).stdout
    (REPO / "Packages.tmp").write_bytes(index)
    (REPO / "Packages.tmp").rename(REPO / "Packages")
    stamp.write_text("\n".join(SOURCES) + "\n", encoding="utf-8")
    return REPO


@pytest.fixture(scope="session")
def built_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One `gpufleet image build` of the default image from the local repository; its output directory.

    GPUFLEET_IMAGE_OUT names the output directory of a build made before (e.g. outside the VM lock, so a
    lock hold is not spent on the ~2 min build); it is used as it is.
    """
    given = os.environ.get("GPUFLEET_IMAGE_OUT")
    if given:
        yield Path(given)
        return
    need_build_tools()
    repo = make_repo()
    out = tmp_path_factory.mktemp("image") / "out"
    res = subprocess.run(
        [*GPUFLEET, "image", "build", IMAGE, "--repo", f"copy://{repo}",
         "--out", str(out)],
        capture_output=True, text=True, timeout=1800, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    print(res.stdout)  # size and build time: reported, never asserted
    yield out
    shutil.rmtree(out, ignore_errors=True)
