"""A node as the probe reads it (`NodeState`), what the probe must look at, and the one comparison with the plan.

The probe is one read-only program, `plugins/module_utils/gpufleet_probe.py`: the `gpu_validate` module
runs it inside a play (`validate-node`, the end of every converge), `infra/dr/remote.py` runs it over SSH
(`drift`, `fingerprint`, `rebuild`). Everything it looks at is named here from the plan (`probe_spec`) and
reaches the role through `infra/plan/rolevars.py`: no name is read back from a role file.

`compare(plan, state)` is the only place that decides what differs from the plan; `validate-node`, `converge`
(whether a node failed), `drift` and `rebuild` all call it. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from infra.model.site import ContainerEngine, FabricType, NodeRole, OperatingSystem
from infra.plan import engines
from infra.plan.fabric import PortPlan
from infra.plan.node import NodePlan
from infra.plan.packages import Component

# Inference units are `<prefix><service name>.service`. The inference_server role names its units with the
# same prefix (roles/inference_server/vars/main.yml; tests/unit/test_nodestate.py keeps the two equal).
INFERENCE_UNIT_PREFIX = "gpufleet-inference-"
# The nvidia_driver role's state file (reboot_required for the boot it names); passed to it by rolevars.
DRIVER_FACT_FILE = "/etc/ansible/facts.d/gpufleet.fact"
# What a host declares it cannot do (docs/roles.md "Node capabilities"): the roles read it as a local fact,
# the probe reads it so that a check the host cannot pass by design (an RDMA device on a host that loads no
# kernel module) is reported as not checked, with the reason, instead of failing.
CAPABILITIES_FACT_FILE = "/etc/ansible/facts.d/gpufleet_capabilities.fact"
# Hashes of the managed files as the last converge left them (written by gpu_validate at the end of node.yml):
# what an out-of-band edit is compared with.
FILES_RECORD = "/var/lib/gpufleet/converged-files.json"
# Paths the roles write that may not carry the `ansible_managed` marker (rendered from dicts, or written
# by tools the roles run). Globs, relative to /.
MANAGED_GLOBS = (
    "etc/**/*gpufleet*",
    "etc/cdi/*.yaml",
    "etc/docker/daemon.json",
    "etc/containerd/config.toml",
    "etc/nvidia-container-runtime/config.toml",
    "etc/containers/storage.conf",
    "etc/containers/containers.conf",
    "etc/nftables.conf",
    "etc/chrony/chrony.conf",
)
# Written by roles but state, not configuration: compared separately (reboot flag) or not at all.
STATE_FILES = (DRIVER_FACT_FILE,)
MANAGED_MARKER = "Ansible managed"
NVIDIA_SMI_FIELDS = "name,memory.total,driver_version,uuid,index,pci.bus_id"
CDI_ALL = "nvidia.com/gpu=all"
# Operating systems whose package roles hold every pinned package (apt-mark hold).
HOLDING_OS = frozenset({OperatingSystem.DEBIAN_12, OperatingSystem.UBUNTU_2204, OperatingSystem.UBUNTU_2404})
_RUNNING_ENABLED = ("enabled", "static", "enabled-runtime")


def expected_services(plan: NodePlan) -> list[str]:
    """Systemd units that must be enabled and running on the node, from the plan.

    Unit names follow the packages the plan pins (stand-ins in the lab ship the same units); inference
    services are `<INFERENCE_UNIT_PREFIX><service name>.service`.
    """
    units = []
    if plan.packages_of(Component.DRIVER):
        units.append("nvidia-persistenced.service")
    if plan.packages_of(Component.FABRIC_MANAGER):
        units.append("nvidia-fabricmanager.service")
    if plan.profile.container_runtime.engine is ContainerEngine.CONTAINERD:
        units.append("containerd.service")
    elif plan.profile.container_runtime.engine is ContainerEngine.DOCKER:
        units.append("docker.service")
    if NodeRole.MONITORING in plan.node.roles and plan.packages_of(Component.MONITORING):
        units.append("prometheus-node-exporter.service")
    units.extend(f"{INFERENCE_UNIT_PREFIX}{s.name}.service" for s in plan.services)
    return units


@dataclass(frozen=True)
class ProbeSpec:
    """What the probe reads on one node: the module's arguments and the SSH program's input (same keys)."""

    packages: tuple[str, ...]
    services: tuple[str, ...]
    endpoints: tuple[tuple[str, int, str], ...]  # (service name, port, health path)
    globs: tuple[str, ...] = MANAGED_GLOBS
    marker: str = MANAGED_MARKER
    state_files: tuple[str, ...] = STATE_FILES
    record_file: str = FILES_RECORD
    fact_file: str = DRIVER_FACT_FILE
    capabilities_file: str = CAPABILITIES_FACT_FILE
    smi_fields: str = NVIDIA_SMI_FIELDS
    cdi: bool = True
    fabric_ports: tuple[tuple[str, str, str], ...] = ()  # (fabric, pci|mac|netdev, value), stack order

    def as_dict(self) -> dict[str, Any]:
        """JSON form (`gpu_validate_probe`, and the SSH program's spec)."""
        return {
            "packages": list(self.packages),
            "services": list(self.services),
            "endpoints": [{"name": n, "port": p, "path": h} for n, p, h in self.endpoints],
            "globs": list(self.globs),
            "marker": self.marker,
            "state_files": list(self.state_files),
            "record_file": self.record_file,
            "fact_file": self.fact_file,
            "smi_fields": self.smi_fields,
            "cdi": self.cdi,
        } | (
            # Only for nodes on a fabric: every other node's probe input (and content hash) stays as it was.
            {
                "fabric_ports": [{"fabric": f, "kind": k, "value": v} for f, k, v in self.fabric_ports],
                "capabilities_file": self.capabilities_file,
            }
            if self.fabric_ports
            else {}
        )


def probe_spec(plan: NodePlan) -> ProbeSpec:
    """The probe's input for one node, from its plan."""
    return ProbeSpec(
        packages=tuple(sorted({p.name for p in plan.packages})),
        services=tuple(expected_services(plan)),
        # A worker of a service spanning nodes serves no HTTP (its head does): only its unit is expected.
        endpoints=tuple(
            (s.name, s.service.port, engines.HEALTH_PATHS[s.service.engine])
            for s in plan.services
            if s.span is None or s.span.role_of(plan.hostname) != "worker"
        ),
        fabric_ports=tuple(_port_key(pp) for pp in plan.fabric_ports),
    )


def _port_key(pp: PortPlan) -> tuple[str, str, str]:
    """(fabric, how the port is found, value): how the probe and the comparison name one declared port."""
    ((kind, value),) = pp.interface.items()
    return pp.fabric.name, kind, value


@dataclass(frozen=True)
class Gpu:
    """One GPU as nvidia-smi reports it (strings, as printed)."""

    name: str = ""
    memory_mib: str = ""
    driver_version: str = ""
    uuid: str = ""
    index: str = ""
    pci_bus_id: str = ""

    @classmethod
    def from_smi(cls, row: Mapping[str, Any]) -> Gpu:
        """From one `--query-gpu` row keyed by nvidia-smi's field names."""
        return cls(
            name=str(row.get("name", "")),
            memory_mib=str(row.get("memory.total", "")),
            driver_version=str(row.get("driver_version", "")),
            uuid=str(row.get("uuid", "")),
            index=str(row.get("index", "")),
            pci_bus_id=str(row.get("pci.bus_id", "")),
        )

    def as_smi(self) -> dict[str, str]:
        """Keyed by nvidia-smi's field names (the probe's JSON and the fingerprint records)."""
        return {
            "name": self.name,
            "memory.total": self.memory_mib,
            "driver_version": self.driver_version,
            "uuid": self.uuid,
            "index": self.index,
            "pci.bus_id": self.pci_bus_id,
        }


@dataclass(frozen=True)
class ServiceState:
    """A unit's ActiveState and UnitFileState ("absent" when the probe did not report it)."""

    active: str = "absent"
    enabled: str = "absent"

    @property
    def ok(self) -> bool:
        """Running and enabled."""
        return self.active == "active" and self.enabled in _RUNNING_ENABLED

    def as_dict(self) -> dict[str, str]:
        """JSON form."""
        return {"active": self.active, "enabled": self.enabled}


@dataclass(frozen=True)
class EndpointState:
    """What an inference endpoint's health path answered on the node (status 0: no answer)."""

    name: str
    url: str
    status: int

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"name": self.name, "url": self.url, "status": self.status, "ok": self.status == 200}


@dataclass(frozen=True)
class FabricPortState:
    """One declared fabric port as the probe found it on the node (None: not found / not reported).

    `speed_mbps` is the interface's Ethernet speed (sysfs `net/<if>/speed`; None when the driver does not
    know it); `rdma_state`, `rdma_phys_state` and `rdma_rate` are the RDMA port's sysfs strings as the
    kernel prints them (`4: ACTIVE`, `5: LinkUp`, `100 Gb/sec (4X EDR)`).
    """

    fabric: str
    kind: str
    value: str
    netdev: str | None = None
    operstate: str | None = None
    speed_mbps: int | None = None
    rdma_device: str | None = None
    rdma_port: int | None = None
    rdma_state: str | None = None
    rdma_phys_state: str | None = None
    rdma_rate: str | None = None

    @classmethod
    def from_json(cls, row: Mapping[str, Any]) -> FabricPortState:
        """From one `fabric_ports` entry of the probe's JSON."""

        def text(key: str) -> str | None:
            v = row.get(key)
            return None if v is None else str(v)

        def number(key: str) -> int | None:
            v = row.get(key)
            return int(v) if isinstance(v, int | str) and str(v).lstrip("-").isdigit() else None

        return cls(
            fabric=str(row.get("fabric", "")),
            kind=str(row.get("kind", "")),
            value=str(row.get("value", "")),
            netdev=text("netdev"),
            operstate=text("operstate"),
            speed_mbps=number("speed_mbps"),
            rdma_device=text("rdma_device"),
            rdma_port=number("rdma_port"),
            rdma_state=text("rdma_state"),
            rdma_phys_state=text("rdma_phys_state"),
            rdma_rate=text("rdma_rate"),
        )

    @property
    def rate_gbps(self) -> float | None:
        """The RDMA port's data rate in Gb/s from sysfs `rate` (`100 Gb/sec (4X EDR)` → 100.0)."""
        head = (self.rdma_rate or "").split(" ", 1)[0]
        try:
            return float(head)
        except ValueError:
            return None

    def as_dict(self) -> dict[str, Any]:
        """JSON form (the probe's shape)."""
        return {
            "fabric": self.fabric,
            "kind": self.kind,
            "value": self.value,
            "netdev": self.netdev,
            "operstate": self.operstate,
            "speed_mbps": self.speed_mbps,
            "rdma_device": self.rdma_device,
            "rdma_port": self.rdma_port,
            "rdma_state": self.rdma_state,
            "rdma_phys_state": self.rdma_phys_state,
            "rdma_rate": self.rdma_rate,
        }


@dataclass(frozen=True)
class NodeState:
    """What the probe found on a node.

    `recorded_files` are the managed files' hashes the last converge recorded (None: never recorded);
    `cdi` is None when `nvidia-ctk cdi list` failed.
    """

    hostname: str
    packages: dict[str, str | None]
    held: tuple[str, ...]
    files: dict[str, str]
    services: dict[str, ServiceState]
    gpus: tuple[Gpu, ...]
    reboot_required: bool
    errors: tuple[str, ...] = ()
    driver_fact: dict[str, Any] = field(default_factory=dict)
    recorded_files: dict[str, str] | None = None
    cdi: tuple[str, ...] | None = ()
    endpoints: tuple[EndpointState, ...] = ()
    fabric_ports: tuple[FabricPortState, ...] = ()
    capabilities: dict[str, Any] = field(default_factory=dict)  # what the host declares (read for fabric nodes)

    @classmethod
    def from_json(cls, hostname: str, data: Mapping[str, Any]) -> NodeState:
        """Parse the probe's JSON."""
        recorded = data.get("recorded_files")
        cdi = data.get("cdi", ())
        return cls(
            hostname=hostname,
            packages={str(k): (None if v is None else str(v)) for k, v in dict(data.get("packages", {})).items()},
            held=tuple(str(h) for h in data.get("held", ())),
            files={str(k): str(v) for k, v in dict(data.get("files", {})).items()},
            services={
                str(k): ServiceState(str(v.get("active", "absent")), str(v.get("enabled", "absent")))
                for k, v in dict(data.get("services", {})).items()
            },
            gpus=tuple(Gpu.from_smi(g) for g in data.get("gpus", ())),
            reboot_required=bool(data.get("reboot_required")),
            errors=tuple(str(e) for e in data.get("errors", ())),
            driver_fact=dict(data.get("driver_fact", {})),
            recorded_files=None if recorded is None else {str(k): str(v) for k, v in dict(recorded).items()},
            cdi=None if cdi is None else tuple(str(c) for c in cdi),
            endpoints=tuple(
                EndpointState(str(e.get("name", "")), str(e.get("url", "")), int(e.get("status") or 0))
                for e in data.get("endpoints", ())
            ),
            fabric_ports=tuple(FabricPortState.from_json(p) for p in data.get("fabric_ports", ()) or ()),
            capabilities=dict(data.get("capabilities") or {}),
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON form (the probe's output shape)."""
        return {
            "hostname": self.hostname,
            "packages": self.packages,
            "held": list(self.held),
            "files": self.files,
            "recorded_files": self.recorded_files,
            "services": {k: v.as_dict() for k, v in self.services.items()},
            "gpus": [g.as_smi() for g in self.gpus],
            "cdi": None if self.cdi is None else list(self.cdi),
            "endpoints": [e.as_dict() for e in self.endpoints],
            "reboot_required": self.reboot_required,
            "errors": list(self.errors),
            "driver_fact": self.driver_fact,
            "fabric_ports": [p.as_dict() for p in self.fabric_ports],
            "capabilities": self.capabilities,
        }


# Kinds of difference. `file` needs a record of the last converge; `task` comes from the roles' check mode.
KINDS = ("package", "hold", "file", "service", "gpu", "cdi", "endpoint", "fabric", "reboot", "task")
# A converge has just rendered every file (so a file "differing" from the previous record is the converge's own
# change) and may leave a reboot pending by policy: neither fails a converge. Everything else does.
NOT_A_CONVERGE_FAILURE = frozenset({"file", "reboot"})
# validate-node reports a pending reboot (with why) but passes: the stack's reboot policy decides when.
NOT_A_VALIDATION_FAILURE = frozenset({"reboot"})


@dataclass(frozen=True)
class DriftItem:
    """One difference from the plan: what kind, which item, what the plan wants and what the node has."""

    kind: str  # one of KINDS
    item: str
    want: Any
    have: Any
    source: str = "probe"  # probe | check
    fix: str = ""
    """What to do about it, where the difference alone does not say (fabric ports)."""

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        out = {"kind": self.kind, "item": self.item, "want": self.want, "have": self.have, "source": self.source}
        return out | ({"fix": self.fix} if self.fix else {})

    def __str__(self) -> str:
        """One line for people, e.g. `GPUs seen: count 2, declared 3`."""
        have = "(absent)" if self.have is None else self.have
        if self.kind == "gpu":
            return f"GPUs seen: {self.item} {have}, declared {self.want}"
        if self.kind == "fabric":
            return f"fabric port {self.item}: {have} (want {self.want}); fix: {self.fix}"
        if self.kind == "file":
            return f"file {self.item}: changed since the last converge ({_short(self.want)} → {_short(self.have)})"
        return f"{self.kind} {self.item}: want {self.want}, have {have}"


def _short(v: Any) -> str:
    return "(absent)" if v is None else str(v)[:12]


def compare(plan: NodePlan, state: NodeState) -> list[DriftItem]:
    """Every difference between the plan and a probed state, in a stable order (pure)."""
    items = _packages(plan, state)
    items += _files(state)
    for unit in expected_services(plan):
        s = state.services.get(unit, ServiceState())
        if not s.ok:
            items.append(DriftItem("service", unit, "active, enabled", f"{s.active}, {s.enabled}"))
    items += _gpus(plan, state)
    items += _cdi(plan, state)
    items += [
        DriftItem("endpoint", e.name, f"{e.url} → 200", f"{e.url} → {e.status or 'no answer'}")
        for e in state.endpoints
        if e.status != 200
    ]
    items += _fabric(plan, state)
    if state.reboot_required:
        items.append(DriftItem("reboot", "pending", False, True))
    return items


def failures(items: Iterable[DriftItem], ignore: frozenset[str]) -> list[DriftItem]:
    """The items that fail a step (`NOT_A_CONVERGE_FAILURE`, `NOT_A_VALIDATION_FAILURE` say which do not)."""
    return [i for i in items if i.kind not in ignore]


def _packages(plan: NodePlan, state: NodeState) -> list[DriftItem]:
    items: list[DriftItem] = []
    for pkg in plan.packages:
        have = state.packages.get(pkg.name)
        if have != pkg.version:
            items.append(DriftItem("package", pkg.name, pkg.version, have))
        elif plan.node.os in HOLDING_OS and pkg.name not in state.held:
            # The roles hold every pinned package so `apt upgrade` cannot move it.
            items.append(DriftItem("hold", pkg.name, "hold", "not held"))
    return items


def _files(state: NodeState) -> list[DriftItem]:
    if state.recorded_files is None:
        return []  # never converged by this version: nothing to compare with (check mode still sees edits)
    rec, now = state.recorded_files, state.files
    paths = sorted(set(rec) | set(now))
    return [DriftItem("file", p, rec.get(p), now.get(p)) for p in paths if rec.get(p) != now.get(p)]


def _gpus(plan: NodePlan, state: NodeState) -> list[DriftItem]:
    out: list[DriftItem] = []
    want_count = plan.node.gpu.count
    if len(state.gpus) != want_count:
        out.append(DriftItem("gpu", "count", want_count, len(state.gpus)))
    if not state.gpus:
        return out
    names = sorted({g.name for g in state.gpus})
    if names != [plan.gpu_product_name]:
        out.append(DriftItem("gpu", "product", plan.gpu_product_name, ", ".join(names)))
    memory = sorted({g.memory_mib for g in state.gpus})
    if plan.gpu_memory_mib and memory != [str(plan.gpu_memory_mib)]:
        out.append(DriftItem("gpu", "memory_mib", plan.gpu_memory_mib, ", ".join(memory)))
    drivers = sorted({g.driver_version for g in state.gpus})
    if drivers != [plan.profile.driver.version]:
        # The loaded driver is not the pinned one: installed but not yet rebooted into, or changed by hand.
        out.append(DriftItem("gpu", "driver_version", plan.profile.driver.version, ", ".join(drivers)))
    return out


def _cdi(plan: NodePlan, state: NodeState) -> list[DriftItem]:
    want = f"{CDI_ALL} and one device per GPU ({plan.node.gpu.count})"
    if state.cdi is None:
        return [DriftItem("cdi", "devices", want, "nvidia-ctk cdi list failed")]
    if CDI_ALL not in state.cdi or len(state.cdi) < plan.node.gpu.count + 1:
        return [DriftItem("cdi", "devices", want, ", ".join(state.cdi) or "none")]
    return []


def _seen_gbps(pp: PortPlan, seen: FabricPortState) -> float | None:
    """The port's link speed in Gb/s.

    RoCE: the interface's Ethernet speed (the RDMA rate where the driver knows none); InfiniBand: the RDMA
    port's rate.
    """
    if pp.fabric.type is FabricType.ROCE and seen.speed_mbps is not None:
        return seen.speed_mbps / 1000
    return seen.rate_gbps


def _rdma_unchecked(state: NodeState) -> str | None:
    """Why this host's RDMA devices are not checked (it declares it loads no kernel module), or None."""
    if state.capabilities.get("kernel_modules") is False:
        return "this host loads no kernel modules (capability kernel_modules=false): no RDMA device to check"
    return None


def _port_problem(pp: PortPlan, seen: FabricPortState | None, state: NodeState) -> tuple[str, str] | None:
    """(what is wrong, the fix) for one declared port, or None when it is present, up, at speed, with RDMA.

    On a host that declares it loads no kernel modules the port's interface, state and Ethernet speed are
    still checked; its RDMA device is not (facts say so).
    """
    _fabric_name, kind, value = _port_key(pp)
    if seen is None:
        return "not reported by the node's probe", "run validate-node again with this gpufleet's collection"
    if seen.netdev is None:
        where = {"pci": f"`lspci -D -s {value}`", "mac": "`ip -br link`", "netdev": f"`ip link show {value}`"}[kind]
        return (
            "no such interface on the node",
            f"check that the adapter is present and its driver loaded ({where}), or correct `{kind}` of this port "
            "under the node's `fabric_ports` in the stack",
        )
    if seen.operstate != "up":
        return (
            f"interface {seen.netdev} is {seen.operstate or 'unknown'}",
            "check the cable and the switch port, then `gpufleet converge` (gpufleet-rdma.service brings it up)",
        )
    if seen.rdma_device is None and _rdma_unchecked(state) is not None:
        gbps = _seen_gbps(pp, seen)
        if gbps is None or gbps != pp.port.speed_gbps:
            have = "no link speed reported" if gbps is None else f"links at {gbps:g} Gb/s"
            return f"{have} ({seen.netdev})", "check the link's speed, or declare it as `speed_gbps`"
        return None
    if seen.rdma_device is None:
        if pp.port.soft_roce:
            fix = (
                "`gpufleet converge` the node: the rdma role creates the Soft-RoCE link "
                f"(`rdma link add rxe_{seen.netdev} type rxe netdev {seen.netdev}`)"
            )
        else:
            fix = "load the adapter's RDMA driver (e.g. mlx5_ib) and enable RoCE/IB on the port (`rdma link` lists it)"
        return f"interface {seen.netdev} has no RDMA device", fix
    if not (seen.rdma_state or "").endswith("ACTIVE"):
        return (
            f"RDMA port {seen.rdma_device}/{seen.rdma_port} is {seen.rdma_state or 'unknown'}",
            "an InfiniBand port stays INIT until a subnet manager sweeps it (is opensm running?); a RoCE port "
            "follows its interface's link",
        )
    gbps = _seen_gbps(pp, seen)
    if gbps is None or gbps != pp.port.speed_gbps:
        have = "no link speed reported" if gbps is None else f"links at {gbps:g} Gb/s"
        return (
            f"{have} ({seen.netdev}, {seen.rdma_device}: {seen.rdma_rate or 'no rate'})",
            "check the cable/transceiver and the switch port's speed; if the port is sold at that speed, "
            "declare it as `speed_gbps`",
        )
    return None


def _fabric(plan: NodePlan, state: NodeState) -> list[DriftItem]:
    seen = {(p.fabric, p.kind, p.value): p for p in state.fabric_ports}
    out: list[DriftItem] = []
    for pp in plan.fabric_ports:
        key = _port_key(pp)
        problem = _port_problem(pp, seen.get(key), state)
        if problem is not None:
            want = f"up at {pp.port.speed_gbps} Gb/s with an active RDMA device"
            item = f"{key[1]} {key[2]} of fabric {key[0]} on {plan.hostname}"
            out.append(DriftItem("fabric", item, want, problem[0], fix=problem[1]))
    return out


def _fabric_facts(plan: NodePlan, state: NodeState) -> list[dict[str, Any]]:
    seen = {(p.fabric, p.kind, p.value): p for p in state.fabric_ports}
    rows = []
    for pp in plan.fabric_ports:
        key = _port_key(pp)
        s = seen.get(key)
        rows.append(
            {
                "fabric": key[0],
                "port": f"{key[1]} {key[2]}",
                "declared_gbps": pp.port.speed_gbps,
                "seen_gbps": None if s is None else _seen_gbps(pp, s),
                "seen": None if s is None else s.as_dict(),
                "ok": _port_problem(pp, s, state) is None,
                "rdma_not_checked": _rdma_unchecked(state) if s is not None and s.rdma_device is None else None,
            }
        )
    return rows


def validation_facts(plan: NodePlan, state: NodeState, items: list[DriftItem]) -> dict[str, Any]:
    """`validate-node`'s facts (also the stack outputs of the validate step): every check, expected and seen."""
    by_kind = {k: [i for i in items if i.kind == k] for k in KINDS}
    failing = failures(items, NOT_A_VALIDATION_FAILURE)
    fm = bool(plan.packages_of(Component.FABRIC_MANAGER))
    fm_state = state.services.get("nvidia-fabricmanager.service")
    return {
        "passed": not failing,
        "problems": [str(i) for i in failing],
        "items": [i.as_dict() for i in items],
        "gpus": {
            "declared": {
                "product_name": plan.gpu_product_name,
                "count": plan.node.gpu.count,
                "memory_mib": plan.gpu_memory_mib,
            },
            "seen": [{"name": g.name, "memory_mib": g.memory_mib, "driver_version": g.driver_version}
                     for g in state.gpus],
            "ok": not [i for i in by_kind["gpu"] if i.item != "driver_version"],
        },
        "driver": {
            "pinned": plan.profile.driver.version,
            "seen": sorted({g.driver_version for g in state.gpus}),
            "ok": not [i for i in by_kind["gpu"] if i.item == "driver_version"],
        },
        "cuda": {"pinned": plan.profile.cuda.version},
        "packages": {
            "mismatched": [{"name": i.item, "pinned": i.want, "installed": i.have or ""} for i in by_kind["package"]],
            "not_held": [i.item for i in by_kind["hold"]],
            "ok": not by_kind["package"] and not by_kind["hold"],
        },
        "files": {
            "recorded": state.recorded_files is not None,
            "changed": [i.item for i in by_kind["file"]],
            "ok": not by_kind["file"],
        },
        "services": {
            "expected": {u: state.services.get(u, ServiceState()).as_dict() for u in expected_services(plan)},
            "ok": not by_kind["service"],
        },
        "fabric_manager": {"required": fm, "active": (fm_state.active == "active") if fm and fm_state else None},
        "cdi": {"devices": list(state.cdi or ()), "ok": not by_kind["cdi"]},
        "fabric": {"ports": _fabric_facts(plan, state), "ok": not by_kind["fabric"]},
        "endpoints": [e.as_dict() for e in state.endpoints],
        "reboot_required": state.reboot_required,
        # Why the nvidia_driver role did not reboot (e.g. the host cannot: capability reboot=false).
        "reboot_reason": str(state.driver_fact.get("reboot_reason", "")) if state.reboot_required else "",
        "errors": list(state.errors),
    }
