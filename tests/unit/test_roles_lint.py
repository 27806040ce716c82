"""Roles and playbooks pass yamllint and a syntax check; specs are complete.

ansible-lint (--offline, production profile) is a static check of scripts/test.sh, not run again here:
it takes ~18 s, a third of the unit tests' budget.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from infra.ansible.collection import link_collections

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
ROLES = sorted(p.name for p in (ROOT / "roles").iterdir() if p.is_dir() and p.name != "mirror")
OURS = [f"roles/{r}" for r in ROLES] + ["playbooks/node.yml", "playbooks/site.yml", "playbooks/validate.yml"]


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
        "ANSIBLE_ROLES_PATH": str(ROOT / "roles"),
        # The roles call the collection's module by FQCN, as the runner sets it up (infra.ansible.collection).
        "ANSIBLE_COLLECTIONS_PATH": str(link_collections(ROOT, Path(tempfile.mkdtemp(prefix="gpf-coll-")))),
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


def _tasks(items: list[dict] | None) -> list[dict]:
    """Every task of a task list, blocks flattened."""
    out: list[dict] = []
    for t in items or []:
        out += _tasks(t["block"]) + _tasks(t.get("rescue")) + _tasks(t.get("always")) if "block" in t else [t]
    return out


def _list_sources(expr: str, role_vars: dict[str, str]) -> set[str]:
    """The role arguments a `{{ ... }}` expression is built from (role vars resolved)."""
    import re

    found: set[str] = set()
    for name in re.findall(r"\b[a-z_][a-z0-9_]*\b", expr.strip("{} ")):
        found |= _list_sources(role_vars[name], role_vars) if name in role_vars else {name}
    return found


def test_pinned_packages_include_sites_satisfy_its_spec() -> None:
    """Every include of pinned_packages passes arguments its spec accepts, built from validated role arguments.

    The sites skip Ansible's per-include argument check (one task per package set per node), so this is
    where a wrong or missing argument is caught.
    """
    from ansible.module_utils.common.arg_spec import ArgumentSpecValidator

    spec = yaml.safe_load((ROOT / "roles" / "pinned_packages" / "meta" / "argument_specs.yml").read_text())
    options = spec["argument_specs"]["main"]["options"]
    present_options = spec["argument_specs"]["present"]["options"]
    published: list[str] = []
    present_sites: list[str] = []
    for role in ROLES:
        role_options = yaml.safe_load((ROOT / "roles" / role / "meta" / "argument_specs.yml").read_text())[
            "argument_specs"
        ]["main"].get("options", {})
        vars_file = ROOT / "roles" / role / "vars" / "main.yml"
        role_vars = (yaml.safe_load(vars_file.read_text()) or {}) if vars_file.exists() else {}
        for path in sorted((ROOT / "roles" / role / "tasks").glob("*.yml")):
            for task in _tasks(yaml.safe_load(path.read_text())):
                include = task.get("ansible.builtin.include_role")
                if not include or include["name"] != "pinned_packages":
                    continue
                args = task["vars"]
                assert include.get("rolespec_validate") is False, (path, task["name"])
                if include.get("tasks_from") == "present.yml":
                    # Unpinned packages a role needs: a list of names from the role's own arguments.
                    literal = {k: v for k, v in args.items() if k != "pinned_packages_present"}
                    result = ArgumentSpecValidator(present_options).validate({**literal, "pinned_packages_present": []})
                    assert not result.error_messages, (path, task["name"], result.error_messages)
                    value = args["pinned_packages_present"]
                    if isinstance(value, str):
                        for source in _list_sources(value, role_vars):
                            assert role_options[source]["type"] == "list", (path, source)
                            assert role_options[source]["elements"] == "str", (path, source)
                    else:
                        assert all(isinstance(v, str) for v in value), (path, value)
                    present_sites.append(role)
                    continue
                assert "tasks_from" not in include, (path, task["name"])
                literal = {k: v for k, v in args.items() if k != "pinned_packages_list"}
                result = ArgumentSpecValidator(options).validate({**literal, "pinned_packages_list": []})
                assert not result.error_messages, (path, task["name"], result.error_messages)
                # The list comes from the calling role's own arguments: lists of {name, version} dicts.
                for source in _list_sources(args["pinned_packages_list"], role_vars):
                    assert role_options[source]["type"] == "list", (path, source)
                    assert role_options[source]["elements"] == "dict", (path, source)
                assert args["pinned_packages_publish_as"].startswith(role)
                published.append(args["pinned_packages_publish_as"])
    assert len(published) == len(set(published)) >= 6
    # One shared probe-then-install step, no copies: every role that installs unpinned packages uses it.
    assert sorted(present_sites) == ["airgap_firewall", "base", "inference_server"]


def test_probe_then_install_lives_in_one_task_file() -> None:
    """No role probes dpkg/rpm for unpinned packages itself: pinned_packages/tasks/present.yml does."""
    own = [
        f"{role}/{path.name}"
        for role in ROLES
        if role != "pinned_packages"
        for path in (ROOT / "roles" / role / "tasks").glob("*.yml")
        if "ansible.builtin.package:" in path.read_text()
    ]
    assert own == []


# Special variables Ansible sets itself (not facts): the only `ansible_*` names roles may read.
_SPECIAL_VARIABLES = {
    "ansible_check_mode",
    "ansible_diff_mode",
    "ansible_facts",
    "ansible_managed",
    "ansible_play_hosts",
    "ansible_play_batch",
    "ansible_role_name",
    "ansible_parent_role_names",
    "ansible_loop",
    "ansible_version",
    "ansible_verbosity",
}


def test_roles_read_facts_through_ansible_facts_only() -> None:
    """Tuned runs set INJECT_FACT_VARS=false: a role reading `ansible_os_family` would see it undefined there.

    Every `ansible_*` name in roles and playbooks must be a special variable; facts are read as
    ansible_facts['os_family'].
    """
    import re

    used: dict[str, set[str]] = {}
    for base in ("roles", "playbooks"):
        for path in (ROOT / base).rglob("*"):
            if path.suffix not in {".yml", ".yaml", ".j2"} or not path.is_file():
                continue
            # Local facts (facts.d) are `ansible_local` inside ansible_facts: read through it, they are fine.
            text = path.read_text().replace("ansible_facts['ansible_local']", "ansible_facts")
            for name in re.findall(r"\bansible_[a-z0-9_]+", text):
                used.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    assert "ansible_facts" in used  # the scan sees role files
    assert {n: sorted(p) for n, p in used.items() if n not in _SPECIAL_VARIABLES} == {}


def test_collection_builds_with_the_roles_and_module_only(tmp_path: Path) -> None:
    """`ansible-galaxy collection build` makes the artifact an AWX project or execution environment installs:
    every role, the gpu_validate module and meta/runtime.yml, and nothing of the Python package or tests."""
    import tarfile

    from infra.ansible.collection import collection_id

    p = _run([str(BIN / "ansible-galaxy"), "collection", "build", "--output-path", str(tmp_path), str(ROOT)])
    assert p.returncode == 0, p.stdout + p.stderr
    namespace, name = collection_id(ROOT)
    (artifact,) = tmp_path.glob(f"{namespace}-{name}-*.tar.gz")
    with tarfile.open(artifact) as tar:
        names = set(tar.getnames())
    assert {"plugins/modules/gpu_validate.py", "meta/runtime.yml", "MANIFEST.json"} <= names
    assert {f"roles/{r}/meta/argument_specs.yml" for r in ROLES} <= names
    assert not [n for n in names if n.split("/")[0] in ("infra", "tests", "stacks", ".venv", "docs", "scripts")]


def test_roles_call_the_collection_module_by_fqcn() -> None:
    """gpu_validate is the collection's plugin, called by its FQCN (no role-local copy)."""
    from infra.ansible.collection import fqcn

    tasks = yaml.safe_load((ROOT / "roles" / "gpu_validate" / "tasks" / "main.yml").read_text())
    assert any(fqcn(ROOT, "gpu_validate") in t for t in tasks)
    assert not (ROOT / "roles" / "gpu_validate" / "library").exists()


# Free-form maps whose keys are data, not fields (sysctl names, daemon.json, file paths): no `options:`.
_FREE_FORM = {"base_sysctl", "container_runtime_docker_daemon_options", "provisioning_http_files"}


def test_structured_inputs_declare_their_keys() -> None:
    """Every list-of-dict or dict input names its keys (`options:`), so the argument check looks inside it;
    required inputs carry no default (an empty value must not pass as given)."""
    missing, defaulted = [], []
    for spec_path in sorted((ROOT / "roles").glob("*/meta/argument_specs.yml")):
        for entry, spec in yaml.safe_load(spec_path.read_text())["argument_specs"].items():
            for name, opt in (spec.get("options") or {}).items():
                structured = opt.get("type") == "dict" or opt.get("elements") == "dict"
                if structured and name not in _FREE_FORM and "options" not in opt:
                    missing.append(f"{spec_path.parts[-3]}:{entry}:{name}")
                if opt.get("required") and "default" in opt:
                    defaulted.append(f"{spec_path.parts[-3]}:{entry}:{name}")
    assert missing == [] and defaulted == []


def test_argument_check_looks_inside_planned_services() -> None:
    """A planned inference service missing a key, or with a wrongly typed one, is refused before any run."""
    from infra.ansible.rolespecs import problems
    from infra.model.load import load_site
    from infra.plan.node import plan_site
    from infra.plan.rolevars import host_vars

    site = load_site("example-airgap")
    node = plan_site(site).nodes[0]
    hv = host_vars(node, site)
    assert problems(node.hostname, ["inference_server"], hv) == []
    broken = dict(hv["inference_server_services"][0])
    del broken["exec_start"]
    assert any(
        "exec_start" in p
        for p in problems(node.hostname, ["inference_server"], {**hv, "inference_server_services": [broken]})
    )
    typed = {**hv["inference_server_services"][0], "port": "eighty"}
    assert any(
        "port" in p for p in problems(node.hostname, ["inference_server"], {**hv, "inference_server_services": [typed]})
    )
