"""Pulumi state backups: `pulumi stack export` on a schedule, with rotation, never with plaintext secrets.

Losing the Pulumi backend must not mean losing the site. The stack *file* (stacks/Pulumi.<stack>.yaml)
is enough to converge or rebuild every node (`gpufleet converge`/`rebuild` never need Pulumi); these
backups give back the *state* (resource ids, outputs, the content hashes that decide what `pulumi up`
replaces) so `pulumi stack import` can resume where the lost backend stopped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from infra.secrets import ENV_PREFIX

# The checkpoint format, from Pulumi's own types (github.com/pulumi/pulumi, sdk/go/common/apitype/core.go:
# UntypedDeployment {version, features, deployment}, DeploymentV3 {manifest, secrets_providers, resources, …},
# ResourceV3 {urn, type, inputs, outputs, additionalSecretOutputs, …}, SecretV1; sdk/go/common/resource/sig/sig.go).
# A secret value is an object whose signature key is SECRET_SIG with the value SECRET_TYPE; exported without
# --show-secrets it carries `ciphertext`, with it `plaintext`.
SECRET_SIG = "4dabf18193072939515e22adb298388d"
SECRET_TYPE = "1b47061264138c4ac30d75fd1eb44270"
DEPLOYMENT_VERSIONS = (3, 4)  # apitype.DeploymentSchemaVersionCurrent .. DeploymentSchemaVersionLatest
URN_PREFIX = "urn:pulumi:"  # urn:pulumi:<stack>::<project>::<qualified type>::<name>
# Resources every stack has even with nothing deployed: a state holding only these is empty.
_BOOKKEEPING = ("pulumi:pulumi:Stack", "pulumi:providers:")
MAX_STATE_BYTES = 1 << 30
FUTURE_SKEW = timedelta(minutes=5)
"""Timestamps later than now plus this are from the future: their age is unknown."""
_NAME = re.compile(r"[^A-Za-z0-9_.-]+")
_STAMP = re.compile(r"-(\d{8}T\d{6}Z)(?:-\d+)?(?:\.pre-restore)?\.json$")


class StateError(Exception):
    """A backup or restore could not be done.

    `missing` is True when the Pulumi CLI is absent (exit 5); `invalid` when the input itself is
    refused — an argument, or a file that is not a safe state to import (exit 2).
    """

    def __init__(self, message: str, *, missing: bool = False, invalid: bool = False) -> None:
        self.missing = missing
        self.invalid = invalid
        super().__init__(message)


@dataclass(frozen=True)
class Backup:
    """One written backup."""

    path: Path
    sha256: str
    resources: int
    removed: tuple[Path, ...]
    unknown_age: tuple[Path, ...] = ()
    """Backups rotation left alone because their time is in the future or unreadable."""

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "path": str(self.path),
            "sha256": self.sha256,
            "resources": self.resources,
            "removed": [str(p) for p in self.removed],
            "unknown_age": [str(p) for p in self.unknown_age],
        }


def _pulumi(binary: str) -> str:
    found = shutil.which(binary)
    if not found:
        raise StateError(
            f"the Pulumi CLI ({binary}) is not on PATH; install it on the backup host (nothing was written)",
            missing=True,
        )
    return found


def _is_secret(node: object) -> bool:
    """A Pulumi secret value, or anything shaped like one (the signature key with a plaintext/ciphertext).

    One predicate for every check here: a value with the secret signature key but another signature value
    and a `plaintext` is not a proper secret, and must be refused, not passed over as ordinary data.
    """
    if not isinstance(node, dict) or SECRET_SIG not in node:
        return False
    return node[SECRET_SIG] == SECRET_TYPE or "plaintext" in node or "ciphertext" in node


def plaintext_secrets(node: Any, path: str = "$") -> list[str]:
    """JSON paths of secret values that carry plaintext (empty for a proper export)."""
    found: list[str] = []
    if isinstance(node, dict):
        if _is_secret(node) and "plaintext" in node:
            found.append(path)
        for k, v in node.items():
            found.extend(plaintext_secrets(v, f"{path}.{k}"))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found.extend(plaintext_secrets(v, f"{path}[{i}]"))
    return found


def _unencrypted(node: Any, path: str, out: list[str]) -> None:
    """Secrets without ciphertext, and values Pulumi would have encrypted that are plain."""
    if isinstance(node, dict):
        if _is_secret(node):
            if "plaintext" in node or not isinstance(node.get("ciphertext"), str) or not node["ciphertext"]:
                out.append(path)
            return
        for k, v in node.items():
            # gpufleet passes every secret to commands as GPUFLEET_SECRET_* (components/node.py): always a secret.
            if isinstance(k, str) and k.startswith(ENV_PREFIX) and not _is_secret(v):
                out.append(f"{path}.{k}")
            else:
                _unencrypted(v, f"{path}.{k}", out)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _unencrypted(v, f"{path}[{i}]", out)


@dataclass(frozen=True)
class StateFacts:
    """What a state document holds (for the confirmation)."""

    stack: str
    resources: int
    managed: int
    """Resources besides the stack and its providers."""


def urn_parts(urn: str) -> tuple[str, str, str, str] | None:
    """(stack, project, type, name) of a Pulumi URN, None when it is not one."""
    if not urn.startswith(URN_PREFIX):
        return None
    parts = urn[len(URN_PREFIX):].split("::", 3)
    if len(parts) != 4 or not all(parts):
        return None
    return parts[0], parts[1], parts[2], parts[3]


def check_state(data: Any, stack: str, project: str) -> StateFacts:
    """Refuse a state that must not be imported as `stack` of `project`; the facts of one that may.

    Refused: not a `pulumi stack export` document (version 3/4 with a `deployment` object), no
    resources or only the stack and providers (a later `pulumi up` would re-create, so reinstall,
    every node), any URN of another stack or project, any secret without ciphertext or any value
    Pulumi encrypts that is plain (`additionalSecretOutputs`, gpufleet's `GPUFLEET_SECRET_*`), and
    secrets without `secrets_providers` to decrypt them.

    Raises:
        StateError: (invalid) naming the first kind of problem.

    """
    def refuse(msg: str) -> StateError:
        return StateError(msg, invalid=True)

    if not isinstance(data, dict) or not isinstance(data.get("deployment"), dict):
        raise refuse("not a `pulumi stack export` file (no `deployment` object)")
    dep = data["deployment"]
    resources = dep.get("resources")
    if resources is None or resources == []:
        raise refuse("the state is empty (no resources): importing it would make the next `pulumi up` "
                     "re-create, so reinstall, every node")
    version = data.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version not in DEPLOYMENT_VERSIONS:
        raise refuse(f"deployment version {str(version)[:20]!r} is not one Pulumi exports (3 or 4)")
    if not isinstance(resources, list) or not all(isinstance(r, dict) for r in resources):
        raise refuse("`deployment.resources` is not a list of resources")
    short = stack.rsplit("/", 1)[-1]  # org/project/stack or org/stack: URNs carry the stack name only
    foreign: list[str] = []
    managed = 0
    for i, r in enumerate(resources):
        urn, typ = r.get("urn"), r.get("type")
        if not isinstance(urn, str) or not isinstance(typ, str):
            raise refuse(f"resource {i}: `urn` and `type` must be strings")
        parts = urn_parts(urn)
        if parts is None:
            raise refuse(f"resource {i}: {urn[:120]!r} is not a Pulumi URN (urn:pulumi:<stack>::<project>::…)")
        if (parts[0], parts[1]) != (short, project):
            foreign.append(urn)
        if not typ.startswith(_BOOKKEEPING):
            managed += 1
    if foreign:
        raise refuse(f"{len(foreign)} resource(s) belong to another stack or project than {short!r} of {project!r} "
                     f"(e.g. {foreign[0][:160]}); restore a backup of this stack")
    if managed == 0:
        raise refuse("the state holds only the stack and its providers, no site resources: importing it would "
                     "make the next `pulumi up` re-create, so reinstall, every node")
    plain: list[str] = []
    _unencrypted(dep, "$.deployment", plain)
    for i, r in enumerate(resources):
        outputs = r.get("outputs") if isinstance(r.get("outputs"), dict) else {}
        extra = r.get("additionalSecretOutputs") or []
        for key in extra if isinstance(extra, list) else []:
            if isinstance(key, str) and key in outputs and not _is_secret(outputs[key]):
                plain.append(f"$.deployment.resources[{i}].outputs.{key}")
    if plain:
        raise refuse(f"{len(plain)} secret value(s) are not encrypted (e.g. {plain[0][:160]}); a state with plaintext "
                     "secrets is never imported — export it again without --show-secrets")
    if _has_ciphertext(dep) and not isinstance(dep.get("secrets_providers"), dict):
        raise refuse("the state holds encrypted secrets but no `secrets_providers` to decrypt them")
    return StateFacts(short, len(resources), managed)


def _has_ciphertext(node: Any) -> bool:
    if _is_secret(node):
        return True
    if isinstance(node, dict):
        return any(_has_ciphertext(v) for v in node.values())
    if isinstance(node, list):
        return any(_has_ciphertext(v) for v in node)
    return False


def _leaked_env_secrets(text: str) -> list[str]:
    # Belt and braces: a secret this process was given must not appear in the file in any form we can see.
    return sorted(k for k, v in os.environ.items() if k.startswith(ENV_PREFIX) and len(v) >= 4 and v in text)


def backup_dir(directory: Path, stack: str) -> Path:
    """Folder of one stack's backups."""
    return directory / _NAME.sub("_", stack)


def backup_time(path: Path, now: datetime | None = None) -> datetime | None:
    """When a backup was taken: the UTC time in its name (else its mtime); None when unknown.

    A time in the future (beyond a few minutes of clock skew) is not trusted: such a backup has no
    known age, is never taken as the newest and is never deleted by rotation.
    """
    now = now or datetime.now(UTC)
    m = _STAMP.search(path.name)
    when: datetime | None = None
    if m:
        with contextlib.suppress(ValueError):
            when = datetime.strptime(m.group(1), "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    if when is None:
        try:
            when = datetime.fromtimestamp(path.stat().st_mtime, UTC)
        except OSError:
            return None
    return None if when > now + FUTURE_SKEW else when


def list_backups(directory: Path, stack: str, now: datetime | None = None) -> list[Path]:
    """Backups of a stack: known times oldest first, then the ones of unknown age (by name)."""
    d = backup_dir(directory, stack)
    prefix = _NAME.sub("_", stack)
    files = [p for p in d.glob(f"{prefix}-*.json") if p.is_file() and not p.is_symlink()] if d.is_dir() else []
    known = sorted((t, p.name, p) for p in files if (t := backup_time(p, now)) is not None)
    unknown = sorted(p for p in files if backup_time(p, now) is None)
    return [p for _, _, p in known] + unknown


def rotate(directory: Path, stack: str, keep: int, written: Path, now: datetime | None = None,
           ) -> tuple[tuple[Path, ...], tuple[Path, ...]]:
    """(removed, unknown age): keep the newest `keep` backups of known age, always `written`, never the unknown."""
    now = now or datetime.now(UTC)
    files = list_backups(directory, stack, now)
    unknown = tuple(p for p in files if backup_time(p, now) is None)
    known = [p for p in files if p not in unknown]
    kept = set(known[-keep:]) | {written}
    removed = tuple(p for p in known if p not in kept)
    for old in removed:
        old.unlink()
    return removed, unknown


def _export(stack: str, exe: str, cwd: Path | None, timeout: float) -> tuple[str, Any]:
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
    except (ValueError, RecursionError):
        raise StateError("`pulumi stack export` did not print JSON; nothing was written") from None
    if not isinstance(data, dict) or not isinstance(data.get("deployment"), dict):
        raise StateError("`pulumi stack export` output has no `deployment`; nothing was written")
    leaks = plaintext_secrets(data)
    if leaks:
        raise StateError(f"the export holds {len(leaks)} plaintext secret(s) (e.g. {leaks[0]}); refusing to write it")
    leaked_env = _leaked_env_secrets(p.stdout)
    if leaked_env:
        raise StateError(f"the export contains the value of {', '.join(leaked_env)}; refusing to write it")
    return p.stdout, data


def backup(
    stack: str,
    directory: Path,
    *,
    keep: int | None = 14,
    pulumi: str = "pulumi",
    cwd: Path | None = None,
    now: datetime | None = None,
    timeout: float = 300,
    suffix: str = "",
) -> Backup:
    """Export the stack's state to `directory/<stack>/<stack>-<UTC>.json` (mode 0600) and keep the newest `keep`.

    `keep=None` rotates nothing (the backup `state restore` takes of the state it replaces).

    Raises:
        StateError: no Pulumi CLI, export failed, output not a deployment, or plaintext secrets in it;
            (invalid) `keep` below 1.

    """
    if keep is not None and keep < 1:
        raise StateError(f"--keep {keep}: keep at least 1 backup (the one being written)", invalid=True)
    exe = _pulumi(pulumi)
    text, data = _export(stack, exe, cwd, timeout)
    d = backup_dir(directory, stack)
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    base = f"{_NAME.sub('_', stack)}-{stamp}"
    # Two backups in the same second get distinct names: a backup never replaces another.
    n = 0
    while (path := d / f"{base}{f'-{n}' if n else ''}{suffix}.json").exists():
        n += 1
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    removed, unknown = rotate(directory, stack, keep, path, now) if keep is not None else ((), ())
    resources = len((data.get("deployment") or {}).get("resources") or [])
    return Backup(path, hashlib.sha256(text.encode()).hexdigest(), resources, removed, unknown)


@dataclass(frozen=True)
class RestorePlan:
    """A checked backup, ready to import after confirmation."""

    file: Path
    facts: StateFacts
    taken: datetime | None
    """When the backup was taken (None: unknown — no readable time, or one in the future)."""

    def age(self, now: datetime | None = None) -> str:
        """The backup's age for people: `3 d 4 h`, `12 min`, or why it is unknown."""
        if self.taken is None:
            return "unknown (no trustworthy time: none in the name, or it is in the future)"
        secs = max(0, int(((now or datetime.now(UTC)) - self.taken).total_seconds()))
        d, h, m = secs // 86400, secs % 86400 // 3600, secs % 3600 // 60
        return f"{d} d {h} h" if d else f"{h} h {m} min" if h else f"{m} min"


def read_restore(stack: str, file: Path, project: str, now: datetime | None = None) -> RestorePlan:
    """Read and check a backup for `state restore` (nothing runs, nothing is written).

    Raises:
        StateError: (invalid) unreadable, not a regular file, or refused by `check_state`.

    """
    try:
        st = os.stat(file, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):
            raise StateError(f"{file}: not a regular file", invalid=True)
        if st.st_size > MAX_STATE_BYTES:
            raise StateError(f"{file}: larger than {MAX_STATE_BYTES} bytes; not a state gpufleet imports", invalid=True)
        text = file.read_text(encoding="utf-8")
        data = json.loads(text)
    except StateError:
        raise
    except (OSError, ValueError, RecursionError) as exc:
        raise StateError(f"{file}: not a readable JSON export ({type(exc).__name__})", invalid=True) from None
    try:
        facts = check_state(data, stack, project)
    except StateError as exc:
        raise StateError(f"{file}: {exc}", invalid=True) from None
    leaked = _leaked_env_secrets(text)
    if leaked:
        raise StateError(f"{file}: contains the value of {', '.join(leaked)}; refusing to import it", invalid=True)
    return RestorePlan(file, facts, backup_time(file, now))


def restore(stack: str, file: Path, *, pulumi: str = "pulumi", cwd: Path | None = None, timeout: float = 300,
            project: str = "gpufleet", backup_to: Path | None = None, plan: RestorePlan | None = None) -> Backup | None:
    """Back up the current state, then `pulumi stack import --stack S --file F` of a checked backup.

    With `backup_to`, the stack's current state is exported first (`<stack>-<UTC>.pre-restore.json`,
    never rotated by this call); if that fails nothing is imported.

    Raises:
        StateError: the file is refused (invalid), the CLI is missing, or the export/import failed.

    """
    plan = plan or read_restore(stack, file, project)
    exe = _pulumi(pulumi)
    saved = None
    if backup_to is not None:
        try:
            saved = backup(stack, backup_to, keep=None, pulumi=pulumi, cwd=cwd, timeout=timeout, suffix=".pre-restore")
        except StateError as exc:
            raise StateError(f"could not save the current state first, so nothing was imported: {exc}",
                             missing=exc.missing) from None
    try:
        p = subprocess.run(
            [exe, "stack", "import", "--stack", stack, "--file", str(plan.file)],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise StateError(f"`pulumi stack import` did not finish in {timeout:.0f} s (backend unreachable?); the "
                         f"state before it is in {saved.path if saved else 'no backup'}") from None
    if p.returncode != 0:
        raise StateError(f"`pulumi stack import` failed (exit {p.returncode}): {p.stderr.strip()[-400:]}")
    return saved
