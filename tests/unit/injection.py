"""The hostile-value corpus (tests/fixtures/injection/corpus.yaml), forced past validation into a Site.

Layer-2 tests use this to check an encoding door on its own: `force` builds the model with pydantic's
`model_copy(update=…)`, which runs no validator, so a value the grammar would reject reaches the
rendering code exactly as an attacker wrote it.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

CORPUS = Path(__file__).resolve().parents[1] / "fixtures" / "injection" / "corpus.yaml"
_TOKEN = re.compile(r"([a-z_]+)|\[(\d+)\]")


@dataclass(frozen=True)
class Attempt:
    """One corpus entry with `@CANARY@` replaced by a test-owned path."""

    path: str
    attack: str
    value: str
    canary: Path


def attempts(canary_dir: Path) -> list[Attempt]:
    """Every corpus entry, each with its own canary file under `canary_dir`."""
    entries = yaml.safe_load(CORPUS.read_text(encoding="utf-8"))
    out = []
    for i, e in enumerate(entries):
        canary = canary_dir / f"canary-{i}"
        out.append(Attempt(e["path"], e["attack"], e["value"].replace("@CANARY@", str(canary)), canary))
    return out


def _tokens(path: str) -> list[str | int]:
    out: list[str | int] = []
    for part in path.split("."):
        for name, index in _TOKEN.findall(part):
            out.append(name if name else int(index))
    return out


def _set(obj: Any, tokens: list[str | int], value: Any) -> Any:
    if not tokens:
        return value
    head, rest = tokens[0], tokens[1:]
    if isinstance(head, int):
        items = list(obj)
        if head == len(items):
            items.append(_set(None, rest, value))  # an index one past the end appends
        else:
            items[head] = _set(items[head], rest, value)
        return type(obj)(items) if isinstance(obj, tuple) else items
    if not isinstance(obj, BaseModel):
        raise TypeError(f"cannot set {head!r} on {type(obj).__name__}")
    return obj.model_copy(update={head: _set(getattr(obj, head), rest, value)})


def set_path(root: dict[str, Any], path: str, value: Any) -> None:
    """Put `value` at `path` of a raw stack mapping (the corpus's rule): an index equal to the list's length
    appends, a missing list or mapping is created."""
    steps = _tokens(path)
    cur: Any = root
    for step, nxt in itertools.pairwise(steps):
        if isinstance(step, int):
            if step == len(cur):
                cur.append([] if isinstance(nxt, int) else {})
        elif step not in cur:
            cur[step] = [] if isinstance(nxt, int) else {}
        cur = cur[step]
    last = steps[-1]
    if isinstance(last, int) and last == len(cur):
        cur.append(value)
    else:
        cur[last] = value


def force(site: Any, path: str, value: Any) -> Any:
    """`site` with the value at `path` (corpus syntax) replaced, bypassing every validator."""
    return _set(site, _tokens(path), value)
