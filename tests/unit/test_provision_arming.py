"""Only a reimage arms a node's install: roles/provisioning re-runs never do (issue 20).

The role's script tasks run for real (ansible-playbook, local connection) into a temporary HTTP root;
arming and the deploy's done report are infra/provision/httpd.py, the file the role installs.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.model.load import parse_site
from infra.provision.httpd import ArmError, arm, mark_done
from infra.provision.render import HTTPD_PATH, ImageRecord, SegmentService, install_script_name, render_site
from tests.unit.ansible_local import run_local_play
from tests.unit.test_image import SHA, _site

ROOT = Path(__file__).resolve().parents[2]
ROLE = ROOT / "roles" / "provisioning"


def _service() -> tuple[SegmentService, str]:
    site = parse_site(_site())
    (svc, *_) = render_site(site, images={"debian-12-node": ImageRecord(1 << 20, SHA)})
    return svc, site.nodes[0].macs[0].replace(":", "-")


def _converge(tmp: Path, root: Path, files: dict[str, str]) -> str:
    """The role's script tasks, as a converge runs them (roles path = this checkout)."""
    role_vars: dict[str, Any] = yaml.safe_load((ROLE / "vars" / "main.yml").read_text())
    role_vars |= {"provisioning_http_root": str(root), "provisioning_http_files": files}
    play = [{
        "name": "Scripts", "hosts": "localhost", "gather_facts": False, "vars": role_vars,
        "tasks": [{"name": "Role scripts", "ansible.builtin.include_tasks": str(ROLE / "tasks" / "scripts.yml")}],
    }]  # fmt: skip
    (root / "ipxe" / "local").mkdir(parents=True, exist_ok=True)
    (root / "ipxe" / "install").mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("ANSIBLE_ROLES_PATH", str(ROOT / "roles"))
    return run_local_play(play, tmp)


def test_converges_never_rearm_only_arming_does(tmp_path: Path) -> None:
    svc, mac = _service()
    root = tmp_path / "http"
    live = root / "ipxe" / f"{mac}.ipxe"
    install_text = svc.http_files[f"ipxe/{mac}.ipxe"]
    local_text = svc.http_files[f"ipxe/local/{mac}.ipxe"]
    assert "kernel " in install_text and "kernel " not in local_text

    # A stale node's files (no longer in the stack) are swept; a new node starts on "boot from disk".
    (root / "firstboot").mkdir(parents=True)
    (root / "ipxe" / "install").mkdir(parents=True)
    stale = ["ipxe/52-54-00-00-00-99.ipxe", "ipxe/install/52-54-00-00-00-99.ipxe", "firstboot/52-54-00-00-00-99.tar.gz"]
    for rel in stale:
        (root / rel).write_text("old")
    _converge(tmp_path, root, svc.http_files)
    assert (root / install_script_name(mac.replace("-", ":"))).read_text() == install_text
    assert live.read_text() == local_text
    assert not any((root / rel).exists() for rel in stale)

    # Arming (what reimage/rebuild run over SSH) switches to the install and places the first-boot data.
    arm(root, mac, b"first-boot")
    assert live.read_text() == install_text
    fb = root / "firstboot" / f"{mac}.tar.gz"
    assert fb.read_bytes() == b"first-boot" and stat.S_IMODE(fb.stat().st_mode) == 0o600

    # A converge while armed keeps the install armed (and its data) ...
    _converge(tmp_path, root, svc.http_files)
    assert live.read_text() == install_text and fb.exists()
    # ... the deploy's done report switches to the disk, and a converge afterwards does not re-arm.
    assert mark_done(root, mac)
    _converge(tmp_path, root, svc.http_files)
    assert live.read_text() == local_text and not fb.exists()


def test_arm_refuses_bad_macs_and_nodes_without_an_install_script(tmp_path: Path) -> None:
    (tmp_path / "ipxe" / "install").mkdir(parents=True)
    with pytest.raises(ArmError, match="hexhyp"):
        arm(tmp_path, "../../etc/passwd", b"")
    with pytest.raises(ArmError, match="no install script"):
        arm(tmp_path, "52-54-00-00-00-01", b"x")
    assert not (tmp_path / "firstboot").exists() and not (tmp_path / "ipxe" / "52-54-00-00-00-01.ipxe").exists()


def test_arm_command_line_reads_the_firstboot_data_from_stdin(tmp_path: Path) -> None:
    (tmp_path / "ipxe" / "install").mkdir(parents=True)
    (tmp_path / "ipxe" / "install" / "52-54-00-00-00-01.ipxe").write_text("#!ipxe\nkernel x\n")
    script = ROOT / "infra" / "provision" / "httpd.py"
    run = [sys.executable, str(script), "--root", str(tmp_path), "--arm"]
    ok = subprocess.run([*run, "52-54-00-00-00-01"], input=b"data", capture_output=True, check=False)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "firstboot" / "52-54-00-00-00-01.tar.gz").read_bytes() == b"data"
    bad = subprocess.run([*run, "52-54-00-00-00-02"], input=b"", capture_output=True, check=False)
    assert bad.returncode == 1 and b"no install script" in bad.stderr


def test_the_role_installs_the_server_the_controller_arms_with() -> None:
    role_vars = yaml.safe_load((ROLE / "vars" / "main.yml").read_text())
    assert role_vars["_provisioning_httpd"] == HTTPD_PATH
    assert (ROLE / "files" / "provision_httpd.py").read_bytes() == (ROOT / "infra/provision/httpd.py").read_bytes()
