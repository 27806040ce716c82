"""A bundle's manifest, its detached signature, and verifying a bundle directory against both.

The manifest lists every file with size and sha256 (and piece hashes of large files) plus the
locked artifacts the bundle carries.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra.bundle.hashing import PIECE, Digest, check_files, digest_files
from infra.bundle.lock import Artifact
from infra.bundle.signing import sign_detached, verify_detached

MANIFEST = "manifest.json"
SIGNATURE = "manifest.json.asc"
FORMAT = 1


@dataclass
class Manifest:
    """What a bundle holds and for whom."""

    site: str
    segment: str | None
    lock_sha256: str
    files: dict[str, Digest]
    artifacts: list[Artifact]

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
            "lock_sha256": self.lock_sha256,
            "files": files,
            "artifacts": [a.as_dict() for a in sorted(self.artifacts)],
        }
        return json.dumps(data, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        """Parse manifest text (ValueError on anything malformed)."""
        data = json.loads(text)
        if data.get("format") != FORMAT:
            raise ValueError(f"manifest format {data.get('format')!r} is not {FORMAT}")
        files = {p: Digest(int(e["size"]), str(e["sha256"]), tuple(e.get("pieces", ())),
                           int(e.get("piece_size", PIECE)))
                 for p, e in data["files"].items()}
        arts = [Artifact(**{**a, "segments": tuple(a.get("segments", ()))}) for a in data["artifacts"]]
        return cls(data["site"], data.get("segment"), data["lock_sha256"], files, arts)


def bundle_files(root: Path) -> list[str]:
    """Relative paths of every file in a bundle directory except the manifest and its signature."""
    out = []
    for p in root.rglob("*"):
        if p.is_file() or p.is_symlink():
            rel = p.relative_to(root).as_posix()
            if rel not in (MANIFEST, SIGNATURE):
                out.append(rel)
    return sorted(out)


def write_manifest(root: Path, site: str, segment: str | None, lock_sha256: str, artifacts: list[Artifact],
                   signing_key: Path, piece_size: int | None = None) -> Manifest:
    """Hash every file of `root`, write manifest.json and sign it with `signing_key`."""
    rels = bundle_files(root)
    digests = digest_files([root / r for r in rels], piece_size=piece_size)
    man = Manifest(site, segment, lock_sha256, dict(zip(rels, digests, strict=True)), artifacts)
    (root / MANIFEST).write_text(man.to_json(), encoding="utf-8")
    sign_detached(root / MANIFEST, signing_key, root / SIGNATURE)
    return man


def verify_bundle(root: Path, keyring: Path, threads: int | None = None) -> tuple[Manifest | None, list[str]]:
    """(manifest, problems): signature, manifest, every hash, no missing and no extra file.

    Each problem names the file. The signature is checked first and nothing in an unsigned or
    badly signed manifest is trusted — but the file checks still run, so one run lists everything.
    """
    problems: list[str] = []
    mpath = root / MANIFEST
    if not root.is_dir():
        return None, [f"{root}: not a directory"]
    if not mpath.is_file():
        return None, [f"{MANIFEST}: missing (not a gpufleet bundle, or it was not finished)"]
    bad_sig = verify_detached(mpath, root / SIGNATURE, keyring)
    if bad_sig:
        problems.append(bad_sig)
    try:
        man = Manifest.from_json(mpath.read_text(encoding="utf-8"))
    except (ValueError, KeyError, TypeError) as exc:
        return None, [*problems, f"{MANIFEST}: unreadable ({exc})"]
    present = set(bundle_files(root))
    listed = set(man.files)
    for rel in sorted(listed - present):
        problems.append(f"{rel}: missing (listed in the manifest)")
    for rel in sorted(present - listed):
        problems.append(f"{rel}: extra file (not in the manifest)")
    for p in root.rglob("*"):
        if p.is_symlink():
            problems.append(f"{p.relative_to(root).as_posix()}: is a symlink (bundles hold plain files only)")
    for rel in sorted(listed):
        if ".." in Path(rel).parts or rel.startswith("/"):
            problems.append(f"{rel}: path escapes the bundle")
    ok_paths = sorted((listed & present) - {r for r in listed if ".." in Path(r).parts or r.startswith("/")})
    for bad in check_files([(root / r, man.files[r]) for r in ok_paths], threads=threads):
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
