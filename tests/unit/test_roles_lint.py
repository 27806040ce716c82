"""Roles and playbooks pass yamllint and a syntax check; specs are complete.

ansible-lint (--offline, production profile) is a static check of scripts/test.sh, not run again here:
it takes ~18 s, a third of the unit tests' budget.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
ROLES = sorted(p.name for p in (ROOT / "roles").iterdir() if p.is_dir() and p.name != "mirror")
OURS = [f"roles/{r}" for r in ROLES] + ["playbooks/node.yml", "playbooks/site.yml", "playbooks/validate.yml"]


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
        "ANSIBLE_ROLES_PATH": str(ROOT / "roles"),
        "NO_COLOR": "1",
    }


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run a lint tool from the project root with the project's venv and roles path."""
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False, env=_env())


def test_every_planned_role_exists() -> None:
    """Every role the plan can ask for exists (the mirror role belongs to the bundle)."""
    from infra.plan.node import ROLE_ORDER

    assert set(ROLE_ORDER) <= set(ROLES)


@pytest.mark.parametrize("role", ROLES)
def test_argument_specs_cover_every_default(role: str) -> None:
    """Every public default has a spec entry with type, default and description, and vice versa."""
    defaults = yaml.safe_load((ROOT / "roles" / role / "defaults" / "main.yml").read_text()) or {}
    spec = yaml.safe_load((ROOT / "roles" / role / "meta" / "argument_specs.yml").read_text())
    options = spec["argument_specs"]["main"]["options"]
    required = {name for name, opt in options.items() if opt.get("required")}
    assert set(options) - required == set(defaults)
    for name, opt in options.items():
        assert name.startswith(role + "_")
        if name in required:  # the caller must pass it: a default would hide a missing argument
            assert "default" not in opt and "description" in opt, name
            continue
        assert {"type", "default", "description"} <= set(opt), name
        assert opt["default"] == defaults[name], name


def test_node_playbook_includes_roles_in_plan_order() -> None:
    """playbooks/node.yml includes exactly ROLE_ORDER, in that order, each only where the plan lists it."""
    from infra.plan.node import ROLE_ORDER

    play = yaml.safe_load((ROOT / "playbooks" / "node.yml").read_text())[0]
    included = [t["ansible.builtin.include_role"]["name"] for t in play["tasks"]]
    assert included == list(ROLE_ORDER)
    assert [t["when"] for t in play["tasks"]] == [f"'{r}' in gpufleet_roles" for r in ROLE_ORDER]


def test_yamllint_clean() -> None:
    """yamllint (the project's .yamllint) finds nothing in our roles and playbooks."""
    p = _run([str(BIN / "yamllint"), "-s", "-c", str(ROOT / ".yamllint"), *OURS])
    assert p.returncode == 0, p.stdout + p.stderr


def test_playbooks_pass_syntax_check() -> None:
    """ansible-playbook --syntax-check accepts every playbook."""
    p = _run(
        [
            str(BIN / "ansible-playbook"),
            "-i",
            "localhost,",
            "--syntax-check",
            "playbooks/site.yml",
            "playbooks/node.yml",
            "playbooks/validate.yml",
        ]
    )
    assert p.returncode == 0, p.stdout + p.stderr


def test_docs_reference_matches_argument_specs() -> None:
    """docs/roles.md's variable reference is the one generated from the argument specs."""
    from infra.ansible.docs import main

    assert main(["--check"]) == 0
