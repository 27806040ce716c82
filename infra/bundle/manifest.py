"""A bundle's manifest, its detached signature, and verifying a bundle directory against both.

The manifest (format 2) binds a bundle to where it goes and when: the site, the segment (or every
segment), the mirrors that may import it, the sha256 of the lock it was built from and a serial that
only grows, plus every file with size and sha256 (and piece hashes of large files) and the locked
artifacts the bundle carries. Format 1 manifests (no binding, no serial) are refused with a message
saying to rebuild.

The parser is total: any text ends in a `Manifest` or a `ManifestError` naming the first problem
(wrong types, missing or unknown keys, bad JSON, duplicate keys, hashes of the wrong length, paths
that escape the bundle). Verification only opens regular files, never follows a symlink and never
opens a FIFO or a device (`lstat` first, then `O_NOFOLLOW | O_NONBLOCK` and an `fstat` check).
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra.bundle.hashing import PIECE, Digest, check_files, digest_files
from infra.bundle.lock import Artifact
from infra.bundle.signing import sign_detached, verify_detached

MANIFEST = "manifest.json"
SIGNATURE = "manifest.json.asc"
FORMAT = 2
MAX_MANIFEST_BYTES = 256 << 20  # a manifest of a million files is ~200 MB; anything larger is not ours
MAX_SERIAL = (1 << 63) - 1
AREAS = ("apt", "files", "images")
"""Top-level folders a bundle may hold (the mirror's layout)."""
KINDS = ("deb", "image", "model", "wheel", "plugin", "runtime", "os-image")

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
# One path component: no separators, no NUL or control characters, not `.`/`..` (checked apart).
_COMPONENT = re.compile(r"^[^/\\\x00-\x1f\x7f]{1,255}$")


class ManifestError(ValueError):
    """The manifest text is not a valid format-2 manifest; the message names the first problem."""


@dataclass(frozen=True)
class Manifest:
    """What a bundle holds, for which site, segment and mirrors, and its place in the sequence (serial)."""

    site: str
    segment: str | None
    lock_sha256: str
    files: dict[str, Digest]
    artifacts: list[Artifact]
    serial: int = 1
    """Grows with every bundle built for the site; a mirror refuses one not newer than its last import."""
    mirrors: tuple[str, ...] = ()
    """Mirrors that may import the bundle (the segment's mirror, or every mirror of the site)."""

    def to_json(self) -> str:
        """Deterministic JSON text (what is signed)."""
        files: dict[str, dict[str, Any]] = {}
        for path, d in sorted(self.files.items()):
            entry: dict[str, Any] = {"size": d.size, "sha256": d.sha256}
            if d.pieces:
                entry["pieces"] = list(d.pieces)
                entry["piece_size"] = d.piece_size
            files[path] = entry
        data = {
            "format": FORMAT,
            "site": self.site,
            "segment": self.segment,
            "mirrors": sorted(self.mirrors),
            "serial": self.serial,
            "lock_sha256": self.lock_sha256,
            "files": files,
            "artifacts": [a.as_dict() for a in sorted(self.artifacts)],
        }
        return json.dumps(data, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        """Parse manifest text; `ManifestError` (a ValueError) on anything malformed, never another error."""
        return _parse(text)


# ------------------------------------------------------------------------------------------ parsing


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ManifestError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _type_name(v: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(v), type(v).__name__)


def _obj(v: object, where: str, required: Iterable[str], optional: Iterable[str] = ()) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise ManifestError(f"{where}: expected an object, got {_type_name(v)}")
    req, opt = set(required), set(optional)
    missing = sorted(req - set(v))
    if missing:
        raise ManifestError(f"{where}: missing key(s) {', '.join(missing)}")
    extra = sorted(set(v) - req - opt)
    if extra:
        raise ManifestError(f"{where}: unknown key(s) {', '.join(repr(k) for k in extra)}")
    return v


def _str(v: object, where: str, pattern: re.Pattern[str] | None = None, what: str = "") -> str:
    if not isinstance(v, str):
        raise ManifestError(f"{where}: expected a string, got {_type_name(v)}")
    if pattern is not None and not pattern.match(v):
        raise ManifestError(f"{where}: {v[:80]!r} is not {what}")
    return v


def _opt_str(v: object, where: str, pattern: re.Pattern[str] | None = None, what: str = "") -> str | None:
    return None if v is None else _str(v, where, pattern, what)


def _int(v: object, where: str, lo: int, hi: int = MAX_SERIAL) -> int:
    # bool is an int in Python; JSON true is not a size.
    if not isinstance(v, int) or isinstance(v, bool):
        raise ManifestError(f"{where}: expected an integer, got {_type_name(v)}")
    if not lo <= v <= hi:
        raise ManifestError(f"{where}: {v} is out of range ({lo}..{hi})")
    return v


def _hex(v: object, where: str) -> str:
    return _str(v, where, _HEX64, "a sha256 (64 lower-case hex digits)")


def check_rel(rel: str) -> str | None:
    """Why `rel` is not a safe relative path inside a bundle (None when it is).

    Relative, `/`-separated, no empty, `.` or `..` components, no control characters or
    backslashes, under one of the mirror areas (`apt/`, `files/`, `images/`).
    """
    if not rel or rel.startswith("/"):
        return "absolute or empty path"
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return "path escapes the bundle or is not normalised ('', '.', '..' component)"
    if not all(_COMPONENT.match(p) for p in parts):
        return "path has a control character or backslash"
    if parts[0] not in AREAS or len(parts) < 2:
        return f"path is not under {', '.join(a + '/' for a in AREAS)}"
    return None


def _digest(v: object, where: str) -> Digest:
    e = _obj(v, where, ("size", "sha256"), ("pieces", "piece_size"))
    size = _int(e["size"], f"{where}.size", 0)
    sha = _hex(e["sha256"], f"{where}.sha256")
    if ("pieces" in e) != ("piece_size" in e):
        raise ManifestError(f"{where}: pieces and piece_size go together")
    pieces: tuple[str, ...] = ()
    piece_size = PIECE
    if "pieces" in e:
        if not isinstance(e["pieces"], list):
            raise ManifestError(f"{where}.pieces: expected a list, got {_type_name(e['pieces'])}")
        pieces = tuple(_hex(p, f"{where}.pieces[{i}]") for i, p in enumerate(e["pieces"]))
        piece_size = _int(e["piece_size"], f"{where}.piece_size", 1)
        if len(pieces) != -(-size // piece_size):
            raise ManifestError(f"{where}: {len(pieces)} pieces do not tile {size} bytes of {piece_size}")
    return Digest(size, sha, pieces, piece_size)


_ARTIFACT_KEYS = ("kind", "name", "version", "path", "size", "sha256", "source", "segments", "declared")


def _artifact(v: object, where: str) -> Artifact:
    a = _obj(v, where, _ARTIFACT_KEYS)
    kind = _str(a["kind"], f"{where}.kind")
    if kind not in KINDS:
        raise ManifestError(f"{where}.kind: {kind[:40]!r} is not one of {', '.join(KINDS)}")
    path = _str(a["path"], f"{where}.path")
    why = check_rel(path)
    if why:
        raise ManifestError(f"{where}.path: {path[:80]!r}: {why}")
    segs = a["segments"]
    if not isinstance(segs, list):
        raise ManifestError(f"{where}.segments: expected a list, got {_type_name(segs)}")
    if not isinstance(a["declared"], bool):
        raise ManifestError(f"{where}.declared: expected a boolean, got {_type_name(a['declared'])}")
    return Artifact(
        kind,
        _str(a["name"], f"{where}.name"),
        _opt_str(a["version"], f"{where}.version"),
        path,
        None if a["size"] is None else _int(a["size"], f"{where}.size", 0),
        None if a["sha256"] is None else _hex(a["sha256"], f"{where}.sha256"),
        _str(a["source"], f"{where}.source"),
        tuple(_str(s, f"{where}.segments[{i}]", _NAME, "a segment name") for i, s in enumerate(segs)),
        a["declared"],
    )


def _parse(text: str | bytes) -> Manifest:
    try:
        data = json.loads(text, object_pairs_hook=_reject_duplicates)
    except ManifestError:
        raise
    except (ValueError, RecursionError, TypeError) as exc:
        # ValueError covers JSONDecodeError, UnicodeDecodeError and over-long integers.
        raise ManifestError(f"not JSON ({type(exc).__name__}: {str(exc)[:120]})") from None
    if isinstance(data, dict) and data.get("format") == 1 and not isinstance(data.get("format"), bool):
        raise ManifestError("manifest format 1 is from an older gpufleet (no site/mirror binding, no serial); "
                            "rebuild the bundle with `gpufleet bundle build`")
    d = _obj(data, "manifest", ("format", "site", "segment", "mirrors", "serial", "lock_sha256", "files",
                                "artifacts"))
    if _int(d["format"], "format", 0) != FORMAT:
        raise ManifestError(f"format: {d['format']} is not {FORMAT} (this gpufleet reads format {FORMAT})")
    site = _str(d["site"], "site", _NAME, "a site name")
    segment = _opt_str(d["segment"], "segment", _NAME, "a segment name")
    if not isinstance(d["mirrors"], list):
        raise ManifestError(f"mirrors: expected a list, got {_type_name(d['mirrors'])}")
    mirrors = tuple(_str(m, f"mirrors[{i}]", _NAME, "a mirror host name") for i, m in enumerate(d["mirrors"]))
    serial = _int(d["serial"], "serial", 1)
    lock_sha = _hex(d["lock_sha256"], "lock_sha256")
    if not isinstance(d["files"], dict):
        raise ManifestError(f"files: expected an object, got {_type_name(d['files'])}")
    files: dict[str, Digest] = {}
    for rel, entry in d["files"].items():
        why = check_rel(rel)
        if why:
            raise ManifestError(f"files: {rel[:80]!r}: {why}")
        files[rel] = _digest(entry, f"files[{rel[:80]!r}]")
    if not isinstance(d["artifacts"], list):
        raise ManifestError(f"artifacts: expected a list, got {_type_name(d['artifacts'])}")
    arts = [_artifact(a, f"artifacts[{i}]") for i, a in enumerate(d["artifacts"])]
    return Manifest(site, segment, lock_sha, files, arts, serial, mirrors)


# ------------------------------------------------------------------------------------ the directory


_KINDS_OF = ((stat.S_ISLNK, "a symlink"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def _what(mode: int) -> str:
    return next((name for test, name in _KINDS_OF if test(mode)), "not a regular file")


def scan_bundle(root: Path) -> tuple[list[str], list[str]]:
    """(regular files, problems) of a bundle directory, found with lstat only (nothing is opened).

    Every entry that is not a directory or a regular file with one link is a problem: symlinks,
    FIFOs, sockets, devices, and hard links (a file shared with another path can change under a
    verified name). The manifest and its signature are not listed.
    """
    files: list[str] = []
    problems: list[str] = []
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        try:
            entries = sorted(os.scandir(root / rel_dir) if rel_dir else os.scandir(root), key=lambda e: e.name)
        except OSError as exc:
            problems.append(f"{rel_dir or '.'}: cannot list ({exc.strerror})")
            continue
        for e in entries:
            rel = f"{rel_dir}/{e.name}" if rel_dir else e.name
            try:
                st = e.stat(follow_symlinks=False)
            except OSError as exc:
                problems.append(f"{rel}: cannot stat ({exc.strerror})")
                continue
            if stat.S_ISDIR(st.st_mode):
                stack.append(rel)
            elif not stat.S_ISREG(st.st_mode):
                problems.append(f"{rel}: is {_what(st.st_mode)} (bundles hold regular files only)")
            elif st.st_nlink != 1:
                problems.append(f"{rel}: has {st.st_nlink} hard links (bundles hold plain, unshared files; "
                                "copy the bundle without preserving hard links)")
            elif rel not in (MANIFEST, SIGNATURE):
                files.append(rel)
    return sorted(files), problems


def bundle_files(root: Path) -> list[str]:
    """Relative paths of the regular files of a bundle directory except the manifest and its signature."""
    return scan_bundle(root)[0]


def read_regular(path: Path, limit: int) -> bytes:
    """Bytes of a regular file, refusing symlinks, FIFOs and devices without blocking on them.

    Raises:
        OSError: missing, not a regular file, unreadable or larger than `limit`.

    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"{path.name} is {_what(st.st_mode)}, not a regular file")
        if st.st_size > limit:
            raise OSError(f"{path.name} is larger than {limit} bytes")
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def write_manifest(root: Path, site: str, segment: str | None, lock_sha256: str, artifacts: list[Artifact],
                   signing_key: Path, piece_size: int | None = None, *, serial: int = 1,
                   mirrors: Iterable[str] = ()) -> Manifest:
    """Hash every file of `root`, write manifest.json and sign it with `signing_key`."""
    rels = bundle_files(root)
    digests = digest_files([root / r for r in rels], piece_size=piece_size)
    man = Manifest(site, segment, lock_sha256, dict(zip(rels, digests, strict=True)), artifacts, serial,
                   tuple(sorted(set(mirrors))))
    (root / MANIFEST).write_text(man.to_json(), encoding="utf-8")
    sign_detached(root / MANIFEST, signing_key, root / SIGNATURE)
    return man


def verify_bundle(root: Path, keyring: Path, threads: int | None = None) -> tuple[Manifest | None, list[str]]:
    """(manifest, problems): signature, manifest, file types, every hash, no missing and no extra file.

    Each problem names the file. The signature is checked first and nothing in an unsigned or
    badly signed manifest is trusted — but the file checks still run, so one run lists everything.
    """
    problems: list[str] = []
    try:
        if not stat.S_ISDIR(os.lstat(root).st_mode):
            return None, [f"{root}: not a directory"]
    except OSError:
        return None, [f"{root}: not a directory"]
    mpath = root / MANIFEST
    try:
        raw = read_regular(mpath, MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        return None, [f"{MANIFEST}: missing (not a gpufleet bundle, or it was not finished)"]
    except OSError as exc:
        return None, [f"{MANIFEST}: unreadable ({exc})"]
    for name in (SIGNATURE,):
        try:
            mode = os.lstat(root / name).st_mode
        except OSError:
            continue  # verify_detached names a missing signature
        if not stat.S_ISREG(mode):
            return None, [f"{name}: is {_what(mode)} (bundles hold regular files only)"]
    bad_sig = verify_detached(mpath, root / SIGNATURE, keyring)
    if bad_sig:
        problems.append(bad_sig)
    try:
        man = Manifest.from_json(raw)
    except ManifestError as exc:
        return None, [*problems, f"{MANIFEST}: unreadable ({exc})"]
    present_list, type_problems = scan_bundle(root)
    problems += type_problems
    present = set(present_list)
    listed = set(man.files)
    for rel in sorted(listed - present):
        if not any(p.startswith(f"{rel}: ") for p in type_problems):
            problems.append(f"{rel}: missing (listed in the manifest)")
    for rel in sorted(present - listed):
        problems.append(f"{rel}: extra file (not in the manifest)")
    for bad in check_files([(root / r, man.files[r]) for r in sorted(listed & present)], threads=threads):
        rel = bad.relative_to(root).as_posix()
        problems.append(f"{rel}: content does not match the manifest (size or sha256)")
    for a in man.artifacts:
        if a.kind == "image":
            if f"{a.path}/index.json" not in listed:
                problems.append(f"{a.path}: image {a.name}@{a.version} not in the bundle")
        elif a.path not in listed:
            problems.append(f"{a.path}: locked {a.kind} {a.name} not in the bundle")
        elif a.sha256 and man.files[a.path].sha256 != a.sha256:
            problems.append(f"{a.path}: manifest hash differs from the lock's for {a.kind} {a.name}")
    return man, problems
