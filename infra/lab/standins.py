"""Stand-in NVIDIA packages for the lab: SIMULATED, not NVIDIA software.

Built with dpkg-deb under exactly the names and versions `infra.plan.packages.packages_for()`
produces for Debian 12, several versions each so upgrades, downgrades and pinning can be
exercised. `STANDIN_VERSIONS` below is the one place listing those versions.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

from infra.lab.sh import run

DESCRIPTION = "SIMULATED — gpufleet lab stand-in, not NVIDIA software"
BUILDER_VERSION = 2  # bump when package contents change in a way the data below does not show

# The one data place of stand-in versions (upstream versions; Debian revision "-1" is appended
# where NVIDIA's Debian repository appends it, exactly as packages_for() pins them).
STANDIN_VERSIONS: dict[str, tuple[str, ...]] = {
    "driver": ("570.124.06", "570.133.20", "580.65.06", "580.95.05"),  # fabric manager: same list
    "cuda": ("12.8.1", "12.9.1", "13.0.2"),
    "container_toolkit": ("1.17.8-1", "1.18.0-1"),
    "dcgm": ("1:4.2.3-1", "1:4.4.1-1"),
}
# CUDA version a driver branch reports (nvidia-smi "CUDA Version").
DRIVER_BRANCH_CUDA = {"570": "12.8", "580": "13.0"}
DCGM_CUDA_MAJORS = ("12", "13")
TOOLKIT_NAMES = ("nvidia-container-toolkit", "nvidia-container-toolkit-base", "libnvidia-container-tools",
                 "libnvidia-container1")


@dataclass(frozen=True)
class StandIn:
    """One stand-in .deb: control fields and files (path inside the package → content, mode)."""

    name: str
    version: str
    depends: str = ""
    conflicts: str = ""
    provides: str = ""
    replaces: str = ""
    files: dict[str, tuple[str, int]] = field(default_factory=dict)
    postinst: str = ""

    @property
    def filename(self) -> str:
        """Debian pool file name (epoch dropped, as dpkg-name does)."""
        return f"{self.name}_{self.version.split(':')[-1]}_amd64.deb"

    def control(self) -> str:
        """DEBIAN/control text."""
        lines = [f"Package: {self.name}", f"Version: {self.version}", "Architecture: amd64",
                 "Maintainer: gpufleet lab <lab@gpufleet.invalid>", "Section: non-free/lab", "Priority: optional"]
        for key, value in (("Depends", self.depends), ("Conflicts", self.conflicts),
                           ("Provides", self.provides), ("Replaces", self.replaces)):
            if value:
                lines.append(f"{key}: {value}")
        lines.append(f"Description: {DESCRIPTION}")
        lines.append(f" Simulated {self.name} {self.version} for the gpufleet lab: no GPU, no kernel module.")
        return "\n".join(lines) + "\n"


def tool_script(module: str) -> str:
    """A stand-in tool as one self-contained python3 file (common helpers inlined)."""
    pkg = files("infra.lab.standin_bin")
    common = pkg.joinpath("common.py").read_text(encoding="utf-8")
    body = pkg.joinpath(f"{module}.py").read_text(encoding="utf-8")
    body = re.sub(r"try:  # installed.*?\nexcept ImportError:\n    from [^\n]+\n", "", body, flags=re.S)
    strip = re.compile(r"^from __future__ import annotations\n", re.M)
    return "#!/usr/bin/python3\nfrom __future__ import annotations\n" + strip.sub("", common) + "\n" + \
        strip.sub("", body)


def _daemon(name: str, what: str) -> str:
    return f"#!/bin/sh\n# {DESCRIPTION}: {what} does nothing but stay up.\necho '{name}: {DESCRIPTION}'\n" \
           "exec sleep infinity\n"


def _unit(description: str, exec_start: str) -> str:
    return (f"[Unit]\nDescription={description} ({DESCRIPTION})\n\n[Service]\nExecStart={exec_start}\n"
            "Restart=on-failure\n\n[Install]\nWantedBy=multi-user.target\n")


def _enable(unit: str) -> str:
    # Enable like the real packages' maintainer scripts do (deb-systemd-helper), start when systemd runs.
    return ("#!/bin/sh\nset -e\nif [ \"$1\" = configure ]; then\n"
            f"  deb-systemd-helper enable {unit} >/dev/null || true\n"
            "  if [ -d /run/systemd/system ]; then systemctl daemon-reload; "
            f"systemctl restart {unit} || true; fi\nfi\n")


def standin_packages() -> list[StandIn]:
    """Every stand-in package of every version in STANDIN_VERSIONS."""
    out: list[StandIn] = []
    smi, ctk, dcgmi = tool_script("nvidia_smi"), tool_script("nvidia_ctk"), tool_script("dcgmi")
    for upstream in STANDIN_VERSIONS["driver"]:
        v = f"{upstream}-1"
        branch = upstream.split(".")[0]
        driver_json = json.dumps({"version": upstream, "branch": branch, "cuda_version": DRIVER_BRANCH_CUDA[branch],
                                  "simulated": True}, sort_keys=True) + "\n"
        out.append(StandIn(
            "nvidia-driver", v,
            depends=f"python3, nvidia-kernel-open-dkms (= {v}) | nvidia-kernel-dkms (= {v})",
            files={"usr/bin/nvidia-smi": (smi, 0o755), "usr/lib/gpufleet-lab/driver.json": (driver_json, 0o644)}))
        for flavour, other in (("nvidia-kernel-open-dkms", "nvidia-kernel-dkms"),
                               ("nvidia-kernel-dkms", "nvidia-kernel-open-dkms")):
            out.append(StandIn(flavour, v, conflicts=other, replaces=other, files={
                f"usr/share/doc/{flavour}/SIMULATED": (f"{DESCRIPTION}: no kernel module is built.\n", 0o644)}))
        out.append(StandIn("nvidia-persistenced", v, files={
            "usr/bin/nvidia-persistenced": (_daemon("nvidia-persistenced", "the persistence daemon"), 0o755),
            "lib/systemd/system/nvidia-persistenced.service": (
                _unit("NVIDIA Persistence Daemon", "/usr/bin/nvidia-persistenced"), 0o644)},
            postinst=_enable("nvidia-persistenced.service")))
        out.append(StandIn(
            f"nvidia-fabricmanager-{branch}", v, provides="nvidia-fabricmanager", conflicts="nvidia-fabricmanager",
            replaces="nvidia-fabricmanager", files={
                "usr/bin/nv-fabricmanager": (_daemon("nv-fabricmanager", "fabric manager"), 0o755),
                "lib/systemd/system/nvidia-fabricmanager.service": (
                    _unit("NVIDIA fabric manager service", "/usr/bin/nv-fabricmanager"), 0o644)},
            postinst=_enable("nvidia-fabricmanager.service")))
    for upstream in STANDIN_VERSIONS["cuda"]:
        major, minor = upstream.split(".")[:2]
        nvcc = (f"#!/bin/sh\necho 'nvcc: NVIDIA (R) Cuda compiler driver ({DESCRIPTION})'\n"
                f"echo 'Cuda compilation tools, release {major}.{minor}, V{upstream}'\n")
        out.append(StandIn(f"cuda-toolkit-{major}-{minor}", f"{upstream}-1", files={
            f"usr/local/cuda-{major}.{minor}/bin/nvcc": (nvcc, 0o755),
            f"usr/local/cuda-{major}.{minor}/version.json": (
                json.dumps({"cuda": {"name": "CUDA SDK", "version": upstream}, "simulated": True}) + "\n", 0o644)}))
    for v in STANDIN_VERSIONS["container_toolkit"]:
        ver_json = json.dumps({"version": v, "simulated": True}) + "\n"
        out.append(StandIn("libnvidia-container1", v, files={
            "usr/share/doc/libnvidia-container1/SIMULATED": (DESCRIPTION + "\n", 0o644)}))
        out.append(StandIn("libnvidia-container-tools", v, depends=f"libnvidia-container1 (= {v})", files={
            "usr/bin/nvidia-container-cli": (
                f"#!/bin/sh\necho 'cli-version: {v.split('-')[0]} (simulated)'\n", 0o755)}))
        out.append(StandIn("nvidia-container-toolkit-base", v, depends="python3", files={
            "usr/bin/nvidia-ctk": (ctk, 0o755),
            "usr/lib/gpufleet-lab/container-toolkit.json": (ver_json, 0o644)}))
        out.append(StandIn(
            "nvidia-container-toolkit", v,
            depends=f"nvidia-container-toolkit-base (= {v}), libnvidia-container-tools (= {v})",
            files={"usr/bin/nvidia-container-runtime": (f"#!/bin/sh\necho '{DESCRIPTION}' >&2\nexit 1\n", 0o755)}))
    for v in STANDIN_VERSIONS["dcgm"]:
        for cuda_major in DCGM_CUDA_MAJORS:
            name = f"datacenter-gpu-manager-4-cuda{cuda_major}"
            others = ", ".join(f"datacenter-gpu-manager-4-cuda{m}" for m in DCGM_CUDA_MAJORS if m != cuda_major)
            out.append(StandIn(name, v, depends="python3", conflicts=others, replaces=others, files={
                "usr/bin/dcgmi": (dcgmi, 0o755),
                "usr/bin/nv-hostengine": (_daemon("nv-hostengine", "the DCGM host engine"), 0o755),
                "usr/lib/gpufleet-lab/dcgm.json": (json.dumps({"version": v, "simulated": True}) + "\n", 0o644),
                "lib/systemd/system/nvidia-dcgm.service": (
                    _unit("NVIDIA DCGM service", "/usr/bin/nv-hostengine"), 0o644)},
                postinst=_enable("nvidia-dcgm.service")))
    return out


STANDIN_NAMES = frozenset(
    {"nvidia-driver", "nvidia-kernel-open-dkms", "nvidia-kernel-dkms", "nvidia-persistenced", *TOOLKIT_NAMES}
    | {f"nvidia-fabricmanager-{v.split('.')[0]}" for v in STANDIN_VERSIONS["driver"]}
    | {f"cuda-toolkit-{v.split('.')[0]}-{v.split('.')[1]}" for v in STANDIN_VERSIONS["cuda"]}
    | {f"datacenter-gpu-manager-4-cuda{m}" for m in DCGM_CUDA_MAJORS}
)


def build_deb(pkg: StandIn, out_dir: Path, work: Path) -> Path:
    """Build one .deb with dpkg-deb (root-owned files, fixed mtimes for identical bytes on rebuild)."""
    root = work / f"{pkg.name}_{pkg.version.replace(':', '_')}"
    shutil.rmtree(root, ignore_errors=True)
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(pkg.control(), encoding="utf-8")
    if pkg.postinst:
        (root / "DEBIAN" / "postinst").write_text(pkg.postinst, encoding="utf-8")
        (root / "DEBIAN" / "postinst").chmod(0o755)
    for rel, (content, mode) in pkg.files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")
        path.chmod(mode)
    out = out_dir / pkg.filename
    run(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", root, out], timeout=60,
        env={"SOURCE_DATE_EPOCH": "1700000000", "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"})
    shutil.rmtree(root)
    return out


def standins_key() -> str:
    """Cache key of the stand-in set: changes with versions, control fields or tool sources."""
    data = [BUILDER_VERSION, [(p.control(), sorted(p.files.items()), p.postinst) for p in standin_packages()]]
    return hashlib.sha256(json.dumps(data).encode()).hexdigest()[:12]


def ensure_standins(cache: Path) -> Path:
    """Directory with every stand-in .deb, built once per key."""
    key = standins_key()
    out = cache / key
    if (out / ".complete").exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    work = cache / f"work-{key}"
    for pkg in standin_packages():
        build_deb(pkg, out, work)
    shutil.rmtree(work, ignore_errors=True)
    (out / ".complete").write_text(key + "\n")
    for old in cache.iterdir():  # earlier builds: the repos hold hard links, not references
        if old != out and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    return out
