"""Generate large valid sites (raw `gpufleet:site` objects) for scale tests and benchmarks."""

from __future__ import annotations

from typing import Any

_DIGEST = "sha256:" + "ab" * 32


def generate_site(n_nodes: int, nodes_per_segment: int = 250, served_nodes: int = 64) -> dict[str, Any]:
    """A valid site of `n_nodes` 8x H100 NVSwitch nodes on /22 segments, one vLLM service on the first nodes."""
    n_segments = max(1, (n_nodes + nodes_per_segment - 1) // nodes_per_segment)
    segments = [
        {
            "name": f"seg{s:03d}",
            "cidr": f"10.{s // 64}.{(s % 64) * 4}.0/22",
            "vlan": 100 + s,
            "gateway": f"10.{s // 64}.{(s % 64) * 4}.1",
        }
        for s in range(n_segments)
    ]
    nodes = []
    for i in range(n_nodes):
        s, k = divmod(i, nodes_per_segment)
        third = (s % 64) * 4 + (k + 10) // 256
        nodes.append(
            {
                "hostname": f"gpu{i:05d}",
                "segment": f"seg{s:03d}",
                "address": f"10.{s // 64}.{third}.{(k + 10) % 256}",
                "macs": [f"02:{i >> 24 & 255:02x}:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}:01"],
                "os": "ubuntu-22.04",
                "gpu": {"model": "H100", "count": 8, "nvswitch": True},
                "bmc": {
                    "endpoint": f"https://bmc-gpu{i:05d}.example",
                    "username": "admin",
                    "password": {"config": "bmcPassword"},
                },
            }
        )
    return {
        "name": f"generated-{n_nodes}",
        "default_profile": "hgx",
        "profiles": {
            "hgx": {
                "driver": {"branch": "570", "version": "570.133.20"},
                "cuda": {"version": "12.8.1"},
                "container_runtime": {"engine": "docker", "version": "26.1.3-0ubuntu1~22.04.1"},
                "container_toolkit": {"version": "1.17.8-1"},
                "fabric_manager": {"enabled": True, "version": "570.133.20"},
                "dcgm": {"enabled": True, "version": "1:4.2.3-1"},
            }
        },
        "segments": segments,
        "nodes": nodes,
        "services": [
            {
                "name": "llama-8b",
                "engine": "vllm",
                "model": {
                    "name": "llama-3.1-8b",
                    "revision": "0e9e39f",
                    "source": "hf://meta-llama/Llama-3.1-8B",
                    "context_length": 8192,
                },
                "image": f"docker.io/vllm/vllm-openai@{_DIGEST}",
                "nodes": [n["hostname"] for n in nodes[: min(n_nodes, served_nodes)]],
            }
        ],
    }
