"""Probe states for tests: a node exactly as its plan says, to change one thing at a time."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from infra.plan.node import NodePlan
from infra.plan.nodestate import (
    CDI_ALL,
    EndpointState,
    FabricPortState,
    Gpu,
    NodeState,
    ServiceState,
    expected_services,
    probe_spec,
)


def converged_state(plan: NodePlan, **overrides: Any) -> NodeState:
    """What a correctly converged node looks like to the probe."""
    gpus = tuple(
        Gpu(
            name=plan.gpu_product_name,
            memory_mib=str(plan.gpu_memory_mib),
            driver_version=plan.profile.driver.version,
            uuid=f"GPU-{i:04d}",
            index=str(i),
            pci_bus_id=f"00000000:{i:02X}:00.0",
        )
        for i in range(plan.node.gpu.count)
    )
    files = {"/etc/apt/preferences.d/gpufleet-nvidia-driver": "a" * 64, "/etc/cdi/nvidia.yaml": "b" * 64}
    st = NodeState(
        hostname=plan.hostname,
        packages={p.name: p.version for p in plan.packages},
        held=tuple(p.name for p in plan.packages),
        files=files,
        services={u: ServiceState("active", "enabled") for u in expected_services(plan)},
        gpus=gpus,
        reboot_required=False,
        recorded_files=dict(files),
        cdi=(*(f"nvidia.com/gpu={i}" for i in range(plan.node.gpu.count)), CDI_ALL),
        endpoints=tuple(
            EndpointState(name, f"http://127.0.0.1:{port}{path}", 200)
            for name, port, path in probe_spec(plan).endpoints
        ),
        # Every declared fabric port present, up at its declared speed, on an ACTIVE RDMA port.
        fabric_ports=tuple(
            FabricPortState(
                fabric,
                kind,
                value,
                netdev=value if kind == "netdev" else f"fab{i}",
                operstate="up",
                speed_mbps=int(pp.port.speed_gbps * 1000),
                rdma_device=f"mlx5_{i}",
                rdma_port=1,
                rdma_state="4: ACTIVE",
                rdma_phys_state="5: LinkUp",
                rdma_rate=f"{pp.port.speed_gbps} Gb/sec (4X)",
            )
            for i, (pp, (fabric, kind, value)) in enumerate(
                zip(plan.fabric_ports, probe_spec(plan).fabric_ports, strict=True)
            )
        ),
    )
    return replace(st, **overrides)
