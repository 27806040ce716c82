"""`pulumi preview` / `pulumi up` of the lab stack with the real Pulumi CLI, then a no-op preview.

Skipped when the `pulumi` CLI is not on PATH (it cannot be installed on the build machines; see
docs/pulumi.md for installing it). Uses a throwaway file backend and PULUMI_HOME, and a copy of the
stack file (`--config-file`) so neither the user's login nor stacks/Pulumi.lab.yaml is touched.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from infra.review.digest import parse
from infra.review.report import review
from tests.pulumi.conftest import ROOT

PULUMI = shutil.which("pulumi")

pytestmark = [
    pytest.mark.pulumi_cli,
    pytest.mark.lab,
    pytest.mark.skipif(PULUMI is None, reason="the Pulumi CLI is not on PATH (not installable here; "
                       "see docs/pulumi.md 'Installing the Pulumi CLI')"),
]


def _pulumi(args: list[str], env: dict[str, str], timeout: int = 3600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(PULUMI), *args, "--non-interactive"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def _lab_is_up() -> bool:
    p = subprocess.run([str(ROOT / ".venv/bin/gpufleet"), "lab", "status", "--json"], capture_output=True,
                       text=True, timeout=60, check=False)
    return p.returncode == 0


def test_lab_stack_up_then_no_changes(tmp_path: Path) -> None:
    """preview shows creates, up succeeds against the lab, a second preview has no changes."""
    if not _lab_is_up():
        pytest.skip("the lab is not up: run `sudo .venv/bin/gpufleet lab up` first")
    env = {**os.environ, "PULUMI_HOME": str(tmp_path / "home"), "PULUMI_CONFIG_PASSPHRASE": "gpufleet-test-only",
           "PULUMI_SKIP_UPDATE_CHECK": "true"}
    config = tmp_path / "Pulumi.lab.yaml"
    shutil.copy(ROOT / "stacks" / "Pulumi.lab.yaml", config)
    cfg = ["--stack", "lab", "--config-file", str(config)]
    assert _pulumi(["login", f"file://{tmp_path / 'state'}"], env).returncode == 0
    init = _pulumi(["stack", "init", "lab", "--secrets-provider", "passphrase"], env)
    assert init.returncode == 0, init.stderr

    preview = _pulumi(["preview", "--json", *cfg], env)
    assert preview.returncode == 0, preview.stderr
    digest = parse(preview.stdout)
    assert digest.change_summary.get("create", 0) >= 29
    assert {n.action for n in review(digest, None, "lab").nodes} == {"added"}

    up = _pulumi(["up", "--yes", "--skip-preview", *cfg], env)
    assert up.returncode == 0, up.stdout[-4000:] + up.stderr[-4000:]
    outputs = json.loads(_pulumi(["stack", "output", "--json", *cfg[:2]], env).stdout)
    assert set(outputs["nodes"]) == {"lab-gpu01", "lab-gpu02", "lab-gpu03", "lab-gpu04"}

    again = _pulumi(["preview", "--expect-no-changes", *cfg], env)
    assert again.returncode == 0, again.stdout[-4000:]
