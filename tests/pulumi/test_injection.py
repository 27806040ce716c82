"""Hostile node values (tests/fixtures/injection/corpus.yaml) in the decommission step's command string.

That string carries the node's whole stack entry as JSON, and runs months later through `/bin/sh -c`
when the node is removed. Forced past validation, each hostile value must reach the CLI as one argv
element, byte for byte, run nothing (no canary), and the CLI must refuse what the site model refuses
(exit 2, one line).
"""

from __future__ import annotations

import copy
import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pydantic
import pytest
import yaml

from infra.components import commands
from infra.model.site import Node
from tests.pulumi.conftest import ROOT, raw_site
from tests.unit.injection import set_path
from tests.unit.test_bmc import run_cli

CORPUS = yaml.safe_load((ROOT / "tests/fixtures/injection/corpus.yaml").read_text())
NODE_ENTRIES = [e for e in CORPUS if e["path"].startswith("nodes[0].")]
# Prints its argv as JSON: stands in for .venv/bin/gpufleet to see exactly what the shell passed.
ECHO = f"{shlex.quote(sys.executable)} -c 'import json, sys; print(json.dumps(sys.argv[1:]))'"


def test_the_corpus_has_node_entries() -> None:
    assert len(NODE_ENTRIES) >= 5


@pytest.mark.parametrize("entry", NODE_ENTRIES, ids=lambda e: f"{e['path']}-{e['attack']}")
def test_hostile_node_value_stays_one_argument_and_is_refused(entry: dict[str, Any], tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    node = copy.deepcopy(raw_site("lab")["nodes"][0])
    set_path({"nodes": [node]}, entry["path"], entry["value"].replace("@CANARY@", str(canary)))
    node_json = json.dumps(node, sort_keys=True, separators=(",", ":"))
    line = commands.decommission("lab", node["hostname"], "power-off", node_json)

    shown = subprocess.run(["/bin/sh", "-c", line.replace(commands.CLI, ECHO, 1)], cwd=tmp_path,
                           capture_output=True, text=True, timeout=30, check=True)
    assert json.loads(shown.stdout) == ["decommission", "--stack", "lab", "--node", node["hostname"],
                                        "--policy", "power-off", "--node-json", node_json]
    # The CLI re-validates with the site model: it refuses exactly what `gpufleet validate` refuses in a node
    # (the grammars are the model's; this layer must not let anything past them).
    try:
        Node.model_validate(node)
        model_refuses = False
    except pydantic.ValidationError:
        model_refuses = True
    code, _, err = run_cli(*shlex.split(line)[1:], "--dry-run")
    if model_refuses:
        assert code == 2 and err.startswith("error: --node-json: ") and err.count("\n") == 1
    else:
        assert code in (0, 5)  # accepted by the model; 5 = the lab's BMC password file is absent here
    assert not canary.exists()
