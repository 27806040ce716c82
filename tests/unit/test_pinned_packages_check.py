"""roles/pinned_packages in check mode reports a hold it would restore (issue 17: `check` saw no lost hold).

Runs the real role in check mode on this machine (nothing is changed: check mode, and the hold task does not
run) against a package that is installed here and not held, as after `apt-mark unhold` on a node.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.unit.ansible_local import run_local_play

ROLE = Path(__file__).resolve().parents[2] / "roles" / "pinned_packages"
PACKAGE = "bash"  # installed on every Debian system


def _installed_unheld() -> str | None:
    """The version of PACKAGE when dpkg has it installed and not held (`ii`), else None."""
    if not shutil.which("dpkg-query"):
        return None
    p = subprocess.run(
        ["dpkg-query", "-W", "-f=${Version} ${db:Status-Abbrev}", PACKAGE], capture_output=True, text=True, check=False
    )
    version, _, status = p.stdout.partition(" ")
    return version if p.returncode == 0 and status.strip() == "ii" else None


def test_check_mode_reports_a_missing_hold(tmp_path: Path) -> None:
    version = _installed_unheld()
    if version is None:
        pytest.skip(f"needs dpkg with {PACKAGE} installed and not held")
    out = tmp_path / "published.json"
    play = [
        {
            "name": "Pinned packages in check mode",
            "hosts": "localhost",
            "gather_facts": True,
            "gather_subset": ["!all", "!min", "distribution"],
            "tasks": [
                {
                    "name": "Pin, install and hold",
                    "ansible.builtin.include_role": {"name": str(ROLE)},
                    "vars": {
                        "pinned_packages_list": [{"name": PACKAGE, "version": version}],
                        "pinned_packages_label": "test",
                        "pinned_packages_pin_file": "gpufleet-check-mode-test",
                        "pinned_packages_publish_as": "probe_test",
                    },
                },
                {
                    "name": "Keep what the role published",
                    "ansible.builtin.copy": {
                        "content": "{{ pinned_packages_published | default({}) | to_json }}",
                        "dest": str(out),
                        "mode": "0644",
                    },
                    "check_mode": False,
                },
            ],
        }
    ]
    run_local_play(play, tmp_path, check=True)
    published = json.loads(out.read_text())
    # The version is right (nothing to install), the hold is missing: reported as a hold, not as a version.
    assert published == {"probe_test:hold": [PACKAGE]}
    assert _installed_unheld() == version  # check mode held nothing
    assert not Path("/etc/apt/preferences.d/gpufleet-check-mode-test").exists()
