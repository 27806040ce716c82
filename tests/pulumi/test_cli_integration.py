"""`pulumi preview` / `pulumi up` of the lab stack with the real Pulumi CLI, then the identity cases.

After `up`: a no-op preview; the same stack previewed from another checkout path (no change); lab-gpu02
moved to another segment (no create/replace/delete of any `-bmc` step, its converge replaced); a node
removed (its `-decommission` step deleted). Without the lab, the example stack's secrets are decrypted
by the real CLI with the documented example passphrase.

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
import yaml

from infra.review.digest import parse
from infra.review.report import review
from tests.pulumi.conftest import ROOT
from tests.pulumi.pulumi_passphrase import EXAMPLE_PASSPHRASE

PULUMI = shutil.which("pulumi")

pytestmark = [
    pytest.mark.pulumi_cli,
    pytest.mark.skipif(PULUMI is None, reason="the Pulumi CLI is not on PATH (not installable here; "
                       "see docs/pulumi.md 'Installing the Pulumi CLI')"),
]


def _pulumi(args: list[str], env: dict[str, str], timeout: int = 3600,
            cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(PULUMI), *args, "--non-interactive"], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def _steps(preview_json: str) -> list[tuple[str, str]]:
    """(op, resource name) of each step of `pulumi preview --json` (the engine's ShowPreviewDigest `steps`)."""
    return [(s["op"], s["urn"].rsplit("::", 1)[1]) for s in json.loads(preview_json).get("steps", [])]


def _other_checkout(dst: Path) -> Path:
    """The tracked files of this checkout at another path, sharing its .venv (as a second clone would have one)."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        if (ROOT / rel).is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dst / rel)
    (dst / ".venv").symlink_to(ROOT / ".venv")
    return dst


def _lab_is_up() -> bool:
    p = subprocess.run([str(ROOT / ".venv/bin/gpufleet"), "lab", "status", "--json"], capture_output=True,
                       text=True, timeout=60, check=False)
    return p.returncode == 0


@pytest.mark.lab
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

    # The same stack from a checkout at another path: relative `dir`, nothing changes.
    elsewhere = _other_checkout(tmp_path / "elsewhere")
    moved_checkout = _pulumi(["preview", "--expect-no-changes", *cfg], env, cwd=elsewhere)
    assert moved_checkout.returncode == 0, moved_checkout.stdout[-4000:]

    # lab-gpu02 to the air-gapped segment: a re-converge, never a reinstall.
    site = yaml.safe_load(config.read_text())
    node = next(n for n in site["config"]["gpufleet:site"]["nodes"] if n["hostname"] == "lab-gpu02")
    node["segment"], node["address"] = "airgap", "198.18.2.13"
    moved = tmp_path / "moved" / "Pulumi.lab.yaml"
    moved.parent.mkdir()
    moved.write_text(yaml.safe_dump(site))
    preview = _pulumi(["preview", "--json", "--stack", "lab", "--config-file", str(moved)], env)
    assert preview.returncode == 0, preview.stderr
    steps = _steps(preview.stdout)
    assert not [s for s in steps if s[1].endswith("-bmc") and s[0] in {"create", "replace", "delete",
                                                                        "create-replacement", "delete-replaced"}]
    assert ("replace", "lab-gpu02-converge") in steps

    # lab-gpu04 removed: its decommission step is deleted (that delete powers it off).
    site = yaml.safe_load(config.read_text())
    site["config"]["gpufleet:site"]["nodes"] = [
        n for n in site["config"]["gpufleet:site"]["nodes"] if n["hostname"] != "lab-gpu04"]
    site["config"]["gpufleet:site"]["services"] = [
        s for s in site["config"]["gpufleet:site"].get("services", []) if "lab-gpu04" not in s["nodes"]]
    removed = tmp_path / "removed" / "Pulumi.lab.yaml"
    removed.parent.mkdir()
    removed.write_text(yaml.safe_dump(site))
    preview = _pulumi(["preview", "--json", "--stack", "lab", "--config-file", str(removed)], env)
    assert preview.returncode == 0, preview.stderr
    assert ("delete", "lab-gpu04-decommission") in _steps(preview.stdout)


@pytest.mark.parametrize("stack", ["example-prod", "example-airgap"])
def test_example_stack_secrets_open_with_the_example_passphrase(stack: str, tmp_path: Path) -> None:
    """The real CLI decrypts the examples' `secure:` values (made by tests/pulumi/pulumi_passphrase.py)."""
    env = {**os.environ, "PULUMI_HOME": str(tmp_path / "home"), "PULUMI_SKIP_UPDATE_CHECK": "true",
           "PULUMI_CONFIG_PASSPHRASE": EXAMPLE_PASSPHRASE}
    config = tmp_path / f"Pulumi.{stack}.yaml"
    shutil.copy(ROOT / "stacks" / f"Pulumi.{stack}.yaml", config)
    assert _pulumi(["login", f"file://{tmp_path / 'state'}"], env).returncode == 0
    init = _pulumi(["stack", "init", stack, "--secrets-provider", "passphrase"], env)
    assert init.returncode == 0, init.stderr
    got = _pulumi(["config", "get", "gpufleet:bmcPassword", "--stack", stack, "--config-file", str(config)], env)
    assert got.returncode == 0, got.stderr
    assert got.stdout.strip() == f"example-bmc-password-{stack}"
