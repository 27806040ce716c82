"""Cross-field rules of a site. Each finds every violation and names its config path and the fix."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from urllib.parse import urlsplit

from infra.model import sizing
from infra.model.catalogue import ResolvedCatalogue, resolve
from infra.model.site import Engine, Site
from infra.model.sizing import deployment, model_arch


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a stack file."""

    path: str
    message: str
    fix: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}. Fix: {self.fix}"

    def as_dict(self) -> dict[str, str]:
        """JSON-ready form."""
        return {"path": self.path, "message": self.message, "fix": self.fix}


Rule = Callable[[Site, ResolvedCatalogue], Iterator[Problem]]
RULES: list[Rule] = []


def rule(fn: Rule) -> Rule:
    """Register a cross-field rule."""
    RULES.append(fn)
    return fn


def check(site: Site) -> list[Problem]:
    """Run every rule; return all problems, in rule order."""
    cat = resolve(site.catalogue)
    return [p for r in RULES for p in r(site, cat)]


def _duplicates(items: Iterator[tuple[str, object]], what: str, fix: str) -> Iterator[Problem]:
    seen: dict[object, str] = {}
    for path, value in items:
        if value in seen:
            yield Problem(path, f"{what} {value} is already used at {seen[value]}", fix)
        else:
            seen[value] = path


@rule
def unique_names(site: Site, cat: ResolvedCatalogue) -> Iterator[Problem]:
    """Hostnames, segment, mirror and service names are unique."""
    yield from _duplicates(
        ((f"segments[{i}].name", s.name) for i, s in enumerate(site.segments)),
        "segment name",
        "give each segment its own name",
    )
    hosts = [(f"nodes[{i}].hostname", n.hostname) for i, n in enumerate(site.nodes)]
    hosts += [(f"mirrors[{i}].name", m.name) for i, m in enumerate(site.mirrors)]
    yield from _duplicates(iter(hosts), "hostname", "give each node and mirror its own hostname")
    yield from _duplicates(
        ((f"services[{i}].name", s.name) for i, s in enumerate(site.services)),
        "service name",
        "give each inference service its own name",
    )


@rule
def unique_addresses(site: Site, cat: ResolvedCatalogue) -> Iterator[Problem]:
    """Addresses, MACs and VLAN ids are unique."""
    addrs = [(f"nodes[{i}].address", n.address) for i, n in enumerate(site.nodes)]
    addrs += [(f"mirrors[{i}].address", m.address) for i, m in enumerate(site.mirrors)]
    yield from _duplicates(iter(addrs), "address", "give each host its own address")
    macs = ((f"nodes[{i}].macs[{j}]", mac) for i, n in enumerate(site.nodes) for j, mac in enumerate(n.macs))
    yield from _duplicates(macs, "MAC", "check the MAC against the node's NIC labels; MACs are unique")
    vlans = ((f"segments[{i}].vlan", s.vlan) for i, s in enumerate(site.segments) if s.vlan is not None)
    yield from _duplicates(vlans, "VLAN id", "give each segment its own VLAN id")


@rule
def networks(site: Site, cat: ResolvedCatalogue) -> Iterator[Problem]:
    """CIDRs do not overlap; gateways, mirrors and nodes sit inside their segment."""
    segs = site.segments
    for i, a in enumerate(segs):
        for j in range(i):
            if a.cidr.overlaps(segs[j].cidr):
                yield Problem(
                    f"segments[{i}].cidr",
                    f"{a.cidr} overlaps segments[{j}].cidr {segs[j].cidr}",
                    "give each segment a distinct, non-overlapping network",
                )
        if a.gateway is not None and a.gateway not in a.cidr:
            yield Problem(
                f"segments[{i}].gateway", f"gateway {a.gateway} is outside {a.cidr}", f"use an address inside {a.cidr}"
            )
    by_name = {s.name: s for s in segs}
    hosts: list[tuple[str, str, IPv4Address]] = [
        (f"nodes[{i}]", n.segment, n.address) for i, n in enumerate(site.nodes)
    ] + [(f"mirrors[{i}]", m.segment, m.address) for i, m in enumerate(site.mirrors)]
    names = ", ".join(sorted(by_name))
    for path, seg_name, addr in hosts:
        seg = by_name.get(seg_name)
        if seg is None:
            yield Problem(f"{path}.segment", f"unknown segment {seg_name!r}", f"use one of: {names}")
        elif addr not in seg.cidr:
            yield Problem(
                f"{path}.address",
                f"{addr} is outside segment {seg.name!r} ({seg.cidr})",
                f"use an address inside {seg.cidr} or move the host to the right segment",
            )
        elif addr in (seg.cidr.network_address, seg.cidr.broadcast_address) or addr == seg.gateway:
            yield Problem(
                f"{path}.address",
                f"{addr} is the network, broadcast or gateway address of {seg.cidr}",
                "use a host address",
            )


@rule
def references(site: Site, cat: ResolvedCatalogue) -> Iterator[Problem]:
    """Profiles, mirrors, GPUs and service targets that are named exist."""
    profiles = ", ".join(sorted(site.profiles))
    if site.default_profile not in site.profiles:
        yield Problem("default_profile", f"unknown profile {site.default_profile!r}", f"use one of: {profiles}")
    mirrors = {m.name for m in site.mirrors}
    for i, s in enumerate(site.segments):
        if s.mirror is not None and s.mirror not in mirrors:
            yield Problem(
                f"segments[{i}].mirror",
                f"unknown mirror {s.mirror!r}",
                f"declare it under mirrors or use one of: {', '.join(sorted(mirrors)) or '(none)'}",
            )
    gpus = ", ".join(sorted(cat.gpus))
    for i, n in enumerate(site.nodes):
        if n.profile is not None and n.profile not in site.profiles:
            yield Problem(f"nodes[{i}].profile", f"unknown profile {n.profile!r}", f"use one of: {profiles}")
        if n.gpu.model not in cat.gpus:
            yield Problem(
                f"nodes[{i}].gpu.model",
                f"unknown GPU model {n.gpu.model!r}",
                f"use one of: {gpus}, or add it under catalogue.gpus",
            )
        elif n.gpu.nvswitch and not cat.gpus[n.gpu.model].nvswitch_capable:
            yield Problem(
                f"nodes[{i}].gpu.nvswitch", f"{n.gpu.model} is not sold in NVSwitch systems", "set nvswitch: false"
            )
    hostnames = {n.hostname: n for n in site.nodes}
    for i, svc in enumerate(site.services):
        for j, host in enumerate(svc.nodes):
            node = hostnames.get(host)
            if node is None:
                yield Problem(f"services[{i}].nodes[{j}]", f"unknown node {host!r}", "name a node declared under nodes")
            elif "inference" not in node.roles:
                yield Problem(
                    f"services[{i}].nodes[{j}]",
                    f"node {host!r} does not have the inference role",
                    f"add 'inference' to the roles of {host}",
                )


@rule
def ports(site: Site, cat: ResolvedCatalogue) -> Iterator[Problem]:
    """Two services on one node do not share a port."""
    used: dict[tuple[str, int], str] = {}
    for i, svc in enumerate(site.services):
        for host in svc.nodes:
            key = (host, svc.port)
            if key in used:
                yield Problem(
                    f"services[{i}].port",
                    f"port {svc.port} on {host} is already used by {used[key]}",
                    "give the service another port",
                )
            else:
                used[key] = svc.name


def _host_of(url: str) -> str | None:
    """Host of a URL or of an image reference (`registry:5000/repo@sha256:…`)."""
    if "://" in url:
        return urlsplit(url).hostname
    first = url.split("/", 1)[0]
    return first.rsplit(":", 1)[0] if ("." in first or ":" in first) and "/" in url else None


@rule
def airgap(site: Site, cat: ResolvedCatalogue) -> Iterator[Problem]:
    """Air-gapped segments have a mirror on the segment and nothing else to fetch from."""
    mirrors = {m.name: m for m in site.mirrors}
    by_seg = {s.name: s for s in site.segments}
    allowed: dict[str, set[str]] = {}
    for i, s in enumerate(site.segments):
        if not s.airgapped:
            continue
        mirror = mirrors.get(s.mirror) if s.mirror else None
        if s.mirror is None:
            yield Problem(
                f"segments[{i}].mirror",
                "air-gapped segment has no mirror",
                "declare a mirror on this segment and name it here",
            )
            continue
        if mirror is None:
            continue  # reported by `references`
        if mirror.segment != s.name:
            yield Problem(
                f"segments[{i}].mirror",
                f"mirror {mirror.name!r} is on segment {mirror.segment!r}",
                "put the air-gapped segment's mirror on the segment itself",
            )
        if s.sources:
            yield Problem(
                f"segments[{i}].sources",
                "air-gapped segment lists upstream sources",
                "remove them: air-gapped nodes install only from their mirror",
            )
        mirror_net = IPv4Network(f"{mirror.address}/32")
        for j, net in enumerate(s.egress_allow):
            if net != mirror_net:
                yield Problem(
                    f"segments[{i}].egress_allow[{j}]",
                    f"{net} is outside the mirror; an air-gapped segment may reach only {mirror_net}",
                    "remove it (egress of air-gapped segments is the mirror only)",
                )
        allowed[s.name] = {str(mirror.address), mirror.name}
    for i, n in enumerate(site.nodes):
        ok = allowed.get(n.segment)
        if ok is None:
            continue
        for j, url in enumerate(n.extra_sources):
            if _host_of(url) not in ok:
                yield Problem(
                    f"nodes[{i}].extra_sources[{j}]",
                    f"{url} is outside mirror {by_seg[n.segment].mirror!r}",
                    "serve it from the segment's mirror (gpufleet bundle) and point there",
                )
    nodes = {n.hostname: n for n in site.nodes}
    for i, svc in enumerate(site.services):
        segs = {nodes[h].segment for h in svc.nodes if h in nodes}
        for seg in sorted(segs & allowed.keys()):
            ok = allowed[seg]
            refs: tuple[tuple[str, str | None], ...] = (
                ("model.source", svc.model.source),
                ("image", svc.image),
                ("wheel", svc.wheel),
            )
            for field, ref in refs:
                if ref is not None and _host_of(ref) not in ok:
                    yield Problem(
                        f"services[{i}].{field}",
                        f"{ref} is outside mirror {by_seg[seg].mirror!r} of air-gapped segment {seg!r}",
                        "import it into the mirror with `gpufleet bundle` and refer to the mirror",
                    )


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("-")[0].split(":")[-1].split("."))


@rule
def versions(site: Site, cat: ResolvedCatalogue) -> Iterator[Problem]:
    """Driver branch ↔ version ↔ CUDA ↔ fabric manager ↔ DCGM are consistent and pinned."""
    nvswitch_profiles: dict[str, str] = {}
    for i, n in enumerate(site.nodes):
        if n.gpu.nvswitch:
            nvswitch_profiles.setdefault(n.profile or site.default_profile, f"nodes[{i}]")
    for name, p in site.profiles.items():
        path = f"profiles.{name}"
        if not p.driver.version.startswith(p.driver.branch + "."):
            yield Problem(
                f"{path}.driver.version",
                f"{p.driver.version} is not on branch {p.driver.branch}",
                f"set driver.branch to {p.driver.version.split('.')[0]} or pick a {p.driver.branch}.x version",
            )
        cuda_minor = ".".join(p.cuda.version.split(".")[:2])
        need = cat.cuda_min_driver.get(cuda_minor)
        if need is None:
            yield Problem(
                f"{path}.cuda.version",
                f"CUDA {p.cuda.version} is not in the compatibility table",
                f"use one of: {', '.join(cat.cuda_min_driver)}",
            )
        elif _version_tuple(p.driver.version) < _version_tuple(need):
            yield Problem(
                f"{path}.cuda.version",
                f"CUDA {p.cuda.version} needs driver ≥ {need}, profile pins {p.driver.version}",
                f"raise driver.version to ≥ {need} or use an older CUDA",
            )
        fm = p.fabric_manager
        if name in nvswitch_profiles and not fm.enabled:
            yield Problem(
                f"{path}.fabric_manager.enabled",
                f"{nvswitch_profiles[name]} has NVSwitch but this profile has no fabric manager",
                f"set fabric_manager: {{enabled: true, version: {p.driver.version}}}",
            )
        if fm.enabled and fm.version is None:
            yield Problem(
                f"{path}.fabric_manager.version",
                "fabric manager is enabled but not pinned",
                f"set it to the driver version {p.driver.version}",
            )
        elif fm.enabled and fm.version != p.driver.version:
            yield Problem(
                f"{path}.fabric_manager.version",
                f"fabric manager {fm.version} differs from driver {p.driver.version}",
                f"fabric manager must be exactly the driver version: set {p.driver.version}",
            )
        if p.dcgm.enabled and p.dcgm.version is None:
            yield Problem(
                f"{path}.dcgm.version",
                "DCGM is enabled but not pinned",
                "set an exact DCGM package version, e.g. '1:4.2.3-1'",
            )


@rule
def services(site: Site, cat: ResolvedCatalogue) -> Iterator[Problem]:
    """Images by digest where needed; TP divides the heads; the model fits in GPU memory."""
    nodes = {n.hostname: n for n in site.nodes}
    for i, svc in enumerate(site.services):
        path = f"services[{i}]"
        if svc.image is None and svc.engine is not Engine.LLAMACPP:
            yield Problem(
                f"{path}.image",
                f"{svc.engine.value} runs as a container and needs an image",
                "set image: registry/repo@sha256:<digest>",
            )
        if svc.engine is Engine.LLAMACPP and svc.image is None and svc.wheel is None:
            yield Problem(
                f"{path}.wheel",
                "native llamacpp needs the llama-cpp-python wheel URL",
                "set wheel: to the wheel on the mirror, or set an image",
            )
        arch = model_arch(svc, cat)
        if arch is None:
            yield Problem(
                f"{path}.model",
                f"model {svc.model.name!r} is not in the catalogue and its architecture is incomplete",
                "set parameters, layers, heads, kv_heads, head_dim and vocab, or add it under catalogue.models",
            )
            continue
        if svc.engine is Engine.LLAMACPP:
            continue  # llama.cpp on CPU/GPU offload: no vLLM budget rule applies
        for msg in sizing.tp_errors(arch, svc.tensor_parallel, svc.pipeline_parallel):
            yield Problem(f"{path}.tensor_parallel", msg, "pick a size that divides the model's attention and KV heads")
        seen_models: set[str] = set()
        for host in svc.nodes:
            node = nodes.get(host)
            if node is None or node.gpu.model not in cat.gpus or node.gpu.model in seen_models:
                continue
            seen_models.add(node.gpu.model)
            if svc.tensor_parallel * svc.pipeline_parallel > node.gpu.count:
                yield Problem(
                    f"{path}.tensor_parallel",
                    f"tensor_parallel × pipeline_parallel = {svc.tensor_parallel * svc.pipeline_parallel} "
                    f"exceeds the {node.gpu.count} GPUs of {host}",
                    f"use at most {node.gpu.count} GPUs or target nodes with more",
                )
                continue
            result = sizing.plan(arch, deployment(svc, node, cat))
            if not result.fits and not result.errors:
                yield Problem(
                    f"{path}.model",
                    f"{svc.model.name} on {host} ({node.gpu.count}× {node.gpu.model}) " + result.verdict(),
                    "apply one of the changes above",
                )


@rule
def observability(site: Site, cat: ResolvedCatalogue) -> Iterator[Problem]:
    """Each monitored segment has one Prometheus on a host of that segment; the site view federates them."""
    obs = site.observability
    if not obs.prometheus:
        if obs.site_view is not None:
            yield Problem(
                "observability.site_view",
                "names a site view but no Prometheus is declared",
                "declare observability.prometheus",
            )
        return
    segments = {s.name: s for s in site.segments}
    hosts = {n.hostname: n.segment for n in site.nodes} | {m.name: m.segment for m in site.mirrors}
    seen: dict[str, int] = {}
    for i, p in enumerate(obs.prometheus):
        path = f"observability.prometheus[{i}]"
        if p.segment not in segments:
            yield Problem(
                f"{path}.segment", f"unknown segment {p.segment!r}", f"use one of: {', '.join(sorted(segments))}"
            )
            continue
        if p.segment in seen:
            yield Problem(
                f"{path}.segment",
                f"segment {p.segment!r} already has a Prometheus at observability.prometheus[{seen[p.segment]}]",
                "declare one Prometheus per segment",
            )
        seen.setdefault(p.segment, i)
        where = hosts.get(p.host)
        if where is None:
            yield Problem(f"{path}.host", f"unknown host {p.host!r}", "name a node or mirror of the segment")
        elif where != p.segment:
            yield Problem(
                f"{path}.host",
                f"{p.host} is on segment {where!r}, not {p.segment!r}",
                "run each segment's Prometheus on a host of that segment (air-gapped: its mirror)",
            )
    for seg in sorted(({n.segment for n in site.nodes} & segments.keys()) - seen.keys()):
        yield Problem(
            "observability.prometheus",
            f"segment {seg!r} has nodes but no Prometheus",
            f"add {{segment: {seg}, host: <a node or mirror of {seg}>}}",
        )
    if obs.site_view is None:
        yield Problem(
            "observability.site_view", "missing", "name the connected segment whose Prometheus federates the others"
        )
    elif obs.site_view not in seen:
        yield Problem(
            "observability.site_view",
            f"segment {obs.site_view!r} has no Prometheus",
            f"use one of: {', '.join(sorted(seen))}",
        )
    elif segments[obs.site_view].airgapped and len(seen) > 1:
        yield Problem(
            "observability.site_view",
            f"{obs.site_view!r} is air-gapped: metrics federate out of an air gap, never into it",
            "make a connected segment the site view",
        )


@rule
def provisioning(site: Site, cat: ResolvedCatalogue) -> Iterator[Problem]:
    """Each provisioning host exists on its segment (an air gap is provisioned from inside); its port is free.

    PXE MACs (the first of each node) are unique through `unique_addresses`, which covers every MAC.
    """
    segments = {s.name: s for s in site.segments}
    hosts = {n.hostname: (n.segment, n.address) for n in site.nodes}
    hosts |= {m.name: (m.segment, m.address) for m in site.mirrors}
    used = {addr: name for name, (_, addr) in hosts.items()}
    ports_on: dict[str, dict[int, str]] = {}
    for m in site.mirrors:
        ports_on[m.name] = {m.http_port: "the mirror's HTTP server", m.registry_port: "the mirror's registry"}
    for svc in site.services:
        for host in svc.nodes:
            ports_on.setdefault(host, {})[svc.port] = f"service {svc.name}"
    for i, s in enumerate(site.segments):
        prov = s.provisioning
        if prov is None:
            continue
        path = f"segments[{i}].provisioning"
        where = hosts.get(prov.host)
        if where is not None:
            seg_name, _ = where
            if prov.address is not None:
                yield Problem(
                    f"{path}.address",
                    f"{prov.host} is a node or mirror; its address comes from its own entry",
                    "remove `address` (it is only for a dedicated provisioning host)",
                )
            if seg_name != s.name:
                fix = (
                    "an air-gapped segment is provisioned from a host on the segment itself (usually its mirror)"
                    if s.airgapped
                    else "name a node or mirror of this segment, or a dedicated host with its address here"
                )
                yield Problem(f"{path}.host", f"{prov.host} is on segment {seg_name!r}, not {s.name!r}", fix)
        elif prov.address is None:
            yield Problem(
                f"{path}.host",
                f"{prov.host!r} is neither a node nor a mirror, and no address is given for it",
                f"name a node or mirror of {s.name!r}, or set `address` of the dedicated host (inside {s.cidr})",
            )
        elif prov.address not in s.cidr:
            yield Problem(
                f"{path}.address",
                f"{prov.address} is outside segment {s.name!r} ({s.cidr})",
                "the provisioning host answers DHCP broadcasts, so it sits on the segment: use an address in it",
            )
        elif prov.address in (s.cidr.network_address, s.cidr.broadcast_address) or prov.address == s.gateway:
            yield Problem(
                f"{path}.address",
                f"{prov.address} is the network, broadcast or gateway address of {s.cidr}",
                "use a host address",
            )
        elif prov.address in used:
            yield Problem(
                f"{path}.address",
                f"{prov.address} is already used by {used[prov.address]}",
                "give the dedicated provisioning host its own address",
            )
        taken = ports_on.get(prov.host, {})
        if prov.http_port in taken:
            yield Problem(
                f"{path}.http_port",
                f"port {prov.http_port} on {prov.host} is already used by {taken[prov.http_port]}",
                "pick another port for the provisioning HTTP server",
            )
    for i, n in enumerate(site.nodes):
        seg = segments.get(n.segment)
        if n.image is not None and (seg is None or seg.provisioning is None):
            yield Problem(
                f"nodes[{i}].image",
                f"names an OS image but segment {n.segment!r} has no provisioning service",
                f"declare segments[].provisioning for {n.segment!r} or remove `image`",
            )
