"""The stack loader (issue 16): every malformed stack file is exit 2 with a clear message, never a traceback."""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.cli import main
from infra.model import load
from infra.model.load import SiteError, load_site, read_stack_config

ROOT = Path(__file__).resolve().parents[2]
LAB_TEXT = (ROOT / "stacks/Pulumi.lab.yaml").read_text(encoding="utf-8")


def validate(path: Path) -> tuple[int, list[dict[str, str]], str]:
    """`gpufleet validate --stack-file PATH --json` in-process: exit code, problems, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["validate", "--stack-file", str(path), "--json"])
    problems = json.loads(out.getvalue())["problems"] if out.getvalue() else []
    return code, problems, err.getvalue()


def write(tmp_path: Path, content: str | bytes) -> Path:
    path = tmp_path / "Pulumi.t.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def test_lab_stack_loads() -> None:
    """The committed lab stack (now written without anchors) passes the strict loader."""
    assert load_site(path=ROOT / "stacks/Pulumi.lab.yaml").name == "lab"


def test_duplicate_key_names_both_lines(tmp_path: Path) -> None:
    """A key given twice is an error naming its path and both line numbers; YAML's last-wins is not applied."""
    text = LAB_TEXT.replace("          username: admin\n", "          username: admin\n          username: root\n", 1)
    first = text.splitlines().index("          username: admin") + 1
    code, problems, err = validate(write(tmp_path, text))
    assert code == 2 and "Traceback" not in err
    (problem,) = problems
    assert problem["path"] == "config.gpufleet:site.nodes[0].bmc.username"
    assert f"line {first} and line {first + 1}" in problem["message"]


def test_every_duplicate_is_reported(tmp_path: Path) -> None:
    """Duplicates at the top, in config and deep inside are all reported at once."""
    text = "config:\n  a: 1\n  a: 2\nconfig:\n  b: {x: 1, x: 2}\n"
    with pytest.raises(SiteError) as info:
        read_stack_config(write(tmp_path, text))
    by_path = {p.path: p.message for p in info.value.problems}
    assert "line 2 and line 3" in by_path["config.a"]
    assert "line 1 and line 4" in by_path["config"]
    assert "config.b.x" in by_path


def test_equal_keys_written_differently_are_duplicates(tmp_path: Path) -> None:
    """`1` and `0x1` (or `true` and `yes`) are the same key after YAML resolves them."""
    with pytest.raises(SiteError, match="appears twice"):
        read_stack_config(write(tmp_path, "config: {1: a, 0x1: b}\n"))


@pytest.mark.parametrize(
    ("text", "what"),
    [
        ("config: &c {a: 1}\n", "anchor &c"),
        ("x: &v 1\nconfig: {a: *v}\n", "anchor &v"),
        ("config:\n  a: {<<: {b: 1}, c: 2}\n", "merge key"),
    ],
)
def test_anchors_aliases_and_merge_keys_are_refused(tmp_path: Path, text: str, what: str) -> None:
    """Pulumi expands anchors/aliases/merges on `pulumi config set` (pulumi/pulumi#6480): refused with the reason."""
    code, problems, err = validate(write(tmp_path, text))
    assert code == 2 and "Traceback" not in err
    assert any(what in p["message"] and "6480" in p["fix"] for p in problems), problems


def test_old_lab_stack_with_merge_anchor_is_refused(tmp_path: Path) -> None:
    """The form the lab stack used before (`bmc: &labbmc` … `<<: *labbmc`) is refused, at its line."""
    text = LAB_TEXT.replace("        bmc:\n", "        bmc: &labbmc\n", 1)
    line = text.splitlines().index("        bmc: &labbmc") + 1
    code, problems, _ = validate(write(tmp_path, text))
    assert code == 2 and problems[0]["path"] == f"(line {line})"


def test_alias_bomb_is_refused_quickly(tmp_path: Path) -> None:
    """A billion-laughs document stops at the first anchor instead of expanding."""
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    lines += [f"{chr(98 + i)}: &{chr(98 + i)} [{','.join(['*' + chr(97 + i)] * 9)}]" for i in range(8)]
    code, problems, _ = validate(write(tmp_path, "\n".join(lines) + "\n"))
    assert code == 2 and "anchor &a" in problems[0]["message"]


SHAPES: list[tuple[str, str | bytes, str]] = [
    ("list", "- config: {}\n", "is a list, not a mapping"),
    ("scalar", "just text\n", "is a text, not a mapping"),
    ("number", "42\n", "is a number, not a mapping"),
    ("empty", "", "is empty"),
    ("comments-only", "# nothing here\n", "is empty"),
    ("config-list", "config: [1, 2]\n", "is a list, not a mapping"),
    ("config-null", "config:\n", "is empty, not a mapping"),
    ("config-text", "config: site\n", "is a text, not a mapping"),
    ("site-list", "config:\n  gpufleet:site: [a]\n", "is a list, not a mapping"),
    ("site-text", "config:\n  gpufleet:site: lab\n", "is a text, not a mapping"),
    ("site-null", "config:\n  gpufleet:site:\n", "is empty, not a mapping"),
    ("no-site", "config: {other:key: 1}\n", "missing"),
    ("two-documents", "config: {}\n---\nconfig: {}\n", "not valid YAML"),
    ("bad-yaml", "config: {a: [1, 2}\n", "not valid YAML"),
    ("tab-indent", "config:\n\ta: 1\n", "not valid YAML"),
    ("python-tag", "config: !!python/object/apply:os.system ['id']\n", "not valid YAML"),
    ("unknown-tag", "config: !unsafe {a: 1}\n", "not valid YAML"),
    ("complex-key", "config:\n  ? [a, b]\n  : 1\n", "list or mapping"),
    ("control-char", 'config: {a: "\x07"}\n', "not valid YAML"),
    ("not-utf8", "config: {name: caf\xe9}\n".encode("latin-1"), "not UTF-8"),
    ("utf16", "config: {}\n".encode("utf-16"), "not UTF-8"),
    ("binary", bytes(range(256)) * 4, "binary"),
    ("nul", b"config: {}\n\x00\n", "binary"),
    ("deep-flow", "config: " + "[" * 5000 + "]" * 5000 + "\n", "nesting deeper"),
    ("deep-block", "config:\n" + "".join("  " * i + f"k{i}:\n" for i in range(1, 60)), "nesting deeper"),
]


@pytest.mark.parametrize(("name", "content", "expect"), SHAPES, ids=[s[0] for s in SHAPES])
def test_malformed_file_exits_2_with_message(tmp_path: Path, name: str, content: str | bytes, expect: str) -> None:
    """Each malformed shape: exit 2, a problem whose message says what is wrong, no traceback."""
    code, problems, err = validate(write(tmp_path, content))
    assert code == 2 and "Traceback" not in err
    assert any(expect in p["message"] for p in problems), problems
    assert all(p["fix"] for p in problems)


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    """Editors on some systems write a BOM; it is not content."""
    path = write(tmp_path, b"\xef\xbb\xbf" + LAB_TEXT.encode())
    assert load_site(path=path).name == "lab"


def test_directory_missing_and_fifo(tmp_path: Path) -> None:
    """A directory, a missing path and a FIFO (which would block a reader) are exit 2, read without blocking."""
    code, problems, _ = validate(tmp_path)
    assert code == 2 and problems[0]["message"] == "is a directory"
    code, problems, _ = validate(tmp_path / "nope.yaml")
    assert code == 2 and problems[0]["message"] == "stack file not found"
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    code, problems, _ = validate(fifo)
    assert code == 2 and problems[0]["message"] == "is not a regular file"


def test_unreadable_file(tmp_path: Path) -> None:
    """A file the user cannot read is exit 2 naming the OS reason (skipped as root, who reads everything)."""
    if os.geteuid() == 0:
        pytest.skip("root can read a mode-000 file")
    path = write(tmp_path, LAB_TEXT)
    path.chmod(0)
    code, problems, _ = validate(path)
    assert code == 2 and "cannot read it" in problems[0]["message"]


def test_too_large_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file over the cap is refused before it is parsed (cap lowered so the test stays small)."""
    monkeypatch.setattr(load, "MAX_STACK_BYTES", len(LAB_TEXT) - 1)
    code, problems, _ = validate(write(tmp_path, LAB_TEXT))
    assert code == 2 and "at most" in problems[0]["message"]


def test_real_cap_allows_large_sites_and_refuses_huge_files(tmp_path: Path) -> None:
    """The real cap: a file just over it is refused; the cap is far above any real site."""
    assert load.MAX_STACK_BYTES >= 1024 * 1024
    code, problems, _ = validate(write(tmp_path, "# " + "x" * load.MAX_STACK_BYTES + "\n"))
    assert code == 2 and "bytes" in problems[0]["message"]


def test_depth_limit_is_above_the_model() -> None:
    """The deepest real path (config → site → nodes → [i] → bmc → password → file) is far from the limit."""
    assert load.MAX_DEPTH >= 16


def test_messages_are_one_line(tmp_path: Path) -> None:
    """YAML syntax errors are flattened to one line with the line number in the path."""
    _, problems, _ = validate(write(tmp_path, "config:\n  a: [1,\n  b: 2\n"))
    (problem,) = problems
    assert problem["path"].startswith("(file) (line ")
    assert "\n" not in problem["message"]


def test_text_output_without_json(tmp_path: Path) -> None:
    """Without --json the problem goes to stderr, one line each, exit 2."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["validate", "--stack-file", str(write(tmp_path, "- a\n"))])
    assert code == 2 and "(root): the file is a list, not a mapping" in err.getvalue()


@pytest.mark.parametrize("command", [["plan"], ["bmc", "status"]])
def test_other_commands_share_the_loader(tmp_path: Path, command: list[str]) -> None:
    """Every stack command goes through the same loader: a list-shaped file is exit 2 there too."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main([*command, "--stack-file", str(write(tmp_path, "- a\n"))])
    assert code == 2 and "not a mapping" in err.getvalue()


def test_parsed_values_are_plain_data(tmp_path: Path) -> None:
    """The loader returns the same data as yaml.safe_load for a plain file (nothing added or lost)."""
    data: Any = read_stack_config(ROOT / "stacks/Pulumi.example-prod.yaml")
    assert data == yaml.safe_load((ROOT / "stacks/Pulumi.example-prod.yaml").read_text())["config"]


def test_duplicate_odd_key_is_quoted_in_path(tmp_path: Path) -> None:
    """A duplicated key holding a newline is named JSON-quoted: the message stays on one line."""
    with pytest.raises(SiteError) as info:
        read_stack_config(write(tmp_path, 'config:\n  "a\\nb": 1\n  "a\\nb": 2\n'))
    (problem,) = info.value.problems
    assert problem.path == 'config["a\\nb"]' and "\n" not in problem.path + problem.message
