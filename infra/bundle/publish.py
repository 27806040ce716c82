"""`gpufleet bundle import`: check, verify, bind, then publish into a mirror host atomically and idempotently.

Publishing goes through a `Publisher` (the SSH one in `infra.bundle.remote`, a recording one in
tests), so "nothing is imported when a check fails" is a property of this module, not of a
transport. Served layout on the mirror (the `mirror` role serves `<root>`; the lab uses the same):
`<root>/apt/` flat apt repo and `<root>/files/` file/model/wheel/plugin store are symlinks into
`<root>/.gpufleet/current/`, itself a symlink to one tree under `<root>/.gpufleet/trees/`; an import
stages a new tree there and switches `current` with one rename. Registry on :5000.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from infra.bundle.build import image_tag
from infra.bundle.hashing import digest_files
from infra.bundle.manifest import Manifest, verify_bundle
from infra.bundle.signing import SigningError, _gpg, _secret_fingerprint

MIRROR_KEY_ENV = "GPUFLEET_MIRROR_SIGNING_KEY"


class ImportRefused(Exception):
    """The bundle (or the mirror key, or the binding) was refused; nothing was published."""

    def __init__(self, problems: list[str], *, invalid: bool = False) -> None:
        self.problems = problems
        self.invalid = invalid
        """The directory is not a bundle at all (no or malformed manifest): bad input, exit 2."""
        sep = " " if len(problems) == 1 else "\n  - "
        super().__init__("bundle rejected, nothing imported:" + "".join(f"{sep}{p}" for p in problems))


RECORD = "import.json"
"""The import record inside each served tree: what was imported, which serial, and why (override)."""


@dataclass(frozen=True)
class ImportRecord:
    """What a mirror last imported (stored in its served tree, switched with it in one step)."""

    site: str
    segment: str | None
    serial: int
    manifest_sha256: str
    lock_sha256: str
    imported_at: str = ""
    override: str | None = None
    """The reason given for a deliberate downgrade (None for a normal import)."""
    previous_serial: int | None = None

    def to_json(self) -> bytes:
        """JSON bytes as stored on the mirror."""
        return (json.dumps(asdict(self), sort_keys=True) + "\n").encode()

    @classmethod
    def parse(cls, text: str) -> ImportRecord:
        """Read a stored record; ValueError when it is not one (the mirror then has no trusted serial)."""
        d = json.loads(text)
        if not isinstance(d, dict) or set(d) != {f for f in cls.__dataclass_fields__}:
            raise ValueError("not an import record")
        serial = d["serial"]
        if not isinstance(serial, int) or isinstance(serial, bool) or serial < 1:
            raise ValueError("serial is not a positive integer")
        for k in ("site", "manifest_sha256", "lock_sha256", "imported_at"):
            if not isinstance(d[k], str):
                raise ValueError(f"{k} is not a string")
        return cls(**d)


@dataclass
class MirrorState:
    """What a mirror serves now, read in one step before anything is written."""

    files: dict[str, tuple[int, str]] = field(default_factory=dict)
    """Relative path (`apt/x.deb`, `files/…`) → (size, sha256)."""
    packages: bytes = b""
    release_fields: dict[str, str] = field(default_factory=dict)
    signed: bool = False
    debs: set[str] = field(default_factory=set)
    record: ImportRecord | None = None
    record_problem: str | None = None
    """Why a record that exists could not be read (the mirror's serial is then unknown)."""
    base: str = ""
    """Which tree is served (a switch refuses when another import switched it meanwhile)."""


@dataclass(frozen=True)
class Target:
    """Where an import goes, from the stack: the site, the mirror and the segments it serves."""

    site: str
    mirror: str
    segments: tuple[str, ...]
    lock_sha256: str | None = None
    """sha256 of the stack's lock file on this side, when there is one."""


class Publisher(Protocol):
    """What import needs from a mirror host. Only `stage`, `switch` and `put_image` write."""

    def state(self) -> MirrorState:
        """What the mirror serves now (read-only)."""

    def stage(self, root: Path, rels: list[str], expected: dict[str, str], generated: dict[str, bytes],
              base: str) -> str:
        """Build a new tree next to the served one and return its name; nothing served changes.

        The tree holds the served files, `rels` of `root` (each must still hash to `expected`) and
        the `generated` bytes (apt index, import record).
        """

    def switch(self, stage: str, base: str) -> None:
        """Serve the staged tree in one step (refused when the served tree is no longer `base`)."""

    def discard(self, stage: str) -> None:
        """Remove a staged tree that will not be served."""

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
    serial: int = 0
    previous_serial: int | None = None
    switched: bool = False
    """A new tree is served (files, index or record changed)."""
    override: str | None = None

    @property
    def changed(self) -> bool:
        """Anything was written to the mirror."""
        return bool(self.uploaded or self.images or self.apt_reindexed or self.switched)


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
                try:
                    exported = subprocess.run(["gpg", "--homedir", str(secret_key), "--batch", "--armor",
                                               "--export-secret-keys"], capture_output=True, timeout=60, check=False)
                except (OSError, subprocess.TimeoutExpired) as exc:
                    raise SigningError(f"cannot export the mirror key from {secret_key}: {exc}") from None
                key = h / "mirror.sec.asc"
                key.write_bytes(exported.stdout)
            elif not secret_key.is_file():
                raise SigningError(f"mirror key {secret_key} is not a file or GnuPG home")
            if _gpg(h, "--import", str(key)).returncode != 0:
                raise SigningError(f"cannot import mirror key {secret_key}")
            fpr = _secret_fingerprint(h)
            clear = _gpg(h, "--armor", "--local-user", fpr, "--clearsign", "--output", "-", stdin=release)
            det = _gpg(h, "--armor", "--local-user", fpr, "--detach-sign", "--output", "-", stdin=release)
            if clear.returncode or det.returncode:
                raise SigningError("signing Release failed: " + (clear.stderr or det.stderr).decode(errors="replace"))
            return clear.stdout, det.stdout

    return sign


def binding_problems(man: Manifest, target: Target) -> list[str]:
    """Why this bundle is not for this site, mirror and segment (empty when it is)."""
    out = []
    if man.site != target.site:
        out.append(f"bundle is for site {man.site!r}; this stack is site {target.site!r}")
    if target.mirror not in man.mirrors:
        out.append(f"bundle is for mirror(s) {', '.join(man.mirrors) or '(none)'}, not {target.mirror!r}")
    if man.segment is not None and man.segment not in target.segments:
        out.append(f"bundle is for segment {man.segment!r}; mirror {target.mirror!r} serves "
                   f"{', '.join(target.segments) or 'no segment'}")
    if target.lock_sha256 and man.lock_sha256 != target.lock_sha256:
        out.append(f"bundle was built from lock sha256 {man.lock_sha256[:16]}…, this side's lock is "
                   f"{target.lock_sha256[:16]}… (update the repository or rebuild the bundle)")
    return out


def serial_problems(man: Manifest, manifest_sha: str, st: MirrorState, override: str | None) -> list[str]:
    """Why the bundle's serial may not replace what the mirror serves (empty when it may).

    Newer serial: fine. The same bundle again (same serial and manifest): fine (a no-op or a repair).
    Anything else — older, or the same serial with other content, or a mirror whose record is
    unreadable — needs an explicit override with a reason.
    """
    if override is not None:
        return []
    hint = "; to downgrade on purpose, pass --allow-downgrade --reason TEXT (logged on the mirror)"
    if st.record_problem:
        return [f"the mirror's import record is unreadable ({st.record_problem}), so its serial is unknown{hint}"]
    rec = st.record
    if rec is None or man.serial > rec.serial:
        return []
    if man.serial == rec.serial and manifest_sha == rec.manifest_sha256:
        return []
    if man.serial == rec.serial:
        return [f"serial {man.serial} was already imported with other content (manifest sha256 "
                f"{rec.manifest_sha256[:16]}…); a new bundle needs a higher serial{hint}"]
    return [f"bundle serial {man.serial} is older than serial {rec.serial} the mirror imported "
            f"(rollback refused){hint}"]


def check_signer(sign_release: Callable[[bytes], tuple[bytes, bytes]]) -> str | None:
    """None when the mirror key can sign, else why not (checked before anything else)."""
    try:
        clear, det = sign_release(b"gpufleet mirror key check\n")
    except (SigningError, OSError, RuntimeError) as exc:
        return f"mirror signing key unusable: {exc}"
    if not clear or not det:
        return "mirror signing key unusable: gpg produced no signature"
    return None


def apt_index(st: MirrorState, debs: dict[str, str], scan: Callable[[], bytes],
              sign: Callable[[bytes], tuple[bytes, bytes]]) -> dict[str, bytes]:
    """The apt index files (`apt/Packages`, …, signed) the new tree needs; empty when the served ones do.

    Built on the controller: the bundle's stanzas merged with the mirror's, so the mirror needs no
    build tools; `scan()` (minutes on a large bundle) only runs when the index must change.
    """
    present = st.debs | set(debs)
    if st.signed and index_covers(st.packages, present, debs):
        return {}
    packages = merge_packages(st.packages, present, scan())
    if packages == st.packages and st.signed:
        return {}
    gz = gzip.compress(packages, mtime=0)
    release = release_text({"Packages": packages, "Packages.gz": gz}, st.release_fields)
    inrelease, detached = sign(release)
    return {"apt/Packages": packages, "apt/Packages.gz": gz, "apt/Release": release,
            "apt/InRelease": inrelease, "apt/Release.gpg": detached}


def import_bundle(root: Path, keyring: Path, publisher: Publisher,
                  sign_release: Callable[[bytes], tuple[bytes, bytes]],
                  scan: Callable[[Path], bytes] | None = None, *, target: Target,
                  override: str | None = None) -> tuple[Manifest, ImportResult]:
    """Check the key, verify `root`, check it is for `target` and newer; then stage and switch.

    Order: the mirror key must sign; every file must verify; the bundle must be for this site,
    mirror and segment; its serial must be newer than the mirror's (or `override` gives the reason
    for a deliberate downgrade). Only then is a new tree staged next to the served one (the served
    files hard-linked, the bundle's new files and the re-signed index added), images copied into
    the registry (content-addressed, so additions never change what is served by digest), and the
    served tree switched in one rename. A failure at any point before the switch removes the stage:
    the served tree stays byte-identical.
    """
    why = check_signer(sign_release)
    if why:
        raise ImportRefused([why])
    man, problems = verify_bundle(root, keyring)
    if problems or man is None:
        raise ImportRefused(problems or ["manifest unreadable"], invalid=man is None)
    bound = binding_problems(man, target)
    if bound:
        raise ImportRefused(bound)
    manifest_sha = hashlib.sha256(man.to_json().encode()).hexdigest()
    st = publisher.state()
    late = serial_problems(man, manifest_sha, st, override)
    if late:
        raise ImportRefused(late)
    prev = st.record.serial if st.record else None
    result = ImportResult(serial=man.serial, previous_serial=prev, override=override)
    want = {rel: d for rel, d in man.files.items() if rel.startswith(("apt/", "files/"))}
    todo = sorted(rel for rel, d in want.items() if st.files.get(rel) != (d.size, d.sha256))
    result.unchanged = len(want) - len(todo)
    debs = {rel.removeprefix("apt/"): d.sha256 for rel, d in want.items() if rel.startswith("apt/")}
    generated = apt_index(st, debs, lambda: (scan or scan_packages)(root / "apt"), sign_release) if debs else {}
    same_record = st.record is not None and st.record.manifest_sha256 == manifest_sha
    images = [a for a in man.artifacts if a.kind == "image" and a.version
              and not publisher.has_image(a.name, a.version)]
    if not todo and not generated and same_record and not images:
        return man, result  # already up to date: nothing staged, nothing switched
    record = ImportRecord(man.site, man.segment, man.serial, manifest_sha, man.lock_sha256,
                          datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                          override if override is not None and (prev is None or man.serial <= prev) else None,
                          prev)
    stage = publisher.stage(root, todo, {rel: want[rel].sha256 for rel in todo},
                            {**generated, RECORD: record.to_json()}, st.base)
    try:
        for a in images:
            publisher.put_image(root / a.path, a.name, a.version or "")
            result.images.append(f"{a.name}@{a.version}")
        publisher.switch(stage, st.base)
    except BaseException:
        publisher.discard(stage)
        raise
    result.uploaded = todo
    result.apt_reindexed = bool(generated)
    result.switched = True
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
    from email.utils import formatdate

    keep = {**DEFAULT_RELEASE_FIELDS, **{k: v for k, v in (fields or {}).items() if k in DEFAULT_RELEASE_FIELDS}}
    lines = [f"{k}: {keep[k]}" for k in ("Origin", "Label", "Suite", "Codename", "Architectures")]
    lines.append(f"Date: {date or formatdate(usegmt=True)}")
    for algo, name in (("md5", "MD5Sum"), ("sha256", "SHA256")):
        lines.append(f"{name}:")
        for fname, data in sorted(files.items()):
            lines.append(f" {hashlib.new(algo, data).hexdigest()} {len(data):>16} {fname}")
    return ("\n".join(lines) + "\n").encode()


__all__ = ["ImportRecord", "ImportRefused", "ImportResult", "MirrorState", "Publisher", "Target", "digest_files",
           "image_tag", "import_bundle", "release_signer", "release_text", "scan_packages"]
