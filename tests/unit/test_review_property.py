"""Property tests of the preview parser (issue 16): thousands of generated and mutated documents.

Each one ends in a parsed digest or a DigestError — never another exception — and every digest that
parses renders to a review whose Markdown keeps its shape (`check_markdown`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infra.model.load import load_site
from infra.plan.node import plan_site
from infra.review.digest import OPS, SECRET_SIG, SIG_KEY, UNKNOWN, DigestError, parse
from infra.review.report import markdown, review
from tests.unit.test_review_injection import check_markdown

# Real emulators or thousands of generated inputs: run by scripts/test.sh, not in the fast unit loop.
pytestmark = pytest.mark.slow

PREVIEWS = Path(__file__).resolve().parents[1] / "fixtures" / "preview"
FIXTURES = {p.name: json.loads(p.read_text()) for p in sorted(PREVIEWS.glob("*.json"))}
PLAN = plan_site(load_site("lab"))
SETTINGS = {"deadline": None, "database": None, "suppress_health_check": [HealthCheck.too_slow]}

_scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
            | st.text(max_size=20) | st.sampled_from([UNKNOWN, "[secret]", "", "urn:pulumi:x::y::a:b:C::n"]))
json_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    # A fresh object each time: a shared one would be mutated by the mutation test.
    | st.builds(lambda: {SIG_KEY: SECRET_SIG, "plaintext": '"leak"'}),
    max_leaves=16,
)
# Inside generated steps: small values, so a thousand documents generate in seconds, not minutes.
small_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=2)
                            | st.dictionaries(st.text(max_size=4), inner, max_size=2), max_leaves=3)
_hosts = st.sampled_from(["lab-gpu01", "lab-gpu03", "lab-gpu09", "x", "a::b", "| ✅ approved |", "<b>", "#h"])
_types = st.sampled_from(["gpufleet:site:Site", "gpufleet:segment:Segment", "gpufleet:segment:AirGappedSegment",
                          "gpufleet:node:GpuNode", "gpufleet:inference:InferenceService"])


@st.composite
def urns(draw: st.DrawFn) -> str:
    chain = draw(st.lists(_types, max_size=3))
    leaf = draw(st.sampled_from(["command:local:Command", "gpufleet:node:GpuNode", "pulumi:providers:command",
                                 "pulumi:pulumi:Stack"]))
    name = draw(_hosts) + draw(st.sampled_from(["", "-bmc", "-converge", "-wait-ssh", "-validate", "-health"]))
    return f"urn:pulumi:lab::gpufleet::{'$'.join([*chain, leaf])}::{name}"


@st.composite
def states(draw: st.DrawFn, urn: str) -> Any:
    if draw(st.integers(0, 4)) == 0:
        return draw(small_values)
    trigger = draw(st.dictionaries(st.sampled_from(["driver", "content_hash", "os", "lock", "reboot_policy"]),
                                   small_values, max_size=3))
    inputs = {"create": draw(st.sampled_from(["x", "gpufleet bmc reimage", UNKNOWN, "[secret]"])),
              "dir": draw(st.text(max_size=8)), "triggers": [trigger, draw(small_values)]}
    if draw(st.booleans()):
        inputs["delete"] = draw(st.sampled_from(["bmc power --state off", "decommission --keep-running", 1]))
    parent = draw(st.one_of(st.none(), urns()))
    return {"urn": urn, "type": urn.split("::")[2].split("$")[-1], "inputs": inputs, "parent": parent,
            "custom": draw(st.booleans())}


@st.composite
def steps(draw: st.DrawFn) -> Any:
    urn = draw(urns())
    step: dict[str, Any] = {"op": draw(st.sampled_from(sorted(OPS)) | st.text(max_size=6)), "urn": urn}
    for key in ("oldState", "newState"):
        if draw(st.booleans()):
            step[key] = draw(states(urn))
    step["detailedDiff"] = draw(st.one_of(st.none(), st.dictionaries(
        st.sampled_from(["dir", "triggers[0].driver", "triggers[1]", "environment.X", "a[", '["q"]', "triggers"]),
        st.fixed_dictionaries({"kind": st.sampled_from(["update", "update-replace", "add", "bad"]),
                               "inputDiff": st.booleans()}), max_size=3)))
    if draw(st.booleans()):
        step["replaceReasons"] = draw(st.lists(st.sampled_from(["id", "provider", "triggers"]), max_size=2))
    if draw(st.booleans()):
        step["diffReasons"] = draw(st.lists(st.text(max_size=6), max_size=2))
    return step


documents = st.fixed_dictionaries(
    {"steps": st.lists(steps(), max_size=5)},
    optional={
        "changeSummary": st.dictionaries(st.sampled_from(["create", "update", "same", "delete"]),
                                         st.integers(min_value=0, max_value=50), max_size=4),
        "diagnostics": st.lists(st.fixed_dictionaries(
            {"severity": st.sampled_from(["error", "warning", "info", "info#err"]),
             "message": st.text(max_size=30) | st.just("warning: \x1b[33mwarning: x\x1b[0m\n")}), max_size=3),
        "maybeCorrupt": st.booleans(),
    },
)


def _outcome(text: str | bytes) -> None:
    """Parse; if it parses, review (with and without the plan) and check the Markdown's shape."""
    try:
        digest = parse(text)
    except DigestError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    r = review(digest, PLAN, "lab")
    md = markdown(r)
    check_markdown(md)
    assert "leak" not in md and "leak" not in json.dumps(r.as_dict())


@settings(max_examples=500, **SETTINGS)  # type: ignore[arg-type]
@given(documents)
def test_generated_digests_parse_or_fail_cleanly(doc: dict[str, Any]) -> None:
    """Digest-shaped documents with random (often wrong) fields: a review or a DigestError."""
    _outcome(json.dumps(doc))


@settings(max_examples=500, **SETTINGS)  # type: ignore[arg-type]
@given(json_values)
def test_any_json_value_parses_or_fails_cleanly(value: Any) -> None:
    """Any JSON value at all."""
    _outcome(json.dumps(value))


def _paths(value: Any, here: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [here]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*here, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*here, i))
    return out


@settings(max_examples=1000, **SETTINGS)  # type: ignore[arg-type]
@given(st.sampled_from(sorted(FIXTURES)), st.data())
def test_mutated_fixtures_parse_or_fail_cleanly(name: str, data: st.DataObject) -> None:
    """A real document with one part replaced by a random value or removed."""
    doc = json.loads(json.dumps(FIXTURES[name]))
    for _ in range(data.draw(st.integers(min_value=1, max_value=3))):
        paths = _paths(doc)
        path = data.draw(st.sampled_from(paths))
        if not path:
            doc = data.draw(json_values)
            break
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        if data.draw(st.booleans()):
            parent[path[-1]] = data.draw(json_values)
        elif isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent.pop(path[-1])
    _outcome(json.dumps(doc))


@settings(max_examples=500, **SETTINGS)  # type: ignore[arg-type]
@given(st.binary(max_size=200) | st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_arbitrary_bytes_parse_or_fail_cleanly(raw: bytes) -> None:
    """Bytes that are anything at all (truncated JSON, invalid UTF-8, surrogates)."""
    _outcome(raw)
