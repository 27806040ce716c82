"""The pairwise fabric test: `ib_write_bw` and `ib_write_lat` between every two nodes of a fabric.

Each pair runs perftest's server on one node and its client on the other over RDMA-CM (`-R`: connect by
the fabric address, so the RDMA device is the one the route to that address goes through), through the
one SSH client (`infra.ssh`). The server is started first and bounded by `timeout`; the client retries
while the server is not yet listening. Pairs run one after another: two tests on one link would halve
each other's figure.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from infra import ssh
from infra.fabric.perftest import Bandwidth, Latency, PerftestError, parse_bandwidth, parse_latency
from infra.model.site import Site
from infra.plan.fabric import PortPair

SERVER_TIMEOUT_S = 60
"""A server that never gets its client ends by itself (no perftest left listening on a node)."""
CLIENT_ATTEMPTS = 10
# perftest's defaults except the unit: 5,000 iterations of 64 KiB (bw), 1,000 of 2 bytes (lat).
BW_ARGS = ("ib_write_bw", "-R", "--report_gbits")
LAT_ARGS = ("ib_write_lat", "-R")
MIN_ITERATIONS = 5
"""perftest's least `-n` ("Number of exchanges (at least 5, default 5000)", `ib_write_bw --help`, perftest 4.5)."""
MAX_ITERATIONS = 1_000_000
"""Upper bound of `--iterations`: a million 64 KiB writes is 65 GB, minutes even at 400 Gb/s."""

Spawn = Callable[[Sequence[str]], "subprocess.Popen[bytes]"]


def _spawn(argv: Sequence[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@dataclass
class PairResult:
    """What one pair measured, and whether it meets the fabric's thresholds."""

    label: str
    fabric: str
    threshold_gbps: float
    max_latency_us: float
    bandwidth: Bandwidth | None = None
    latency: Latency | None = None
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Both figures measured and within the thresholds."""
        return (
            not self.errors
            and self.bandwidth is not None
            and self.latency is not None
            and self.bandwidth.average_gbps >= self.threshold_gbps
            and self.latency.typical_us <= self.max_latency_us
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "pair": self.label,
            "fabric": self.fabric,
            "ok": self.ok,
            "bandwidth_gbps": round(self.bandwidth.average_gbps, 2) if self.bandwidth else None,
            "min_bandwidth_gbps": self.threshold_gbps,
            "latency_typical_us": self.latency.typical_us if self.latency else None,
            "max_latency_us": self.max_latency_us,
            "errors": self.errors,
        }


def _one(
    settings: ssh.SshSettings,
    server: tuple[str, str | None],
    client: tuple[str, str | None],
    server_addr: str,
    tool: Sequence[str],
    spawn: Spawn,
) -> str:
    """Run one perftest server/client pair; the client's output."""
    s_host, s_user = server
    c_host, c_user = client
    serve = ssh.shell_command("timeout", str(SERVER_TIMEOUT_S), *tool)
    srv = spawn(ssh.argv(settings, s_host, serve, user=s_user))
    try:
        last = ""
        for _ in range(CLIENT_ATTEMPTS):
            p = ssh.run(
                ssh.argv(settings, c_host, ssh.shell_command(*tool, server_addr), user=c_user),
                host=c_host,
                timeout=SERVER_TIMEOUT_S,
            )
            out = p.stdout.decode(errors="replace")
            if p.returncode == 0:
                return out
            last = out + p.stderr.decode(errors="replace")
            if srv.poll() is not None:
                break  # the server is gone: retrying cannot help
            time.sleep(0.5)
        server_err = b"" if srv.poll() is None else (srv.stderr.read() if srv.stderr else b"")
        words = (last or server_err.decode(errors="replace")).strip()
        raise PerftestError(f"{tool[0]} {c_host} → {s_host} failed: {words.splitlines()[-1] if words else 'no output'}")
    finally:
        if srv.poll() is None:
            srv.terminate()
        srv.wait(timeout=10)


def run_pair(
    site: Site, pair: PortPair, settings: ssh.SshSettings, spawn: Spawn = _spawn, iterations: int | None = None
) -> PairResult:
    """Bandwidth then latency between the pair's nodes (server on `a`, client on `b`).

    `iterations`: perftest's `-n` for both tests (None: perftest's defaults). Fewer for slow links, e.g.
    Soft-RoCE in emulated VMs, where 5,000 writes of 64 KiB take longer than the server's time limit.
    """
    if iterations is not None and not MIN_ITERATIONS <= iterations <= MAX_ITERATIONS:
        raise ValueError(f"iterations {iterations}: give {MIN_ITERATIONS}–{MAX_ITERATIONS}")
    extra = () if iterations is None else ("-n", str(iterations))
    nodes = site.nodes_by_name
    a, b = nodes[pair.a[0]], nodes[pair.b[0]]
    result = PairResult(pair.label, pair.fabric.name, pair.threshold_gbps, pair.fabric.max_latency_us)
    server = (str(a.address), a.ssh_user)
    client = (str(b.address), b.ssh_user)
    addr = str(pair.a[1].address)
    try:
        result.bandwidth = parse_bandwidth(_one(settings, server, client, addr, (*BW_ARGS, *extra), spawn))
        result.latency = parse_latency(_one(settings, server, client, addr, (*LAT_ARGS, *extra), spawn))
    except (PerftestError, ssh.SshError) as exc:
        result.errors.append(str(exc))
    return result
