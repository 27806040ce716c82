"""Output for people (tables) and machines (`--json`), and the CLI's exit codes."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from enum import IntEnum
from typing import Any, TextIO


class Exit(IntEnum):
    """Exit codes of every `gpufleet` command (documented in the README)."""

    OK = 0
    FAILED = 1  # the operation ran and failed (converge error, validation failed on a node, …)
    INVALID = 2  # bad input: stack file, arguments; nothing was touched
    DRIFT = 3  # `drift`/`check`: nodes differ from the plan
    ABORTED = 4  # a destructive command was not confirmed
    UNAVAILABLE = 5  # a prerequisite is missing (not root, no nspawn, BMC unreachable …)


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
