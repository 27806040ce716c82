"""Small factories for raw `gpufleet:site` objects (plain dicts, as a stack file holds them)."""

from __future__ import annotations

import copy
from typing import Any

DIGEST = "sha256:" + "ab" * 32


def make_profile(**overrides: Any) -> dict[str, Any]:
    """A valid pinned software profile."""
    p: dict[str, Any] = {
        "driver": {"branch": "570", "version": "570.133.20", "open_modules": True},
        "cuda": {"version": "12.8.1"},
        "container_runtime": {"engine": "podman", "version": "4.3.1+ds1-8+deb12u1+b3"},
        "container_toolkit": {"version": "1.17.8-1"},
        "fabric_manager": {"enabled": True, "version": "570.133.20"},
        "dcgm": {"enabled": True, "version": "1:4.2.3-1"},
    }
    p.update(overrides)
    return p


def make_node(
    hostname: str = "gpu01",
    address: str = "10.0.0.11",
    segment: str = "compute",
    mac: str = "02:00:00:00:00:11",
    **overrides: Any,
) -> dict[str, Any]:
    """A valid 8x H100 NVSwitch node."""
    n: dict[str, Any] = {
        "hostname": hostname,
        "segment": segment,
        "address": address,
        "macs": [mac],
        "os": "ubuntu-22.04",
        "gpu": {"model": "H100", "count": 8, "nvswitch": True},
        # Each node its own BMC: two nodes on one BMC endpoint must name distinct system ids.
        "bmc": {"endpoint": f"https://bmc-{hostname}.example", "username": "admin", "password": {"env": "BMC_PW"}},
    }
    n.update(overrides)
    return n


def make_service(**overrides: Any) -> dict[str, Any]:
    """A valid vLLM service serving Llama-3.1-8B on gpu01."""
    s: dict[str, Any] = {
        "name": "llama-8b",
        "engine": "vllm",
        "model": {
            "name": "llama-3.1-8b",
            "revision": "0e9e39f",
            "source": "hf://meta-llama/Llama-3.1-8B",
            "dtype": "bf16",
            "context_length": 8192,
        },
        "image": f"docker.io/vllm/vllm-openai@{DIGEST}",
        "tensor_parallel": 1,
        "nodes": ["gpu01"],
    }
    s.update(overrides)
    return s


def make_site(**overrides: Any) -> dict[str, Any]:
    """A valid site: one connected and one air-gapped segment, two nodes, a mirror and a service."""
    site: dict[str, Any] = {
        "name": "test",
        "default_profile": "hgx",
        "profiles": {"hgx": make_profile()},
        "segments": [
            {"name": "compute", "cidr": "10.0.0.0/24", "vlan": 10, "gateway": "10.0.0.1"},
            {
                "name": "iso",
                "cidr": "10.0.1.0/24",
                "vlan": 11,
                "airgapped": True,
                "mirror": "mirror01",
                "egress_allow": ["10.0.1.10/32"],
            },
        ],
        "mirrors": [
            {"name": "mirror01", "segment": "iso", "address": "10.0.1.10", "keyring": "/etc/gpufleet/keys/mirror01.gpg"}
        ],
        "nodes": [
            make_node(),
            make_node("gpu02", "10.0.1.11", "iso", "02:00:00:00:01:11"),
        ],
        "services": [make_service()],
    }
    site.update(overrides)
    return copy.deepcopy(site)
