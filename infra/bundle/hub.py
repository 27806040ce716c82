"""`hf://` models on the connected side: a hub revision pinned to its commit and file hashes, and downloads.

Only `gpufleet lock` and `gpufleet bundle build` talk to a hub, through `huggingface_hub` (the hub's own
client: its endpoints, redirects, authentication with `HF_TOKEN`, Xet storage). `HF_ENDPOINT` names
another hub (a company proxy, or the tests' local one); it is read when called, not when imported.
Nodes never reach a hub: they fetch the bundled files from their mirror and run with hub access off.

What a lock records of one model, per file: the path in the repository, size and sha256. The hub
gives sha256 for LFS files (every weight file); small git files (config.json, tokenizer files) have
only a git blob id there, so they are downloaded once at lock time and hashed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import httpx
from huggingface_hub import HfApi, hf_hub_download

from infra.bundle.store import FetchError, file_digest
from infra.model.site import HF_FILE_PART, HF_REPO_PART

COMMIT = re.compile(r"^[0-9a-f]{40}$")
"""A git commit sha as the hub reports it (`ModelInfo.sha`, the `X-Repo-Commit` header)."""
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Weight formats other engines load. A repository with safetensors (what vLLM and TGI load first) often
# carries the same weights again in these; carrying them would double a bundle for nothing.
_OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".h5", ".msgpack", ".onnx", ".ot", ".ckpt", ".gguf")
TIMEOUT_S = 60.0


class HubError(FetchError):
    """The hub could not answer, or answered something a lock cannot record."""


@dataclass(frozen=True)
class HubFile:
    """One file of a pinned revision."""

    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class HubRevision:
    """What `ref` of `repo` was when resolved: the commit and the files a bundle carries."""

    repo: str
    ref: str
    commit: str
    files: tuple[HubFile, ...]


def endpoint() -> str | None:
    """The hub to ask: `HF_ENDPOINT` when set (read now), else huggingface_hub's default."""
    return os.environ.get("HF_ENDPOINT") or None


def safe_file(path: str) -> bool:
    """A repository file path the model store can hold: components of HF_FILE_PART, no '..' anywhere."""
    parts = path.split("/")
    return len(path) <= 1024 and all(HF_FILE_PART.fullmatch(p) and ".." not in p for p in parts)


def locked_source(repo: str, commit: str, path: str) -> str:
    """The source a lock records for one file: `hf://<repo>@<commit>/<path>`."""
    return f"hf://{repo}@{commit}/{path}"


def parse_locked_source(source: str) -> tuple[str, str, str] | None:
    """(repo, commit, path) of a lock's `hf://<repo>@<commit>/<path>`; None for anything else."""
    if not source.startswith("hf://"):
        return None
    repo, at, rest = source.removeprefix("hf://").partition("@")
    commit, slash, path = rest.partition("/")
    parts = repo.split("/")
    ok = (at and slash and len(parts) == 2 and all(HF_REPO_PART.fullmatch(p) and ".." not in p for p in parts)
          and COMMIT.match(commit) and safe_file(path))
    return (repo, commit, path) if ok else None


def _wanted(names: list[str], path: str | None) -> list[str]:
    if path is not None:
        return [path] if path in names else []
    visible = [n for n in names if not any(p.startswith(".") for p in n.split("/"))]
    if any(n.endswith(".safetensors") for n in visible):
        visible = [n for n in visible if not n.endswith(_OTHER_WEIGHTS)]
    return sorted(visible)


def _fail(what: str, exc: BaseException) -> HubError:
    # The hub's own message says what is wrong (no such repo, gated, no such revision); keep it short.
    text = " ".join(str(exc).split())[:300]
    return HubError(f"{what}: {type(exc).__name__}: {text}")


def resolve(repo: str, ref: str, path: str | None, work: Path, hub: str | None = None) -> HubRevision:
    """Pin `ref` of `repo`: its commit, and size and sha256 of every file a bundle carries.

    `path` selects one file (a GGUF for llama.cpp); None takes the repository, less hidden files and,
    when it has safetensors, the same weights in other formats.

    Raises:
        HubError: the hub is unreachable, the repo/revision/file does not exist, or it reports a
            commit, size or hash that is not well formed, or a file name the model store cannot hold.

    """
    hub = hub or endpoint()
    where = f"hf://{repo}@{ref}"
    try:
        info = HfApi(endpoint=hub).model_info(repo, revision=ref, files_metadata=True, timeout=TIMEOUT_S)
    except (OSError, ValueError, httpx.HTTPError) as exc:
        raise _fail(f"{where}: cannot resolve on {hub or 'the hub'}", exc) from None
    commit = info.sha or ""
    if not COMMIT.match(commit):
        raise HubError(f"{where}: the hub reported commit {commit[:80]!r}, not a 40-hex sha")
    siblings = {s.rfilename: s for s in info.siblings or []}
    names = _wanted(sorted(siblings), path)
    if not names:
        raise HubError(f"{where}: " + (f"has no file {path!r}" if path else "has no files to serve"))
    bad = [n for n in names if not safe_file(n)]
    if bad:
        raise HubError(f"{where}: file name {bad[0][:120]!r} cannot be placed in the model store "
                       "(name the files you serve with hf://<org>/<name>@<revision>/<file>)")
    files = []
    for name in names:
        lfs = siblings[name].lfs
        if lfs is not None:
            size, sha = int(lfs.size), str(lfs.sha256)
            if not _SHA256.match(sha) or size < 0:
                raise HubError(f"{where}: {name}: the hub reported sha256 {sha[:80]!r}, size {size}")
        else:
            # A git (non-LFS) file: the hub lists only its git blob id, so hash the bytes themselves.
            dest = work / "hub-small" / commit / name
            download(repo, commit, name, dest, work, hub)
            size, sha = file_digest(dest)
        files.append(HubFile(name, size, sha))
    return HubRevision(repo, ref, commit, tuple(files))


def download(repo: str, commit: str, path: str, dest: Path, work: Path, hub: str | None = None) -> None:
    """Download one file of `repo` at `commit` to `dest` (the caller checks its sha256 against the lock).

    Raises:
        HubError: the hub cannot deliver it.

    """
    if not COMMIT.match(commit) or not safe_file(path):
        raise HubError(f"hf://{repo}@{commit}/{path}: not a pinned file of a repository")
    hub = hub or endpoint()
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        got = hf_hub_download(repo, path, revision=commit, cache_dir=work / "hub-cache", endpoint=hub,
                              etag_timeout=TIMEOUT_S)
        shutil.copyfile(got, dest)
    except (OSError, ValueError, httpx.HTTPError) as exc:
        raise _fail(f"hf://{repo}@{commit}/{path}: cannot download from {hub or 'the hub'}", exc) from None


def index_bytes(name: str, revision: str, repo: str, commit: str, files: list[tuple[str, int, str]]) -> bytes:
    """The file list a node fetches an `hf://` model by (`files/model-index/<name>/<revision>.json`).

    Derived from the lock alone (deterministic): same lock, same bytes. `files` is (path in the
    repository, size, sha256).
    """
    data = {"format": 1, "model": name, "revision": revision, "repo": repo, "commit": commit,
            "files": [{"path": p, "size": s, "sha256": h} for p, s, h in sorted(files)]}
    return (json.dumps(data, indent=1, sort_keys=True) + "\n").encode()
