"""NodePlan → Ansible host variables: the only mapping from the plan to role variables.

Every role receives its inputs here, under its own prefix; no role sets another role's variables
and no role knows a package name or a version (those come from `infra.plan.packages` through the
plan). Pure: the same plan always gives the same variables, so the content hash is stable.
"""

from __future__ import annotations

import posixpath
import re
from typing import Any
from urllib.parse import urlsplit

from infra.model.ports import DCGM_EXPORTER_PORT
from infra.model.site import ContainerEngine, Engine, InferenceService, Mirror, Site, parse_hf_source
from infra.plan import engines, nodestate
from infra.plan.fabric import SpanGroup
from infra.plan.node import NodePlan
from infra.plan.packages import Component

# `name-1.2.3-cp311-...whl` → distribution name and version (PEP 427 file names).
_WHEEL = re.compile(r"^(?P<name>[A-Za-z0-9_.]+)-(?P<version>[0-9][^-]*)-.*\.whl$")


def _pkgs(plan: NodePlan, *components: Component) -> list[dict[str, str]]:
    return [p.as_dict() for c in components for p in plan.packages_of(c)]


def apt_sources(plan: NodePlan) -> list[dict[str, Any]]:
    """Apt sources of the node: its segment's mirror when there is one, else the segment's sources."""
    if plan.mirror is not None:
        m = plan.mirror
        port = "" if m.http_port == 80 else f":{m.http_port}"
        return [
            {
                "name": m.name,
                "uris": f"http://{m.address}{port}/apt",
                "suites": "/",
                "components": [],
                "keyring": m.keyring,
            }
        ]
    return [
        {"name": s.name, "uris": s.url, "suites": s.suite, "components": list(s.components), "keyring": s.keyring}
        for s in plan.segment.sources
    ]


def wheel_requirement(url: str) -> tuple[str, str]:
    """(requirement `name==version`, find-links directory) for a wheel URL.

    The node installs with `--no-index --find-links <dir>`: the wheel's own dependencies must sit
    next to it on the mirror, so nothing ever reaches PyPI (air-gapped nodes cannot).
    """
    path = urlsplit(url).path
    m = _WHEEL.match(posixpath.basename(path))
    if not m:
        raise ValueError(f"{url!r} does not name a wheel file (name-version-tags.whl)")
    return f"{m['name']}=={m['version']}", url[: url.rindex("/") + 1]


def service_vars(
    s: InferenceService,
    runtime: ContainerEngine,
    runtime_version: str,
    *,
    span: SpanGroup | None = None,
    hostname: str = "",
    mirror: Mirror | None = None,
) -> dict[str, Any]:
    """One service as the `inference_server` role places it: paths and unit lines, already encoded.

    The unit's command lines come from `infra.plan.engines` (the engine's argv from the plan's limits)
    and are quoted for systemd there; the template only writes them on their lines.
    """
    role = span.role_of(hostname) if span is not None else ""
    # llama.cpp spans through RPC backends on its workers (the head holds the model and sends the tensors);
    # vLLM through its multi-node mode: every node runs `vllm serve` on its own copy of the model, the
    # workers headless, and the head's endpoint answers once the whole group has joined.
    rpc_worker = role == "worker" and s.engine is Engine.LLAMACPP
    node = None
    if span is not None and role and s.engine is Engine.VLLM:
        node = engines.NodeRank(span.rank_of(hostname), span.nnodes, span.head_address, s.rpc_port,
                                span.fabric_address_of(hostname))
    if rpc_worker and span is not None:
        # A worker of a spanning llama.cpp service: only its RPC backend, no model file, no endpoint.
        cmds = engines.rpc_worker_commands(s, span.address_of(hostname))
        name = ""
    else:
        llama_head = role == "head" and span is not None and s.engine is Engine.LLAMACPP
        rpc = [f"{addr}:{s.rpc_port}" for _, addr in span.workers] if llama_head and span is not None else []
        cmds = engines.unit_commands(s, runtime, runtime_version, rpc_servers=rpc, node=node)
        name = engines.model_file(s)
    directory = engines.model_dir(s)
    native = s.engine is Engine.LLAMACPP and s.image is None
    # A llama.cpp RPC worker holds no model file (its head sends the tensors): nothing to fetch.
    hub = parse_hf_source(s.model.source) is not None and not rpc_worker
    base = f"http://{mirror.address}:{mirror.http_port}/" if mirror else ""
    out: dict[str, Any] = {
        "name": s.name,
        "engine": s.engine.value,
        # A single file fetched as it is (http(s) sources); `hf://` models come file by file from the mirror.
        "model_source": "" if hub or rpc_worker else s.model.source,
        "model_index_url": base + engines.mirror_model_index(s.model.name, s.model.revision) if hub and base else "",
        "model_base_url": base + engines.mirror_model_dir(s.model.name, s.model.revision) + "/" if hub and base else "",
        "model_unserved": (
            f"service {s.name}: {s.model.source} reaches nodes only through their segment's mirror "
            "(gpufleet lock, bundle build, bundle import); give the segment a mirror"
            if hub and not base
            else ""
        ),
        "model_dir": directory,
        "model_path": f"{directory}/{name}" if name else "",
        "port": s.rpc_port if rpc_worker else s.port,
        # A worker answers no HTTP (a llama.cpp worker: the role waits for its RPC port on `rpc_bind`; a headless
        # vLLM worker: its head's endpoint answers only once it has joined).
        "health_path": "" if role == "worker" else engines.HEALTH_PATHS[s.engine],
        "span_role": role,
        "rpc_bind": span.address_of(hostname) if rpc_worker and span is not None else "",
        "span_workers": (
            [{"node": h, "address": a, "port": s.rpc_port} for h, a in span.workers]
            if role == "head" and span is not None and s.engine is Engine.LLAMACPP
            else []
        ),
        "native": native,
        "description": engines.unit_text(
            f"gpufleet inference {s.name} ({s.engine.value} serving {s.model.name}@{s.model.revision})"
        ),
        "environment": [engines.systemd_assignment(k, v) for k, v in sorted(cmds.environment.items())],
        "user": cmds.user,
        # Clean-up commands may fail (nothing to clean): systemd's `-` prefix.
        "exec_start_pre": ["-" + engines.systemd_command_line(c) for c in cmds.exec_start_pre],
        "exec_start": engines.systemd_command_line(cmds.exec_start),
        "exec_stop": [engines.systemd_command_line(c) for c in cmds.exec_stop],
        "pip_requirement": "",
        "pip_find_links": "",
        "pip_trusted_host": "",
    }
    if native:
        if not s.wheel:
            raise ValueError(f"service {s.name!r}: a native llamacpp service needs `wheel`")
        out["pip_requirement"], out["pip_find_links"] = wheel_requirement(s.wheel)
        # pip ignores plain-HTTP find-links unless the host is named; the mirror/file store is the
        # site's own (air-gapped: the only) source, declared in the stack.
        url = urlsplit(s.wheel)
        out["pip_trusted_host"] = url.hostname or "" if url.scheme == "http" else ""
    return out


def _interfaces(plan: NodePlan) -> list[dict[str, Any]]:
    seg, node = plan.segment, plan.node
    return [
        {
            "name": "mgmt",
            "mac": node.macs[0],
            "address": f"{node.address}/{seg.cidr.prefixlen}",
            "gateway": str(seg.gateway) if seg.gateway else "",
            "dns": [str(d) for d in seg.dns],
            "mtu": seg.mtu,
            "vlan": seg.vlan or 0,
        }
    ]


def host_vars(plan: NodePlan, site: Site) -> dict[str, Any]:
    """Every role variable of one node (plus `gpufleet_*` play-level facts), JSON-serialisable.

    What a host cannot do (reboot, load kernel modules, apply sysctl or network settings …) is not
    decided here: the host declares it in its capabilities fact file and the roles read it there
    (docs/roles.md "Node capabilities"), so the plan is the same for a real node and a stand-in.
    """
    p, seg = plan.profile, plan.segment
    engine = p.container_runtime.engine
    fm = _pkgs(plan, Component.FABRIC_MANAGER)
    gpu_names = sorted({pkg.name for pkg in plan.packages if pkg.component is not Component.MONITORING})
    allow = sorted(
        {str(seg.cidr), *(str(n) for n in seg.egress_allow), *([f"{plan.mirror.address}/32"] if plan.mirror else [])}
    )
    docker_options: dict[str, Any] = {"log-driver": "journald", "live-restore": True}
    if engine is ContainerEngine.DOCKER:
        # Declared here (not by `nvidia-ctk runtime configure`) so the daemon.json the runtime role
        # renders already has the NVIDIA runtime and both roles agree on one file content.
        docker_options["runtimes"] = {"nvidia": {"path": "nvidia-container-runtime", "args": []}}
        docker_options["features"] = {"cdi": True}
    services = [
        service_vars(
            s.service, engine, p.container_runtime.version, span=s.span, hostname=plan.hostname, mirror=plan.mirror
        )
        for s in plan.services
    ]
    # Registries that get credentials (when a token is given): those of the images, and the mirror's.
    registries = sorted(
        {
            img.split("/", 1)[0]
            for s in plan.services
            if (img := s.service.image) and "/" in img and ("." in img.split("/", 1)[0] or ":" in img.split("/", 1)[0])
        }
        | ({f"{plan.mirror.address}:{plan.mirror.registry_port}"} if plan.mirror else set())
    )
    out = {
        "gpufleet_roles": list(plan.roles),
        "gpufleet_segment": seg.name,
        "gpufleet_airgapped": seg.airgapped,
        # base
        "base_ntp_servers": list(seg.ntp),
        "base_admin_keys": list(site.admin_keys),
        "base_apt_sources": apt_sources(plan),
        "base_apt_sources_exclusive": seg.airgapped or bool(seg.sources) or plan.mirror is not None,
        "base_unattended_upgrades_blacklist": gpu_names,
        # network
        "network_interfaces": _interfaces(plan),
        "network_management_address": str(plan.node.address),
        # airgap_firewall
        "airgap_firewall_allow": allow,
        "airgap_firewall_probe_address": str(seg.egress_probe) if seg.egress_probe else "",
        "airgap_firewall_mirror_address": str(plan.mirror.address) if plan.mirror else "",
        "airgap_firewall_mirror_port": plan.mirror.http_port if plan.mirror else 80,
        # nvidia_driver
        "nvidia_driver_branch": p.driver.branch,
        "nvidia_driver_version": p.driver.version,
        "nvidia_driver_open_modules": p.driver.open_modules,
        "nvidia_driver_packages": _pkgs(plan, Component.DRIVER),
        "nvidia_driver_fabric_manager_packages": fm,
        "nvidia_driver_reboot_policy": plan.reboot_policy.value,
        "nvidia_driver_reboot_timeout": site.reboot.timeout_s,
        "nvidia_driver_fact_file": nodestate.DRIVER_FACT_FILE,  # the probe reads the reboot flag there
        # cuda_toolkit
        "cuda_toolkit_version": p.cuda.version,
        "cuda_toolkit_packages": _pkgs(plan, Component.CUDA),
        # container_runtime
        "container_runtime_engine": engine.value,
        "container_runtime_packages": _pkgs(plan, Component.CONTAINER_RUNTIME),
        "container_runtime_docker_daemon_options": docker_options,
        # nvidia_container_toolkit
        "nvidia_container_toolkit_packages": _pkgs(plan, Component.CONTAINER_TOOLKIT),
        "nvidia_container_toolkit_runtime": engine.value,
        "nvidia_container_toolkit_driver_version": p.driver.version,
        # inference_server
        "inference_server_services": services,
        "inference_server_model_dir": engines.MODEL_ROOT,
        "inference_server_venv_dir": engines.VENV_ROOT,
        "inference_server_rpc_program": engines.RPC_PROGRAM,
        "inference_server_registries": registries,
        # monitoring
        "monitoring_node_exporter_packages": _pkgs(plan, Component.MONITORING),
        "monitoring_dcgm_packages": _pkgs(plan, Component.DCGM),
        "monitoring_dcgm_exporter_image": p.monitoring.dcgm_exporter_image or "",
        "monitoring_container_engine": engine.value,
        "monitoring_dcgm_exporter_port": DCGM_EXPORTER_PORT,  # the validator keeps services off it
        # gpu_validate: the probe's input (names from the plan, infra.plan.nodestate); the comparison with the
        # plan is infra.plan.nodestate.compare, on the controller.
        "gpu_validate_probe": nodestate.probe_spec(plan).as_dict(),
    }
    if plan.fabric_ports:
        # Only nodes on a fabric get these: every other node's variables (and content hash) stay as they were.
        out |= rdma_vars(plan)
    return out


def rdma_vars(plan: NodePlan) -> dict[str, Any]:
    """Variables of the `rdma` role: pinned packages, the ports with their fabric settings, opensm duty."""
    keys = sorted({pp.fabric.partition_key for pp in plan.fabric_ports if pp.fabric.partition_key})
    gpudirect = "none" if plan.node.gpu.count == 0 else "dmabuf" if plan.profile.driver.open_modules else "peermem"
    return {
        "rdma_packages": _pkgs(plan, Component.RDMA),
        "rdma_ports": [pp.as_vars() for pp in plan.fabric_ports],
        "rdma_subnet_manager_fabrics": list(plan.subnet_manager_for),
        "rdma_partition_keys": keys,
        # GPUDirect RDMA: the open kernel modules export GPU memory as dma-buf to the inbox RDMA stack;
        # the proprietary ones need nvidia-peermem (and an OFED kernel with peer-memory support).
        "rdma_gpudirect": gpudirect,
    }
