"""The collection's execution environment and the inventory export an AWX/AAP project uses."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from infra.ansible.ee import EE_FILE, definition
from infra.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_execution_environment_is_current_and_pins_what_the_controller_runs() -> None:
    """execution-environment.yml is what `gpufleet collection ee` writes, and its ansible-core, ansible-runner
    and mitogen are exactly the versions uv.lock gives the controller."""
    assert main(["collection", "ee", "--check"]) == 0
    locked = {p["name"]: p["version"] for p in tomllib.loads((ROOT / "uv.lock").read_text())["package"]}
    deps = yaml.safe_load((ROOT / EE_FILE).read_text())["dependencies"]
    assert deps["ansible_core"]["package_pip"] == f"ansible-core=={locked['ansible-core']}"
    assert deps["ansible_runner"]["package_pip"] == f"ansible-runner=={locked['ansible-runner']}"
    assert f"mitogen=={locked['mitogen']}" in deps["python"]
    assert definition(ROOT) == yaml.safe_load((ROOT / EE_FILE).read_text())


def test_ansible_builder_accepts_the_definition(tmp_path: Path) -> None:
    """`ansible-builder create` (the real tool) turns the definition and the built collection into a context."""
    assert main(["collection", "build", "--out", str(tmp_path)]) == 0
    (tmp_path / EE_FILE).write_text((ROOT / EE_FILE).read_text())
    builder = Path(sys.executable).parent / "ansible-builder"
    p = subprocess.run([str(builder), "create", "-f", EE_FILE, "-c", "ctx"], cwd=tmp_path, capture_output=True,
                       text=True, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    assert list((tmp_path / "ctx" / "_build").glob("gpufleet-fleet-*.tar.gz"))


def test_inventory_export_is_the_converge_inventory(capsys: pytest.CaptureFixture[str]) -> None:
    """`gpufleet inventory` prints the inventory converge builds: every node of the selection with its role
    variables, and no secret (the registry token is injected by AWX at run time)."""
    from infra.ansible.inventory import build_inventory
    from infra.model.load import load_site
    from infra.plan.node import plan_site

    assert main(["inventory", "--stack", "lab", "--segment", "airgap"]) == 0
    printed = json.loads(capsys.readouterr().out)
    site = load_site("lab")
    nodes = [n for n in plan_site(site).nodes if n.segment.name == "airgap"]
    assert printed == json.loads(json.dumps(build_inventory(site, nodes)))
    assert "registry_token" not in json.dumps(printed)


def test_inventory_of_an_unknown_segment_is_invalid_input(capsys: pytest.CaptureFixture[str]) -> None:
    """A selection naming nothing: exit 2 with the known segments, no traceback."""
    assert main(["inventory", "--stack", "lab", "--segment", "nowhere"]) == 2
    assert "nowhere" in capsys.readouterr().err
