"""Which OS packages, at which exact versions, a software profile means on a given OS.

This is the one place that knows NVIDIA's package names and version scheme. The plan hands these
lists to the roles, `gpufleet lock` resolves them to files, and the lab builds its stand-in
packages under the same names, so none of them keeps a copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from infra.model.site import ContainerEngine, OperatingSystem, Segment, Site, SoftwareProfile


class Component(StrEnum):
    """The part of the GPU stack a package belongs to (one Ansible role each)."""

    DRIVER = "nvidia_driver"
    FABRIC_MANAGER = "fabric_manager"
    CUDA = "cuda_toolkit"
    CONTAINER_RUNTIME = "container_runtime"
    CONTAINER_TOOLKIT = "nvidia_container_toolkit"
    DCGM = "dcgm"
    MONITORING = "monitoring"
    RDMA = "rdma"
    PROVISIONING = "provisioning"


@dataclass(frozen=True, order=True)
class Package:
    """One pinned OS package."""

    name: str
    version: str
    component: Component

    def as_dict(self) -> dict[str, str]:
        """Plain dict for role variables and JSON."""
        return {"name": self.name, "version": self.version}


@dataclass(frozen=True)
class _Family:
    """Naming and version scheme of NVIDIA's repository for one OS family."""

    driver_open: tuple[str, ...]
    driver_proprietary: tuple[str, ...]
    fabric_manager: str
    cuda: str
    container_toolkit: tuple[str, ...]
    dcgm: str
    runtime: dict[ContainerEngine, str]
    node_exporter: str
    rdma_core: tuple[str, ...]  # built from the rdma-core source package: one version
    perftest: str
    opensm: str
    revision: str  # package revision NVIDIA appends to an upstream version

    def pin(self, upstream: str) -> str:
        """Package version for an upstream version (`570.133.20` → `570.133.20-1`)."""
        return upstream if "-" in upstream else f"{upstream}{self.revision}"


_DEBIAN_RUNTIME = {
    ContainerEngine.CONTAINERD: "containerd",
    ContainerEngine.DOCKER: "docker.io",
    ContainerEngine.PODMAN: "podman",
}
_TOOLKIT = (
    "nvidia-container-toolkit",
    "nvidia-container-toolkit-base",
    "libnvidia-container-tools",
    "libnvidia-container1",
)

_DEBIAN = _Family(
    driver_open=("nvidia-driver", "nvidia-kernel-open-dkms", "nvidia-persistenced"),
    driver_proprietary=("nvidia-driver", "nvidia-kernel-dkms", "nvidia-persistenced"),
    fabric_manager="nvidia-fabricmanager-{branch}",
    cuda="cuda-toolkit-{major}-{minor}",
    container_toolkit=_TOOLKIT,
    dcgm="datacenter-gpu-manager-4-cuda{cuda_major}",
    runtime=_DEBIAN_RUNTIME,
    node_exporter="prometheus-node-exporter",
    rdma_core=("rdma-core", "ibverbs-providers", "ibverbs-utils", "rdmacm-utils", "infiniband-diags"),
    perftest="perftest",
    opensm="opensm",
    revision="-1",
)
_UBUNTU = _Family(
    driver_open=("nvidia-driver-{branch}-server-open", "nvidia-persistenced"),
    driver_proprietary=("nvidia-driver-{branch}-server", "nvidia-persistenced"),
    fabric_manager="nvidia-fabricmanager-{branch}",
    cuda="cuda-toolkit-{major}-{minor}",
    container_toolkit=_TOOLKIT,
    dcgm="datacenter-gpu-manager-4-cuda{cuda_major}",
    runtime=_DEBIAN_RUNTIME,
    node_exporter="prometheus-node-exporter",
    rdma_core=("rdma-core", "ibverbs-providers", "ibverbs-utils", "rdmacm-utils", "infiniband-diags"),
    perftest="perftest",
    opensm="opensm",
    revision="-0ubuntu1",
)
_RHEL = _Family(
    driver_open=("nvidia-driver", "kmod-nvidia-open-dkms", "nvidia-persistenced"),
    driver_proprietary=("nvidia-driver", "kmod-nvidia-latest-dkms", "nvidia-persistenced"),
    fabric_manager="nvidia-fabric-manager",
    cuda="cuda-toolkit-{major}-{minor}",
    container_toolkit=_TOOLKIT,
    dcgm="datacenter-gpu-manager-4-cuda{cuda_major}",
    runtime={
        ContainerEngine.CONTAINERD: "containerd.io",
        ContainerEngine.DOCKER: "docker-ce",
        ContainerEngine.PODMAN: "podman",
    },
    node_exporter="golang-github-prometheus-node-exporter",
    rdma_core=("rdma-core", "libibverbs", "libibverbs-utils", "librdmacm-utils", "infiniband-diags"),
    perftest="perftest",
    opensm="opensm",
    revision="-1.el9",
)

FAMILIES: dict[OperatingSystem, _Family] = {
    OperatingSystem.DEBIAN_12: _DEBIAN,
    OperatingSystem.UBUNTU_2204: _UBUNTU,
    OperatingSystem.UBUNTU_2404: _UBUNTU,
    OperatingSystem.RHEL_9: _RHEL,
}


def packages_for(
    profile: SoftwareProfile,
    os: OperatingSystem,
    *,
    fabric_manager: bool,
    container_runtime: bool = True,
    monitoring: bool = True,
    rdma: bool = False,
    subnet_manager: bool = False,
) -> list[Package]:
    """Every pinned package a node with this profile and OS gets, in install order."""
    fam = FAMILIES[os]
    branch = profile.driver.branch
    major, minor = profile.cuda.version.split(".")[:2]
    names = fam.driver_open if profile.driver.open_modules else fam.driver_proprietary
    driver_version = fam.pin(profile.driver.version)
    out = [Package(n.format(branch=branch), driver_version, Component.DRIVER) for n in names]
    if fabric_manager and profile.fabric_manager.version:
        out.append(
            Package(
                fam.fabric_manager.format(branch=branch),
                fam.pin(profile.fabric_manager.version),
                Component.FABRIC_MANAGER,
            )
        )
    out.append(Package(fam.cuda.format(major=major, minor=minor), fam.pin(profile.cuda.version), Component.CUDA))
    if container_runtime:
        rt = profile.container_runtime
        out.append(Package(fam.runtime[rt.engine], rt.version, Component.CONTAINER_RUNTIME))
    out.extend(
        Package(n, fam.pin(profile.container_toolkit.version), Component.CONTAINER_TOOLKIT)
        for n in fam.container_toolkit
    )
    if profile.dcgm.enabled and profile.dcgm.version:
        out.append(Package(fam.dcgm.format(cuda_major=major), profile.dcgm.version, Component.DCGM))
    if monitoring and profile.monitoring.node_exporter_version:
        out.append(Package(fam.node_exporter, profile.monitoring.node_exporter_version, Component.MONITORING))
    if rdma and profile.rdma is not None:
        # Distribution packages: their versions are the distribution's, written in full in the profile.
        out.extend(Package(n, profile.rdma.version, Component.RDMA) for n in fam.rdma_core)
        out.append(Package(fam.perftest, profile.rdma.perftest_version, Component.RDMA))
        if subnet_manager and profile.rdma.opensm_version:
            out.append(Package(fam.opensm, profile.rdma.opensm_version, Component.RDMA))
    return out


PROMETHEUS_PACKAGE = "prometheus"
ALERTMANAGER_PACKAGE = "prometheus-alertmanager"


def monitoring_server_packages(site: Site) -> list[Package]:
    """The pinned packages every Prometheus host installs (Debian's names; none when no versions are pinned).

    One place for the `monitoring_server` role (through infra/observe/server.py) and the air-gap lock and
    bundle (infra/bundle/declared.py), so a mirror-hosted Prometheus installs from what the bundle carried.
    """
    obs = site.observability
    out = []
    if obs.prometheus_version:
        out.append(Package(PROMETHEUS_PACKAGE, obs.prometheus_version, Component.MONITORING))
    if obs.alertmanager_version:
        out.append(Package(ALERTMANAGER_PACKAGE, obs.alertmanager_version, Component.MONITORING))
    return out


DNSMASQ_PACKAGE = "dnsmasq-base"
IPXE_PACKAGE = "ipxe"
#: The provisioning entry's version field of each package the provisioning service installs.
PROVISIONING_VERSION_FIELDS = (("dnsmasq_version", DNSMASQ_PACKAGE), ("ipxe_version", IPXE_PACKAGE))


def provisioning_packages(segment: Segment) -> list[Package]:
    """The pinned packages a segment's provisioning host installs: those of `dnsmasq-base`/`ipxe` the stack pins.

    One place for `roles/provisioning` (through infra/provision/service.py, which refuses an unset one) and the
    lock and bundle (infra/bundle/declared.py), so an air-gapped mirror carries what its service installs.
    """
    prov = segment.provisioning
    if prov is None:
        return []
    return [Package(name, v, Component.PROVISIONING)
            for key, name in PROVISIONING_VERSION_FIELDS if (v := getattr(prov, key)) is not None]
