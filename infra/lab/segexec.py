"""Segment-local execution in the lab: the lab stack with an execution host per segment, and what proves it.

The lab stack itself stays `local` (the lab's fast path). `execution_stack` writes a copy whose segments run
Ansible on lab hosts: the air-gapped segment on its mirror (`lab-mirror`), the connected segment on the
upstream host (`lab-upstream`, a dedicated host named with its address). Same hosts, names and addresses, so
the running lab serves it unchanged.

Lab-only step, `authorize_execution_hosts`: each execution host gets its own SSH key, authorized for root on
the nodes of its segment, written through the hosts' disks (as `lab up` writes the controller's key). In a real
site the execution host's key is one of `admin_keys`, installed by the base role.

`SshCounters` is the evidence: nftables counters on this machine's output path (locally generated packets
only, i.e. the controller's own connections; the execution hosts' traffic to their nodes is bridged between
containers and never passes it), one per lab host, of TCP packets to port 22.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from infra.ansible.remote import runtime
from infra.ansible.remote.job import exec_host
from infra.bundle.declared import Kind, runtime_declared
from infra.bundle.lock import Lock, decl_dict, lock_path_for, runtime_artifact
from infra.bundle.signing import generate_key
from infra.lab import hosts
from infra.lab.config import HostKind, LabSpec, Paths
from infra.model.load import load_site

TABLE = "gpufleet_segexec_proof"


def execution_plan(spec: LabSpec) -> dict[str, dict[str, str]]:
    """Segment → its `execution` entry: an air-gapped segment's mirror, a connected segment's outside host."""
    out: dict[str, dict[str, str]] = {}
    for seg in spec.site.segments:
        if seg.airgapped and seg.mirror:
            out[seg.name] = {"host": seg.mirror}
            continue
        serving = [h for h in spec.hosts if h.segment == seg.name and h.kind is HostKind.OUTSIDE]
        if serving:
            out[seg.name] = {"host": serving[0].name, "address": str(serving[0].address.ip)}
    return out


def execution_stack(spec: LabSpec, source: Path, out: Path) -> Path:
    """Write the lab stack with segment-local execution to `out` (a `Pulumi.<name>.yaml`); returns it."""
    data = yaml.safe_load(source.read_text(encoding="utf-8"))
    plan = execution_plan(spec)
    for seg in data["config"]["gpufleet:site"]["segments"]:
        if seg["name"] in plan:
            seg["execution"] = plan[seg["name"]]
    out.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return out


def authorize_execution_hosts(spec: LabSpec, paths: Paths) -> dict[str, str]:
    """Give each execution host a key of its own and authorize it on its segment's nodes (lab only).

    Returns execution host → public key. Idempotent: an existing key is kept, a line is added once.
    """
    out: dict[str, str] = {}
    for segment, entry in execution_plan(spec).items():
        root = hosts.root_of(paths, entry["host"])
        key = root / "root/.ssh/id_ed25519"
        if not key.exists():
            key.parent.mkdir(parents=True, exist_ok=True)
            key.parent.chmod(0o700)
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"gpufleet-exec@{entry['host']}", "-f", str(key)],
                check=True,
                timeout=30,
            )
        pub = key.with_suffix(".pub").read_text(encoding="utf-8").strip()
        out[entry["host"]] = pub
        for node in spec.nodes:
            if node.segment != segment:
                continue
            auth = hosts.root_of(paths, node.name) / "root/.ssh/authorized_keys"
            lines = auth.read_text(encoding="utf-8").splitlines() if auth.exists() else []
            if pub not in lines:
                auth.write_text("\n".join([*lines, pub]) + "\n", encoding="utf-8")
                auth.chmod(0o600)
    return out


class SshCounters:
    """nftables counters of the controller's SSH packets to each lab host (an own table; removed by `close`)."""

    def __init__(self, spec: LabSpec) -> None:
        self.addresses = {h.name: str(h.address.ip) for h in spec.hosts}

    def open(self) -> None:
        """Create the table: output hook, one counter rule per host."""
        self.close()
        subprocess.run(["nft", "-f", "-"], input=self.text().encode(), check=True, timeout=30)

    def text(self) -> str:
        """The nftables script of the table."""
        rules = "\n".join(
            f'    ip daddr {addr} tcp dport 22 counter comment "{name}"'
            for name, addr in sorted(self.addresses.items())
        )
        return (
            f"table inet {TABLE} {{\n  chain out {{\n    type filter hook output priority 0; policy accept;\n"
            f"{rules}\n  }}\n}}\n"
        )

    def read(self) -> dict[str, int]:
        """Packets counted per host name so far."""
        p = subprocess.run(["nft", "-j", "list", "table", "inet", TABLE], capture_output=True, check=True, timeout=30)
        out: dict[str, int] = {}
        for item in json.loads(p.stdout).get("nftables", []):
            rule: dict[str, Any] | None = item.get("rule")
            if not rule:
                continue
            packets = next((e["counter"]["packets"] for e in rule.get("expr", []) if "counter" in e), 0)
            out[str(rule.get("comment"))] = int(packets)
        return out

    def close(self) -> None:
        """Delete the table (no error when it is not there)."""
        subprocess.run(["nft", "delete", "table", "inet", TABLE], capture_output=True, check=False, timeout=30)


RUNTIME_STORE = Path("/var/cache/gpufleet/bundle/artifacts")
"""The connected side's artifacts store of the lab (as docs/airgap.md "The lab"): the runtime's wheels land in
its `files/gpufleet-exec/`, fetched once from the registry URLs uv.lock names and checked against their sha256."""


def segexec_lock(site_lock: Path, stack: Path) -> Path:
    """The lock of the execution stack: the lab's lock plus the execution runtime, as `gpufleet lock` records it.

    The execution stack differs from the lab stack only in `segments[].execution`, and the runtime's part of a
    lock needs no network (uv.lock holds its sizes and sha256s), so the lab's other entries are kept as they
    are instead of re-resolving every package. The runtime entries come from the product's own functions.
    """
    site = load_site(path=stack)
    lock = Lock.from_json(site_lock.read_text(encoding="utf-8"))
    lock.declared = [d for d in lock.declared if d["kind"] != Kind.RUNTIME.value]
    lock.artifacts = [a for a in lock.artifacts if a.kind != Kind.RUNTIME.value]
    notes: list[str] = []
    for d in runtime_declared(site):
        lock.declared.append(decl_dict(d))
        lock.artifacts.append(runtime_artifact(d, notes))
    assert not notes, notes
    out = lock_path_for(stack)
    out.write_text(lock.to_json(), encoding="utf-8")
    return out


def prepare(spec: LabSpec, paths: Paths, source: Path, work: Path) -> Path:
    """The execution stack written into `work`, execution hosts keyed and given the runtime; returns the stack.

    The runtime goes on through the product path: its files in the stack's lock, a bundle of them (`bundle build
    --kind runtime`) signed and imported into lab-mirror, `exec-host install` fetching them from that mirror on
    the air-gapped execution host; the connected segment has no mirror, so its host gets them with `--stream`.
    """
    stack = execution_stack(spec, source, work / "Pulumi.lab-segexec.yaml")
    authorize_execution_hosts(spec, paths)
    segexec_lock(source.with_name(source.name.removesuffix(".yaml") + ".lock.json"), stack)
    runtime.fetch(RUNTIME_STORE / "files" / "gpufleet-exec", runtime.spec())
    secret, keyring = work / "bundle.sec.asc", work / "bundle.pub.asc"
    generate_key(work / "gnupg", "gpufleet lab bundle key (SIMULATED) <bundle@lab.invalid>", secret, keyring)
    site = load_site(path=stack)
    for seg in site.segments:
        if exec_host(site, seg.name) is None or not seg.mirror:
            continue
        bundle = work / f"bundle-{seg.name}"
        # The lab mirror keeps its import record across runs: a serial newer than any earlier one.
        step("bundle", "build", "--stack-file", str(stack), "--segment", seg.name, "--kind", Kind.RUNTIME.value,
             "--out", str(bundle), "--artifacts", str(RUNTIME_STORE), "--signing-key", str(secret),
             "--serial", str(int(time.time())))
        step("bundle", "import", str(bundle), "--stack-file", str(stack), "--mirror", seg.mirror,
             "--keyring", str(keyring), "--mirror-key", str(paths.gnupg_dir / seg.mirror))
    step("exec-host", "install", "--stack-file", str(stack), "--stream", "--out", str(work / "stream"), "--json")
    return stack


def step(*argv: str) -> str:
    """Run one gpufleet command as a user would; its stdout (AssertionError with its output when it fails)."""
    p = subprocess.run([str(Path(sys.executable).parent / "gpufleet"), *argv], capture_output=True, text=True,
                       timeout=900, check=False)
    if p.returncode != 0:
        out = f"{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
        raise AssertionError(f"gpufleet {' '.join(argv[:2])}: exit {p.returncode}\n{out}")
    return p.stdout
