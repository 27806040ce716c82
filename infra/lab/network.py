"""Lab networking: one bridge per segment and one nftables table of ours; ip_forward stays 0.

Bridged frames pass through the host's netfilter here (bridge-nf-call-iptables=1), so the forward
chain decides what hosts on a bridge may reach: their own bridge only. Nothing is routed between
bridges or out of the machine, and air-gapped segments cannot open connections to the lab host.

One exception, when the stack federates an air-gapped segment's Prometheus (`infra.observe.server
.federation_flows`): the lab host is then the site's boundary firewall for exactly those flows — TCP
from the site view's host to the other Prometheus host's port, and that connection's replies. Only
the bridges of such a flow forward (per-interface `forwarding`; the global ip_forward stays 0), and
every other packet between bridges is still dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

from infra.lab.config import Bridge, LabSpec
from infra.lab.sh import run
from infra.observe.server import federation_flows

NFT_TABLE = "gpufleet_lab"  # the lab stack's table; another stack gets gpufleet_<stack>


def table_name(stack: str) -> str:
    """Our nftables table for a lab stack (one per lab, so a second lab never touches the first)."""
    return f"gpufleet_{stack.replace('-', '_')}"


@dataclass(frozen=True)
class Flow:
    """One allowed TCP connection between two bridges (a federation pull), replies included."""

    from_bridge: str
    from_address: IPv4Address
    to_bridge: str
    to_address: IPv4Address
    port: int


def lab_flows(spec: LabSpec) -> list[Flow]:
    """The stack's federation flows, on the lab's bridges."""
    return [
        Flow(spec.bridge(f.from_segment).name, f.from_address, spec.bridge(f.to_segment).name, f.to_address, f.port)
        for f in federation_flows(spec.site)
    ]


def host_routes(spec: LabSpec, host: str) -> list[tuple[IPv4Address, IPv4Address]]:
    """(destination, gateway) routes a lab host needs for its end of a flow: via its own bridge's address."""
    out = []
    for f in federation_flows(spec.site):
        for me, my_segment, peer in ((f.from_host, f.from_segment, f.to_address),
                                     (f.to_host, f.to_segment, f.from_address)):
            if me == host:
                out.append((peer, spec.bridge(my_segment).address.ip))
    return out


def render_ruleset(
    bridges: tuple[Bridge, ...] | list[Bridge], table: str = NFT_TABLE, flows: Sequence[Flow] = ()
) -> str:
    """The nftables table (deterministic text; `nft -c -f` validates it)."""
    names = ", ".join(f'"{b.name}"' for b in bridges)
    lines = [
        f"table inet {table} {{",
        "  chain forward {",
        "    type filter hook forward priority filter - 10; policy accept;",
        "    # Same-bridge traffic (bridged frames seen through br_netfilter) stays on its segment.",
    ]
    for b in bridges:
        lines.append(f'    iifname "{b.name}" oifname "{b.name}" accept')
    if flows:
        lines.append("    # Federation: the site view's host to another segment's Prometheus, that port only.")
    for f in flows:
        lines += [
            f'    iifname "{f.from_bridge}" oifname "{f.to_bridge}" ip saddr {f.from_address} '
            f"ip daddr {f.to_address} tcp dport {f.port} ct state new,established accept",
            f'    iifname "{f.to_bridge}" oifname "{f.from_bridge}" ip saddr {f.to_address} '
            f"ip daddr {f.from_address} tcp sport {f.port} ct state established accept",
        ]
    lines += [
        "    # Nothing across bridges, nothing from a lab bridge to the outside, nothing in.",
        f"    iifname {{ {names} }} drop",
        f"    oifname {{ {names} }} drop",
        "  }",
        "  chain input {",
        "    type filter hook input priority filter - 10; policy accept;",
    ]
    for b in bridges:
        if b.airgapped:
            lines += [
                f"    # {b.segment} is air-gapped: the controller may open SSH to it, it may not open anything back.",
                f'    iifname "{b.name}" ct state established,related accept',
                f'    iifname "{b.name}" drop',
            ]
    lines += ["  }", "}"]
    return "\n".join(lines) + "\n"


def bridge_exists(name: str) -> bool:
    """Does the interface exist."""
    return Path(f"/sys/class/net/{name}").exists()


def ensure_bridge(b: Bridge) -> None:
    """Create the bridge with the lab host's segment address (idempotent)."""
    if not bridge_exists(b.name):
        run(["ip", "link", "add", b.name, "type", "bridge"], timeout=10)
    out = run(["ip", "-o", "-4", "addr", "show", "dev", b.name], timeout=10).stdout
    if str(b.address) not in out:
        run(["ip", "addr", "replace", str(b.address), "dev", b.name], timeout=10)
    run(["ip", "link", "set", b.name, "up"], timeout=10)


def delete_bridge(name: str) -> None:
    """Remove a bridge if present."""
    if bridge_exists(name):
        run(["ip", "link", "del", name], timeout=10)


def apply_ruleset(
    bridges: tuple[Bridge, ...] | list[Bridge], table: str = NFT_TABLE, flows: Sequence[Flow] = ()
) -> None:
    """Replace our table atomically (one nft transaction: delete + add), then let the flows' bridges forward."""
    text = render_ruleset(bridges, table, flows)
    if table_exists(table):
        text = f"delete table inet {table}\n" + text
    run(["nft", "-f", "-"], input=text, timeout=10)
    # Per-interface forwarding: packets entering these bridges may be routed (the table above decides
    # which); net.ipv4.ip_forward, and so every other interface of this machine, stays as it is.
    for name in sorted({f.from_bridge for f in flows} | {f.to_bridge for f in flows}):
        Path(f"/proc/sys/net/ipv4/conf/{name}/forwarding").write_text("1\n")


def table_exists(table: str = NFT_TABLE) -> bool:
    """Is our nftables table loaded."""
    return run(["nft", "list", "table", "inet", table], timeout=10, check=False).returncode == 0


def delete_table(table: str = NFT_TABLE) -> None:
    """Remove our table if present."""
    if table_exists(table):
        run(["nft", "delete", "table", "inet", table], timeout=10)


def ip_forward() -> str:
    """Current net.ipv4.ip_forward (the lab never turns it on)."""
    return Path("/proc/sys/net/ipv4/ip_forward").read_text().strip()
