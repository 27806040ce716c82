"""Run a playbook on this machine with the venv's ansible-playbook (render tests of role templates)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml


def run_local_play(play: list[dict[str, Any]], work: Path, *, check: bool = False) -> str:
    """Write `play` under `work` and run it against localhost (local connection); fail the test on error.

    `check` runs it with `--check` (as `gpufleet check` does; a play's `check_mode: true` does not set
    `ansible_check_mode`, which the roles test). Returns ansible-playbook's output (task names and their
    ok/changed/skipping lines).
    """
    (work / "play.yml").write_text(yaml.safe_dump(play))
    env = {
        **os.environ,
        "ANSIBLE_LOCALHOST_WARNING": "false",
        "ANSIBLE_INVENTORY_UNPARSED_WARNING": "false",
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
        "ANSIBLE_HOME": str(work / ".ansible"),
        "ANSIBLE_LOCAL_TEMP": str(work / ".tmp"),
        "ANSIBLE_PYTHON_INTERPRETER": sys.executable,
    }
    p = subprocess.run(
        [str(Path(sys.executable).parent / "ansible-playbook"), "-i", "localhost,", "-c", "local",
         str(work / "play.yml"), *(["--check"] if check else [])],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout
