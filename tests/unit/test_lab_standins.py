"""Stand-in NVIDIA packages: names/versions exactly as the plan pins them, SIMULATED label, real .debs."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from infra.lab import vm
from infra.lab.config import gpus_json
from infra.lab.standins import (
    DESCRIPTION,
    STANDIN_NAMES,
    STANDIN_VERSIONS,
    build_deb,
    standin_packages,
    tool_script,
)
from infra.model.load import load_site
from infra.model.site import (
    ContainerEngine,
    ContainerRuntimeSpec,
    ContainerToolkitSpec,
    CudaSpec,
    DcgmSpec,
    DriverSpec,
    FabricManagerSpec,
    OperatingSystem,
    SoftwareProfile,
)
from infra.plan.nodestate import CAPABILITIES_FACT_FILE
from infra.plan.packages import packages_for

needs_dpkg = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb not installed")


def make_profile(driver: str, cuda: str, toolkit: str, dcgm: str, open_modules: bool = True) -> SoftwareProfile:
    """A pinned profile from stand-in versions."""
    return SoftwareProfile(
        driver=DriverSpec(branch=driver.split(".")[0], version=driver, open_modules=open_modules),
        cuda=CudaSpec(version=cuda),
        container_runtime=ContainerRuntimeSpec(engine=ContainerEngine.PODMAN, version="4.3.1+ds1-8+deb12u1+b3"),
        container_toolkit=ContainerToolkitSpec(version=toolkit),
        fabric_manager=FabricManagerSpec(enabled=True, version=driver),
        dcgm=DcgmSpec(enabled=True, version=dcgm),
    )


@pytest.mark.parametrize("open_modules", [True, False])
def test_every_pinnable_combination_has_a_standin(open_modules: bool) -> None:
    """For each stand-in version combination, every NVIDIA package packages_for() pins exists at that version."""
    built = {(p.name, p.version) for p in standin_packages()}
    for driver in STANDIN_VERSIONS["driver"]:
        for cuda in STANDIN_VERSIONS["cuda"]:
            for toolkit in STANDIN_VERSIONS["container_toolkit"]:
                for dcgm in STANDIN_VERSIONS["dcgm"]:
                    pins = packages_for(make_profile(driver, cuda, toolkit, dcgm, open_modules),
                                        OperatingSystem.DEBIAN_12, fabric_manager=True)
                    for p in pins:
                        if p.name in STANDIN_NAMES:
                            assert (p.name, p.version) in built, f"missing stand-in {p.name}={p.version}"
                    # Everything else the plan pins is a Debian package, fetched for real.
                    assert {p.name for p in pins} - STANDIN_NAMES == {"podman"}


def test_every_package_is_labelled_simulated() -> None:
    """Each control file says SIMULATED, not NVIDIA software, in its Description."""
    for p in standin_packages():
        assert f"Description: {DESCRIPTION}" in p.control()
        assert "SIMULATED" in DESCRIPTION and "not NVIDIA software" in DESCRIPTION


def test_kernel_module_flavours_conflict_and_driver_accepts_either() -> None:
    """Open and proprietary module packages conflict; the driver depends on exactly its own version of either."""
    pkgs = {(p.name, p.version): p for p in standin_packages()}
    open_ = pkgs[("nvidia-kernel-open-dkms", "570.133.20-1")]
    prop = pkgs[("nvidia-kernel-dkms", "570.133.20-1")]
    assert "nvidia-kernel-dkms" in open_.conflicts and "nvidia-kernel-open-dkms" in prop.conflicts
    drv = pkgs[("nvidia-driver", "570.133.20-1")]
    assert "nvidia-kernel-open-dkms (= 570.133.20-1) | nvidia-kernel-dkms (= 570.133.20-1)" in drv.depends


def test_fabric_manager_branches_replace_each_other() -> None:
    """nvidia-fabricmanager-570 and -580 provide/conflict/replace one virtual name, so a branch change swaps them."""
    for p in standin_packages():
        if p.name.startswith("nvidia-fabricmanager-"):
            assert p.provides == p.conflicts == p.replaces == "nvidia-fabricmanager"


def test_tool_scripts_are_self_contained() -> None:
    """The shipped nvidia-smi is one python3 file with the helpers inlined (no import of the repo)."""
    text = tool_script("nvidia_smi")
    assert text.startswith("#!/usr/bin/python3\n")
    assert "infra.lab" not in text and "from common import" not in text
    compile(text, "nvidia-smi", "exec")


@needs_dpkg
def test_built_deb_has_fields_and_files(tmp_path: Path) -> None:
    """dpkg-deb builds a package whose control fields and file list match the stand-in definition."""
    pkg = next(p for p in standin_packages() if p.name == "nvidia-driver" and p.version == "580.95.05-1")
    deb = build_deb(pkg, tmp_path, tmp_path / "work")
    assert deb.name == "nvidia-driver_580.95.05-1_amd64.deb"
    field = lambda f: subprocess.run(["dpkg-deb", "-f", str(deb), f], capture_output=True, text=True,  # noqa: E731
                                     check=True).stdout.strip()
    assert field("Package") == "nvidia-driver" and field("Version") == "580.95.05-1"
    assert field("Description").startswith(DESCRIPTION)
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True).stdout
    assert "./usr/bin/nvidia-smi" in listing and "root/root" in listing and "-rwxr-xr-x" in listing
    contents = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, check=True).stdout
    assert b'"version": "580.95.05"' in contents and b'"cuda_version": "13.0"' in contents


@needs_dpkg
def test_epoch_version_builds_with_pool_filename(tmp_path: Path) -> None:
    """DCGM's epoch version (1:4.2.3-1) keeps the epoch in the control file and drops it from the file name."""
    pkg = next(p for p in standin_packages()
               if p.name == "datacenter-gpu-manager-4-cuda12" and p.version == "1:4.2.3-1")
    deb = build_deb(pkg, tmp_path, tmp_path / "work")
    assert deb.name == "datacenter-gpu-manager-4-cuda12_4.2.3-1_amd64.deb"
    version = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True, check=True)
    assert version.stdout.strip() == "1:4.2.3-1"


@needs_dpkg
def test_vm_declarations_package_carries_each_vm_nodes_gpus_and_the_capability(tmp_path: Path) -> None:
    """The VM nodes' lab package: a real .deb, SIMULATED, the capabilities fact (no NVIDIA module), each node's
    GPUs exactly as the lab declares them for an nspawn node (gpus_json), a boot unit enabled by postinst."""
    site = load_site("lab")
    deb = vm.declarations_deb(site, ["lab-gpu03", "lab-gpu01"], tmp_path / "out", tmp_path / "work")
    info = subprocess.run(["dpkg-deb", "--info", deb], capture_output=True, text=True, check=True).stdout
    assert f"Package: {vm.DECLARATIONS_PACKAGE}" in info and DESCRIPTION in info
    postinst = subprocess.run(["dpkg-deb", "--info", deb, "postinst"], capture_output=True, text=True).stdout
    assert "deb-systemd-helper enable gpufleet-lab-vm-declare.service" in postinst
    tree = tmp_path / "x"
    subprocess.run(["dpkg-deb", "-x", deb, tree], check=True)
    assert json.loads((tree / CAPABILITIES_FACT_FILE.lstrip("/")).read_text()) == {"kernel_modules": False}
    for host in ("lab-gpu01", "lab-gpu03"):
        assert json.loads((tree / f"usr/lib/gpufleet-lab/vm-gpus/{host}.json").read_text()) == gpus_json(site, host)
    unit = (tree / "lib/systemd/system/gpufleet-lab-vm-declare.service").read_text()
    assert "Before=ssh.service" in unit and "ConditionPathExists=!/etc/gpufleet-lab/gpus.json" in unit
    # Content decides the version: another node set is another package version.
    other = vm.declarations(site, ["lab-gpu01"])
    assert other.version != vm.declarations(site, ["lab-gpu01", "lab-gpu03"]).version
