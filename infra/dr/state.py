"""Pulumi state backups: `pulumi stack export` on a schedule, with rotation, never with plaintext secrets.

Losing the Pulumi backend must not mean losing the site. The stack *file* (stacks/Pulumi.<stack>.yaml)
is enough to converge or rebuild every node (`gpufleet converge`/`rebuild` never need Pulumi); these
backups give back the *state* (resource ids, outputs, the content hashes that decide what `pulumi up`
replaces) so `pulumi stack import` can resume where the lost backend stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from infra.secrets import ENV_PREFIX

# Pulumi marks secret values in a deployment with this signature key; with --show-secrets they carry
# `plaintext`, without it only `ciphertext`.
SECRET_SIG = "4dabf18193072939515e22adb298388d"
_NAME = re.compile(r"[^A-Za-z0-9_.-]+")


class StateError(Exception):
    """A backup or restore could not be done; `missing` is True when the Pulumi CLI is absent."""

    def __init__(self, message: str, *, missing: bool = False) -> None:
        self.missing = missing
        super().__init__(message)


@dataclass(frozen=True)
class Backup:
    """One written backup."""

    path: Path
    sha256: str
    resources: int
    removed: tuple[Path, ...]

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "path": str(self.path),
            "sha256": self.sha256,
            "resources": self.resources,
            "removed": [str(p) for p in self.removed],
        }


def _pulumi(binary: str) -> str:
    found = shutil.which(binary)
    if not found:
        raise StateError(
            f"the Pulumi CLI ({binary}) is not on PATH; install it on the backup host (nothing was written)",
            missing=True,
        )
    return found


def plaintext_secrets(node: Any, path: str = "$") -> list[str]:
    """JSON paths of secret values that carry plaintext (empty for a proper export)."""
    found: list[str] = []
    if isinstance(node, dict):
        if node.get(SECRET_SIG) and "plaintext" in node:
            found.append(path)
        for k, v in node.items():
            found.extend(plaintext_secrets(v, f"{path}.{k}"))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found.extend(plaintext_secrets(v, f"{path}[{i}]"))
    return found


def _leaked_env_secrets(text: str) -> list[str]:
    # Belt and braces: a secret this process was given must not appear in the file in any form we can see.
    return sorted(k for k, v in os.environ.items() if k.startswith(ENV_PREFIX) and len(v) >= 4 and v in text)


def backup_dir(directory: Path, stack: str) -> Path:
    """Folder of one stack's backups."""
    return directory / _NAME.sub("_", stack)


def list_backups(directory: Path, stack: str) -> list[Path]:
    """Backups of a stack, oldest first (names sort by their UTC timestamp)."""
    d = backup_dir(directory, stack)
    prefix = _NAME.sub("_", stack)
    return sorted(d.glob(f"{prefix}-*.json")) if d.is_dir() else []


def backup(
    stack: str,
    directory: Path,
    *,
    keep: int = 14,
    pulumi: str = "pulumi",
    cwd: Path | None = None,
    now: datetime | None = None,
    timeout: float = 300,
) -> Backup:
    """Export the stack's state to `directory/<stack>/<stack>-<UTC>.json` (mode 0600) and keep the newest `keep`.

    Raises:
        StateError: no Pulumi CLI, export failed, output not a deployment, or plaintext secrets in it.

    """
    if keep < 1:
        raise StateError("--keep must be at least 1")
    exe = _pulumi(pulumi)
    try:
        p = subprocess.run(
            [exe, "stack", "export", "--stack", stack, "--show-secrets=false"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise StateError(f"`pulumi stack export` did not finish in {timeout:.0f} s (backend unreachable?)") from None
    if p.returncode != 0:
        raise StateError(f"`pulumi stack export` failed (exit {p.returncode}): {p.stderr.strip()[-400:]}")
    try:
        data = json.loads(p.stdout)
    except ValueError:
        raise StateError("`pulumi stack export` did not print JSON; nothing was written") from None
    if not isinstance(data, dict) or "deployment" not in data:
        raise StateError("`pulumi stack export` output has no `deployment`; nothing was written")
    leaks = plaintext_secrets(data)
    if leaks:
        raise StateError(f"the export holds {len(leaks)} plaintext secret(s) (e.g. {leaks[0]}); refusing to write it")
    leaked_env = _leaked_env_secrets(p.stdout)
    if leaked_env:
        raise StateError(f"the export contains the value of {', '.join(leaked_env)}; refusing to write it")
    d = backup_dir(directory, stack)
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    path = d / f"{_NAME.sub('_', stack)}-{stamp}.json"
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(p.stdout)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    existing = list_backups(directory, stack)
    removed = tuple(existing[:-keep]) if len(existing) > keep else ()
    for old in removed:
        old.unlink()
    resources = len((data.get("deployment") or {}).get("resources") or [])
    return Backup(path, hashlib.sha256(p.stdout.encode()).hexdigest(), resources, removed)


def restore(stack: str, file: Path, *, pulumi: str = "pulumi", cwd: Path | None = None, timeout: float = 300) -> None:
    """`pulumi stack import --stack S --file F` after checking the file is a deployment export."""
    exe = _pulumi(pulumi)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StateError(f"{file}: not a readable JSON export ({type(exc).__name__})") from None
    if not isinstance(data, dict) or "deployment" not in data:
        raise StateError(f"{file}: not a `pulumi stack export` file (no `deployment`)")
    p = subprocess.run(
        [exe, "stack", "import", "--stack", stack, "--file", str(file)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if p.returncode != 0:
        raise StateError(f"`pulumi stack import` failed (exit {p.returncode}): {p.stderr.strip()[-400:]}")
