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

    def put_files(self, root: Path, rels: list[str], expected: dict[str, str]) -> None:
        """Upload files of a local tree to the same relative paths; each must still hash to `expected`."""

    def reindex_apt(self, debs: dict[str, str], scan: Callable[[], bytes],
                    sign: Callable[[bytes], tuple[bytes, bytes]]) -> bool:
        """Make the mirror's signed index list `debs` (file name → sha256); False when it already did.

        `scan()` gives the bundle's Packages stanzas; it is only called when the index must change.
        """

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
    """Sign a Release file with the mirror key: returns (InRelease, Release.gpg).

    `secret_key` is an armored secret key file, or a GnuPG home holding the key (the lab keeps one
    per serving host); either way the key is used from a throwaway copy, never modified.
    """

    def sign(release: bytes) -> tuple[bytes, bytes]:
        with tempfile.TemporaryDirectory(prefix="gpufleet-mirror-gpg-") as home:
            h = Path(home)
            h.chmod(0o700)
            key = secret_key
            if secret_key.is_dir():
                exported = subprocess.run(["gpg", "--homedir", str(secret_key), "--batch", "--armor",
                                           "--export-secret-keys"], capture_output=True, timeout=60, check=False)
                key = h / "mirror.sec.asc"
                key.write_bytes(exported.stdout)
            if _gpg(h, "--import", str(key)).returncode != 0:
                raise SigningError(f"cannot import mirror key {secret_key}")
            fpr = _secret_fingerprint(h)
            clear = _gpg(h, "--armor", "--local-user", fpr, "--clearsign", "--output", "-", stdin=release)
            det = _gpg(h, "--armor", "--local-user", fpr, "--detach-sign", "--output", "-", stdin=release)
            if clear.returncode or det.returncode:
                raise SigningError("signing Release failed: " + (clear.stderr or det.stderr).decode(errors="replace"))
            return clear.stdout, det.stdout

    return sign


def import_bundle(root: Path, keyring: Path, publisher: Publisher,
                  sign_release: Callable[[bytes], tuple[bytes, bytes]],
                  scan: Callable[[Path], bytes] | None = None) -> tuple[Manifest, ImportResult]:
    """Verify `root` against `keyring`; only if that passes, publish what the mirror lacks.

    The apt index is built on the controller (`dpkg-scanpackages` over the bundle's debs, merged
    with the mirror's existing stanzas), so the mirror needs no build tools, only a web server.
    """
    man, problems = verify_bundle(root, keyring)
    if problems or man is None:
        raise ImportRefused(problems or ["manifest unreadable"])
    result = ImportResult()
    have = publisher.list_files()
    want = {rel: d for rel, d in man.files.items() if rel.startswith(("apt/", "files/"))}
    todo = sorted(rel for rel, d in want.items() if have.get(rel) != (d.size, d.sha256))
    result.unchanged = len(want) - len(todo)
    if todo:
        publisher.put_files(root, todo, {rel: want[rel].sha256 for rel in todo})
        result.uploaded = todo
    debs = {rel.removeprefix("apt/"): d.sha256 for rel, d in want.items() if rel.startswith("apt/")}
    if debs:
        result.apt_reindexed = publisher.reindex_apt(debs, lambda: (scan or scan_packages)(root / "apt"),
                                                     sign_release)
    for a in man.artifacts:
        if a.kind == "image" and a.version and not publisher.has_image(a.name, a.version):
            publisher.put_image(root / a.path, a.name, a.version)
            result.images.append(f"{a.name}@{a.version}")
    return man, result


def index_covers(packages: bytes, present: set[str], debs: dict[str, str]) -> bool:
    """The index lists every deb of `debs` with its sha256, and only files that are `present`."""
    listed: dict[str, str] = {}
    for para in packages.split(b"\n\n"):
        fields = dict(line.split(b": ", 1) for line in para.splitlines() if b": " in line and line[:1] != b" ")
        if b"Filename" in fields:
            listed[fields[b"Filename"].decode().removeprefix("./")] = fields.get(b"SHA256", b"").decode()
    return all(listed.get(f) == sha for f, sha in debs.items()) and set(listed) <= present


def merge_packages(current: bytes, present: set[str], new: bytes) -> bytes:
    """Packages stanzas of `current` whose file is still `present`, replaced/added by `new` (by Filename)."""
    by_file: dict[str, bytes] = {}
    for text in (current, new):
        for para in text.split(b"\n\n"):
            para = para.strip(b"\n")
            fields = dict(line.split(b": ", 1) for line in para.splitlines() if b": " in line and line[:1] != b" ")
            fname = fields.get(b"Filename", b"").decode()
            if fname and (text is new or fname.removeprefix("./") in present):
                by_file[fname] = para
    def key(item: tuple[str, bytes]) -> tuple[bytes, str]:
        pkg = next((ln for ln in item[1].splitlines() if ln.startswith(b"Package: ")), b"")
        return pkg, item[0]
    return b"".join(para + b"\n\n" for _, para in sorted(by_file.items(), key=key))


def scan_packages(apt_dir: Path) -> bytes:
    """`dpkg-scanpackages --multiversion` over a flat repo directory (paths relative to it)."""
    proc = subprocess.run(["dpkg-scanpackages", "--multiversion", ".", "/dev/null"], cwd=apt_dir,
                          capture_output=True, timeout=600, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"dpkg-scanpackages failed: {proc.stderr.decode(errors='replace')}")
    return proc.stdout


DEFAULT_RELEASE_FIELDS = {"Origin": "gpufleet", "Label": "gpufleet mirror", "Suite": "gpufleet",
                          "Codename": "gpufleet", "Architectures": "amd64 all"}


def release_text(files: dict[str, bytes], fields: dict[str, str] | None = None, date: str | None = None) -> bytes:
    """A flat repository's Release: identity fields and hashes of its index files.

    `fields` keeps an existing repository's Origin/Label/Suite/Codename: apt refuses an update whose
    Suite or Codename changed since the last one, so re-publishing must not rename the repository.
    """
    import hashlib
    from email.utils import formatdate

    keep = {**DEFAULT_RELEASE_FIELDS, **{k: v for k, v in (fields or {}).items() if k in DEFAULT_RELEASE_FIELDS}}
    lines = [f"{k}: {keep[k]}" for k in ("Origin", "Label", "Suite", "Codename", "Architectures")]
    lines.append(f"Date: {date or formatdate(usegmt=True)}")
    for algo, name in (("md5", "MD5Sum"), ("sha256", "SHA256")):
        lines.append(f"{name}:")
        for fname, data in sorted(files.items()):
            lines.append(f" {hashlib.new(algo, data).hexdigest()} {len(data):>16} {fname}")
    return ("\n".join(lines) + "\n").encode()


__all__ = ["ImportRefused", "ImportResult", "Publisher", "digest_files", "image_tag", "import_bundle",
           "release_signer", "release_text", "scan_packages"]
