"""Find and read stack files, and turn their `gpufleet:site` object into a validated `Site`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from infra.model.rules import Problem, check
from infra.model.site import Site

CONFIG_KEY = "gpufleet:site"
PROJECT_ENV = "GPUFLEET_PROJECT_DIR"


class SiteError(Exception):
    """A stack file that cannot be used; carries every problem found, not just the first."""

    def __init__(self, source: str, problems: list[Problem]) -> None:
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s):\n{lines}")


def project_dir(start: Path | None = None) -> Path:
    """The directory holding Pulumi.yaml (env GPUFLEET_PROJECT_DIR, else upward from cwd, else the package's)."""
    if env := os.environ.get(PROJECT_ENV):
        return Path(env).resolve()
    for d in [(start or Path.cwd()).resolve(), *(start or Path.cwd()).resolve().parents]:
        if (d / "Pulumi.yaml").is_file() and (d / "infra").is_dir():
            return d
    return Path(__file__).resolve().parents[2]


def stack_path(stack: str, root: Path | None = None) -> Path:
    """`stacks/Pulumi.<stack>.yaml` of the project."""
    return (root or project_dir()) / "stacks" / f"Pulumi.{stack}.yaml"


def read_stack_config(path: Path) -> dict[str, Any]:
    """The `config:` mapping of a stack file."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise SiteError(
            str(path),
            [Problem("(file)", "stack file not found", "create it, or pass --stack with an existing stack name")],
        ) from None
    except yaml.YAMLError as exc:
        raise SiteError(str(path), [Problem("(file)", f"not valid YAML: {exc}", "fix the YAML syntax")]) from None
    config = data.get("config") or {}
    if not isinstance(config, dict):
        raise SiteError(str(path), [Problem("config", "is not a mapping", "write config: as a YAML mapping")])
    return config


def _loc_to_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.startswith(("function-after", "function-")) or part in ("str", "int"):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out or "(root)"


_FIXES = {
    "extra_forbidden": "remove the key or fix its spelling (see `gpufleet schema`)",
    "missing": "add the field",
    "enum": "use one of the allowed values",
    "literal_error": "use one of the allowed values",
    "value_error": "see the message",
}


def parse_site(raw: Any, source: str = "gpufleet:site") -> Site:
    """Validate a raw `gpufleet:site` object: field types first, then every cross-field rule."""
    try:
        site = Site.model_validate(raw)
    except ValidationError as exc:
        problems = [
            Problem(
                _loc_to_path(e["loc"]),
                e["msg"].removeprefix("Value error, "),
                _FIXES.get(e["type"], "correct the value"),
            )
            for e in exc.errors(include_url=False)
        ]
        raise SiteError(source, problems) from None
    problems = check(site)
    if problems:
        raise SiteError(source, problems)
    return site


def load_site(stack: str | None = None, path: Path | None = None) -> Site:
    """Load and validate the site of a stack (by name, or by stack file path)."""
    if path is None:
        if stack is None:
            raise ValueError("give a stack name or a stack file path")
        path = stack_path(stack)
    config = read_stack_config(path)
    if CONFIG_KEY not in config:
        raise SiteError(
            str(path), [Problem(f"config.{CONFIG_KEY}", "missing", f"put the site object under config: {CONFIG_KEY}:")]
        )
    return parse_site(config[CONFIG_KEY], source=f"{path} ({CONFIG_KEY})")
