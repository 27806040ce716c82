"""The example stacks and generated sites validate; the JSON Schema matches the model."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from infra.bench.sitegen import generate_site
from infra.cli import main
from infra.commands.site import schema_text, stack_file_schema
from infra.model.load import load_site, parse_site
from infra.plan.node import plan_site
from tests.unit.factories import make_site

ROOT = Path(__file__).resolve().parents[2]
STACKS = sorted(ROOT.glob("stacks/Pulumi.*.yaml"))


def test_required_example_stacks_exist() -> None:
    """The lab and both example stacks ship with the project."""
    names = {p.name for p in STACKS}
    assert {"Pulumi.lab.yaml", "Pulumi.example-prod.yaml", "Pulumi.example-airgap.yaml"} <= names


@pytest.mark.parametrize("path", STACKS, ids=lambda p: p.stem)
def test_example_stack_validates(path: Path) -> None:
    """Every stack file in stacks/ loads into a valid Site and plans every node."""
    site = load_site(path=path)
    plan = plan_site(site)
    assert len(plan.nodes) == len(site.nodes) > 0
    for node in plan.nodes:
        assert node.roles[0] == "base" and node.roles[-1] == "gpu_validate"


@pytest.mark.parametrize("path", STACKS, ids=lambda p: p.stem)
def test_schema_accepts_example(path: Path) -> None:
    """The JSON Schema editors use accepts every example stack file."""
    schema = stack_file_schema(json.loads(schema_text()))
    jsonschema.validate(yaml.safe_load(path.read_text()), schema)


def test_schema_rejects_unknown_key() -> None:
    """A misspelt key is an error in the editor as it is in `gpufleet validate`."""
    schema = stack_file_schema(json.loads(schema_text()))
    doc = {"config": {"gpufleet:site": {**make_site(), "segmnets": []}}}
    with pytest.raises(jsonschema.ValidationError, match="segmnets"):
        jsonschema.validate(doc, schema)
    bad_node = make_site()
    bad_node["nodes"][0]["gpus"] = 8
    with pytest.raises(jsonschema.ValidationError, match="gpus"):
        jsonschema.validate({"config": {"gpufleet:site": bad_node}}, schema)


def test_committed_schema_is_current() -> None:
    """docs/schema/site.schema.json is what `gpufleet schema` writes today."""
    assert main(["schema", "--check", "--out", str(ROOT / "docs/schema/site.schema.json")]) == 0


def test_every_field_has_a_description() -> None:
    """Every field of every model carries a docstring (shown by editors through the schema)."""
    schema = json.loads(schema_text())
    missing = [
        f"{name}.{prop}"
        for name, d in schema["$defs"].items()
        for prop, spec in d.get("properties", {}).items()
        if "description" not in spec
    ]
    missing += [f"Site.{p}" for p, spec in schema["properties"].items() if "description" not in spec]
    assert missing == []


def test_generated_10000_node_site_validates() -> None:
    """A generated 10,000-node site passes every rule (its speed is measured by `gpufleet bench`)."""
    site = parse_site(generate_site(10_000))
    assert len(site.nodes) == 10_000
    assert len({n.address for n in site.nodes}) == 10_000


def test_validate_cli_json(capsys: pytest.CaptureFixture[str]) -> None:
    """`gpufleet validate --json` reports validity and counts for machines."""
    assert main(["validate", "--stack", "example-prod", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["valid"] is True and data["nodes"] == 6
