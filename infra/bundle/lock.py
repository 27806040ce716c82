"""The lock file: every artifact a stack needs, with version, source, size and sha256.

`stacks/Pulumi.<stack>.lock.json` holds two lists. `declared` is what the stack names (derived by
`infra.bundle.declared` from the plan, no I/O); `artifacts` is what that resolves to (dependency
closure of OS packages, image blobs, files), each with its bundle path, size and sha256. The file
is deterministic (sorted, no timestamps), so a re-lock that changes nothing changes no byte.

A third list, `os_images` (present once an image is built), records each node OS image `gpufleet image
build --lock` made: name, sha256, size, epoch and the exact package set it was built from. Images are not
resolved from the stack (they are built), so a re-lock carries them and their `os-image` artifacts over
from the previous lock (`carry_os_images`).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from infra.bundle import hub, oci
from infra.bundle.apt import AptRoot
from infra.bundle.declared import Declared, Kind, declared, files_path, image_repo, plugin_file
from infra.bundle.store import FetchError, Store, fetch_url, file_digest
from infra.model.load import CONFIG_KEY, SiteError, project_dir
from infra.model.rules import Problem
from infra.model.site import AptSource, Segment, Site, parse_hf_source
from infra.plan.engines import mirror_model_dir
from infra.plan.execruntime import RuntimeFile, RuntimeSpec
from infra.plan.execruntime import spec as runtime_spec

FORMAT = 1
BASELINE = "baseline"  # `source` of packages the nodes' installed OS already provides (nothing to fetch)


def installed(status: Path) -> dict[str, str]:
    """Package → version of everything a dpkg status file marks installed."""
    out: dict[str, str] = {}
    for para in status.read_text(encoding="utf-8", errors="replace").split("\n\n"):
        rec = dict(line.split(": ", 1) for line in para.splitlines() if ": " in line and not line.startswith(" "))
        if rec.get("Status", "").endswith(" installed") and "Package" in rec:
            out[rec["Package"]] = rec.get("Version", "")
    return out


@dataclass(frozen=True, order=True)
class Artifact:
    """One file (or image) of a bundle, as locked."""

    kind: str
    name: str
    version: str | None
    path: str
    """Path inside a bundle and on the mirror (`apt/x.deb`, `files/models/…`, `images/<repo>`)."""
    size: int | None
    sha256: str | None
    """sha256 of the file; for images the manifest digest (hex)."""
    source: str
    """Where it was resolved from (URL, image reference, artifacts store)."""
    segments: tuple[str, ...] = ()
    declared: bool = False
    """Named by the stack (top level) rather than pulled in as a dependency."""

    @property
    def resolved(self) -> bool:
        """Size and hash are known (a bundle can be built and checked)."""
        return self.size is not None and self.sha256 is not None

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        d = asdict(self)
        d["segments"] = list(self.segments)
        return d


@dataclass
class Lock:
    """A stack's lock: the declared set and what it resolved to."""

    site: str
    declared: list[dict[str, Any]]
    artifacts: list[Artifact]
    baseline: str = "empty"
    """dpkg status the OS closure was computed against (`empty` = complete down to libc)."""
    notes: list[str] = field(default_factory=list)
    os_images: list[OsImage] = field(default_factory=list)
    """Node OS images built for this stack (`gpufleet image build --lock`), by name."""

    def to_json(self) -> str:
        """Deterministic JSON text."""
        data = {
            "format": FORMAT,
            "site": self.site,
            "baseline": self.baseline,
            "declared": sorted(self.declared, key=_decl_sort),
            "artifacts": [a.as_dict() for a in sorted(self.artifacts)],
        } | os_images_json(self.os_images)
        return json.dumps(data, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Lock:
        """Parse lock text; `LockError` (a ValueError) naming the first problem for anything malformed."""
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise LockError(f"not JSON ({type(exc).__name__}: {str(exc)[:120]})") from None
        if not isinstance(data, dict):
            raise LockError("expected a JSON object")
        if data.get("format") != FORMAT or isinstance(data.get("format"), bool):
            raise LockError(f"lock format {str(data.get('format'))[:20]!r} is not {FORMAT}; re-run `gpufleet lock`")
        for key, typ in (("site", str), ("declared", list), ("artifacts", list), ("baseline", str)):
            if (key in data or key != "baseline") and not isinstance(data.get(key), typ):
                raise LockError(f"{key}: missing or not a {typ.__name__}")
        declared_ = []
        for i, d in enumerate(data["declared"]):
            ok = (isinstance(d, dict) and isinstance(d.get("kind"), str) and isinstance(d.get("name"), str)
                  and "version" in d and isinstance(d["version"], str | None)
                  and all(isinstance(d.get(k), list) and all(isinstance(x, str) for x in d[k])
                          for k in ("sources", "segments")))
            if not ok:
                raise LockError(f"declared[{i}]: expected {{kind, name, version, sources, segments}}")
            declared_.append(d)
        arts = [_artifact(a, f"artifacts[{i}]") for i, a in enumerate(data["artifacts"])]
        return cls(data["site"], declared_, arts, data.get("baseline", "empty"), os_images=parse_os_images(data))

    def for_segment(self, segment: str | None) -> list[Artifact]:
        """Artifacts one segment needs from a bundle (all segments when None); baseline ones are not fetched."""
        return [a for a in self.artifacts
                if (segment is None or segment in a.segments) and a.source != BASELINE]


class LockError(ValueError):
    """A lock file that cannot be read; the message names the first problem."""


_ARTIFACT_TYPES: dict[str, tuple[type, ...]] = {
    "kind": (str,), "name": (str,), "version": (str, type(None)), "path": (str,), "size": (int, type(None)),
    "sha256": (str, type(None)), "source": (str,), "segments": (list,), "declared": (bool,)}


def _artifact(a: object, where: str) -> Artifact:
    if not isinstance(a, dict) or set(a) != set(_ARTIFACT_TYPES):
        raise LockError(f"{where}: expected an object with exactly {', '.join(_ARTIFACT_TYPES)}")
    for k, types in _ARTIFACT_TYPES.items():
        v = a[k]
        if not isinstance(v, types) or (isinstance(v, bool) and bool not in types):
            raise LockError(f"{where}.{k}: wrong type ({type(v).__name__})")
    if not all(isinstance(s, str) for s in a["segments"]):
        raise LockError(f"{where}.segments: expected a list of names")
    return Artifact(**{**a, "segments": tuple(a["segments"])})


def _decl_sort(d: dict[str, Any]) -> tuple[str, str, str]:
    return (d["kind"], d["name"], d.get("version") or "")


def decl_dict(d: Declared) -> dict[str, Any]:
    """JSON form of a declared artifact (what `--check` compares)."""
    return {"kind": d.kind.value, "name": d.name, "version": d.version, "sources": list(d.sources),
            "segments": list(d.segments)}


def lock_path(stack: str, root: Path | None = None) -> Path:
    """`stacks/Pulumi.<stack>.lock.json`."""
    return (root or project_dir()) / "stacks" / f"Pulumi.{stack}.lock.json"


def lock_path_for(stack_file: Path) -> Path:
    """Lock file next to a stack file (`Pulumi.x.yaml` → `Pulumi.x.lock.json`)."""
    return stack_file.with_name(stack_file.name.removesuffix(".yaml") + ".lock.json")


# ----------------------------------------------------------------------------------------- check

def check(lock: Lock, site: Site) -> list[str]:
    """Every difference between what the stack declares now and what the lock was made from."""
    now = {_ident(d): d for d in (decl_dict(x) for x in declared(site))}
    then = {_ident(d): d for d in lock.declared}
    problems = []
    if lock.site != site.name:
        problems.append(f"lock is for site {lock.site!r}, the stack is {site.name!r}")
    by_name: dict[tuple[str, str], tuple[list[str], list[str]]] = {}
    for key in sorted(set(now) | set(then)):
        if key in now and key in then:
            a, b = now[key], then[key]
            for f in ("sources", "segments"):
                if sorted(a[f]) != sorted(b[f]):
                    problems.append(f"{_show(key)}: {f} changed: lock has "
                                    f"{', '.join(b[f]) or '-'}; stack has {', '.join(a[f]) or '-'}")
            continue
        slot = by_name.setdefault((key[0], key[1]), ([], []))
        (slot[0] if key in now else slot[1]).append(key[2] or "(unpinned)")
    for (kind, name), (wanted, locked) in sorted(by_name.items()):
        if wanted and locked:
            problems.append(f"{kind} {name}: stack wants {', '.join(wanted)}, lock has {', '.join(locked)}")
        elif wanted:
            problems.append(f"{kind} {name} {', '.join(wanted)}: in the stack, not in the lock")
        else:
            problems.append(f"{kind} {name} {', '.join(locked)}: in the lock, no longer in the stack")
    for d in lock.declared:
        if not any(_covers(a, d) for a in lock.artifacts):
            problems.append(f"{_show(_ident(d))}: declared but no artifact resolved for it "
                            "(lock edited by hand?)")
    return problems


def unresolved(lock: Lock) -> list[Artifact]:
    """Locked artifacts without size/hash (their sources were not reachable when locking)."""
    return [a for a in lock.artifacts if not a.resolved]


def _show(key: tuple[str, str, str]) -> str:
    return " ".join(k for k in key if k)


def _ident(d: dict[str, Any]) -> tuple[str, str, str]:
    return (d["kind"], d["name"], d.get("version") or "")


def _covers(a: Artifact, d: dict[str, Any]) -> bool:
    # An unpinned declaration (role packages) is covered by whatever version was resolved.
    return (a.kind == d["kind"] and a.declared and a.name == d["name"]
            and (d["version"] is None or a.version == d["version"]))


# --------------------------------------------------------------------------------------- resolve

def upstream_sources(site: Site, seg: Segment) -> list[AptSource]:
    """Apt sources a segment's packages are resolved from on the connected side.

    A connected segment uses its own `sources`; an air-gapped one installs from its mirror, which is
    filled from the connected side — so from the sources of the site's connected segments.
    """
    if seg.sources:
        return list(seg.sources)
    seen: dict[str, AptSource] = {}
    for s in site.segments:
        if not s.airgapped:
            for src in s.sources:
                seen.setdefault(src.name, src)
    return list(seen.values())


@dataclass
class ResolveOptions:
    """Where `gpufleet lock` looks things up."""

    artifacts: Sequence[Store] = ()
    """Directories/URLs holding files/ and images/ in the mirror layout."""
    registries: Sequence[str] = ()
    """Registries (`host[:port]`) to inspect images at by repository and digest."""
    dpkg_status: Path | None = None
    """Installed baseline for the OS closure (default: nothing installed)."""
    apt_sources: Sequence[AptSource] = ()
    """Override the stack's sources (e.g. an internal proxy of the same repositories)."""
    work: Path | None = None
    mirror_hosts: Sequence[str] = ()
    """Addresses/names of the site's mirrors: URLs on them are destinations, never sources."""


def _upstream(urls: Sequence[str], opts: ResolveOptions) -> list[str]:
    """The URLs that are not on one of the site's own mirrors (those are filled from the bundle)."""
    from urllib.parse import urlsplit

    return [u for u in urls if (urlsplit(u).hostname or "") not in opts.mirror_hosts]


def resolve(site: Site, opts: ResolveOptions) -> Lock:
    """Resolve the declared set to artifacts. Needs the sources reachable (network or lab)."""
    decl = declared(site)
    opts.mirror_hosts = [*opts.mirror_hosts, *(str(m.address) for m in site.mirrors), *(m.name for m in site.mirrors)]
    arts: dict[tuple[str, str, str | None, str], Artifact] = {}
    notes: list[str] = []

    def put(a: Artifact) -> None:
        key = (a.kind, a.name, a.version, a.path)
        old = arts.get(key)
        if old is not None:
            a = Artifact(**{**a.__dict__, "segments": tuple(sorted(set(old.segments) | set(a.segments))),
                            "declared": old.declared or a.declared})
        arts[key] = a

    with tempfile.TemporaryDirectory(prefix="gpufleet-lock-") as tmp:
        work = opts.work or Path(tmp)
        for seg in site.segments:
            wanted = [d for d in decl if d.kind is Kind.DEB and seg.name in d.segments]
            if not wanted:
                continue
            sources = list(opts.apt_sources) or upstream_sources(site, seg)
            if not sources:
                raise FetchError(f"segment {seg.name!r} has no apt sources to resolve packages from; "
                                 "give the segment `sources` or pass --sources FILE")
            root = AptRoot(work / f"apt-{seg.name}", sources, opts.dpkg_status)
            root.update()
            base = installed(opts.dpkg_status) if opts.dpkg_status else {}
            # Unpinned packages the baseline OS already has are not fetched: the nodes have them.
            from_base = [d for d in wanted if d.version is None and d.name in base]
            specs = [f"{d.name}={d.version}" if d.version else d.name for d in wanted if d not in from_base]
            top = {d.name for d in wanted}
            for deb in root.closure(specs):
                put(Artifact(Kind.DEB.value, deb.name, deb.version, f"apt/{deb.filename}", deb.size, deb.sha256,
                             deb.url, (seg.name,), deb.name in top))
            for d in from_base:
                put(Artifact(Kind.DEB.value, d.name, base[d.name], "", 0, "", BASELINE, (seg.name,), True))
        for d in decl:
            if d.kind is Kind.DEB:
                continue
            if d.kind is Kind.RUNTIME:
                put(runtime_artifact(d, notes))
                continue
            for a in _resolve_other(d, opts, work, notes):
                put(a)
            if d.kind is Kind.WHEEL:
                for a in _wheel_closure(d, opts, work, notes):
                    put(a)
    baseline = "empty" if opts.dpkg_status is None else f"dpkg-status sha256:{file_digest(opts.dpkg_status)[1]}"
    return Lock(site.name, [decl_dict(d) for d in decl], list(arts.values()), baseline, notes)


def _file_rel(d: Declared) -> str:
    if d.kind is Kind.PLUGIN:
        return f"files/plugins/{plugin_file(d.version or '')}"
    return "files/" + files_path(d.sources[0])


def _resolve_other(d: Declared, opts: ResolveOptions, work: Path, notes: list[str]) -> list[Artifact]:
    segs = d.segments
    if d.kind is Kind.IMAGE:
        repo, digest = image_repo(d.name + "@" + (d.version or ""))
        for store in opts.artifacts:
            if store.is_url:
                continue
            found = oci.image_in_layout(Path(store.base) / "images" / repo, digest)
            if found:
                return [Artifact(d.kind.value, repo, digest, f"images/{repo}", found[0],
                                 digest.split(":", 1)[1], store.where(f"images/{repo}"), segs, True)]
        # The stack's own reference may name a site mirror (the destination): never resolve from it.
        own = [r.split("/", 1)[0] for r in d.sources]
        for reg in [*opts.registries, *(r for r in own if r.split(":", 1)[0] not in opts.mirror_hosts)]:
            size = _registry_image_size(reg, repo, digest)
            if size is not None:
                return [Artifact(d.kind.value, repo, digest, f"images/{repo}", size, digest.split(":", 1)[1],
                                 f"docker://{reg}/{repo}@{digest}", segs, True)]
        notes.append(f"image {repo}@{digest}: not found in --artifacts or registries; locked unresolved")
        return [Artifact(d.kind.value, repo, digest, f"images/{repo}", None, None, d.sources[0], segs, True)]
    if d.kind is Kind.MODEL and d.sources and parse_hf_source(d.sources[0]):
        return _resolve_hub(d, work, notes)
    # Files: a model directory (source ending in /) becomes one artifact per file found in a store.
    rel = _file_rel(d)
    if rel.endswith("/"):
        for store in opts.artifacts:
            p = None if store.is_url else Path(store.base) / rel
            if p is not None and p.is_dir():
                return [Artifact(d.kind.value, d.name, d.version, str(f.relative_to(store.base)),
                                 *file_digest(f), store.where(str(f.relative_to(store.base))), segs, True)
                        for f in sorted(x for x in p.rglob("*") if x.is_file())]
        notes.append(f"{d.describe()}: directory {rel} not found in any --artifacts directory; locked unresolved")
        return [Artifact(d.kind.value, d.name, d.version, rel, None, None, d.sources[0], segs, True)]
    candidates = [*(s.where(rel) for s in opts.artifacts), *_upstream(d.sources, opts)]
    for where in candidates:
        local = Path(where) if not where.startswith(("http://", "https://")) else None
        try:
            if local is not None:
                if not local.is_file():
                    continue
                size, sha = file_digest(local)
            else:
                dest = work / "files" / rel
                fetch_url(where, dest)
                size, sha = file_digest(dest)
                dest.unlink()
        except FetchError:
            continue
        return [Artifact(d.kind.value, d.name, d.version, rel, size, sha, where, segs, True)]
    notes.append(f"{d.describe()}: not found at {', '.join(candidates)}; locked unresolved")
    return [Artifact(d.kind.value, d.name, d.version, rel, None, None, d.sources[0], segs, True)]


def _resolve_hub(d: Declared, work: Path, notes: list[str]) -> list[Artifact]:
    """An `hf://` model: its revision pinned to the commit, one artifact per file with the hub's sha256.

    Raises:
        HubError: the hub reports a commit other than the one the stack's `revision` spells out in full.

    """
    hub_src = parse_hf_source(d.sources[0])
    if hub_src is None or hub_src.revision is None:  # declared() always writes `@<ref>`: a lock edited by hand
        raise hub.HubError(f"{d.describe()}: source {d.sources[0][:120]!r} names no hub revision")
    name, revision = d.name.split("@", 1)
    model_dir = mirror_model_dir(name, revision)
    try:
        pinned = hub.resolve(hub_src.repo, hub_src.revision, hub_src.path, work)
    except hub.HubError as exc:
        notes.append(f"{d.describe()}: {exc}; locked unresolved")
        return [Artifact(d.kind.value, d.name, None, model_dir, None, None, d.sources[0], d.segments, True)]
    if hub.COMMIT.match(revision) and revision != pinned.commit:
        raise hub.HubError(f"model {name}: `revision` is commit {revision}, but {d.sources[0]} is commit "
                           f"{pinned.commit}; make them agree (or give `revision` a name, not a sha)")
    if pinned.ref != pinned.commit:
        notes.append(f"{d.sources[0]}: pinned to commit {pinned.commit}")
    return [Artifact(d.kind.value, d.name, pinned.commit, f"{model_dir}/{f.path}", f.size, f.sha256,
                     hub.locked_source(pinned.repo, pinned.commit, f.path), d.segments, True)
            for f in pinned.files]


# llama.cpp's OpenAI-compatible server (what the inference role runs) lives in the `server` extra.
WHEEL_EXTRAS = {"llama_cpp_python": "server"}


def _wheel_closure(d: Declared, opts: ResolveOptions, work: Path, notes: list[str]) -> list[Artifact]:
    """The wheel's dependency wheels, resolved offline by pip from the stores and the connected-side URL.

    Nodes install with `pip --no-index --find-links <mirror>/files/wheels/`, so every dependency must
    sit next to the wheel on the mirror.
    """
    project = d.name.split("-", 1)[0]
    extra = WHEEL_EXTRAS.get(project)
    links = [s.where("files/wheels/") if s.is_url else str(Path(s.base) / "files" / "wheels")
             for s in opts.artifacts]
    links += [src.rsplit("/", 1)[0] + "/" for src in _upstream(d.sources, opts)]
    dest = work / "wheels"
    dest.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, "-m", "pip", "download", "--quiet", "--no-index", "--only-binary=:all:",
            "--dest", str(dest)]
    for link in links:
        args += ["--find-links", link]
    args.append(f"{project}[{extra}]=={d.version}" if extra else f"{project}=={d.version}")
    try:
        proc = subprocess.run(args, capture_output=True, timeout=600, check=False, text=True)
    except subprocess.TimeoutExpired:
        proc = None
    if proc is None or proc.returncode != 0:
        why = (proc.stderr.strip().splitlines() or [""])[-1] if proc else "timeout"
        notes.append(f"wheel {d.name}: dependencies not resolvable offline from {', '.join(links)} ({why}); "
                     "only the wheel is locked")
        return []
    out = []
    for f in sorted(dest.glob("*.whl")):
        if f.name == d.name:
            continue
        size, sha = file_digest(f)
        src = next((str(Path(link) / f.name) for link in links if (Path(link) / f.name).is_file()),
                   next((f"{link.rstrip('/')}/{f.name}" for link in links if "://" in link), f.name))
        out.append(Artifact(Kind.WHEEL.value, f.name, f.name.split("-")[1], f"files/wheels/{f.name}", size, sha, src,
                            d.segments, False))
    return out


def _registry_image_size(registry: str, repo: str, digest: str) -> int | None:
    try:
        proc = subprocess.run(
            ["skopeo", "inspect", "--raw", "--tls-verify=false", "--retry-times=0",
             f"docker://{registry}/{repo}@{digest}"],
            capture_output=True, timeout=60, check=False)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    man = json.loads(proc.stdout)
    return len(proc.stdout) + int(man["config"]["size"]) + sum(int(la["size"]) for la in man.get("layers", []))


# ----------------------------------------------------------------------------------- execution runtime

def runtime_artifact(d: Declared, notes: list[str]) -> Artifact:
    """A runtime file as locked: size and sha256 from `uv.lock` (the registry's own), or the supervisor's digest.

    No network: uv.lock already holds what the registry published; `bundle build` checks the bytes it fetches.
    """
    f = next((x for x in runtime_spec().files if (x.name, x.version) == (d.name, d.version)), None)
    if f is None:  # declared() reads the same spec: only a lock edited by hand gets here
        notes.append(f"{d.describe()}: not in the execution runtime of uv.lock; locked unresolved")
        return Artifact(d.kind.value, d.name, d.version, "", None, None, d.sources[0], d.segments, True)
    return Artifact(d.kind.value, f.name, f.version, f.path, f.size, f.sha256, f.source, d.segments, True)


def runtime_release(lock: Lock, segment: str, python: str, glibc: str) -> RuntimeSpec | None:
    """The execution runtime the lock records for `segment` (None when it records none).

    `python` and `glibc` are the release's platform (`infra.plan.execruntime.spec()`): the lock pins files.
    """
    files = [RuntimeFile(a.name, a.version or "", a.path.rsplit("/", 1)[-1], a.source, a.sha256 or "", a.size or 0)
             for a in lock.artifacts if a.kind == Kind.RUNTIME.value and segment in a.segments]
    return RuntimeSpec(python, glibc, tuple(sorted(files))) if files else None
# ------------------------------------------------------------------------------------------ OS images

#: Kind of the lock entries `gpufleet image build --lock` records for an image's files (the disk image, its
#: manifest, the deploy kernel and ramdisk), carried by `gpufleet bundle build` like any file artifact.
OS_IMAGE_KIND = "os-image"


@dataclass(frozen=True, order=True)
class OsImage:
    """One node OS image as built: what a node's `image` must name before it can be installed."""

    name: str
    sha256: str
    """sha256 of the disk image (what the deploy ramdisk checks the written bytes against)."""
    size: int
    epoch: int
    """SOURCE_DATE_EPOCH of the build (with `packages`, what rebuilds it byte for byte)."""
    packages: tuple[str, ...]
    """Every installed package as `name=version`, sorted: the package set the image was built from."""
    segments: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"name": self.name, "sha256": self.sha256, "size": self.size, "epoch": self.epoch,
                "packages": list(self.packages), "segments": list(self.segments)}


_OS_IMAGE_TYPES: dict[str, type] = {"name": str, "sha256": str, "size": int, "epoch": int, "packages": list,
                                    "segments": list}


def os_images_json(images: Sequence[OsImage]) -> dict[str, Any]:
    """The lock's `os_images` key: absent while there are none, so locks without images keep their bytes."""
    return {"os_images": [i.as_dict() for i in sorted(images)]} if images else {}


def parse_os_images(data: dict[str, Any]) -> list[OsImage]:
    """`os_images` of a lock's JSON (LockError naming the first malformed entry)."""
    raw = data.get("os_images", [])
    if not isinstance(raw, list):
        raise LockError("os_images: expected a list")
    out = []
    for i, e in enumerate(raw):
        where = f"os_images[{i}]"
        if not isinstance(e, dict) or set(e) != set(_OS_IMAGE_TYPES):
            raise LockError(f"{where}: expected an object with exactly {', '.join(_OS_IMAGE_TYPES)}")
        for k, typ in _OS_IMAGE_TYPES.items():
            if not isinstance(e[k], typ) or isinstance(e[k], bool):
                raise LockError(f"{where}.{k}: wrong type ({type(e[k]).__name__})")
        if not all(isinstance(x, str) for x in [*e["packages"], *e["segments"]]):
            raise LockError(f"{where}: packages and segments are lists of strings")
        out.append(OsImage(e["name"], e["sha256"], e["size"], e["epoch"], tuple(e["packages"]), tuple(e["segments"])))
    return out


def put_os_image(lock: Lock, image: OsImage, files: Sequence[Artifact]) -> None:
    """Record a build: replaces an earlier build of the same image (entry and files)."""
    names = {a.name for a in files}
    lock.artifacts = sorted([a for a in lock.artifacts if not (a.kind == OS_IMAGE_KIND and a.name in names)]
                            + list(files))
    lock.os_images = sorted([i for i in lock.os_images if i.name != image.name] + [image])


def image_segments(site: Site) -> dict[str, set[str]]:
    """Image name → segments of the nodes that name it (where the bundle must carry it)."""
    out: dict[str, set[str]] = {}
    for n in site.nodes:
        if n.image is not None:
            out.setdefault(n.image, set()).add(n.segment)
    return out


def _image_of(a: Artifact) -> str:
    # The four files of image X are named X, X.json, X:deploy-kernel, X:deploy-initrd.
    return a.name.split(":", 1)[0].removesuffix(".json")


def carry_os_images(old: Lock | None, new: Lock, site: Site) -> None:
    """Keep the previous lock's OS images (entries and `os-image` files) in a freshly resolved lock.

    Their segments grow to every segment whose nodes name the image now, so a node moved to another
    segment gets the image in that segment's bundle without a rebuild. An image no node names is kept,
    with a note (it may be built ahead of the nodes that will use it).
    """
    if old is None:
        return
    wanted = image_segments(site)

    def segs(name: str, have: Sequence[str]) -> tuple[str, ...]:
        return tuple(sorted(set(have) | wanted.get(name, set())))

    new.os_images = sorted(OsImage(**{**i.__dict__, "segments": segs(i.name, i.segments)}) for i in old.os_images)
    files = [Artifact(**{**a.__dict__, "segments": segs(_image_of(a), a.segments)})
             for a in old.artifacts if a.kind == OS_IMAGE_KIND]
    new.artifacts = sorted([a for a in new.artifacts if a.kind != OS_IMAGE_KIND] + files)
    for i in new.os_images:
        if i.name not in wanted:
            new.notes.append(f"os-image {i.name}: no node names it (kept from the previous lock)")


def unlocked_images(site: Site, lock: Lock | None) -> list[tuple[int, str]]:
    """(node index, image) for every node whose image has no entry and disk file in the lock."""
    have = set() if lock is None else {i.name for i in lock.os_images} & {
        a.name for a in lock.artifacts if a.kind == OS_IMAGE_KIND and a.resolved}
    return [(i, n.image) for i, n in enumerate(site.nodes) if n.image is not None and n.image not in have]


def require_locked_images(site: Site, lock_file: Path) -> None:
    """Raise SiteError (exit 2 in `gpufleet validate`) naming each node whose OS image the lock lacks.

    A node with `image` is installed from exactly the bytes the lock records (the deploy ramdisk checks the
    written disk against that sha256), so an image that was never built into the lock cannot be installed.
    """
    if not any(n.image for n in site.nodes):
        return
    lock: Lock | None = None
    why = f"there is no lock file {lock_file}"
    if lock_file.is_file():
        try:
            lock = Lock.from_json(lock_file.read_text(encoding="utf-8"))
            why = f"the lock {lock_file} has no os_images entry for it"
        except (OSError, UnicodeDecodeError, LockError) as exc:
            why = f"the lock {lock_file} cannot be read ({exc})"
    problems = [Problem(f"config.{CONFIG_KEY}.nodes[{i}].image", f"OS image {name!r} is not locked: {why}",
                        f"run `gpufleet lock`, then `gpufleet image build {name} --repo <mirror> --out <dir> "
                        f"--lock {lock_file}`")
                for i, name in unlocked_images(site, lock)]
    if problems:
        raise SiteError(str(lock_file), problems)
