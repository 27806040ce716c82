"""Shared by lab tests: the gpufleet CLI, SSH to lab hosts, run recaps, and what the lab's repositories carry."""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

from infra.lab import repo, rootfs, standins
from infra.lab.config import Paths, lab_spec
from infra.lab.session import Lab
from infra.model.load import project_dir, stack_path


def lab_debs() -> tuple[list[Path], Path]:
    """The .debs `gpufleet lab up` seeds every serving host with (Debian seed closure + NVIDIA stand-ins) and the
    lab's node base root (the closure was computed against it). Built once and cached, like `lab up` does."""
    paths = Paths.from_env()
    key, bases = rootfs.ensure_rootfs(paths, rootfs.seed_package_specs(lab_spec("lab", stack_path("lab"))))
    debs = sorted([*rootfs.seed_debs_path(paths, key).glob("*.deb"),
                   *standins.ensure_standins(paths.standins_dir).glob("*.deb")])
    return debs, bases["node"]


def installed_packages(status: Path) -> list[str]:
    """Names of the packages a dpkg status file lists as installed."""
    names, name = [], ""
    for line in status.read_text(encoding="utf-8").splitlines():
        if line.startswith("Package: "):
            name = line.split()[1]
        elif line.startswith("Status: ") and line.endswith(" installed"):
            names.append(name)
    return names


def reseed_mirror_unless(package: str) -> None:
    """Put the lab's own seed back on lab-mirror unless its repository already serves `package`.

    A bundle imported by an earlier lab test replaces the mirror's repository, and the lab's seeding then leaves
    it alone; a test that needs a package a bundle does not carry restores the seed, as `lab up` does on a
    fresh lab.
    """
    with urllib.request.urlopen("http://198.18.2.10/apt/Packages", timeout=10) as r:
        if f"\nPackage: {package}\n".encode() in b"\n" + r.read():
            return
    spec, paths = lab_spec("lab"), Paths.from_env()
    srv = paths.srv_dir / "lab-mirror"
    (srv / "apt" / ".gpufleet-seed").unlink(missing_ok=True)
    repo.seed_repo("lab-mirror", srv, lab_debs()[0], paths.gnupg_dir / "lab-mirror", spec.keyrings["lab-mirror"],
                   paths.files_dir, scan_cache=paths.cache / "scan")


def gpufleet_cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """`gpufleet ARGS` as a subprocess from the project directory (this interpreter's infra.cli)."""
    return subprocess.run([sys.executable, "-m", "infra.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=project_dir(), check=False)


def lab_ssh(lab: Lab, host: str, command: str) -> subprocess.CompletedProcess[str]:
    """A command on a lab host over the lab's SSH config."""
    return subprocess.run(["ssh", "-F", str(lab.spec.ssh_config), host, command], capture_output=True, text=True,
                          timeout=60, check=False)


def recap(run: dict[str, Any]) -> dict[str, tuple[bool, int]]:
    """host → (succeeded, number of changed tasks) of a `--json` converge report."""
    return {h: (r["succeeded"], len(r["changed_tasks"])) for h, r in run["hosts"].items()}
