"""The `mirror` role on the lab's mirror host: check mode, apply, apply again with no change, still serving."""

from __future__ import annotations

import os
import re
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from infra.model.load import project_dir

pytestmark = pytest.mark.lab

LAB = Path("/var/lib/gpufleet/lab")
MIRROR = "198.18.2.10"


def _playbook(tmp: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    inv = tmp / "inventory.ini"
    inv.write_text("[mirrors]\nlab-mirror ansible_python_interpreter=/usr/bin/python3\n")
    root = project_dir()
    env = {**os.environ, "ANSIBLE_ROLES_PATH": str(root / "roles"), "ANSIBLE_PIPELINING": "True",
           "ANSIBLE_SSH_ARGS": f"-F {LAB / 'ssh/config'}", "ANSIBLE_HOST_KEY_CHECKING": "True",
           "ANSIBLE_NOCOLOR": "1", "PATH": f"{root / '.venv/bin'}:{os.environ.get('PATH', '')}"}
    return subprocess.run([str(root / ".venv/bin/ansible-playbook"), "-i", str(inv),
                           str(root / "playbooks/mirror.yml"), *extra],
                          capture_output=True, text=True, timeout=600, env=env, check=False)


def _recap(out: str) -> dict[str, int]:
    m = re.search(r"lab-mirror\s+:\s+(.*)", out)
    assert m, out[-2000:]
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(1))}


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.fixture(scope="module")
def lab_mirror(lab: object) -> None:
    """The session lab (LAB engineer's fixture), with its mirror answering SSH."""
    r = subprocess.run(["ssh", "-F", str(LAB / "ssh/config"), "lab-mirror", "true"], capture_output=True,
                       timeout=20, check=False)
    if r.returncode != 0:
        pytest.skip("lab-mirror does not answer SSH")


def test_mirror_role_is_idempotent_and_serves(lab_mirror: None, tmp_path: Path) -> None:
    """Check mode passes, a converge leaves the mirror serving apt/files/registry, a second converge changes nothing."""
    check = _playbook(tmp_path, "--check", "--diff")
    assert check.returncode == 0 and _recap(check.stdout)["failed"] == 0, check.stdout[-3000:]
    first = _playbook(tmp_path)
    assert first.returncode == 0, first.stdout[-3000:]
    second = _playbook(tmp_path)
    assert second.returncode == 0 and _recap(second.stdout)["changed"] == 0, second.stdout[-3000:]
    assert _status(f"http://{MIRROR}/apt/Release") == 200
    assert _status(f"http://{MIRROR}/files/") == 200
    assert _status(f"http://{MIRROR}/registry/") == 404  # registry storage is never served as files
    assert _status(f"http://{MIRROR}/.gpufleet-hashes.json") == 404  # nor the import hash cache
    assert _status(f"http://{MIRROR}/.gpufleet/imports.log") == 404  # nor import's trees, record and log
    assert _status(f"http://{MIRROR}:5000/v2/") == 200  # no auth: Debian's htpasswd block is gone
