"""The lab stack's spanning service: tiny-span, one llama.cpp instance across lab-gpu02 (head) and lab-gpu01
(worker), converged by the product's roles like any service and benched beside the single-node tiny-connected.

- `gpufleet lab up` gives each of the two nodes a fabric port (`fab0`, a veth on the lab fabric's own bridge,
  198.18.8.0/24, its address from the stack); the `rdma` role installs the pinned RDMA stack and renders the
  port setup, but applies nothing (nspawn hosts declare kernel_modules/network_apply false).
- `gpufleet converge --node lab-gpu01 --node lab-gpu02`: the worker's unit runs the RPC backend bound to its
  fabric address; the head's unit registers it and serves the endpoint; the role's group check reaches the
  worker from the head before it waits for the head's endpoint.
- `gpufleet bench-inference` with the same load against both services (tiny-connected: the same model, one
  node): both complete every request; the worker really served the head's layers.

Kept within ~3 minutes of CI: one converge of the two nodes, two short benches.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from infra.lab.session import Lab

pytestmark = pytest.mark.lab

HEAD, WORKER = "lab-gpu02", "lab-gpu01"
WORKER_FABRIC, HEAD_FABRIC, RPC_PORT = "198.18.8.11", "198.18.8.12", 50052
UNIT = "gpufleet-inference-tiny-span.service"
# The load of benchmarks 6c (docs/benchmarks.md): 32 requests × 32 tokens, one at a time. Every request is
# sent however slow a loaded machine makes the pair (bench-inference stops sending after 120 s by default).
LOAD = ("--requests", "32", "--max-tokens", "32", "--concurrency", "1", "--max-duration", "420")


def gpufleet(*args: str, timeout: float = 1500) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "infra.cli", *args], capture_output=True, text=True, timeout=timeout,
                          check=False)


@pytest.fixture(scope="module")
def converged(lab: Lab) -> dict[str, Any]:
    """Both nodes of the group converged from the lab stack (the worker's batch runs before the head's)."""
    r = gpufleet("converge", "--stack", "lab", "--node", WORKER, "--node", HEAD, "--json")
    assert r.returncode == 0, f"converge failed:\n{r.stdout[-4000:]}\n{r.stderr[-3000:]}"
    out: dict[str, Any] = json.loads(r.stdout)
    return out


def test_fabric_ports_carry_the_group(lab: Lab, converged: dict[str, Any]) -> None:
    """Each node has its fabric address on fab0; the head reaches the worker's RPC backend over it."""
    for node, addr in ((WORKER, WORKER_FABRIC), (HEAD, HEAD_FABRIC)):
        r = lab.ssh(node, "ip -4 -o addr show dev fab0")
        assert f"inet {addr}/24" in r.stdout, r.stdout + r.stderr
    listening = lab.ssh(WORKER, f"ss -Htln 'sport = :{RPC_PORT}'").stdout
    assert f"{WORKER_FABRIC}:{RPC_PORT}" in listening, listening  # bound to the fabric address only
    route = lab.ssh(HEAD, f"ip -4 route get {WORKER_FABRIC}").stdout
    assert "dev fab0" in route, route  # the RPC traffic leaves through the fabric port, not the segment's


def test_rdma_role_installs_the_stack_and_says_why_it_applies_nothing(lab: Lab, converged: dict[str, Any]) -> None:
    """Pinned rdma-core/perftest held, the setup program rendered, its unit not started on a host that cannot."""
    for node in (WORKER, HEAD):
        held = lab.ssh(node, "apt-mark showhold").stdout.split()
        assert {"rdma-core", "perftest"} <= set(held), held
        version = lab.ssh(node, "dpkg-query -W -f '${Version}' rdma-core").stdout
        assert version == "44.0-2"
        assert lab.ssh(node, "bash -n /usr/local/libexec/gpufleet-rdma-setup").returncode == 0
        assert lab.ssh(node, "systemctl is-enabled gpufleet-rdma.service").stdout.strip() != "enabled"


def test_spanning_service_answers_the_bench_beside_the_single_node_one(lab: Lab, converged: dict[str, Any]) -> None:
    """bench-inference with the same load: the spanning head and the single-node service complete every request."""
    results = {}
    for service in ("tiny-connected", "tiny-span"):
        r = gpufleet("bench-inference", "--stack", "lab", "--service", service, *LOAD, "--facts-dir", "-", "--json",
                     timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        data = json.loads(r.stdout)
        (result,) = data["endpoints"]
        metrics = result["metrics"]
        assert (metrics["completed"], metrics["failed"], metrics["not_sent"]) == (32, 0, 0), (service, metrics)
        results[service] = result
    assert results["tiny-span"]["label"] == "tiny-span@lab-gpu02"  # the head's endpoint is the service's
    m = {s: r["metrics"] for s, r in results.items()}
    print("SPAN-BENCH " + json.dumps(m, sort_keys=True))  # the figures docs/benchmarks.md quotes
    # The worker served the head: ggml's RPC server logs each client it accepts.
    log = lab.ssh(WORKER, f"journalctl -u {UNIT} --no-pager -o cat").stdout
    assert "Accepted client connection" in log, log[-2000:]
