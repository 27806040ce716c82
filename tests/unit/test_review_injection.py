"""Review Markdown under hostile values (issue 16, layer 2): the injection corpus forced into a preview.

The corpus (tests/fixtures/injection/corpus.yaml) is what `validate` rejects; here the same values skip
validation and go straight into the places a preview carries free text — URNs (host names), trigger
summaries (keys and values), diagnostics — and the stack name. Whatever they are, the Markdown must
keep its shape: no HTML, no heading or line we did not write, every table row with its header's cells.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.model.load import load_site
from infra.plan.node import SitePlan, plan_site
from infra.review.digest import DigestError, parse
from infra.review.report import escape, markdown, review

ROOT = Path(__file__).resolve().parents[2]
PREVIEWS = ROOT / "tests" / "fixtures" / "preview"
CORPUS = yaml.safe_load((ROOT / "tests" / "fixtures" / "injection" / "corpus.yaml").read_text())
PLAN = plan_site(load_site("lab"))

# Every line the review writes starts like one of these; values never start a line.
_LINE = re.compile(
    r"(## gpufleet change review|\*\*Stack:\*\* [^\n]*"
    r"|### (⚠️ reinstalls|Nodes|Providers|Other resources|Unknown to this stack|Preview diagnostics)"
    r"|> ❌ \*\*The preview failed or did not finish\.\*\* [^\n]*"
    r"|\*\*Summary:\*\* [^\n]*|- [^\n]*|\| [^\n]* \||\|(---\|)+|\*\*[^\n]*\*\* steps:"
    r"|Each of these runs `bmc reimage`[^\n]*|No resource changes\.|)"
)
_HTML = re.compile(r"<\s*[A-Za-z/!?]")


def _cells(row: str) -> int:
    """Table cells in a row: pipes not escaped by an odd number of backslashes, minus the outer two."""
    count, backslashes = 0, 0
    for ch in row:
        if ch == "\\":
            backslashes += 1
            continue
        if ch == "|" and backslashes % 2 == 0:
            count += 1
        backslashes = 0
    return count - 1


def check_markdown(md: str) -> None:
    """Assert the review's shape holds whatever values it carries."""
    assert not _HTML.search(md), "raw HTML tag in the review"
    assert "\x1b" not in md and "\r" not in md
    table: int | None = None
    for line in md.splitlines():
        assert _LINE.fullmatch(line), f"a line the review does not write: {line!r}"
        if line.startswith("#"):
            assert "approved" not in line.lower(), f"forged heading: {line!r}"
        if line.startswith("|"):
            cells = _cells(line)
            table = cells if table is None else table
            assert cells == table, f"table row with {cells} cells, header has {table}: {line!r}"
        else:
            table = None


def _values() -> list[Any]:
    return [pytest.param(e["value"], id=f"{i}-{e['attack']}") for i, e in enumerate(CORPUS)]


def _with_host(doc: dict[str, Any], old: str, new: str) -> dict[str, Any]:
    """The document with host `old` renamed `new` in every URN, parent and name."""
    text = json.dumps(doc)
    text = text.replace(f"::{json.dumps(old)[1:-1]}", f"::{json.dumps(new)[1:-1]}")
    return dict(json.loads(text))


def _render(doc: dict[str, Any], plan: SitePlan | None, stack: str = "lab") -> str | None:
    try:
        d = parse(json.dumps(doc))
    except DigestError:
        return None  # refused as input: nothing is rendered
    return markdown(review(d, plan, stack))


@pytest.mark.parametrize("value", _values())
def test_hostile_values_keep_the_review_shape(value: str, tmp_path: Path) -> None:
    """Host names, trigger keys/values, diagnostics and the stack name from the corpus change no structure."""
    value = value.replace("@CANARY@", str(tmp_path / "canary"))
    removal = json.loads((PREVIEWS / "node-removal.json").read_text())
    bump = json.loads((PREVIEWS / "driver-bump.json").read_text())

    rendered = []
    # 1. As a host name: in every URN and parent of the removed node.
    hosted = _with_host(removal, "lab-gpu05", value)
    for plan in (None, PLAN):
        rendered.append(_render(hosted, plan))
    # 2. As trigger summary values and keys of a converge step (and a detailed-diff path naming them).
    summary = copy.deepcopy(bump)
    conv = next(s for s in summary["steps"] if s["urn"].endswith("::lab-gpu01-converge"))
    trigger = conv["newState"]["inputs"]["triggers"][0]
    trigger["driver"] = value
    trigger[value] = value
    conv["detailedDiff"][f"triggers[0].{value}"] = {"kind": "update-replace", "inputDiff": False}
    conv["detailedDiff"][value] = {"kind": "update", "inputDiff": False}
    rendered.append(_render(summary, PLAN))
    # 3. As diagnostics of both severities, with and without the engine's prefix.
    diags = copy.deepcopy(bump)
    diags["diagnostics"] = [{"message": f"error: {value}\n", "severity": "error"},
                            {"message": value, "severity": "warning", "urn": value}]
    rendered.append(_render(diags, PLAN))
    # 4. As the stack name in the title.
    rendered.append(markdown(review(parse(json.dumps(bump)), PLAN, value)))

    assert rendered[2] is not None and rendered[3] is not None
    for md in rendered:
        if md is not None:
            check_markdown(md)
    assert not (tmp_path / "canary").exists()


def test_escape_neutralises_every_markdown_construct() -> None:
    """Headings, links, images, HTML, entities, tables, code, emphasis, mentions, autolinks, math."""
    hostile = ("# h\n## ✅ approved | x | [a](javascript:x) ![i](y) <b>&amp; `c` *e* _u_ @all #1 "
               "http://x www.x.y $m$ \\|")
    out = escape(hostile)
    assert "\n" not in out and not out.startswith("#")
    assert "&amp;amp;" in out  # an entity in the input shows as typed, it is not decoded
    assert "<" not in out and ">" not in out and not re.search(r"&(?!lt;|gt;|amp;)", out)
    assert "www." not in out
    for i, ch in enumerate(out):
        if ch in "`*_[]#|~!:@$":
            run = len(out[:i]) - len(out[:i].rstrip("\\"))
            assert run % 2 == 1, f"unescaped {ch!r} at {i} in {out!r}"
    assert _cells(f"| {out} |") == 1
