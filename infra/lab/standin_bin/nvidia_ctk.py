"""`nvidia-ctk` stand-in: CDI spec generation/listing and idempotent runtime configuration (SIMULATED)."""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from typing import Any

try:  # installed as a single file on nodes; a package module in the repo
    from common import GPUS_FILE, load  # type: ignore[import-not-found]
except ImportError:
    from infra.lab.standin_bin.common import GPUS_FILE, load

VERSION_FILE = os.environ.get("GPUFLEET_LAB_CTK_VERSION_FILE", "/usr/lib/gpufleet-lab/container-toolkit.json")
CDI_DIRS = ("/etc/cdi", "/var/run/cdi")
RUNTIME_CONFIGS = {
    "docker": "/etc/docker/daemon.json",
    "containerd": "/etc/containerd/config.toml",
    "crio": "/etc/crio/crio.conf.d/99-nvidia.toml",
}


def cdi_spec(decl: dict[str, Any]) -> dict[str, Any]:
    """CDI spec of kind nvidia.com/gpu: one device per GPU (by index and by UUID) plus `all`."""
    # No GPU device exists on a lab node: every simulated device node is backed by the host's
    # /dev/null (CDI `hostPath`), so `--device nvidia.com/gpu=all` really works in containers.
    def node(path: str) -> dict[str, str]:
        return {"path": path, "hostPath": "/dev/null"}

    devices = []
    for g in decl["gpus"]:
        edits = {"deviceNodes": [node(f"/dev/nvidia{g['index']}")]}
        devices.append({"name": str(g["index"]), "containerEdits": edits})
        devices.append({"name": g["uuid"], "containerEdits": edits})
    devices.append({"name": "all", "containerEdits": {
        "deviceNodes": [node(f"/dev/nvidia{g['index']}") for g in decl["gpus"]]}})
    return {
        "cdiVersion": "0.5.0",
        "kind": "nvidia.com/gpu",
        "devices": devices,
        "containerEdits": {
            "env": ["NVIDIA_VISIBLE_DEVICES=void", "GPUFLEET_LAB_SIMULATED_GPUS=1"],
            "deviceNodes": [node("/dev/nvidiactl"), node("/dev/nvidia-uvm")],
        },
    }


def cdi_devices(dirs: tuple[str, ...] = CDI_DIRS) -> list[str]:
    """Fully qualified device names in the CDI specs found (JSON or the JSON-as-YAML we write)."""
    names = []
    for d in dirs:
        for path in sorted(glob.glob(os.path.join(d, "*.yaml")) + glob.glob(os.path.join(d, "*.json"))):
            try:
                with open(path, encoding="utf-8") as f:
                    spec = json.load(f)
            except (OSError, ValueError):
                continue
            names += [f"{spec['kind']}={dev['name']}" for dev in spec.get("devices", [])]
    return names


def configure_docker(text: str) -> str:
    """daemon.json with the nvidia runtime added (unchanged if already there)."""
    cfg = json.loads(text) if text.strip() else {}
    cfg.setdefault("runtimes", {})["nvidia"] = {"args": [], "path": "nvidia-container-runtime"}
    return json.dumps(cfg, indent=4, sort_keys=True) + "\n"


_CONTAINERD_BLOCK = """
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.nvidia]
  runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.nvidia.options]
    BinaryName = "/usr/bin/nvidia-container-runtime"
"""


def configure_toml(text: str) -> str:
    """containerd/cri-o TOML with the nvidia runtime block appended once."""
    if "runtimes.nvidia]" in text:
        return text
    return text + _CONTAINERD_BLOCK


def main(argv: list[str] | None = None) -> int:
    """Entry point of /usr/bin/nvidia-ctk on lab nodes."""
    p = argparse.ArgumentParser(prog="nvidia-ctk")
    p.add_argument("--version", action="store_true")
    sub = p.add_subparsers(dest="cmd")
    cdi = sub.add_parser("cdi").add_subparsers(dest="sub")
    gen = cdi.add_parser("generate")
    gen.add_argument("--output", default="")
    gen.add_argument("--format", default="yaml")
    cdi.add_parser("list")
    rt = sub.add_parser("runtime").add_subparsers(dest="sub")
    conf = rt.add_parser("configure")
    conf.add_argument("--runtime", default="docker")
    conf.add_argument("--config", default="")
    conf.add_argument("--set-as-default", action="store_true")
    args = p.parse_args(argv)
    if args.version:
        ver = (load(VERSION_FILE) or {}).get("version", "unknown")
        sys.stdout.write(f"NVIDIA Container Toolkit CLI version {ver.split('-')[0]}\ncommit: gpufleet-lab-simulated\n")
        return 0
    if args.cmd == "cdi" and args.sub == "generate":
        decl = load(GPUS_FILE)
        if decl is None:
            sys.stderr.write("ERRO[0000] failed to generate CDI spec: failed to initialize NVML: "
                             "ERROR_LIBRARY_NOT_FOUND\n")
            return 1
        text = json.dumps(cdi_spec(decl), indent=2, sort_keys=True) + "\n"
        if not args.output:
            sys.stdout.write(text)
            return 0
        os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
        sys.stderr.write(f'INFO[0000] Generated CDI spec with version 0.5.0\nINFO[0000] Wrote "{args.output}"\n')
        return 0
    if args.cmd == "cdi" and args.sub == "list":
        names = cdi_devices()
        sys.stderr.write(f"INFO[0000] Found {len(names)} CDI devices\n")
        sys.stdout.write("".join(n + "\n" for n in names))
        return 0
    if args.cmd == "runtime" and args.sub == "configure":
        if args.runtime not in RUNTIME_CONFIGS:
            sys.stderr.write(f"ERRO[0000] unrecognized runtime '{args.runtime}'\n")
            return 1
        path = args.config or RUNTIME_CONFIGS[args.runtime]
        try:
            with open(path, encoding="utf-8") as f:
                old = f.read()
        except FileNotFoundError:
            old = ""
        new = configure_docker(old) if args.runtime == "docker" else configure_toml(old)
        if new != old:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write(new)
        sys.stderr.write(f"INFO[0000] Wrote updated config to {path}\n"
                         f"INFO[0000] It is recommended that {args.runtime} daemon be restarted.\n")
        return 0
    p.print_help(sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
