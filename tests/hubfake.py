"""A local stand-in for the Hugging Face hub: the few endpoints `huggingface_hub` calls, on 127.0.0.1.

No test ever reaches huggingface.co: point `HF_ENDPOINT` at `FakeHub.url`. What is implemented, and
what huggingface_hub 1.33.0 (the version in uv.lock) reads from it, from the installed wheel:

- `GET /api/models/<org>/<name>/revision/<rev>?blobs=True` (`hf_api.py`, `HfApi.model_info` with
  `files_metadata=True`): JSON with `id`, `sha` (the commit) and `siblings`, each `rfilename`,
  `size`, `blobId` and, for LFS files, `lfs: {size, sha256, pointerSize}` (`ModelInfo.__init__`).
- `HEAD` and `GET /<org>/<name>/resolve/<rev>/<path>` (`file_download.py`, `get_hf_file_metadata`
  and `http_get`): headers `X-Repo-Commit`, `X-Linked-Etag` or `ETag`, `X-Linked-Size` or
  `Content-Length` (header names in `constants.py`: HUGGINGFACE_HEADER_X_REPO_COMMIT,
  HUGGINGFACE_HEADER_X_LINKED_ETAG, HUGGINGFACE_HEADER_X_LINKED_SIZE). No `X-Xet-Hash` header, so
  the client downloads over plain HTTP rather than Xet storage (`utils/_xet.py`,
  `parse_xet_file_data_from_response`).
- Errors as `utils/_http.py` `hf_raise_for_status` reads them: 404 with `X-Error-Code`
  `RepoNotFound`, `RevisionNotFound` or `EntryNotFound`.

As on the hub, LFS files (weights) carry their sha256 in the listing and as ETag; git files carry a
git blob id (sha1 of `blob <size>\\0<bytes>`) and no sha256.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".gguf", ".safetensors", ".bin")


def git_blob_id(data: bytes) -> str:
    """git's object id of a blob (what the hub reports as `blobId` and ETag of a non-LFS file)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


@dataclass
class FakeRepo:
    """Commits (sha → files), and branches and tags naming them."""

    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    served: dict[tuple[str, str], bytes] = field(default_factory=dict)
    """Bytes served instead of the committed ones (a tampering CDN or proxy), by (commit, path)."""

    def commit(self, files: dict[str, bytes], branch: str = "main") -> str:
        """Add a commit holding `files` on `branch`; its sha (deterministic from the content)."""
        h = hashlib.sha1(usedforsecurity=False)
        h.update(self.refs.get(branch, "").encode())
        for path, data in sorted(files.items()):
            h.update(path.encode() + b"\0" + hashlib.sha256(data).digest())
        sha = h.hexdigest()
        self.commits[sha] = dict(files)
        self.refs[branch] = sha
        return sha

    def resolve(self, rev: str) -> str | None:
        """A revision (commit sha, branch or tag) → commit sha."""
        return rev if rev in self.commits else self.refs.get(rev)


class FakeHub:
    """A local hub on 127.0.0.1 (port chosen by the OS); use as a context manager."""

    def __init__(self) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                hub._answer(self, body=True)

            def do_HEAD(self) -> None:
                hub._answer(self, body=False)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def repo(self, repo_id: str) -> FakeRepo:
        """The repository `org/name`, created empty on first use."""
        return self.repos.setdefault(repo_id, FakeRepo())

    def _answer(self, h: BaseHTTPRequestHandler, *, body: bool) -> None:
        path = unquote(urlsplit(h.path).path)
        self.requests.append(f"{h.command} {path}")
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo_id = "/".join(parts[2:4])
            rev = parts[5] if len(parts) == 6 and parts[4] == "revision" else "main"
            self._info(h, repo_id, rev, body=body)
        elif len(parts) >= 5 and parts[2] == "resolve":
            self._file(h, "/".join(parts[:2]), parts[3], "/".join(parts[4:]), body=body)
        else:
            self._error(h, 404, "RepoNotFound")

    def _error(self, h: BaseHTTPRequestHandler, status: int, code: str) -> None:
        data = json.dumps({"error": code}).encode()
        h.send_response(status)
        h.send_header("X-Error-Code", code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _info(self, h: BaseHTTPRequestHandler, repo_id: str, rev: str, *, body: bool) -> None:
        repo = self.repos.get(repo_id)
        if repo is None:
            return self._error(h, 404, "RepoNotFound")
        sha = repo.resolve(rev)
        if sha is None:
            return self._error(h, 404, "RevisionNotFound")
        siblings = []
        for name, data in sorted(repo.commits[sha].items()):
            s: dict[str, Any] = {"rfilename": name, "size": len(data), "blobId": git_blob_id(data)}
            if name.endswith(LFS_SUFFIXES):
                s["lfs"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 132}
            siblings.append(s)
        out = json.dumps({"id": repo_id, "modelId": repo_id, "sha": sha, "private": False,
                          "siblings": siblings}).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(out)))
        h.end_headers()
        if body:
            h.wfile.write(out)
        return None

    def _file(self, h: BaseHTTPRequestHandler, repo_id: str, rev: str, name: str, *, body: bool) -> None:
        repo = self.repos.get(repo_id)
        if repo is None:
            return self._error(h, 404, "RepoNotFound")
        sha = repo.resolve(rev)
        if sha is None:
            return self._error(h, 404, "RevisionNotFound")
        data = repo.commits[sha].get(name)
        if data is None:
            return self._error(h, 404, "EntryNotFound")
        served = repo.served.get((sha, name), data)
        h.send_response(200)
        h.send_header("X-Repo-Commit", sha)
        if name.endswith(LFS_SUFFIXES):
            etag = hashlib.sha256(data).hexdigest()
            h.send_header("X-Linked-Etag", f'"{etag}"')
            h.send_header("X-Linked-Size", str(len(served)))
        else:
            etag = git_blob_id(data)
        h.send_header("ETag", f'"{etag}"')
        h.send_header("Content-Length", str(len(served)))
        h.end_headers()
        if body:
            h.wfile.write(served)
        return None
