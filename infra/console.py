"""Output for people (tables) and machines (`--json`), and the CLI's exit codes."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from enum import IntEnum
from pathlib import Path
from typing import Any, TextIO

RUNS_ENV = "GPUFLEET_RUNS_DIR"
DEFAULT_RUNS_DIR = Path("/var/lib/gpufleet/runs")


class Exit(IntEnum):
    """Exit codes of every `gpufleet` command (documented in the README)."""

    OK = 0
    FAILED = 1  # the operation ran and failed (converge error, validation failed on a node, …)
    INVALID = 2  # bad input: stack file, arguments; nothing was touched
    DRIFT = 3  # `drift`/`check`: nodes differ from the plan
    ABORTED = 4  # a destructive command was not confirmed
    UNAVAILABLE = 5  # a prerequisite is missing (not root, no nspawn, BMC unreachable …)


class CommandError(Exception):
    """Raised by a command to end with `code` and a one-line `message` (main() prints it through `fail`)."""

    def __init__(self, code: int, message: str, **fields: Any) -> None:
        self.code = int(code)
        self.message = message
        self.fields = fields
        super().__init__(message)


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    """A plain aligned text table."""
    cells = [[str(h) for h in headers], *[["" if c is None else str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def emit(as_json: bool, data: Any, render: Callable[[Any], str], out: TextIO | None = None) -> None:
    """Print `data` as JSON for machines or through `render` for people."""
    out = out or sys.stdout
    if as_json:
        json.dump(data, out, indent=2, sort_keys=True, default=str)
        out.write("\n")
    else:
        out.write(render(data).rstrip() + "\n")


def confirm(prompt: str, assume_yes: bool) -> bool:
    """Ask before destroying or rebuilding; `--yes` skips, no terminal means no."""
    if assume_yes:
        return True
    if not sys.stdin.isatty():
        sys.stderr.write(f"{prompt} — refusing without --yes (no terminal to ask)\n")
        return False
    return input(f"{prompt} [y/N] ").strip().lower() in ("y", "yes")


def runs_dir() -> Path:
    """Where run directories and error logs live (env GPUFLEET_RUNS_DIR overrides)."""
    return Path(os.environ.get(RUNS_ENV) or DEFAULT_RUNS_DIR)


def one_line(text: str, limit: int = 2000) -> str:
    """`text` on one line (newlines and control characters shown as spaces), at most `limit` characters."""
    flat = " ".join("".join(c if c.isprintable() else " " for c in part) for part in str(text).splitlines())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def fail(
    args: argparse.Namespace | None, code: int, message: str, *, lines: Sequence[str] = (), **fields: Any
) -> int:
    """End a command: one line on stderr, or one JSON object on stdout under `--json`; returns `code`.

    Args:
        args: The command's parsed arguments (`--json` is honoured when the command has it).
        code: An `Exit` code (the README's table).
        message: What went wrong and, where there is one, the fix — one line.
        lines: Further items, one line each (e.g. every problem of a stack file), printed indented.
        **fields: Extra JSON fields for machines (e.g. `path`, `node`, `problems`).

    """
    text = one_line(message)
    if getattr(args, "json", False):
        json.dump({"error": text, "exit": int(code), **fields}, sys.stdout, sort_keys=True, default=str)
        sys.stdout.write("\n")
    else:
        sys.stderr.write(f"error: {text}\n" + "".join(f"  - {one_line(x)}\n" for x in lines))
    return int(code)


def write_error_log(exc: BaseException) -> Path | None:
    """Write `exc`'s traceback to a new file under `<runs dir>/errors` (or the temp dir); None if both fail."""
    body = "".join(traceback.format_exception(exc))
    for base in (runs_dir() / "errors", Path(tempfile.gettempdir()) / "gpufleet-errors"):
        try:
            base.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd, name = tempfile.mkstemp(prefix=f"error-{time.strftime('%Y%m%dT%H%M%S')}-", suffix=".log", dir=base)
            path = Path(name)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(f"gpufleet {' '.join(sys.argv[1:])}\n{body}")
            return path
        except OSError:
            continue
    return None


def positive_int(text: str) -> int:
    """Argparse type: an integer ≥ 1 (bad values exit 2 through argparse)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be 1 or more")
    return value


def positive_float(text: str) -> float:
    """Argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a finite number above 0")
    return value


def fraction(text: str) -> float:
    """Argparse type: a number in (0, 1] (e.g. a GPU memory utilisation)."""
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"{text} must be in (0, 1]")
    return value
