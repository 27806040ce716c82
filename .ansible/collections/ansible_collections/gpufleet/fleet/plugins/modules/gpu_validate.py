#!/usr/bin/python
"""Read-only probe of a GPU node against the plan: GPUs, versions, fabric manager, CDI, endpoints."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.request

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
module: gpu_validate
short_description: Compare what a GPU node runs with what the plan declares (read-only)
description:
  - Runs nvidia-smi, dpkg-query or rpm, systemctl, nvidia-ctk and HTTP health probes; changes nothing.
options:
  product_name: {type: str, required: true, description: GPU product name nvidia-smi must report.}
  gpu_count: {type: int, required: true, description: Number of GPUs declared.}
  memory_mib: {type: int, default: 0, description: memory.total nvidia-smi must report (0 skips).}
  driver_version: {type: str, required: true, description: Pinned driver version.}
  cuda_version: {type: str, required: true, description: Pinned CUDA toolkit version.}
  packages: {type: list, elements: dict, default: [], description: Pinned packages (name, version).}
  fabric_manager_required: {type: bool, default: false, description: Fabric manager must be active.}
  endpoints: {type: list, elements: dict, default: [], description: Inference endpoints (name, port, path).}
  fact_file: {type: path, default: /etc/ansible/facts.d/gpufleet.fact, description: Driver state file.}
author: gpufleet
"""


def _run(argv: list[str]) -> tuple[int, str]:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 127, str(exc)
    return p.returncode, p.stdout


def _installed(names: list[str]) -> dict[str, str]:
    if not names:
        return {}
    if os.path.exists("/usr/bin/dpkg-query"):
        _rc, out = _run(["dpkg-query", "-W", "-f=${Package} ${Version} ${db:Status-Abbrev}\n", *names])
        return {p[0]: p[1] for p in (line.split() for line in out.splitlines()) if len(p) >= 3 and p[2] in ("ii", "hi")}
    _rc, out = _run(["rpm", "-q", "--qf", "%{NAME} %{VERSION}-%{RELEASE}\n", *names])
    return {p[0]: p[1] for p in (line.split() for line in out.splitlines()) if len(p) == 2}


def _endpoint(e: dict[str, object]) -> dict[str, object]:
    url = f"http://127.0.0.1:{e['port']}{e['path']}"
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            status = r.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (urllib.error.URLError, OSError):
        status = 0
    return {"name": e["name"], "url": url, "status": status, "ok": status == 200}


def probe(p: dict[str, object]) -> dict[str, object]:
    """Every check, each with what was expected and what was seen."""
    problems: list[str] = []
    rc, out = _run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader,nounits"])
    seen = (
        [
            dict(zip(("name", "memory_mib", "driver_version"), (c.strip() for c in line.split(",")), strict=False))
            for line in out.splitlines()
            if line.strip()
        ]
        if rc == 0
        else []
    )
    names_ok = all(g.get("name") == p["product_name"] for g in seen)
    mem_ok = not p["memory_mib"] or all(str(g.get("memory_mib")) == str(p["memory_mib"]) for g in seen)
    gpus_ok = rc == 0 and len(seen) == p["gpu_count"] and names_ok and mem_ok
    if not gpus_ok:
        problems.append(
            f"GPUs seen {[g.get('name') for g in seen]} (nvidia-smi rc={rc}) != declared "
            f"{p['gpu_count']}x {p['product_name']}"
        )
    drivers = sorted({g.get("driver_version", "") for g in seen})
    driver_ok = drivers == [p["driver_version"]]
    if not driver_ok:
        problems.append(f"driver seen {drivers} != pinned {p['driver_version']}")
    wanted = {str(x["name"]): str(x["version"]) for x in p["packages"]}  # type: ignore[attr-defined]
    have = _installed(sorted(wanted))
    mismatched = [
        {"name": n, "pinned": v, "installed": have.get(n, "")} for n, v in sorted(wanted.items()) if have.get(n) != v
    ]
    if mismatched:
        problems.append(
            "packages not at the pinned version: "
            + ", ".join(f"{m['name']} {m['installed'] or 'missing'} != {m['pinned']}" for m in mismatched)
        )
    fm_active = None
    if p["fabric_manager_required"]:
        _rc_fm, out_fm = _run(["systemctl", "is-active", "nvidia-fabricmanager"])
        fm_active = out_fm.strip() == "active"
        if not fm_active:
            problems.append(f"fabric manager is {out_fm.strip() or 'missing'}, must be active on this NVSwitch node")
    rc_cdi, out_cdi = _run(["nvidia-ctk", "cdi", "list"])
    cdi = sorted(line.strip() for line in out_cdi.splitlines() if line.strip().startswith("nvidia.com/gpu="))
    cdi_ok = rc_cdi == 0 and "nvidia.com/gpu=all" in cdi and len(cdi) >= int(p["gpu_count"]) + 1  # type: ignore[call-overload]
    if not cdi_ok:
        problems.append(f"CDI devices {cdi} (rc={rc_cdi}) do not list every GPU and nvidia.com/gpu=all")
    endpoints = [_endpoint(e) for e in p["endpoints"]]  # type: ignore[attr-defined]
    problems.extend(
        f"endpoint {e['name']} {e['url']} answered {e['status'] or 'nothing'}" for e in endpoints if not e["ok"]
    )
    try:
        with open(str(p["fact_file"]), encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError):
        state = {}
    return {
        "passed": not problems,
        "problems": problems,
        "gpus": {
            "declared": {"product_name": p["product_name"], "count": p["gpu_count"], "memory_mib": p["memory_mib"]},
            "seen": seen,
            "ok": gpus_ok,
        },
        "driver": {"pinned": p["driver_version"], "seen": drivers, "ok": driver_ok},
        "cuda": {"pinned": p["cuda_version"]},
        "packages": {"mismatched": mismatched, "ok": not mismatched},
        "fabric_manager": {"required": p["fabric_manager_required"], "active": fm_active},
        "cdi": {"devices": cdi, "ok": cdi_ok},
        "endpoints": endpoints,
        "reboot_required": bool(state.get("reboot_required", False)),
    }


def main() -> None:
    """Ansible entry point."""
    module = AnsibleModule(
        argument_spec={
            "product_name": {"type": "str", "required": True},
            "gpu_count": {"type": "int", "required": True},
            "memory_mib": {"type": "int", "default": 0},
            "driver_version": {"type": "str", "required": True},
            "cuda_version": {"type": "str", "required": True},
            "packages": {"type": "list", "elements": "dict", "default": []},
            "fabric_manager_required": {"type": "bool", "default": False},
            "endpoints": {"type": "list", "elements": "dict", "default": []},
            "fact_file": {"type": "path", "default": "/etc/ansible/facts.d/gpufleet.fact"},
        },
        supports_check_mode=True,
    )
    module.exit_json(changed=False, result=probe(module.params))


if __name__ == "__main__":
    main()
