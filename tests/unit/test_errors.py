"""One error path: every registered command, given invalid input, ends with an exit code of the README's
table (0–5) and never shows a traceback; unexpected exceptions become one line plus a log file."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra import cli
from infra.console import Exit

# Commands that touch the shared lab or run for minutes once their arguments parse: only their
# argument errors are exercised here (argparse stops before anything runs).
PARSE_ONLY = {"lab up", "lab down", "lab measure", "bench"}
# Commands that still end some failures with text under --json, in code owned elsewhere; remove an
# entry when its command goes through infra.console.fail (issue 17, "one fail() that honours --json").
TEXT_UNDER_JSON = {
    "bmc reimage": "asks for confirmation (text, exit 4) before it reads the stack (infra/bmc/cli.py)",
}


Leaf = tuple[tuple[str, ...], argparse.ArgumentParser]


def _leaves(p: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> Iterator[Leaf]:
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sp in a.choices.items():
                yield from _leaves(sp, (*prefix, name))
            return
    yield prefix, p


COMMANDS = list(_leaves(cli.build_parser()))


def _required(p: argparse.ArgumentParser, tmp: Path) -> list[str]:
    """Dummy values for every required argument (paths that do not exist, first choices)."""
    out: list[str] = []
    for a in p._actions:
        if not (a.required or not a.option_strings) or isinstance(a, argparse._HelpAction):
            continue
        if a.choices:
            value = str(next(iter(a.choices)))
        elif a.dest in ("preview", "file", "dir"):
            value = str(tmp / "missing")
        elif a.dest == "out":
            value = str(tmp / "out")
        elif a.type is int:
            value = "1"  # a well-typed value, so the stack is what the command trips over
        else:
            value = "x"
        out += [value] if not a.option_strings else [a.option_strings[0], value]
    return out


def _options(p: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.option_strings[0]: a for a in p._actions if a.option_strings}


def _bad_stacks(tmp: Path) -> list[Path]:
    files = {
        "list.yaml": b"- a\n- b\n",
        "scalar.yaml": b"42\n",
        "binary.yaml": b"\xff\xfe\x00config: {}\n",
        "empty.yaml": b"",
        "incomplete.yaml": b"config:\n  gpufleet:site:\n    name: x\n",
        "broken.yaml": b"config: [unclosed\n",
    }
    out = []
    for name, data in files.items():
        (tmp / name).write_bytes(data)
        out.append(tmp / name)
    (tmp / "a-directory.yaml").mkdir()
    return [*out, tmp / "a-directory.yaml", tmp / "missing.yaml"]


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code if isinstance(exc.code, int) else 2
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("GPUFLEET_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _assert_clean(argv: list[str], code: int, out: str, err: str) -> None:
    assert 0 <= code <= 5, (argv, code, err[-500:])
    assert "Traceback" not in out + err, (argv, err[-2000:])


@pytest.mark.parametrize(("cmd", "parser"), COMMANDS, ids=[" ".join(c) for c, _ in COMMANDS])
def test_every_command_fails_cleanly_on_invalid_input(
    cmd: tuple[str, ...], parser: argparse.ArgumentParser, env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name = " ".join(cmd)
    base = [*cmd, *_required(parser, env)]
    options = _options(parser)
    # Unknown flag: argparse, exit 2.
    code, out, err = _run([*base, "--no-such-flag"], capsys)
    assert code == Exit.INVALID
    _assert_clean(base, code, out, err)
    stack_file = "--stack-file" in options and name not in PARSE_ONLY
    bad = _bad_stacks(env)
    # Every typed option with a value of the wrong type: exit 2 before anything runs.
    for flag, action in options.items():
        if action.type not in (None, str, Path) and action.nargs != 0:
            argv = [*base, flag, "not-a-number"]
            code, out, err = _run(argv, capsys)
            assert code == Exit.INVALID, (argv, err)
            _assert_clean(argv, code, out, err)
    if name in PARSE_ONLY or not stack_file:
        return
    for stack in bad:
        for json_flag in ([["--json"]] if "--json" in options else []) + [[]]:
            argv = [*base, "--stack-file", str(stack), *json_flag]
            code, out, err = _run(argv, capsys)
            _assert_clean(argv, code, out, err)
            assert code != Exit.OK, argv
            if json_flag and name not in TEXT_UNDER_JSON:
                # One JSON object on stdout naming the exit code, nothing on stderr.
                data = json.loads(out)
                assert data["exit"] == code and data["error"], (argv, out)
                assert err == "", (argv, err)


@pytest.mark.parametrize(
    "args",
    [
        ["--tp", "0"],
        ["--tp", "-1"],
        ["--pp", "0"],
        ["--count", "0"],
        ["--context", "-5"],
        ["--concurrency", "0"],
        ["--utilization", "0"],
        ["--utilization", "1.5"],
        ["--utilization", "nan"],
        ["--params", "-1"],
        ["--layers", "0"],
    ],
)
def test_vram_rejects_non_positive_numbers(args: list[str], env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(["vram", "--model", "llama-3.1-8b", *args], capsys)
    assert code == Exit.INVALID
    assert args[0] in err and "Traceback" not in err


def test_vram_unknown_model_is_one_json_object(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(["vram", "--model", "no-such-model", "--json"], capsys)
    assert code == Exit.INVALID
    data = json.loads(out)
    assert data["exit"] == 2 and "no-such-model" in data["error"] and err == ""


def test_an_unexpected_exception_is_one_line_and_a_log_file(
    env: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from infra.commands import site

    def boom(args: argparse.Namespace) -> int:
        raise ZeroDivisionError("secret-free detail\nsecond line")

    monkeypatch.setattr(site, "cmd_vram", boom)
    code, out, err = _run(["vram", "--model", "llama-3.1-8b"], capsys)
    assert code == Exit.FAILED
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: internal error: ZeroDivisionError: secret-free detail")
    assert "gpufleet bug" in lines[0]
    logs = list((env / "runs" / "errors").iterdir())
    assert len(logs) == 1 and str(logs[0]) in lines[0]
    assert "Traceback" in logs[0].read_text() and "boom" in logs[0].read_text()
    # Under --json the same failure is one JSON object naming the log.
    code, out, err = _run(["vram", "--model", "llama-3.1-8b", "--json"], capsys)
    data = json.loads(out)
    assert code == 1 and data["exit"] == 1 and Path(data["log"]).is_file() and err == ""


def test_a_command_returning_a_non_code_is_reported_not_passed_on(
    env: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from infra.commands import site

    monkeypatch.setattr(site, "cmd_vram", lambda args: None)
    code, _, err = _run(["vram", "--model", "llama-3.1-8b"], capsys)
    assert code == Exit.FAILED and "internal error" in err
