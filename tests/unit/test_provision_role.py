"""roles/provisioning: its units rendered by real Ansible from the lab stack pass `systemd-analyze verify`."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.model.load import load_site
from infra.provision.render import render_site
from tests.unit.ansible_local import run_local_play

ROOT = Path(__file__).resolve().parents[2]
ROLE = ROOT / "roles" / "provisioning"
UNITS = ("gpufleet-provision-dhcp", "gpufleet-provision-http")
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


def _render(tmp: Path, role_vars: dict[str, Any]) -> dict[str, str]:
    """Each unit template through Ansible's own template lookup (one local ansible-playbook run)."""
    tasks = [
        {
            "name": f"Render {u}",
            "ansible.builtin.set_fact": {
                f"u{i}": "{{ lookup('ansible.builtin.template', '%s') }}" % (ROLE / "templates" / f"{u}.service.j2")
            },
        }
        for i, u in enumerate(UNITS)
    ]
    tasks.append(
        {
            "name": "Write",
            "ansible.builtin.copy": {
                "content": "{{ [u0, u1] | to_json }}",
                "dest": str(tmp / "out.json"),
                "mode": "0644",
            },
        }
    )
    play = [{"name": "Render", "hosts": "localhost", "gather_facts": False, "vars": role_vars, "tasks": tasks}]
    run_local_play(play, tmp)
    return dict(zip(UNITS, json.loads((tmp / "out.json").read_text()), strict=True))


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_units_from_the_lab_stack_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    svc = render_site(load_site("lab"))[1]  # the air-gapped segment, served by its mirror
    role_vars: dict[str, Any] = {}
    for f in ("defaults/main.yml", "vars/main.yml"):
        role_vars |= yaml.safe_load((ROLE / f).read_text())
    role_vars |= {"provisioning_address": str(svc.address), "provisioning_http_port": svc.http_port}
    units = _render(tmp_path, role_vars)
    assert f"--bind {svc.address} " in units["gpufleet-provision-http"]
    exec_start = next(ln for ln in units["gpufleet-provision-http"].splitlines() if ln.startswith("ExecStart="))
    assert exec_start.endswith(f" {svc.http_port}")
    root = tmp_path / "root"
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    for name, text in units.items():
        for line in text.splitlines():
            # dnsmasq and python3 need not be installed where the tests run: stand-ins at the exact paths.
            if line.startswith(("ExecStart=", "ExecStartPre=")):
                stub = root / line.split("=", 1)[1].split()[0].lstrip("/")
                stub.parent.mkdir(parents=True, exist_ok=True)
                stub.write_text("#!/bin/sh\n")
                stub.chmod(0o755)
        (root / "etc/systemd/system" / f"{name}.service").write_text(text)
    for name in units:
        p = subprocess.run(
            [SYSTEMD_ANALYZE, "verify", f"--root={root}", f"/etc/systemd/system/{name}.service"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        noise = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.strip()]
        assert p.returncode == 0 and not noise, f"{name}: {noise}"
