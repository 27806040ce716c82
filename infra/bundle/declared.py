"""What a stack's nodes and services need from outside, derived from the plan (and the roles' defaults).

This is the *declared* set: the top-level artifacts the stack names. `gpufleet lock` resolves it
(dependency closure, sizes, hashes) into the lock file; `gpufleet lock --check` compares only this
set with the lock, so it runs anywhere (CI, no network, no lab).
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cache
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from infra.model.load import project_dir
from infra.model.site import Engine, OperatingSystem, Site, parse_hf_source
from infra.plan.execruntime import spec as runtime_spec
from infra.plan.node import NodePlan, SitePlan, plan_site
from infra.plan.packages import monitoring_server_packages, provisioning_packages


class Kind(StrEnum):
    """Kinds of artifact a bundle carries; each has its own place on the mirror."""

    DEB = "deb"
    IMAGE = "image"
    WHEEL = "wheel"
    MODEL = "model"
    PLUGIN = "plugin"
    RUNTIME = "runtime"
    """A file of the execution runtime (`infra.plan.execruntime`): a wheel from uv.lock, or the supervisor."""


# OS packages the roles install besides the pinned GPU stack. Unversioned on purpose: the lock pins
# the version the configured sources had when locked. Lists the roles keep in their defaults
# (`base_packages`, …) are read from the roles themselves (`role_default_packages`), so the offline
# list cannot drift from the real defaults; this table only adds names the roles' tasks install
# literally, and what Ansible itself needs on a node (python3-apt for the apt module).
ROLE_PACKAGES: dict[str, tuple[str, ...]] = {
    "base": ("python3-apt",),
    "airgap_firewall": ("nftables",),
}
# Native llama.cpp services run in a venv built on the node.
LLAMACPP_PACKAGES = ("python3-venv", "python3-pip")

PLUGIN_NAME = "pulumi-resource-command"
PLUGIN_URL = "https://get.pulumi.com/releases/plugins/{file}"


@dataclass(frozen=True, order=True)
class Declared:
    """One artifact the stack names. `version` is None for OS packages the roles install unpinned."""

    kind: Kind
    name: str
    version: str | None
    sources: tuple[str, ...] = field(default=(), compare=False)
    """Where it comes from as the stack says it (URLs, image references); empty for OS packages."""
    segments: tuple[str, ...] = field(default=(), compare=False)
    """Segments whose nodes need it."""

    @property
    def key(self) -> str:
        """Stable identity used to compare the lock with the stack (`deb:podman`, `image:repo`)."""
        return f"{self.kind.value}:{self.name}"

    def describe(self) -> str:
        """Human form for messages."""
        return f"{self.kind.value} {self.name}" + (f" {self.version}" if self.version else "")


def plugin_version() -> str:
    """Version of the pulumi-resource-command provider matching the installed pulumi-command SDK."""
    return importlib.metadata.version("pulumi-command")


def plugin_file(version: str) -> str:
    """Tarball name `pulumi plugin install resource command V --file …` expects."""
    return f"{PLUGIN_NAME}-v{version}-linux-amd64.tar.gz"


def url_file(url: str) -> str:
    """Last path component of a URL (the file name a wheel or model file keeps)."""
    return urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1]


def files_path(url: str) -> str:
    """Path of a file-store URL below `/files/` (the mirror layout), e.g. `models/m/rev/model.gguf`."""
    path = urlsplit(url).path
    marker = "/files/"
    if marker in path:
        return path.split(marker, 1)[1]
    return path.lstrip("/")


def image_repo(ref: str) -> tuple[str, str]:
    """(`repository` without registry host, `sha256:…` digest) of a digest-pinned image reference."""
    name, digest = ref.split("@", 1)
    first, _, rest = name.partition("/")
    # A first component with a dot or port is a registry host (docker's rule).
    repo = rest if rest and ("." in first or ":" in first or first == "localhost") else name
    return repo, digest


@cache
def role_default_packages(role: str, root: Path | None = None) -> tuple[str, ...]:
    """Unpinned package names a role's defaults list (`<role>_*packages` lists of plain strings)."""
    f = (root or project_dir()) / "roles" / role / "defaults" / "main.yml"
    if not f.is_file():
        return ()
    data = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
    out: list[str] = []
    for key, value in sorted(data.items()):
        if key.startswith(role) and key.endswith("packages") and isinstance(value, list):
            out.extend(v for v in value if isinstance(v, str) and "{{" not in v)
    return tuple(out)


def _node_debs(n: NodePlan) -> list[tuple[str, str | None]]:
    out: list[tuple[str, str | None]] = [(p.name, p.version) for p in n.packages]
    for role in n.roles:
        out.extend((name, None) for name in (*role_default_packages(role), *ROLE_PACKAGES.get(role, ())))
    if any(s.service.engine is Engine.LLAMACPP and s.service.wheel for s in n.services):
        out.extend((name, None) for name in LLAMACPP_PACKAGES)
    return out


def declared(site: Site, segment: str | None = None, plan: SitePlan | None = None) -> list[Declared]:
    """Every top-level artifact the site's nodes (of one segment, or all) need, sorted and merged.

    Two versions of one package (nodes on different profiles) are two entries: a mirror serves both.

    Raises:
        ValueError: for an unknown segment.

    """
    if segment is not None and segment not in {s.name for s in site.segments}:
        raise ValueError(f"no segment {segment!r} in site {site.name!r}; known: "
                         + ", ".join(s.name for s in site.segments))
    plan = plan or plan_site(site)
    found: dict[tuple[Kind, str, str | None], tuple[set[str], set[str]]] = {}

    def add(kind: Kind, name: str, version: str | None, seg: str, source: str = "") -> None:
        segs, sources = found.setdefault((kind, name, version), (set(), set()))
        segs.add(seg)
        if source:
            sources.add(source)

    for n in plan.nodes:
        seg = n.segment.name
        if segment is not None and seg != segment:
            continue
        for name, version in _node_debs(n):
            add(Kind.DEB, name, version, seg)
        mon = n.profile.monitoring
        if "monitoring" in n.roles and mon.dcgm_exporter_image:
            add(Kind.IMAGE, *image_repo(mon.dcgm_exporter_image), seg, mon.dcgm_exporter_image)
        for s in n.services:
            svc = s.service
            if svc.image:
                add(Kind.IMAGE, *image_repo(svc.image), seg, svc.image)
            if svc.wheel:
                # Wheel file names carry the version (`name-1.2.3-py3-none-any.whl`, PEP 427).
                add(Kind.WHEEL, url_file(svc.wheel), url_file(svc.wheel).split("-")[1], seg, svc.wheel)
            hub = parse_hf_source(svc.model.source)
            if hub is not None:
                # Unpinned on purpose: the lock pins the commit the hub revision had when locked (like a
                # branch in any lock file); the source, with the revision it asks for, is what `--check` sees.
                ref = hub.revision or svc.model.revision
                add(Kind.MODEL, f"{svc.model.name}@{svc.model.revision}", None, seg,
                    f"hf://{hub.repo}@{ref}" + (f"/{hub.path}" if hub.path else ""))
            elif svc.model.source.startswith(("http://", "https://")):
                add(Kind.MODEL, f"{svc.model.name}@{svc.model.revision}", svc.model.revision, seg,
                    svc.model.source)
    # Each segment's Prometheus host installs the server packages from its segment's source: an air-gapped
    # one from its mirror, so the bundle must carry them.
    for host in site.observability.prometheus:
        if segment is None or host.segment == segment:
            for pkg in monitoring_server_packages(site):
                add(Kind.DEB, pkg.name, pkg.version, host.segment)
    # Each segment's provisioning host installs dnsmasq-base and ipxe from its segment's source (an air-gapped
    # mirror serves them to itself), so the segment's lock and bundle carry them.
    for seg_ in site.segments:
        if segment is None or seg_.name == segment:
            for pkg in provisioning_packages(seg_):
                add(Kind.DEB, pkg.name, pkg.version, seg_.name)
    segs = [s.name for s in site.segments if segment is None or s.name == segment]
    if segs:
        # The controller runs `pulumi up` on the isolated side too: it needs the provider plugin offline.
        v = plugin_version()
        for seg in segs:
            add(Kind.PLUGIN, PLUGIN_NAME, v, seg, PLUGIN_URL.format(file=plugin_file(v)))
    for d in runtime_declared(site, segment):
        for seg in d.segments:
            add(d.kind, d.name, d.version, seg, d.sources[0])
    # Unpinned role packages that some node also pins are covered by the pinned entry.
    pinned = {(k, name) for (k, name, v) in found if v is not None}
    out = [
        Declared(kind, name, version, tuple(sorted(sources)), tuple(sorted(segs_)))
        for (kind, name, version), (segs_, sources) in found.items()
        if version is not None or kind is not Kind.DEB or (kind, name) not in pinned
    ]
    return sorted(out)


def os_of(site: Site, segment: str | None = None) -> list[OperatingSystem]:
    """Operating systems of the nodes (of one segment): the lock resolves packages per OS."""
    return sorted({n.os for n in site.nodes if segment is None or n.segment == segment})


def runtime_declared(site: Site, segment: str | None = None) -> list[Declared]:
    """The execution runtime's files, for every segment (of `segment`) whose Ansible runs on an execution host.

    Each wheel at the version `uv.lock` pins (its registry URL as the source) and the supervisor at its digest:
    `lock --check` then fails when uv.lock or the supervisor changed without a re-lock.
    """
    segs = tuple(sorted(s.name for s in site.segments
                        if not s.execution.local and (segment is None or s.name == segment)))
    if not segs:
        return []
    return [Declared(Kind.RUNTIME, f.name, f.version, (f.source,), segs) for f in runtime_spec().files]
