"""Layer 1 of issue 16: `gpufleet validate` rejects every hostile value of the shared injection corpus.

Each corpus entry puts one hostile value at one path of the lab stack's site; the stack is written to a
file and validated through the real CLI entry point. Every entry must end in exit 2 with a problem at
(or under) the entry's path, and no canary file may appear.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.cli import main
from tests.unit.injection import set_path

ROOT = Path(__file__).resolve().parents[2]
CORPUS = yaml.safe_load((ROOT / "tests/fixtures/injection/corpus.yaml").read_text(encoding="utf-8"))
LAB = yaml.safe_load((ROOT / "stacks/Pulumi.lab.yaml").read_text(encoding="utf-8"))


def test_set_path_creates_and_appends() -> None:
    """The helper replaces, appends at len and creates missing lists, as the corpus header says."""
    doc: dict[str, Any] = {"a": [{"b": 1}]}
    set_path(doc, "a[0].b", 2)
    set_path(doc, "a[1].c[0]", "x")
    set_path(doc, "d.e[0]", "y")
    assert doc == {"a": [{"b": 2}, {"c": ["x"]}], "d": {"e": ["y"]}}


def hostile_stack(tmp_path: Path, entry: dict[str, str]) -> tuple[Path, Path]:
    """The lab stack with the entry's value (canary filled in) at its path; returns (stack file, canary)."""
    canary = tmp_path / "canary"
    data = copy.deepcopy(LAB)
    set_path(data["config"]["gpufleet:site"], entry["path"], entry["value"].replace("@CANARY@", str(canary)))
    stack = tmp_path / "Pulumi.hostile.yaml"
    stack.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return stack, canary


def run_validate(stack: Path) -> tuple[int, dict[str, Any], str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["validate", "--stack-file", str(stack), "--json"])
    return code, json.loads(out.getvalue()), err.getvalue()


def test_corpus_is_large_enough() -> None:
    """The issue asks for at least 30 attempts; the corpus must not shrink under us."""
    assert len(CORPUS) >= 44
    assert {e["attack"] for e in CORPUS} >= {"jinja", "newline", "option", "path", "markdown", "html", "control"}


def test_untouched_lab_stack_is_valid(tmp_path: Path) -> None:
    """The base the corpus builds on validates, so each rejection below is the hostile value's doing."""
    stack = tmp_path / "Pulumi.lab.yaml"
    stack.write_text(yaml.safe_dump(LAB), encoding="utf-8")
    code, data, _ = run_validate(stack)
    assert code == 0 and data["valid"] is True


@pytest.mark.parametrize("entry", CORPUS, ids=[f"{i:02d}-{e['attack']}-{e['path']}" for i, e in enumerate(CORPUS)])
def test_validate_rejects_hostile_value(tmp_path: Path, entry: dict[str, str]) -> None:
    """Exit 2, a problem at the entry's path (not somewhere else), and no canary."""
    stack, canary = hostile_stack(tmp_path, entry)
    code, data, _ = run_validate(stack)
    assert code == 2, data
    paths = [p["path"] for p in data["problems"]]
    assert any(p == entry["path"] or p.startswith(entry["path"]) for p in paths), paths
    assert not canary.exists()


@pytest.mark.parametrize(
    "index",
    [next(i for i, e in enumerate(CORPUS) if e["attack"] == kind) for kind in ("jinja", "newline", "option")],
)
def test_validate_subprocess_exit_2_without_traceback(tmp_path: Path, index: int) -> None:
    """The installed `gpufleet` command: exit 2, a one-line problem naming the path, no traceback."""
    entry = CORPUS[index]
    stack, canary = hostile_stack(tmp_path, entry)
    exe = Path(sys.executable).parent / "gpufleet"
    proc = subprocess.run(
        [str(exe), "validate", "--stack-file", str(stack)], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    assert f"  - {entry['path']}" in proc.stderr
    # Every problem is one line: a hostile newline is shown escaped, never raw.
    problem_lines = [line for line in proc.stderr.splitlines() if line.startswith("  - ")]
    assert len(problem_lines) == proc.stderr.count("  - ")
    assert not canary.exists()
