"""Project settings that work from a fresh clone (`pulumi install`, Pulumi Deployments), checked without the CLI.

With `toolchain: uv` the Python language host runs `uv sync` in the program directory, which walks up to
uv.lock and installs what it pins into `virtualenv` (pulumi sdk/python/toolchain/uv.go, v3.19x). So a
fresh clone gets the SDK exactly when uv.lock is current and pins the SDK and the project itself.
"""

from __future__ import annotations

import tomllib
from typing import Any

import yaml
from packaging.requirements import Requirement

from infra.components.commands import CLI
from tests.pulumi.conftest import ROOT


def _project() -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / "Pulumi.yaml").read_text()))


def _lock_package(name: str) -> dict[str, Any]:
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    return next(p for p in lock["package"] if p["name"] == name)


def test_runtime_installs_from_the_lock_into_the_venv_the_steps_use() -> None:
    """toolchain uv + virtualenv .venv: the venv whose bin/gpufleet every step runs (commands.CLI)."""
    options = _project()["runtime"]["options"]
    assert options == {"toolchain": "uv", "virtualenv": ".venv"}
    assert f"{options['virtualenv']}/bin/gpufleet" == CLI
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "gpufleet" in pyproject["project"]["scripts"]


def test_uv_lock_pins_the_sdk_and_the_project_itself() -> None:
    """The locked project is installed editable from the checkout, with pulumi and pulumi-command."""
    pkg = _lock_package("gpufleet")
    assert pkg["source"] == {"editable": "."}
    assert {"pulumi", "pulumi-command"} <= {d["name"] for d in pkg["dependencies"]}


def test_uv_lock_is_current_with_pyproject() -> None:
    """The lock's recorded requirements are pyproject's (what `uv lock --check` compares); else re-run `uv lock`."""
    declared = {Requirement(r).name: Requirement(r).specifier
                for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    locked = {d["name"]: Requirement(d["name"] + d.get("specifier", "")).specifier
              for d in _lock_package("gpufleet")["metadata"]["requires-dist"] if "marker" not in d}
    assert locked == declared
