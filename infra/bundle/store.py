"""Where artifact bytes come from on the connected side: a local directory or an HTTP base URL.

Both use the mirror's own layout (`files/models/<name>/<rev>/…`, `files/wheels/…`,
`files/plugins/…`, `images/<repo>/` as an OCI layout), so an `--artifacts` tree is what a mirror
would serve and the same relative path names a file everywhere.
"""

from __future__ import annotations

import hashlib
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

HTTP_TIMEOUT_S = 30
CHUNK = 4 << 20


class FetchError(Exception):
    """An artifact is not where it was looked for."""


@dataclass(frozen=True)
class Store:
    """A local directory or an `http(s)://` base holding artifacts in the mirror layout."""

    base: str

    @property
    def is_url(self) -> bool:
        """True for an HTTP base."""
        return self.base.startswith(("http://", "https://"))

    def where(self, rel: str) -> str:
        """Location of one relative path, for messages."""
        return f"{self.base.rstrip('/')}/{rel}"

    def local(self, rel: str) -> Path | None:
        """Local path of `rel` when this store is a directory and the file exists."""
        if self.is_url:
            return None
        p = Path(self.base) / rel
        return p if p.is_file() else None

    def fetch(self, rel: str, dest: Path) -> None:
        """Copy or download `rel` to `dest`; FetchError naming the location when absent."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not self.is_url:
            src = Path(self.base) / rel
            if not src.is_file():
                raise FetchError(f"not found: {src}")
            shutil.copyfile(src, dest)
            return
        fetch_url(self.where(rel), dest)


def fetch_url(url: str, dest: Path) -> None:
    """Download one URL to `dest` (whole file, atomically renamed)."""
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as resp, tmp.open("wb") as out:
            shutil.copyfileobj(resp, out, CHUNK)
    except (urllib.error.URLError, OSError) as exc:
        tmp.unlink(missing_ok=True)
        raise FetchError(f"cannot fetch {url}: {exc}") from None
    tmp.replace(dest)


def file_digest(path: Path) -> tuple[int, str]:
    """(size, sha256 hex) of a file."""
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()
