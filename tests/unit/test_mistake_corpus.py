"""A corpus of realistic one-mistake stacks, each with its correct twin (tests/fixtures/mistakes).

Each case file patches one of the example stacks in stacks/: `broken` makes one realistic mistake and
`twin` makes the same kind of change correctly. `gpufleet validate --json` must reject the broken stack
(exit 2) with a problem at the recorded config path, and accept the twin (exit 0). Every
machine-applicable suggestion the broken stack gets is then applied mechanically to the raw stack and
validated again: the problem must be gone and no other problem may appear.

Patches are `{path, value}` (set, creating a missing mapping key) or `{path, append}` (append to a list),
with paths written as the validator writes them (`services[0].model.context_length`). The patching here
is independent of the product's code on purpose.
"""

from __future__ import annotations

import copy
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.cli import main
from infra.model.load import SiteError, parse_site

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "tests" / "fixtures" / "mistakes"
CASES = sorted(CORPUS.glob("*.yaml"))
SITE = "gpufleet:site"
_STEP = re.compile(r"\[(\d+)\]|([^.\[\]]+)")


def _steps(path: str) -> list[str | int]:
    """`a.b[0].c` → ['a', 'b', 0, 'c']."""
    steps: list[str | int] = []
    for m in _STEP.finditer(path):
        steps.append(int(m.group(1)) if m.group(1) is not None else m.group(2))
    assert steps, path
    return steps


def _walk(doc: Any, steps: list[str | int]) -> Any:
    for step in steps:
        doc = doc[step]
    return doc


def apply(site: dict[str, Any], edits: list[dict[str, Any]]) -> dict[str, Any]:
    """A copy of `site` with the edits applied in order."""
    out = copy.deepcopy(site)
    for edit in edits:
        steps = _steps(edit["path"])
        if "append" in edit:
            _walk(out, steps).append(copy.deepcopy(edit["append"]))
        else:
            _walk(out, steps[:-1])[steps[-1]] = copy.deepcopy(edit["value"])
    return out


def _base(name: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "stacks" / f"Pulumi.{name}.yaml").read_text(encoding="utf-8"))
    return data


def validate(
    doc: dict[str, Any], site: dict[str, Any], tmp: Path, capsys: pytest.CaptureFixture[str]
) -> tuple[int, list[dict[str, Any]]]:
    """Exit code and problems of `gpufleet validate --json` on the stack `doc` with its site replaced."""
    full = copy.deepcopy(doc)
    full["config"][SITE] = site
    f = tmp / f"Pulumi.case{len(list(tmp.iterdir()))}.yaml"
    f.write_text(yaml.safe_dump(full, sort_keys=False), encoding="utf-8")
    capsys.readouterr()
    code = main(["validate", "--stack-file", str(f), "--json"])
    out = json.loads(capsys.readouterr().out)
    return int(code), out.get("problems", [])


def problems_of(site: dict[str, Any]) -> list[dict[str, Any]]:
    """Problems of a raw site, in process (the YAML round trip is what the CLI cases already cover)."""
    try:
        parse_site(site)
    except SiteError as exc:
        return [p.as_dict() for p in exc.problems]
    return []


def _case(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
    return data


@pytest.mark.parametrize("case_file", CASES, ids=[c.stem for c in CASES])
def test_mistake_rejected_twin_accepted_suggestions_apply(
    case_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Broken: exit 2 at the recorded path; twin: exit 0; each suggestion, applied, removes its problem only."""
    case = _case(case_file)
    doc = _base(case["base"])
    base = doc["config"][SITE]

    twin = apply(base, case["twin"])
    code, problems = validate(doc, twin, tmp_path, capsys)
    assert (code, problems) == (0, []), f"the twin must validate: {problems}"

    broken = apply(base, case["broken"])
    code, problems = validate(doc, broken, tmp_path, capsys)
    assert code == 2
    expected = case["expect"]["path"]
    at_path = [p for p in problems if p["path"] == expected]
    assert at_path, f"no problem at {expected}; got {[p['path'] for p in problems]}"
    for p in problems:
        assert p["message"] and p["fix"], p
        assert "\n" not in p["message"] + p["fix"], p
    if case["expect"]["suggestion"]:
        assert any(p.get("suggestions") for p in at_path), f"expected a suggestion at {expected}: {at_path}"

    before = {(p["path"], p["message"]) for p in problems}
    for problem in problems:
        for suggestion in problem.get("suggestions", []):
            fixed = apply(broken, suggestion["edits"])
            after = problems_of(fixed)
            now = {(p["path"], p["message"]) for p in after}
            assert (problem["path"], problem["message"]) not in now, f"{suggestion} left {problem}"
            assert now <= before, f"{suggestion} for {problem['path']} added {now - before}"


@pytest.mark.parametrize("base", sorted({_case(c)["base"] for c in CASES}))
def test_bases_are_valid(base: str) -> None:
    """Each mistake is the only one: the stacks the cases patch validate as they are."""
    assert problems_of(_base(base)["config"][SITE]) == []


def test_corpus_size_and_classes() -> None:
    """At least 60 cases, covering the classes a held-out set found slipping through (issue 16)."""
    cases = [_case(c) for c in CASES]
    assert len(cases) >= 60
    classes = Counter(c["class"] for c in cases)
    assert classes["every-node"] >= 5 and classes["identity"] >= 15 and classes["engine-limit"] >= 8, classes
    assert sum(bool(c["expect"]["suggestion"]) for c in cases) >= 20
    for c in cases:
        assert c["broken"] != c["twin"] and c["why"], c


def test_patch_paths() -> None:
    """The test's own patcher: set, create a key, append, nested list indexes."""
    site: dict[str, Any] = {"a": [{"b": 1}, {"b": 2}], "m": {}}
    out = apply(site, [{"path": "a[1].b", "value": 3}, {"path": "m.new-key", "value": 4}, {"path": "a", "append": 5}])
    assert out == {"a": [{"b": 1}, {"b": 3}, 5], "m": {"new-key": 4}}
    assert site["a"][1]["b"] == 2
