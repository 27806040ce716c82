"""`gpufleet bundle build`: fetch exactly the locked artifacts into a directory, manifest, sign.

A bundle covers a stack (or one segment). Building refuses to finish one that misses anything.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infra.bundle import hub, oci
from infra.bundle.apt import AptError, AptRoot
from infra.bundle.declared import Kind
from infra.bundle.lock import Artifact, Lock, check, upstream_sources
from infra.bundle.manifest import MANIFEST, SIGNATURE, Manifest, check_rel, write_manifest
from infra.bundle.store import FetchError, Store, fetch_url, file_digest
from infra.model.load import project_dir
from infra.model.site import AptSource, Site
from infra.plan.engines import mirror_model_dir, mirror_model_index
from infra.plan.execruntime import RuntimeFile, own_file_bytes

SKOPEO_TIMEOUT_S = 1800


class BuildError(Exception):
    """The bundle cannot be completed; `missing` names each artifact and where it was looked for."""

    def __init__(self, message: str, missing: Sequence[str] = ()) -> None:
        self.missing = list(missing)
        super().__init__(message + "".join(f"\n  - {m}" for m in self.missing))


@dataclass
class BuildOptions:
    """Where the connected side fetches from."""

    artifacts: Sequence[Store] = ()
    registries: Sequence[str] = ()
    apt_sources: Sequence[AptSource] = ()
    work: Path | None = None
    fetched: list[str] = field(default_factory=list)
    kinds: Sequence[str] = ()
    """Only artifacts of these kinds (e.g. `runtime`: a bundle of the execution runtime alone); all when empty."""


def image_tag(digest: str) -> str:
    """The tag a bundle (and the mirror registry) gives an image: its digest, spelled as a tag."""
    return digest.replace(":", "-")


def serial_path(lock_file: Path) -> Path:
    """The builder's record of the last serial it issued: `Pulumi.<stack>.bundle-serial` next to the lock."""
    return lock_file.with_name(lock_file.name.removesuffix(".lock.json") + ".bundle-serial")


def last_serial(record: Path) -> int:
    """The serial in the builder's record (0 when there is none yet).

    Raises:
        BuildError: the record exists but does not hold one positive integer.

    """
    try:
        text = record.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return 0
    except (OSError, UnicodeDecodeError) as exc:
        raise BuildError(f"{record}: cannot read the serial record ({exc}); pass --serial N") from None
    if not text.isdigit() or len(text) > 18:
        raise BuildError(f"{record}: expected one positive integer (the last bundle serial), found {text[:40]!r}; "
                         "fix it or pass --serial N")
    return int(text)


def save_serial(record: Path, serial: int) -> None:
    """Remember `serial` as the last one issued (never lowers the record)."""
    if serial > last_serial(record):
        tmp = record.with_name(record.name + ".tmp")
        tmp.write_text(f"{serial}\n", encoding="ascii")
        tmp.replace(record)


def mirrors_for(site: Site, segment: str | None) -> list[str]:
    """Mirrors a bundle for `segment` (or every segment) may be imported into."""
    if segment is None:
        return sorted(m.name for m in site.mirrors)
    seg = site.segment(segment)
    if seg is None:
        raise BuildError(f"segment {segment!r} is not in site {site.name!r}; known: "
                         + ", ".join(s.name for s in site.segments))
    return [seg.mirror] if seg.mirror else []


def build(site: Site, lock: Lock, lock_text: str, segment: str | None, out: Path, signing_key: Path,
          opts: BuildOptions, serial: int = 1) -> Manifest:
    """Fetch every locked artifact for `segment` into `out`, then write and sign the manifest.

    The manifest binds the bundle to the site, the segment, the mirrors that serve it, the lock's
    sha256 and `serial` (a mirror refuses a serial not newer than its last import).
    """
    mirrors = mirrors_for(site, segment)
    if not mirrors:
        raise BuildError(f"segment {segment!r} has no mirror, so no bundle can be imported for it; give a segment "
                         "whose `mirror` is set (or none for every mirror)" if segment else
                         f"site {site.name!r} has no mirrors: a bundle is only ever imported into a mirror")
    drift = check(lock, site)
    if drift:
        raise BuildError("the lock does not match the stack; run `gpufleet lock` first", drift)
    arts = [a for a in lock.for_segment(segment) if not opts.kinds or a.kind in opts.kinds]
    unresolved = [a for a in arts if not a.resolved]
    if unresolved:
        raise BuildError("the lock has artifacts without size/sha256 (their source was unreachable when "
                         "locking); re-run `gpufleet lock` with them reachable",
                         [f"{a.kind} {a.name} {a.version or ''} from {a.source}" for a in unresolved])
    unsafe = [f"{a.kind} {a.name}: path {a.path!r}: {why}" for a in arts if (why := check_rel(a.path))]
    if unsafe:
        raise BuildError("the lock names paths a bundle cannot hold (edited by hand?)", unsafe)
    if out.exists() and any(out.iterdir()):
        raise BuildError(f"{out} is not empty; give a new directory (a bundle holds exactly its manifest)")
    out.mkdir(parents=True, exist_ok=True)
    missing: list[str] = []
    missing += _fetch_debs(site, [a for a in arts if a.kind == "deb"], segment, out, opts)
    for a in arts:
        if a.kind == "image":
            missing += _fetch_image(a, out, opts)
        elif a.kind == Kind.RUNTIME.value:
            missing += _fetch_runtime(a, out, opts)
        elif a.kind != "deb":
            missing += _fetch_file(a, out, opts)
    if missing:
        raise BuildError(f"bundle for {site.name}{'/' + segment if segment else ''} is incomplete; "
                         f"{len(missing)} locked artifact(s) missing (no manifest written)", missing)
    shutil.rmtree(out.parent / f".{out.name}.hub", ignore_errors=True)  # huggingface_hub's download cache
    _write_model_indexes(arts, out)
    lock_sha = hashlib.sha256(lock_text.encode()).hexdigest()
    return write_manifest(out, site.name, segment, lock_sha, arts, signing_key, serial=serial, mirrors=mirrors)


def _fetch_debs(site: Site, debs: list[Artifact], segment: str | None, out: Path, opts: BuildOptions) -> list[str]:
    if not debs:
        return []
    dest = out / "apt"
    dest.mkdir(parents=True, exist_ok=True)
    missing: list[str] = []
    by_seg: dict[str, list[Artifact]] = {}
    for a in debs:
        by_seg.setdefault(segment or a.segments[0], []).append(a)
    work = opts.work or out.parent / f".{out.name}.work"
    try:
        for seg_name, group in by_seg.items():
            seg = site.segments_by_name[seg_name]
            sources = list(opts.apt_sources) or upstream_sources(site, seg)
            todo = [a for a in group if not (dest / Path(a.path).name).is_file()]
            try:
                root = AptRoot(work / f"apt-{seg_name}", sources)
                root.update()
                try:
                    root.download([f"{a.name}={a.version}" for a in todo], dest)
                except AptError:
                    # One unavailable package fails the whole call: retry one by one to name each.
                    for a in todo:
                        with contextlib.suppress(AptError):
                            root.download([f"{a.name}={a.version}"], dest)
            except AptError as exc:
                opts.fetched.append(f"apt unavailable: {exc}")
            for a in group:
                f = dest / Path(a.path).name
                if not f.is_file():
                    # apt could not: fall back to the exact URL the lock recorded (hash checked below).
                    try:
                        fetch_url(a.source, f)
                    except FetchError:
                        missing.append(f"deb {a.name} {a.version}: not available from "
                                       f"{', '.join(s.url for s in sources) or 'no source'} nor {a.source}")
                        continue
                size, sha = file_digest(f)
                if (size, sha) != (a.size, a.sha256):
                    f.unlink()
                    missing.append(f"deb {a.name} {a.version}: {a.source} served different bytes "
                                   f"(sha256 {sha}, lock says {a.sha256})")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return missing


def _fetch_file(a: Artifact, out: Path, opts: BuildOptions) -> list[str]:
    dest = out / a.path
    # Stores create the folder themselves; the lock's own source (a local file or URL) needs it too.
    dest.parent.mkdir(parents=True, exist_ok=True)
    tried = []
    for store in opts.artifacts:
        tried.append(store.where(a.path))
        try:
            store.fetch(a.path, dest)
        except FetchError:
            continue
        break
    else:
        tried.append(a.source)
        pinned = hub.parse_locked_source(a.source)
        try:
            if pinned is not None:
                repo, commit, path = pinned
                hub.download(repo, commit, path, dest, opts.work or out.parent / f".{out.name}.hub")
            elif a.source.startswith(("http://", "https://")):
                fetch_url(a.source, dest)
            elif Path(a.source).is_file():
                shutil.copyfile(a.source, dest)
            else:
                raise FetchError(a.source)
        except FetchError:
            return [f"{a.kind} {a.name} {a.version or ''}: {a.path} not found at {', '.join(tried)} "
                    "(pass --artifacts DIR|URL holding it)"]
    size, sha = file_digest(dest)
    if (size, sha) != (a.size, a.sha256):
        dest.unlink()
        return [f"{a.kind} {a.name}: {a.path} has sha256 {sha}, the lock says {a.sha256}"]
    return []


def _fetch_runtime(a: Artifact, out: Path, opts: BuildOptions) -> list[str]:
    """A file of the execution runtime: from a store, else its locked source (registry URL or this checkout)."""
    if a.source.startswith("gpufleet"):
        # The supervisor and the roles are gpufleet's own: the checkout building the bundle makes them; their
        # bytes are checked against the lock all the same.
        own = own_file_bytes(
            RuntimeFile(a.name, a.version or "", a.path.rsplit("/", 1)[-1], a.source, a.sha256 or "", a.size or 0),
            project_dir())
        if own is not None:
            dest = out / a.path
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(own)
            size, sha = file_digest(dest)
            if (size, sha) != (a.size, a.sha256):
                dest.unlink()
                return [f"{a.kind} {a.name}: {a.path} made from this checkout has sha256 {sha}, the lock says "
                        f"{a.sha256}: the roles or supervisor changed since `gpufleet lock`; re-run it"]
            return []
    return _fetch_file(a, out, opts)


def _write_model_indexes(arts: list[Artifact], out: Path) -> None:
    """For each `hf://` model, the file list its nodes fetch it by (`files/model-index/<name>/<rev>.json`).

    Written from the lock alone, so it is in the signed manifest like every other file and a mirror
    serves exactly what the lock pinned. A node checks each file's sha256 against it when fetching.
    """
    models: dict[str, list[tuple[Artifact, tuple[str, str, str]]]] = {}
    for a in arts:
        pinned = hub.parse_locked_source(a.source) if a.kind == "model" else None
        if pinned is not None:
            models.setdefault(a.name, []).append((a, pinned))
    for key, files in sorted(models.items()):
        name, revision = key.split("@", 1)
        repo, commit, _ = files[0][1]
        prefix = mirror_model_dir(name, revision) + "/"
        listed = [(a.path.removeprefix(prefix), a.size or 0, a.sha256 or "") for a, _ in files]
        if any(not a.path.startswith(prefix) for a, _ in files) or len({p[:2] for _, p in files}) != 1:
            raise BuildError(f"model {key}: the lock mixes paths or commits of one model (edited by hand?)")
        dest = out / mirror_model_index(name, revision)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(hub.index_bytes(name, revision, repo, commit, listed))


def _fetch_image(a: Artifact, out: Path, opts: BuildOptions) -> list[str]:
    digest = a.version or ""
    layout = out / a.path
    tried = []
    for store in opts.artifacts:
        if store.is_url:
            continue
        src = Path(store.base) / a.path
        tried.append(str(src))
        found = oci.image_in_layout(src, digest)
        if found:
            _copy_layout_image(src, layout, digest, found[1])
            return _check_image(a, layout)
    for ref in [*(f"docker://{r}/{a.name}@{digest}" for r in opts.registries),
                *([a.source] if a.source.startswith("docker://") else [])]:
        tried.append(ref)
        try:
            proc = subprocess.run(["skopeo", "copy", "--preserve-digests", "--src-tls-verify=false", "--quiet",
                                   ref, f"oci:{layout}:{image_tag(digest)}"],
                                  capture_output=True, timeout=SKOPEO_TIMEOUT_S, check=False)
        except (FileNotFoundError, subprocess.TimeoutExpired):
            continue
        if proc.returncode == 0:
            return _check_image(a, layout)
    return [f"image {a.name}@{digest}: not found at {', '.join(tried) or 'nowhere (no --artifacts/--registry)'}"]


def _copy_layout_image(src: Path, dst: Path, digest: str, blobs: list[str]) -> None:
    """Copy one image (manifest + blobs) from a layout into another, tagged with its digest."""
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    for b in blobs:
        algo, hexd = b.split(":", 1)
        (dst / "blobs" / algo).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / "blobs" / algo / hexd, dst / "blobs" / algo / hexd)
    entry = next(m for m in json.loads((src / "index.json").read_text())["manifests"] if m["digest"] == digest)
    entry = {**entry, "annotations": {"org.opencontainers.image.ref.name": image_tag(digest)}}
    index_path = dst / "index.json"
    old: list[dict[str, Any]] = json.loads(index_path.read_text())["manifests"] if index_path.exists() else []
    manifests = sorted([m for m in old if m["digest"] != digest] + [entry], key=lambda m: str(m["digest"]))
    index_path.write_text(json.dumps({"schemaVersion": 2, "manifests": manifests}, sort_keys=True))


def _check_image(a: Artifact, layout: Path) -> list[str]:
    found = oci.image_in_layout(layout, a.version or "")
    if not found:
        return [f"image {a.name}@{a.version}: copied, but the layout has no manifest with that digest"]
    return []


def is_bundle(path: Path) -> bool:
    """A directory with a manifest and signature."""
    return (path / MANIFEST).is_file() and (path / SIGNATURE).is_file()
