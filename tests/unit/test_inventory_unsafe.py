"""Second layer for Ansible: hostile values forced past validation are never templated by real Ansible.

The grammar in the model rejects the corpus (tests/unit/test_model_invalid.py and the corpus tests);
here the model is bypassed on purpose, the inventory is built and written by the real code
(`build_inventory` → `run_playbook` → `write_json`), and real ansible-playbook (the venv's, local
connection, `--check`) uses every variable the way roles do. No canary may appear and every value
must come out of Ansible exactly as it went in.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from infra.ansible import runner as runner_mod
from infra.ansible.inventory import GROUP, UNSAFE_KEY, ansible_json, build_inventory, unsafe
from infra.ansible.runner import run_playbook
from infra.ansible.settings import Tuning
from infra.model.load import load_site
from infra.plan.node import plan_site
from infra.ssh import SshSettings
from tests.unit.injection import Attempt, attempts, force

# Uses each variable as roles do: printed, templated into a file (check mode), into a loop, an assert.
PLAYBOOK = """
- name: Use every variable the way roles do
  hosts: gpufleet_nodes
  gather_facts: false
  tasks:
    - name: Print every variable
      ansible.builtin.debug:
        msg: "{{ query('ansible.builtin.vars', *gpf_test_vars) }}"
    - name: Template every variable into a file (check mode, nothing written)
      ansible.builtin.copy:
        content: "{% for v in query('ansible.builtin.vars', *gpf_test_vars) %}{{ v }}\\n{% endfor %}"
        dest: "{{ gpf_test_out }}/check-only"
        mode: "0644"
    - name: Record every variable as Ansible sees it (written in check mode too, for the test)
      ansible.builtin.copy:
        content: "{{ dict(gpf_test_vars | zip(query('ansible.builtin.vars', *gpf_test_vars))) | to_json }}"
        dest: "{{ gpf_test_out }}/seen.json"
        mode: "0644"
      check_mode: false
    - name: Connection, boolean and list variables keep working
      ansible.builtin.assert:
        that:
          - ansible_user is string
          - gpf_test_vars | length > 3
          - not ansible_become
"""


def _leaves(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [s for v in value.values() for s in _leaves(v)] + [str(k) for k in value]
    if isinstance(value, list):
        return [s for v in value for s in _leaves(v)]
    return [value] if isinstance(value, str) else []


def test_unsafe_marks_every_string_and_keeps_other_types() -> None:
    data = {"a": "x", "b": True, "c": 3, "d": 1.5, "e": None, "f": ["y", {"g": "z"}], "h": ("t",)}
    assert unsafe(data) == {
        "a": {UNSAFE_KEY: "x"},
        "b": True,
        "c": 3,
        "d": 1.5,
        "e": None,
        "f": [{UNSAFE_KEY: "y"}, {"g": {UNSAFE_KEY: "z"}}],
        "h": [{UNSAFE_KEY: "t"}],
    }
    with pytest.raises(TypeError):
        unsafe({"a": object()})
    with pytest.raises(TypeError):
        unsafe({1: "x"})


def test_written_inventory_has_no_plain_string() -> None:
    """Every string leaf of the real lab inventory is wrapped (nothing slips through unmarked)."""
    site = load_site("lab")
    encoded = json.loads(ansible_json(build_inventory(site, plan_site(site).nodes)))

    def walk(v: Any) -> None:
        if isinstance(v, dict) and set(v) == {UNSAFE_KEY}:
            assert isinstance(v[UNSAFE_KEY], str)
            return
        assert not isinstance(v, str), v
        for child in v.values() if isinstance(v, dict) else v if isinstance(v, list) else ():
            walk(child)

    walk(encoded)


def _renderable(base: Any, items: list[Attempt]) -> list[Attempt]:
    """The attempts the plan turns into host variables at all. Some forced values are refused before any
    rendering (a GPU model the catalogue does not know, a model path the engines module will not place):
    those never reach Ansible, which is the second layer holding too."""
    out = []
    for a in items:
        site = force(base, a.path, a.value)
        try:
            build_inventory(site, [plan_site(site).node(site.nodes[0].hostname)])
        except (KeyError, ValueError, StopIteration):
            continue
        out.append(a)
    return out


def _rounds(items: list[Attempt]) -> list[list[Attempt]]:
    """Group attempts so that no two in a round set the same path (one Ansible run per round)."""
    rounds: list[list[Attempt]] = []
    for a in items:
        for r in rounds:
            if all(b.path != a.path for b in r):
                r.append(a)
                break
        else:
            rounds.append([a])
    return rounds


def test_hostile_values_forced_past_validation_are_never_templated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(runner_mod.RUNS_ENV, str(tmp_path / "runs"))
    canaries = tmp_path / "canaries"
    canaries.mkdir()
    # Everything that could run code through a template or a shell.
    base = load_site("lab")
    hostile = _renderable(base, [a for a in attempts(canaries) if a.attack in ("jinja", "shell")])
    assert len(hostile) >= 10
    reached: set[str] = set()
    for i, batch in enumerate(_rounds(hostile)):
        site = base
        for a in batch:
            site = force(site, a.path, a.value)
        node = plan_site(site).node(site.nodes[0].hostname)
        inventory = build_inventory(site, [node])
        hostvars = inventory["all"]["children"][GROUP]["hosts"][node.hostname]
        names = sorted(hostvars)
        plain = _leaves(hostvars)
        out = tmp_path / f"out-{i}"
        out.mkdir()
        hostvars |= {
            # Local stand-ins for the connection (ansible_user stays the forced one: it is templated too).
            "ansible_connection": "local",
            "ansible_python_interpreter": sys.executable,
            "ansible_become": False,
            "gpf_test_vars": names,
            "gpf_test_out": str(out),
        }
        playbook = tmp_path / f"use-vars-{i}.yml"
        playbook.write_text(PLAYBOOK, encoding="utf-8")
        result = run_playbook(
            str(playbook), inventory, [node.hostname], ssh=SshSettings(None, None), check=True, tuning=Tuning.DEFAULTS
        )
        assert result.succeeded, result.as_dict()
        seen_vars = json.loads((out / "seen.json").read_text())
        seen = [s for name in names for s in _leaves(seen_vars[name])]
        for a in batch:
            assert not a.canary.exists(), f"{a.path} = {a.value!r} ran code"
            if any(a.value in s for s in plain):
                reached.add(a.path)
                # Out of Ansible exactly as it went in: literal text, never evaluated.
                assert any(a.value in s for s in seen), f"{a.path}: {a.value!r} did not come out literally"
        # Nothing templated at all: Ansible's view of every variable equals the plan's.
        assert sorted(seen) == sorted(s for name in names for s in _leaves(hostvars[name]))
        assert not (out / "check-only").exists(), "check mode wrote a file"
    # The test means something only if the hostile values really reach the inventory.
    # Model names and revisions never get this far: the engines module refuses a value that cannot name a
    # directory of the model store (tests/unit/test_engines.py); these reach the inventory and the templates.
    assert {"nodes[0].ssh_user", "segments[0].ntp[0]", "services[0].model.source"} <= reached, reached
    assert not list(canaries.iterdir())


def test_control_without_the_encoder_the_same_value_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The attack is real: written as plain JSON, the first Jinja entry of the corpus runs its lookup.

    This is the same playbook and inventory as above with only the encoder taken out; it shows the
    test above can fail (and that a dict *key* is not templated even then, which `unsafe` relies on).
    """
    monkeypatch.setenv(runner_mod.RUNS_ENV, str(tmp_path / "runs"))
    monkeypatch.setattr(
        runner_mod, "write_json", lambda path, data: path.write_text(json.dumps(data), encoding="utf-8")
    )
    attempt = next(a for a in attempts(tmp_path) if a.attack == "jinja" and a.path == "segments[0].ntp[0]")
    site = force(load_site("lab"), attempt.path, attempt.value)
    node = plan_site(site).node(site.nodes[0].hostname)
    inventory = build_inventory(site, [node])
    hostvars = inventory["all"]["children"][GROUP]["hosts"][node.hostname]
    key_canary = tmp_path / "key-canary"
    out = tmp_path / "out"
    out.mkdir()
    hostvars |= {
        "ansible_connection": "local",
        "ansible_python_interpreter": sys.executable,
        "ansible_become": False,
        "gpf_test_vars": [*sorted(hostvars), "gpf_hostile_key"],
        "gpf_test_out": str(out),
        "gpf_hostile_key": {"{{ lookup('pipe', 'touch " + str(key_canary) + "') }}": 1},
    }
    playbook = tmp_path / "use-vars.yml"
    playbook.write_text(PLAYBOOK, encoding="utf-8")
    run_playbook(str(playbook), inventory, [node.hostname], ssh=SshSettings(None, None), check=True,
                 tuning=Tuning.DEFAULTS)
    assert attempt.canary.exists()
    assert not key_canary.exists()


@pytest.mark.lab  # not the lab itself, but slow (~2 min) and root: runs with the lab tests in CI
@pytest.mark.skipif(os.geteuid() != 0, reason="the roles' check mode reads root-only files")
def test_real_node_playbook_in_check_mode_never_templates_a_forced_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """playbooks/node.yml with every role, in check mode on this machine, with one hostile value per path.

    The roles render their templates (unit files, configs) for the diff: the Jinja in the forced values
    must show up literally in those diffs and never run.
    """
    monkeypatch.setenv(runner_mod.RUNS_ENV, str(tmp_path / "runs"))
    canaries = tmp_path / "canaries"
    canaries.mkdir()
    site, used = load_site("lab"), set()
    forced = []
    for a in _renderable(site, list(attempts(canaries))):
        if a.attack in ("jinja", "shell") and a.path not in used:
            used.add(a.path)
            forced.append(a)
            site = force(site, a.path, a.value)
    node = plan_site(site).node(site.nodes[0].hostname)
    inventory = build_inventory(site, [node])
    inventory["all"]["children"][GROUP]["hosts"][node.hostname] |= {
        "ansible_connection": "local",
        "ansible_python_interpreter": sys.executable,
        "ansible_become": False,
    }
    result = run_playbook("node.yml", inventory, [node.hostname], ssh=SshSettings(None, None), check=True,
                          tuning=Tuning.DEFAULTS)
    host = result.hosts[node.hostname]
    assert not host.unreachable and host.ok > 0
    assert not list(canaries.iterdir()), [a.path for a in forced if a.canary.exists()]
    ntp = next(a.value for a in forced if a.path == "segments[0].ntp[0]")
    rendered = [str(d.get("after") or "") for d in host.diffs]
    assert any(ntp in text for text in rendered), "the forced NTP server never reached a template"
