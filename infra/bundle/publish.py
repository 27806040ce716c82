"""`gpufleet bundle import`: verify a bundle, then publish it into a mirror host, idempotently.

Publishing goes through a `Publisher` (the SSH one in `infra.bundle.remote`, a recording one in
tests), so "nothing is imported when verification fails" is a property of this module, not of a
transport. Layout on the mirror (the `mirror` role serves it; the lab uses the same):
`<root>/apt/` flat apt repo, `<root>/files/` file/model/wheel/plugin store, registry on :5000.
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from infra.bundle.build import image_tag
from infra.bundle.hashing import digest_files
from infra.bundle.manifest import Manifest, verify_bundle
from infra.bundle.signing import SigningError, _gpg, _secret_fingerprint

MIRROR_KEY_ENV = "GPUFLEET_MIRROR_SIGNING_KEY"


class ImportRefused(Exception):
    """Verification failed; nothing was published."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("bundle rejected, nothing imported:" + "".join(f"\n  - {p}" for p in problems))


class Publisher(Protocol):
    """What import needs from a mirror host."""

    def list_files(self) -> dict[str, tuple[int, str]]:
        """Relative path (`apt/x.deb`, `files/…`) → (size, sha256) of what the mirror holds."""

    def put_files(self, root: Path, rels: list[str]) -> None:
        """Upload files of a local tree to the same relative paths on the mirror."""

    def reindex_apt(self, sign: Callable[[bytes], tuple[bytes, bytes]]) -> bool:
        """Rebuild Packages/Release over the mirror's debs and sign them; False when nothing changed."""

    def has_image(self, repo: str, digest: str) -> bool:
        """The mirror registry serves `repo@digest`."""

    def put_image(self, layout: Path, repo: str, digest: str) -> None:
        """Copy one image from an OCI layout into the mirror registry, digest preserved."""


@dataclass
class ImportResult:
    """What one import changed."""

    uploaded: list[str] = field(default_factory=list)
    images: list[str] = field(default_factory=list)
    apt_reindexed: bool = False
    unchanged: int = 0

    @property
    def changed(self) -> bool:
        """Anything was written to the mirror."""
        return bool(self.uploaded or self.images or self.apt_reindexed)


def release_signer(secret_key: Path) -> Callable[[bytes], tuple[bytes, bytes]]:
    """Sign a Release file with the mirror key: returns (InRelease, Release.gpg)."""

    def sign(release: bytes) -> tuple[bytes, bytes]:
        with tempfile.TemporaryDirectory(prefix="gpufleet-mirror-gpg-") as home:
            h = Path(home)
            h.chmod(0o700)
            if _gpg(h, "--import", str(secret_key)).returncode != 0:
                raise SigningError(f"cannot import mirror key {secret_key}")
            fpr = _secret_fingerprint(h)
            clear = _gpg(h, "--armor", "--local-user", fpr, "--clearsign", "--output", "-", stdin=release)
            det = _gpg(h, "--armor", "--local-user", fpr, "--detach-sign", "--output", "-", stdin=release)
            if clear.returncode or det.returncode:
                raise SigningError("signing Release failed: " + (clear.stderr or det.stderr).decode(errors="replace"))
            return clear.stdout, det.stdout

    return sign


def import_bundle(root: Path, keyring: Path, publisher: Publisher,
                  sign_release: Callable[[bytes], tuple[bytes, bytes]]) -> tuple[Manifest, ImportResult]:
    """Verify `root` against `keyring`; only if that passes, publish what the mirror lacks."""
    man, problems = verify_bundle(root, keyring)
    if problems or man is None:
        raise ImportRefused(problems or ["manifest unreadable"])
    result = ImportResult()
    have = publisher.list_files()
    want = {rel: d for rel, d in man.files.items() if rel.startswith(("apt/", "files/"))}
    todo = sorted(rel for rel, d in want.items() if have.get(rel) != (d.size, d.sha256))
    result.unchanged = len(want) - len(todo)
    if todo:
        publisher.put_files(root, todo)
        result.uploaded = todo
    if any(rel.startswith("apt/") for rel in want):
        result.apt_reindexed = publisher.reindex_apt(sign_release)
    for a in man.artifacts:
        if a.kind == "image" and a.version and not publisher.has_image(a.name, a.version):
            publisher.put_image(root / a.path, a.name, a.version)
            result.images.append(f"{a.name}@{a.version}")
    return man, result


def scan_packages(apt_dir: Path) -> bytes:
    """`dpkg-scanpackages --multiversion` over a flat repo directory (paths relative to it)."""
    proc = subprocess.run(["dpkg-scanpackages", "--multiversion", ".", "/dev/null"], cwd=apt_dir,
                          capture_output=True, timeout=600, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"dpkg-scanpackages failed: {proc.stderr.decode(errors='replace')}")
    return proc.stdout


def release_text(files: dict[str, bytes], origin: str = "gpufleet", label: str = "gpufleet mirror") -> bytes:
    """A flat repository's Release: hashes of its index files, no date (same input → same bytes)."""
    import hashlib

    lines = [f"Origin: {origin}", f"Label: {label}", "Suite: ./", "Codename: ./", "Architectures: amd64 all",
             "Acquire-By-Hash: no"]
    for algo, name in (("md5", "MD5Sum"), ("sha256", "SHA256")):
        lines.append(f"{name}:")
        for fname, data in sorted(files.items()):
            lines.append(f" {hashlib.new(algo, data).hexdigest()} {len(data):>16} {fname}")
    return ("\n".join(lines) + "\n").encode()


__all__ = ["ImportRefused", "ImportResult", "Publisher", "digest_files", "image_tag", "import_bundle",
           "release_signer", "release_text", "scan_packages"]
