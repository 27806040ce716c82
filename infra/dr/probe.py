"""Read a node's actual state in one SSH round trip: packages, managed files, services, GPUs, reboot flag.

The probe is a small Python program sent on stdin to `python3 -` on the node (Ansible already needs
python3 there). It only reads; it never changes the node. What it looks at comes from the plan:

- packages: the plan's pinned package names (`NodePlan.packages`), through `dpkg-query` (or `rpm`);
- files: every file under /etc carrying Ansible's `ansible_managed` marker, plus the gpufleet-named
  and GPU-stack paths in `MANAGED_GLOBS` (files rendered from dicts carry no marker);
- services: `expected_services(plan)`;
- GPUs: `nvidia-smi --query-gpu` (what validation compares against the stack);
- reboot: /run/reboot-required and the nvidia_driver role's fact file (valid only for the boot it names).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import yaml

from infra.model.load import project_dir
from infra.model.site import ContainerEngine, NodeRole
from infra.plan.node import NodePlan
from infra.plan.packages import Component

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
STATE_FILES = ("/etc/ansible/facts.d/gpufleet.fact",)
MANAGED_MARKER = "Ansible managed"
NVIDIA_SMI_FIELDS = "name,memory.total,driver_version,uuid,index,pci.bus_id"
DRIVER_FACT_FILE = "/etc/ansible/facts.d/gpufleet.fact"
_DEFAULT_INFERENCE_PREFIX = "gpufleet-inference-"


def expected_services(plan: NodePlan) -> list[str]:
    """Systemd units that must be enabled and running on the node, from the plan.

    Unit names follow the packages the plan pins (stand-ins in the lab ship the same units); inference
    services are `<prefix><service name>.service` with the inference_server role's prefix.
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
    prefix = inference_unit_prefix()
    units.extend(f"{prefix}{s.name}.service" for s in plan.services)
    return units


@cache
def inference_unit_prefix() -> str:
    """Prefix of inference service units, read from the inference_server role so both agree on one name."""
    try:
        data = yaml.safe_load((project_dir() / "roles" / "inference_server" / "vars" / "main.yml").read_text())
        return str(data["_inference_server_unit_prefix"])
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return _DEFAULT_INFERENCE_PREFIX


# Runs on the node with the system python3; standard library only, read-only.
_REMOTE = r"""
import glob, hashlib, json, os, shutil, subprocess, sys
spec = json.loads(SPEC)
out = {"packages": {}, "files": {}, "services": {}, "gpus": [], "reboot_required": False, "errors": []}

def run(argv):
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        return p.returncode, p.stdout, p.stderr
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 127, "", str(exc)

names = spec["packages"]
for n in names:
    out["packages"][n] = None
if shutil.which("dpkg-query"):
    held = set()
    rc, so, _ = run(["dpkg-query", "-W", "-f", "${Package}\t${Version}\t${db:Status-Abbrev}\n"] + names)
    for line in so.splitlines():
        parts = line.split("\t")
        # Status-Abbrev: desired (i install, h hold, ...), then state (i = installed), then error flag.
        if len(parts) == 3 and parts[0] in out["packages"] and parts[2][1:2] == "i":
            out["packages"][parts[0]] = parts[1]
            if parts[2][:1] == "h":
                held.add(parts[0])
    rc, so, _ = run(["apt-mark", "showhold"])
    out["held"] = sorted((held | set(so.split())) & set(names))
elif shutil.which("rpm"):
    for n in names:
        rc, so, _ = run(["rpm", "-q", "--qf", "%{EPOCH}:%{VERSION}-%{RELEASE}", n])
        if rc == 0:
            out["packages"][n] = so.replace("(none):", "")
    out["held"] = []

paths = set()
for pattern in spec["globs"]:
    paths.update(p for p in glob.glob("/" + pattern, recursive=True) if os.path.isfile(p))
for root, dirs, files in os.walk("/etc"):
    dirs[:] = [d for d in dirs if d not in ("ssl", "alternatives")]
    for f in files:
        p = os.path.join(root, f)
        try:
            if os.path.islink(p) or os.path.getsize(p) > 1048576:
                continue
            with open(p, "rb") as fh:
                if spec["marker"].encode() in fh.read(4096):
                    paths.add(p)
        except OSError:
            pass
for p in sorted(paths - set(spec["state_files"])):
    try:
        with open(p, "rb") as fh:
            out["files"][p] = hashlib.sha256(fh.read()).hexdigest()
    except OSError as exc:
        out["errors"].append(f"{p}: {exc.strerror}")

for unit in spec["services"]:
    rc, so, _ = run(["systemctl", "show", "-p", "ActiveState,UnitFileState,LoadState", unit])
    props = dict(l.split("=", 1) for l in so.splitlines() if "=" in l)
    out["services"][unit] = {"active": props.get("ActiveState", "unknown"),
                             "enabled": props.get("UnitFileState", "") or props.get("LoadState", "unknown")}

if shutil.which("nvidia-smi"):
    rc, so, se = run(["nvidia-smi", "--query-gpu=" + spec["smi_fields"], "--format=csv,noheader,nounits"])
    keys = spec["smi_fields"].split(",")
    if rc == 0:
        out["gpus"] = [dict(zip(keys, [c.strip() for c in l.split(",")])) for l in so.splitlines() if l.strip()]
    else:
        out["errors"].append("nvidia-smi: " + (se.strip() or f"exit {rc}")[:200])
else:
    out["errors"].append("nvidia-smi: not installed")

boot_id = open("/proc/sys/kernel/random/boot_id").read().strip()
try:
    fact = json.load(open(spec["fact_file"]))
except (OSError, ValueError):
    fact = {}
out["reboot_required"] = bool(os.path.exists("/run/reboot-required") or (
    fact.get("reboot_required") and fact.get("boot_id") == boot_id))
out["driver_fact"] = {k: v for k, v in fact.items() if k != "boot_id"}
json.dump(out, sys.stdout, sort_keys=True)
"""


def remote_program(plan: NodePlan) -> str:
    """The probe program for one node (sent on stdin to `python3 -`)."""
    spec = {
        "packages": sorted({p.name for p in plan.packages}),
        "globs": list(MANAGED_GLOBS),
        "marker": MANAGED_MARKER,
        "state_files": list(STATE_FILES),
        "services": expected_services(plan),
        "smi_fields": NVIDIA_SMI_FIELDS,
        "fact_file": DRIVER_FACT_FILE,
    }
    return f"SPEC = {json.dumps(json.dumps(spec))}\n{_REMOTE}"


@dataclass(frozen=True)
class NodeState:
    """What the probe found on a node."""

    hostname: str
    packages: dict[str, str | None]
    held: tuple[str, ...]
    files: dict[str, str]
    services: dict[str, dict[str, str]]
    gpus: tuple[dict[str, str], ...]
    reboot_required: bool
    errors: tuple[str, ...] = ()
    driver_fact: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, hostname: str, data: dict[str, Any]) -> NodeState:
        """Parse the probe's JSON."""
        return cls(
            hostname=hostname,
            packages=dict(data.get("packages", {})),
            held=tuple(data.get("held", ())),
            files=dict(data.get("files", {})),
            services={k: dict(v) for k, v in data.get("services", {}).items()},
            gpus=tuple(dict(g) for g in data.get("gpus", ())),
            reboot_required=bool(data.get("reboot_required")),
            errors=tuple(data.get("errors", ())),
            driver_fact=dict(data.get("driver_fact", {})),
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON form (also the on-disk fingerprint record)."""
        return {
            "hostname": self.hostname,
            "packages": self.packages,
            "held": list(self.held),
            "files": self.files,
            "services": self.services,
            "gpus": list(self.gpus),
            "reboot_required": self.reboot_required,
            "errors": list(self.errors),
            "driver_fact": self.driver_fact,
        }
