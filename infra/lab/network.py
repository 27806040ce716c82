"""Lab networking: one bridge per segment and one nftables table of ours; ip_forward stays 0.

Bridged frames pass through the host's netfilter here (bridge-nf-call-iptables=1), so the forward
chain decides what hosts on a bridge may reach: their own bridge only. Nothing is routed between
bridges or out of the machine, and air-gapped segments cannot open connections to the lab host.
"""

from __future__ import annotations

from pathlib import Path

from infra.lab.config import Bridge
from infra.lab.sh import run

NFT_TABLE = "gpufleet_lab"  # the lab stack's table; another stack gets gpufleet_<stack>


def table_name(stack: str) -> str:
    """Our nftables table for a lab stack (one per lab, so a second lab never touches the first)."""
    return f"gpufleet_{stack.replace('-', '_')}"


def render_ruleset(bridges: tuple[Bridge, ...] | list[Bridge], table: str = NFT_TABLE) -> str:
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


def apply_ruleset(bridges: tuple[Bridge, ...] | list[Bridge], table: str = NFT_TABLE) -> None:
    """Replace our table atomically (one nft transaction: delete + add)."""
    text = render_ruleset(bridges, table)
    if table_exists(table):
        text = f"delete table inet {table}\n" + text
    run(["nft", "-f", "-"], input=text, timeout=10)


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
