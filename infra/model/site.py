"""The typed site model: what a stack file's `gpufleet:site` object may say.

Field-level rules live on the fields; rules that need more than one field live in
`infra.model.rules` so that every problem is reported at once with its config path.
"""

from __future__ import annotations

import re
from enum import StrEnum
from ipaddress import IPv4Address, IPv4Network
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

# Upstream version with optional epoch, Debian/RPM suffixes (`1:4.2.3-1`, `4.3.1+ds1-8+deb12u1+b3`).
_EXACT_VERSION = re.compile(r"^(\d+:)?\d+(\.\d+)+([~+][0-9A-Za-z.+~]*)?(-[0-9A-Za-z.+~]+)?$")
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_HOSTNAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")


def _exact_version(value: str) -> str:
    if not _EXACT_VERSION.match(value):
        raise ValueError(
            f"{value!r} is not an exact version; pin it (for example '570.133.20' or '1.17.8-1'), "
            "ranges, branches and 'latest' make rebuilds non-reproducible"
        )
    return value


def _mac(value: str) -> str:
    lowered = value.lower()
    if not _MAC.match(lowered):
        raise ValueError(f"{value!r} is not a MAC address; write it as 'aa:bb:cc:dd:ee:ff'")
    return lowered


def _hostname(value: str) -> str:
    if not _HOSTNAME.match(value):
        raise ValueError(f"{value!r} is not a valid hostname; use lower-case letters, digits and '-'")
    return value


def _image_digest(value: str) -> str:
    if not _DIGEST.search(value):
        raise ValueError(
            f"image {value!r} has no digest; pin it as 'registry/repo@sha256:<64 hex>' (tags move, digests do not)"
        )
    return value


ExactVersion = Annotated[str, AfterValidator(_exact_version)]
MacAddress = Annotated[str, AfterValidator(_mac)]
Hostname = Annotated[str, AfterValidator(_hostname)]
ImageRef = Annotated[str, AfterValidator(_image_digest)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class RebootPolicy(StrEnum):
    """When a converge may reboot a node."""

    IF_REQUIRED = "if-required"
    NEVER = "never"


class Engine(StrEnum):
    """Inference engines gpufleet can deploy."""

    VLLM = "vllm"
    TGI = "tgi"
    TRITON = "triton"
    LLAMACPP = "llamacpp"


class ContainerEngine(StrEnum):
    """Container runtimes the `container_runtime` role installs."""

    CONTAINERD = "containerd"
    DOCKER = "docker"
    PODMAN = "podman"


class DType(StrEnum):
    """Weight precision or quantisation of a served model."""

    BF16 = "bf16"
    FP16 = "fp16"
    FP8 = "fp8"
    INT8 = "int8"
    INT4 = "int4"
    AWQ = "awq"
    GPTQ = "gptq"


class KvCacheDType(StrEnum):
    """Precision of the KV cache; `auto` follows the model (fp16 for quantised weights)."""

    AUTO = "auto"
    FP16 = "fp16"
    BF16 = "bf16"
    FP8 = "fp8"


class OperatingSystem(StrEnum):
    """Operating systems supported on GPU nodes."""

    UBUNTU_2204 = "ubuntu-22.04"
    UBUNTU_2404 = "ubuntu-24.04"
    DEBIAN_12 = "debian-12"
    RHEL_9 = "rhel-9"


class NodeRole(StrEnum):
    """What a node is for; decides which Ansible roles run on it."""

    INFERENCE = "inference"
    MONITORING = "monitoring"


class SecretRef(_Model):
    """Where a secret comes from. The model never holds the secret itself.

    Exactly one of `config`, `env`, `file` is set. Under `pulumi up` the `config` key is read as a
    Pulumi secret; the `gpufleet` CLI (break-glass, tests) reads `GPUFLEET_SECRET_<KEY>` or the file.
    """

    config: str | None = Field(default=None, pattern=r"^[a-zA-Z][\w.-]*$")
    """Pulumi config key (in this project's namespace) holding the value as a `secure:` secret."""
    env: str | None = Field(default=None, pattern=r"^[A-Z_][A-Z0-9_]*$")
    """Environment variable holding the value."""
    file: str | None = Field(default=None, pattern=r"^/")
    """Absolute path of a file holding the value (mode 0600 recommended)."""

    @model_validator(mode="after")
    def _exactly_one(self) -> SecretRef:
        if sum(x is not None for x in (self.config, self.env, self.file)) != 1:
            raise ValueError(
                "a secret reference names exactly one of `config`, `env` or `file`; "
                "put the secret itself in Pulumi config (`pulumi config set --secret KEY`) and refer to it"
            )
        return self

    def describe(self) -> str:
        """Where the secret comes from, for messages (never the value)."""
        if self.config:
            return f"config:{self.config}"
        return f"env:{self.env}" if self.env else f"file:{self.file}"


class RolloutPolicy(_Model):
    """How nodes of one segment are converged: in batches, stopping on failures."""

    batch_size: int = Field(default=1, ge=1)
    """Nodes converged at once within a segment (also the most that may be unavailable)."""
    max_failures: int = Field(default=0, ge=0)
    """Failed nodes tolerated before the rollout stops; 0 stops at the first failure."""


class RebootSettings(_Model):
    """Site-wide reboot policy."""

    policy: RebootPolicy = RebootPolicy.IF_REQUIRED
    """`if-required`: reboot when a driver change needs it; `never`: only report `reboot_required`."""
    timeout_s: int = Field(default=900, ge=60, le=7200)
    """How long to wait for a node to come back after a reboot."""


class DriverSpec(_Model):
    """NVIDIA data-centre driver pin."""

    branch: str = Field(pattern=r"^\d{3}$")
    """Driver branch, e.g. `570`; must be the branch of `version`."""
    version: ExactVersion
    """Exact driver version, e.g. `570.133.20`."""
    open_modules: bool = True
    """Use the open GPU kernel modules (required on Hopper and newer); false for proprietary."""


class CudaSpec(_Model):
    """CUDA toolkit pin."""

    version: ExactVersion
    """Exact toolkit version, e.g. `12.8.1`."""


class ContainerRuntimeSpec(_Model):
    """Container runtime pin."""

    engine: ContainerEngine = ContainerEngine.CONTAINERD
    """Which runtime: containerd, docker or podman."""
    version: ExactVersion
    """Exact package version of the runtime."""


class ContainerToolkitSpec(_Model):
    """nvidia-container-toolkit pin."""

    version: ExactVersion
    """Exact package version, e.g. `1.17.8-1`."""


class FabricManagerSpec(_Model):
    """NVIDIA fabric manager (required on NVSwitch systems)."""

    enabled: bool = False
    """Install and run fabric manager; required for nodes with NVSwitch."""
    version: ExactVersion | None = None
    """Exact version; must equal the driver version."""


class DcgmSpec(_Model):
    """NVIDIA Data Center GPU Manager pin."""

    enabled: bool = True
    """Install DCGM (health checks and the DCGM exporter's data source)."""
    version: ExactVersion | None = None
    """Exact DCGM package version, e.g. `1:4.2.3-1`."""


class MonitoringSpec(_Model):
    """Node and GPU metrics exporters."""

    node_exporter_version: ExactVersion | None = None
    """Exact prometheus-node-exporter package version; unset to skip it."""
    dcgm_exporter_image: ImageRef | None = None
    """DCGM exporter container image by digest; unset to skip it."""


class SoftwareProfile(_Model):
    """One pinned GPU software stack; nodes refer to it by name."""

    driver: DriverSpec
    """NVIDIA driver branch and version."""
    cuda: CudaSpec
    """CUDA toolkit version."""
    container_runtime: ContainerRuntimeSpec
    """Container runtime and version."""
    container_toolkit: ContainerToolkitSpec
    """nvidia-container-toolkit version."""
    fabric_manager: FabricManagerSpec = FabricManagerSpec()
    """Fabric manager settings."""
    dcgm: DcgmSpec = DcgmSpec(enabled=False)
    """DCGM settings."""
    monitoring: MonitoringSpec = MonitoringSpec()
    """Metrics exporters (installed on nodes with the monitoring role)."""


class Mirror(_Model):
    """A mirror host: signed apt repository, container registry and file/model store."""

    name: Hostname
    """Mirror name (also its hostname)."""
    segment: str
    """Segment the mirror sits on."""
    address: IPv4Address
    """Mirror address inside its segment."""
    http_port: int = Field(default=80, ge=1, le=65535)
    """Port of the apt repository and the file/model store."""
    registry_port: int = Field(default=5000, ge=1, le=65535)
    """Port of the container registry."""
    keyring: str = Field(pattern=r"^/")
    """Controller path of the keyring that signs the mirror's apt repository (`signed-by` on nodes)."""


class AptSource(_Model):
    """An upstream apt source used by connected segments."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    """Short name, used for the sources and keyring file names."""
    url: str = Field(pattern=r"^https?://")
    """Repository URL."""
    suite: str
    """Suite (e.g. `bookworm`, or `/` for a flat repository)."""
    components: list[str] = []
    """Components (e.g. `main`); empty for a flat repository."""
    keyring: str = Field(pattern=r"^/")
    """Controller path of the repository's signing keyring; installed as the source's `signed-by`."""


class Segment(_Model):
    """An L2/L3 network segment of the site."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    """Segment name."""
    cidr: IPv4Network
    """Segment network, e.g. `10.20.0.0/24`."""
    vlan: int | None = Field(default=None, ge=1, le=4094)
    """802.1Q VLAN id; unset for an untagged segment."""
    gateway: IPv4Address | None = None
    """Default gateway; air-gapped segments usually have none."""
    mtu: int = Field(default=1500, ge=1280, le=9216)
    """Interface MTU on this segment."""
    dns: list[IPv4Address] = []
    """DNS resolvers."""
    ntp: list[str] = []
    """NTP servers (addresses or names reachable from the segment)."""
    airgapped: bool = False
    """No route to the outside: every package, image and model comes from `mirror`."""
    mirror: str | None = None
    """Name of the mirror this segment installs from (required when air-gapped)."""
    sources: list[AptSource] = []
    """Upstream apt sources for connected segments without a mirror."""
    egress_allow: list[IPv4Network] = []
    """Destinations nodes may reach outside their segment; air-gapped: only the mirror."""
    egress_probe: IPv4Address | None = None
    """An address outside the segment that the air-gap firewall check must find unreachable."""
    provisioning: Provisioning | None = None
    """Network-install service of this segment; unset when nodes are installed some other way."""


class ProvisioningMode(StrEnum):
    """How a segment's provisioning service answers DHCP."""

    DHCP = "dhcp"
    """The only DHCP server of the segment: static reservations from the stack's MACs, no dynamic pool."""
    PROXY = "proxy"
    """Proxy-DHCP beside the site's own DHCP server: boot information only, the site's server gives addresses."""


class Provisioning(_Model):
    """A segment's network-install service: DHCP (or proxy-DHCP), TFTP of iPXE, HTTP of per-node iPXE scripts.

    Only MACs declared under `nodes` get an answer; unknown machines get nothing (docs/bare-metal.md).
    """

    host: Hostname
    """Host that runs the service: a node or mirror of this segment (air-gapped: usually its mirror), or a
    dedicated host named here with `address`."""
    address: IPv4Address | None = None
    """Address of a dedicated provisioning host on this segment; unset when `host` is a node or mirror."""
    mode: ProvisioningMode = ProvisioningMode.DHCP
    """`dhcp`: static reservations only; `proxy`: proxy-DHCP next to the site's DHCP server."""
    http_port: int = Field(default=8081, ge=1, le=65535)
    """Port of the HTTP server that serves iPXE scripts, kernel, initrd and images on `host`."""


class BootMode(StrEnum):
    """Firmware boot mode a node is set to (and its bootloader is installed for)."""

    UEFI = "uefi"
    BIOS = "bios"


# Disk serial numbers as udev reports them (ID_SERIAL_SHORT): letters, digits, '.', '_', '-'.
_SERIAL = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
# A kernel device path or a stable udev link: /dev/nvme0n1, /dev/sda, /dev/disk/by-id/…, /dev/disk/by-path/….
_DISK_PATH = r"^/dev/([a-z][a-z0-9]{1,31}|disk/by-(id|path|uuid)/[A-Za-z0-9][A-Za-z0-9:._+-]{0,127})$"


class RootDiskHint(_Model):
    """Which disk of a node is its root disk; exactly one of `size_gb`, `serial`, `path`."""

    size_gb: int | None = Field(default=None, ge=1, le=1_000_000)
    """Size in GB (10^9 bytes) as the disk reports it, rounded down: the one disk of this size."""
    serial: str | None = Field(default=None, pattern=_SERIAL)
    """Disk serial number (udev `ID_SERIAL_SHORT`, `lsblk -o SERIAL`)."""
    path: str | None = Field(default=None, pattern=_DISK_PATH)
    """Device path; prefer a stable `/dev/disk/by-path/…` or `/dev/disk/by-id/…` link over `/dev/sdX`."""

    @model_validator(mode="after")
    def _exactly_one(self) -> RootDiskHint:
        if sum(x is not None for x in (self.size_gb, self.serial, self.path)) != 1:
            raise ValueError(
                "a root disk hint names exactly one of `size_gb`, `serial` or `path`; "
                "pick the one that identifies the disk uniquely (serial is the most stable)"
            )
        return self


class BmcProtocol(StrEnum):
    """How gpufleet talks to a BMC."""

    REDFISH = "redfish"
    IPMI = "ipmi"


class Bmc(_Model):
    """Baseboard management controller of a node."""

    protocol: BmcProtocol = BmcProtocol.REDFISH
    """Redfish (preferred) or IPMI."""
    endpoint: str = Field(pattern=r"^(https?://|ipmi://)")
    """`https://bmc-host` for Redfish, `ipmi://bmc-host` for IPMI."""
    system_id: str | None = None
    """Redfish system id or name; unset when the BMC manages exactly one system."""
    username: str
    """BMC user name (not secret)."""
    password: SecretRef
    """Where the BMC password comes from; never the password itself."""
    verify_tls: bool = True
    """Verify the BMC's TLS certificate."""
    ca_bundle: str | None = None
    """CA bundle path to verify the BMC certificate with."""


class GpuSpec(_Model):
    """The GPUs a node has."""

    model: str
    """GPU model from the catalogue (A100-40, A100-80, H100, H200, B200, L40S, L4, A10 …)."""
    count: int = Field(ge=0, le=16)
    """Number of GPUs."""
    nvswitch: bool = False
    """The node has an NVSwitch fabric (HGX/DGX): fabric manager is then required."""


class Node(_Model):
    """A bare-metal GPU node."""

    hostname: Hostname
    """Node hostname (unique in the site)."""
    segment: str
    """Segment the node's management address is on."""
    address: IPv4Address
    """Management address (inside the segment's CIDR)."""
    macs: list[MacAddress] = Field(min_length=1)
    """MAC addresses of the node's interfaces; the first is the management/PXE interface."""
    bmc: Bmc | None = None
    """BMC for power and boot control; required to rebuild the node."""
    gpu: GpuSpec
    """GPU model, count and NVSwitch."""
    os: OperatingSystem = OperatingSystem.UBUNTU_2204
    """Operating system."""
    profile: str | None = None
    """Software profile name; the site's `default_profile` when unset."""
    roles: list[NodeRole] = [NodeRole.INFERENCE, NodeRole.MONITORING]
    """What the node is for."""
    extra_sources: list[str] = []
    """Additional URLs the node fetches from (apt, files); checked against air-gap rules."""
    ssh_user: str = "root"
    """User Ansible connects as (with sudo when not root)."""
    boot_mode: BootMode = BootMode.UEFI
    """Firmware boot mode the node is set to: `uefi` (default) or legacy `bios`."""
    root_disk: RootDiskHint | None = None
    """Disk the OS image is written to; set it for every node with more than one disk (the stack cannot tell)."""
    image: str | None = Field(default=None, pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")
    """Name of the OS image the provisioning service installs; unset: the node is never network-installed
    (its iPXE script hands back to the firmware's next boot device)."""


class ModelSpec(_Model):
    """A served model. Architecture fields default from the catalogue entry of `name`."""

    name: str
    """Model name; a catalogue name fills in the architecture."""
    revision: str = Field(min_length=1)
    """Exact revision (commit hash or immutable tag) of the weights."""
    source: str
    """Where the weights come from: `http(s)://` file store URL or `hf://org/name`."""
    dtype: DType = DType.BF16
    """Weight precision or quantisation."""
    context_length: int = Field(ge=128)
    """Maximum context length served (engine's max model length)."""
    parameters: float | None = Field(default=None, gt=0)
    """Parameter count."""
    layers: int | None = Field(default=None, ge=1)
    """Transformer layers."""
    heads: int | None = Field(default=None, ge=1)
    """Attention heads."""
    kv_heads: int | None = Field(default=None, ge=1)
    """Key/value heads (GQA)."""
    head_dim: int | None = Field(default=None, ge=1)
    """Dimension per attention head."""
    vocab: int | None = Field(default=None, ge=1)
    """Vocabulary size."""


class ServiceSlo(_Model):
    """Service-level objectives of an inference service: the alerts and `gpufleet status` compare against them."""

    ttft_p99_ms: float = Field(default=2000, gt=0, le=600_000)
    """Time to first token, 99th percentile over 5 minutes, in milliseconds."""
    itl_p99_ms: float = Field(default=200, gt=0, le=60_000)
    """Inter-token latency (time between streamed tokens), 99th percentile over 5 minutes, in milliseconds."""
    min_tokens_per_s: float = Field(default=0, ge=0)
    """Generated tokens per second the service must sustain while it has requests; 0 sets no floor."""
    max_error_rate: float = Field(default=0.01, ge=0, le=1)
    """Largest fraction of failed requests over 5 minutes."""


class InferenceService(_Model):
    """An inference server deployment on one or more nodes."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    """Service name (systemd unit and endpoint name)."""
    engine: Engine
    """vllm, tgi, triton or llamacpp."""
    model: ModelSpec
    """The model served."""
    image: ImageRef | None = None
    """Container image by digest; only `llamacpp` may run natively without one."""
    wheel: str | None = None
    """Native install (`llamacpp`): URL of the llama-cpp-python wheel on the mirror or index."""
    tensor_parallel: int = Field(default=1, ge=1)
    """Tensor parallel size (GPUs per replica)."""
    pipeline_parallel: int = Field(default=1, ge=1)
    """Pipeline parallel size."""
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    """Fraction of GPU memory the engine may use (vLLM's --gpu-memory-utilization)."""
    kv_cache_dtype: KvCacheDType = KvCacheDType.AUTO
    """KV cache precision."""
    max_concurrency: int = Field(default=1, ge=1)
    """Concurrent sequences at full context the deployment must hold in KV cache."""
    port: int = Field(default=8000, ge=1, le=65535)
    """Port the OpenAI-compatible endpoint listens on."""
    nodes: list[str] = Field(min_length=1)
    """Hostnames of the nodes serving it."""
    slo: ServiceSlo | None = None
    """This service's objectives; the site's `observability.slo` when unset."""


class Catalogue(_Model):
    """Stack-local additions to the GPU and model catalogue."""

    gpus: dict[str, GpuCatalogueEntry] = {}
    """Extra GPU models by name."""
    models: dict[str, ModelArch] = {}
    """Extra model architectures by name."""


class GpuCatalogueEntry(_Model):
    """A GPU model's memory figures."""

    product_name: str
    """Name nvidia-smi reports."""
    smi_memory_mib: int = Field(gt=0)
    """memory.total as nvidia-smi reports it, MiB."""
    usable_gib: float = Field(gt=0)
    """Device memory CUDA reports, GiB (what engines budget against)."""
    nvswitch_capable: bool = False
    """Sold in NVSwitch (HGX/DGX) systems."""


class ModelArch(_Model):
    """A model architecture's size figures."""

    parameters: float = Field(gt=0)
    """Parameter count."""
    layers: int = Field(ge=1)
    """Transformer layers."""
    heads: int = Field(ge=1)
    """Attention heads."""
    kv_heads: int = Field(ge=1)
    """Key/value heads."""
    head_dim: int = Field(ge=1)
    """Dimension per head."""
    vocab: int = Field(ge=1)
    """Vocabulary size."""


class GpuHealth(_Model):
    """Per-node GPU health limits; any new XID error or uncorrectable ECC error alerts regardless."""

    max_temperature_c: int = Field(default=85, ge=40, le=110)
    """GPU temperature (°C) above which a GPU alerts (sustained for 5 minutes)."""
    max_memory_used_fraction: float = Field(default=0.98, gt=0, le=1)
    """Framebuffer memory in use, as a fraction of the total, above which a GPU alerts (sustained 15 minutes)."""


class PrometheusHost(_Model):
    """Where one segment's Prometheus runs; it scrapes only that segment's nodes."""

    segment: str
    """Segment whose nodes this Prometheus scrapes."""
    host: str
    """Hostname of a node or mirror on that segment (air-gapped segments: usually their mirror)."""
    port: int = Field(default=9090, ge=1, le=65535)
    """Port of Prometheus' HTTP API (and of `/federate` for the site view)."""


class Observability(_Model):
    """Metrics collection, SLO alerts and the site view (see docs/observability.md)."""

    prometheus: list[PrometheusHost] = []
    """One Prometheus per monitored segment; empty disables metrics collection."""
    site_view: str | None = None
    """Segment whose Prometheus federates the others (the place `gpufleet status` asks); a connected segment."""
    scrape_interval_s: int = Field(default=15, ge=1, le=300)
    """How often every target is scraped."""
    alertmanager_port: int = Field(default=9093, ge=1, le=65535)
    """Port of Alertmanager on each Prometheus host."""
    slo: ServiceSlo = ServiceSlo()
    """Objectives of every service that sets none."""
    gpu: GpuHealth = GpuHealth()
    """GPU health limits of every node."""


class Controller(_Model):
    """How the controller (where `gpufleet`/`pulumi` runs) reaches nodes."""

    ssh_config: str | None = Field(default=None, pattern=r"^/")
    """OpenSSH client config used for nodes (IdentityFile, UserKnownHostsFile with pinned host keys)."""
    known_hosts: str | None = Field(default=None, pattern=r"^/")
    """known_hosts file with the nodes' pinned host keys (StrictHostKeyChecking=yes)."""


class Site(_Model):
    """A whole GPU site: the `gpufleet:site` object of a stack file."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    """Site name."""
    reboot: RebootSettings = RebootSettings()
    """Reboot policy."""
    rollout: RolloutPolicy = RolloutPolicy()
    """Rolling converge policy, applied per segment."""
    default_profile: str
    """Software profile of nodes that name none."""
    profiles: dict[str, SoftwareProfile] = Field(min_length=1)
    """Software profiles by name."""
    segments: list[Segment] = Field(min_length=1)
    """Network segments."""
    mirrors: list[Mirror] = []
    """Mirror hosts."""
    nodes: list[Node] = []
    """GPU nodes."""
    services: list[InferenceService] = []
    """Inference services."""
    catalogue: Catalogue = Catalogue()
    """Additions to the built-in GPU/model catalogue."""
    admin_keys: list[str] = []
    """SSH public keys of administrators, installed for the admin user."""
    controller: Controller = Controller()
    """Controller-side SSH settings."""
    observability: Observability = Observability()
    """Metrics, SLO alerts and the site view."""
    lab_mode: Literal[False, True] = False
    """True only in the lab stack: nodes are containers with simulated GPUs (roles skip hardware steps)."""


Catalogue.model_rebuild()
