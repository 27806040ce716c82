"""Cross-field rules of a site. Each finds every violation and names its config path and the fix.

A rule that concerns nodes looks at every node (never one node per GPU model or profile), and a
problem may carry machine-applicable suggestions: each is a set of edits that, applied to the stack
file, removes the problem without adding another. Rules build them only from values they have
re-checked, so a suggestion never asks for more GPUs than a node has or edits a profile other nodes share.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from ipaddress import IPv4Address, IPv4Network
from typing import Any
from urllib.parse import urlsplit

from infra.model import sizing
from infra.model.catalogue import ResolvedCatalogue, resolve
from infra.model.ports import DCGM_EXPORTER_PORT, NODE_EXPORTER_PORT, SSH_PORT
from infra.model.site import (
    IB_MTUS,
    ContainerEngine,
    DType,
    Engine,
    FabricType,
    InferenceService,
    KvCacheDType,
    Node,
    NodeRole,
    Segment,
    Site,
    SoftwareProfile,
    parse_hf_source,
)
from infra.model.sizing import deployment, model_arch


@dataclass(frozen=True)
class Edit:
    """Set the value at a config path of the `gpufleet:site` object (a missing mapping key is created)."""

    path: str
    value: Any

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"path": self.path, "value": self.value}


@dataclass(frozen=True)
class Suggestion:
    """One way to fix a problem: edits applied together (alternatives are separate suggestions)."""

    change: str
    edits: tuple[Edit, ...]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"change": self.change, "edits": [e.as_dict() for e in self.edits]}


def suggest(change: str, *edits: tuple[str, Any]) -> Suggestion:
    """A suggestion from `(path, value)` pairs."""
    return Suggestion(change, tuple(Edit(p, v) for p, v in edits))


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a stack file."""

    path: str
    message: str
    fix: str
    suggestions: tuple[Suggestion, ...] = ()

    def __str__(self) -> str:
        return f"{self.path}: {self.message}. Fix: {self.fix}"

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (`suggestions` only when there are machine-applicable ones)."""
        out: dict[str, Any] = {"path": self.path, "message": self.message, "fix": self.fix}
        if self.suggestions:
            out["suggestions"] = [s.as_dict() for s in self.suggestions]
        return out


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
    """One problem per repeated value, naming both config paths."""
    seen: dict[object, str] = {}
    for path, value in items:
        if value in seen:
            yield Problem(path, f"{what} {value} is already used at {seen[value]}", fix)
        else:
            seen[value] = path


def _some(names: Sequence[str], at_most: int = 3) -> str:
    """`a, b, c and 4 more`: a list in a message stays one line even for a 1,000-node service."""
    shown = ", ".join(names[:at_most])
    return shown if len(names) <= at_most else f"{shown} and {len(names) - at_most} more"


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


def _url_host(url: str) -> str | None:
    """Lower-case host of a URL, None when it has none."""
    host = urlsplit(url).hostname
    return host.rstrip(".") if host else None


@rule
def unique_addresses(site: Site, cat: ResolvedCatalogue) -> Iterator[Problem]:
    """Addresses, MACs and VLAN ids are unique; a BMC endpoint is not a host's own address."""
    addrs = [(f"nodes[{i}].address", n.address) for i, n in enumerate(site.nodes)]
    addrs += [(f"mirrors[{i}].address", m.address) for i, m in enumerate(site.mirrors)]
    yield from _duplicates(iter(addrs), "address", "give each host its own address")
    macs = ((f"nodes[{i}].macs[{j}]", mac) for i, n in enumerate(site.nodes) for j, mac in enumerate(n.macs))
    yield from _duplicates(macs, "MAC", "check the MAC against the node's NIC labels; MACs are unique")
    used_vlans = {s.vlan for s in site.segments if s.vlan is not None}
    seen_vlans: dict[int, str] = {}
    for i, s in enumerate(site.segments):
        if s.vlan is None:
            continue
        if s.vlan not in seen_vlans:
            seen_vlans[s.vlan] = f"segments[{i}].vlan"
            continue
        free = next((v for v in [*range(s.vlan + 1, 4095), *range(1, s.vlan)] if v not in used_vlans), None)
        yield Problem(
            f"segments[{i}].vlan",
            f"VLAN id {s.vlan} is already used at {seen_vlans[s.vlan]}",
            "give each segment its own VLAN id (the one its switch ports are tagged with)",
            (suggest(f"vlan {free}", (f"segments[{i}].vlan", free)),) if free is not None else (),
        )
        if free is not None:
            used_vlans.add(free)
    # A BMC endpoint that is a node's or mirror's own address drives no BMC: power actions would fail
    # or, worse, reach another machine's management plane once that address is reassigned.
    host_paths = {str(addr): path for path, addr in addrs}
    for i, n in enumerate(site.nodes):
        if n.bmc is None:
            continue
        host = _url_host(n.bmc.endpoint)
        if host is not None and host in host_paths:
            yield Problem(
                f"nodes[{i}].bmc.endpoint",
                f"BMC host {host} is the operating-system address at {host_paths[host]}, not a BMC",
                "use the address of this node's BMC (its out-of-band management interface)",
            )


_DEFAULT_PORTS = {"https": 443, "http": 80, "ipmi": 623}


def _bmc_key(endpoint: str) -> tuple[str, int | None]:
    """Which BMC an endpoint reaches: host and explicit port (the scheme's default port counts as none)."""
    parts = urlsplit(endpoint)
    try:
        port = parts.port
    except ValueError:  # the field grammar reports a bad port; here it is just another key
        port = None
    if port == _DEFAULT_PORTS.get(parts.scheme.lower()):
        port = None
    return ((parts.hostname or endpoint).lower().rstrip("."), port)


@dataclass
class _BmcSeen:
    """Nodes met so far on one BMC: the first, those by system id, the first without one."""

    first: tuple[int, Node]
    ids: dict[str, tuple[int, Node]]
    anonymous: tuple[int, Node] | None


@rule
def unique_bmc_systems(site: Site, cat: ResolvedCatalogue) -> Iterator[Problem]:
    """No two nodes drive the same BMC system (one BMC with distinct system ids is fine, as in the lab)."""

    def shared(k: int, j: int, other: Node, i: int, n: Node) -> Problem:
        return Problem(
            f"nodes[{k}].bmc.system_id",
            f"BMC {n.bmc.endpoint if n.bmc else ''} serves nodes[{j}] ({other.hostname}) and nodes[{i}] "
            f"({n.hostname}), but nodes[{k}] names no system id, so its power actions would go to whichever "
            "system the BMC lists first",
            "set bmc.system_id of every node sharing a BMC, or give the node its own BMC endpoint",
        )

    by_bmc: dict[tuple[str, int | None], _BmcSeen] = {}
    reported: set[int] = set()
    for i, n in enumerate(site.nodes):
        if n.bmc is None:
            continue
        sid = n.bmc.system_id
        seen = by_bmc.get(key := _bmc_key(n.bmc.endpoint))
        if seen is None:
            by_bmc[key] = _BmcSeen((i, n), {} if sid is None else {sid: (i, n)}, (i, n) if sid is None else None)
            continue
        if sid is not None and sid in seen.ids:
            j, other = seen.ids[sid]
            yield Problem(
                f"nodes[{i}].bmc.system_id",
                f"BMC system {sid!r} at {n.bmc.endpoint} is already driven by nodes[{j}] "
                f"({other.hostname}); a power or boot action on {n.hostname} would hit {other.hostname}",
                "set the system id of this node's own server on that BMC (see its /redfish/v1/Systems)",
            )
        elif sid is None:
            reported.add(i)
            yield shared(i, *seen.first, i, n)
        elif seen.anonymous is not None and seen.anonymous[0] not in reported:
            reported.add(seen.anonymous[0])
            yield shared(seen.anonymous[0], *seen.anonymous, i, n)
        if sid is not None:
            seen.ids.setdefault(sid, (i, n))
        elif seen.anonymous is None:
            seen.anonymous = (i, n)


@rule
def networks(site: Site, cat: ResolvedCatalogue) -> Iterator[Problem]:
    """CIDRs do not overlap; gateways, mirrors and nodes sit inside their segment; probes outside it."""
    segs = site.segments
    mirrors = site.mirrors_by_name
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
        probe = a.egress_probe
        mirror = mirrors.get(a.mirror) if a.mirror else None
        if probe is not None and (probe in a.cidr or (mirror is not None and probe == mirror.address)):
            yield Problem(
                f"segments[{i}].egress_probe",
                f"{probe} is reachable by design (inside {a.cidr} or the segment's mirror), "
                "so the egress check would always report a leak",
                "use an address outside the segment that its firewall must block (e.g. an upstream gateway)",
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


def profile_of(site: Site, node: Node) -> str:
    """Name of the software profile a node uses."""
    return node.profile or site.default_profile


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
                f"nodes[{i}].gpu.nvswitch",
                f"{n.gpu.model} is not sold in NVSwitch systems",
                "set nvswitch: false",
                (suggest("nvswitch: false", (f"nodes[{i}].gpu.nvswitch", False)),),
            )
    hostnames = site.nodes_by_name
    for i, svc in enumerate(site.services):
        listed: dict[str, int] = {}
        for j, host in enumerate(svc.nodes):
            node = hostnames.get(host)
            if host in listed:
                once = list(dict.fromkeys(svc.nodes))
                yield Problem(
                    f"services[{i}].nodes[{j}]",
                    f"node {host!r} is already listed at services[{i}].nodes[{listed[host]}]",
                    "list each node once",
                    (suggest("list each node once", (f"services[{i}].nodes", once)),),
                )
                continue
            listed[host] = j
            if node is None:
                yield Problem(f"services[{i}].nodes[{j}]", f"unknown node {host!r}", "name a node declared under nodes")
            elif NodeRole.INFERENCE not in node.roles:
                yield Problem(
                    f"services[{i}].nodes[{j}]",
                    f"node {host!r} does not have the inference role",
                    f"add 'inference' to the roles of {host}",
                )


def node_ports(node: Node, profile: SoftwareProfile | None) -> dict[int, str]:
    """Ports gpufleet itself uses on a node, with what uses each (services must keep off them)."""
    used = {SSH_PORT: "ssh, how gpufleet reaches the node"}
    if profile is not None and NodeRole.MONITORING in node.roles:
        if profile.monitoring.node_exporter_version:
            used[NODE_EXPORTER_PORT] = "the node exporter (monitoring role)"
        if profile.monitoring.dcgm_exporter_image:
            used[DCGM_EXPORTER_PORT] = "the DCGM exporter (monitoring role)"
    return used


@rule
def ports(site: Site, cat: ResolvedCatalogue) -> Iterator[Problem]:
    """A port on a node has one user: a service, or gpufleet itself (ssh, exporters); mirrors likewise."""
    nodes = site.nodes_by_name
    own = {h: node_ports(n, site.profiles.get(profile_of(site, n))) for h, n in nodes.items()}
    by_service: dict[tuple[str, int], list[str]] = {}
    for i, svc in enumerate(site.services):
        for host in dict.fromkeys(svc.nodes):
            by_service.setdefault((host, svc.port), []).append(f"services[{i}] ({svc.name})")
    first: dict[tuple[str, int], str] = {}
    for i, svc in enumerate(site.services):
        me = f"services[{i}] ({svc.name})"
        clashes: list[tuple[str, str]] = []
        for host in dict.fromkeys(svc.nodes):
            if host not in nodes:
                continue
            key = (host, svc.port)
            if svc.port in own[host]:
                clashes.append((host, own[host][svc.port]))
            elif first.setdefault(key, me) != me:
                clashes.append((host, first[key]))
        if not clashes:
            continue
        # A free port: not gpufleet's and not any other service's on any of this service's nodes.
        taken = {p for h in set(svc.nodes) if h in nodes for p in own[h]}
        mine = set(svc.nodes)
        taken |= {p for (h, p), users in by_service.items() if h in mine and users != [me]}
        free = next((p for p in range(8000, 65536) if p not in taken and p != svc.port), None)
        host, user = clashes[0]
        more = f" (and on {len(clashes) - 1} more of its nodes)" if len(clashes) > 1 else ""
        yield Problem(
            f"services[{i}].port",
            f"port {svc.port} on {host} is already used by {user}{more}",
            f"give the service another port{f', e.g. {free}' if free else ''}",
            (suggest(f"port {free}", (f"services[{i}].port", free)),) if free is not None else (),
        )
    for i, m in enumerate(site.mirrors):
        if m.registry_port == m.http_port:
            other = 5000 if m.http_port != 5000 else 5001
            yield Problem(
                f"mirrors[{i}].registry_port",
                f"port {m.registry_port} is also mirrors[{i}].http_port",
                "serve the registry and the apt/file store on different ports (the registry's default is 5000)",
                (suggest(f"registry_port {other}", (f"mirrors[{i}].registry_port", other)),),
            )
        for field, port in (("http_port", m.http_port), ("registry_port", m.registry_port)):
            if port == SSH_PORT:
                yield Problem(
                    f"mirrors[{i}].{field}",
                    f"port {port} is ssh, how gpufleet reaches the mirror",
                    "use the service's usual port (80 for http_port, 5000 for registry_port)",
                )


def _host_of(url: str) -> str | None:
    """Host of a URL or of an image reference (`registry:5000/repo@sha256:…`)."""
    if "://" in url:
        return urlsplit(url).hostname
    first = url.split("/", 1)[0]
    return first.rsplit(":", 1)[0] if ("." in first or ":" in first) and "/" in url else None


@rule
def airgap(site: Site, cat: ResolvedCatalogue) -> Iterator[Problem]:
    """Air-gapped segments have a mirror on the segment and nothing else to fetch from."""
    mirrors = site.mirrors_by_name
    by_seg = site.segments_by_name
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
                (suggest("remove the upstream sources", (f"segments[{i}].sources", [])),),
            )
        mirror_net = IPv4Network(f"{mirror.address}/32")
        # Removing every entry beyond the mirror at once keeps the other entries' indexes (paths) stable.
        kept = [str(net) for net in s.egress_allow if net == mirror_net]
        for j, net in enumerate(s.egress_allow):
            if net != mirror_net:
                yield Problem(
                    f"segments[{i}].egress_allow[{j}]",
                    f"{net} is outside the mirror; an air-gapped segment may reach only {mirror_net}",
                    "remove it (egress of air-gapped segments is the mirror only)",
                    (suggest(f"egress_allow: {kept}", (f"segments[{i}].egress_allow", kept)),),
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
    nodes = site.nodes_by_name
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
                # An hf:// model is locked and bundled on the connected side and served by the mirror.
                if ref is not None and not ref.startswith("hf://") and _host_of(ref) not in ok:
                    yield Problem(
                        f"services[{i}].{field}",
                        f"{ref} is outside mirror {by_seg[seg].mirror!r} of air-gapped segment {seg!r}",
                        "import it into the mirror with `gpufleet bundle` and refer to the mirror",
                    )


def _version_tuple(v: str) -> tuple[int, ...]:
    """Numeric release parts of an exact version (`1:570.133.20-1`, `4.3.1+ds1`, `570.133~rc1` → leading digits)."""
    release = re.split(r"[-~+]", v.split(":")[-1], maxsplit=1)[0]
    return tuple(int(m.group()) for part in release.split(".") if (m := re.match(r"[0-9]+", part)))


def _profile_problems(name: str, p: SoftwareProfile, cat: ResolvedCatalogue) -> Iterator[Problem]:
    """What is wrong within one profile, whichever nodes use it."""
    path = f"profiles.{name}"
    if not p.driver.version.startswith(p.driver.branch + "."):
        branch = p.driver.version.split(".")[0]
        yield Problem(
            f"{path}.driver.version",
            f"{p.driver.version} is not on branch {p.driver.branch}",
            f"set driver.branch to {branch} or pick a {p.driver.branch}.x version",
            (suggest(f"driver.branch {branch}", (f"{path}.driver.branch", branch)),) if len(branch) == 3 else (),
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
    pin = (suggest(f"fabric_manager.version {p.driver.version}", (f"{path}.fabric_manager.version", p.driver.version)),)
    if fm.enabled and fm.version is None:
        yield Problem(
            f"{path}.fabric_manager.version",
            "fabric manager is enabled but not pinned",
            f"set it to the driver version {p.driver.version}",
            pin,
        )
    elif fm.enabled and fm.version != p.driver.version:
        yield Problem(
            f"{path}.fabric_manager.version",
            f"fabric manager {fm.version} differs from driver {p.driver.version}",
            f"fabric manager must be exactly the driver version: set {p.driver.version}",
            pin,
        )
    if p.dcgm.enabled and p.dcgm.version is None:
        yield Problem(
            f"{path}.dcgm.version",
            "DCGM is enabled but not pinned",
            "set an exact DCGM package version, e.g. '1:4.2.3-1'",
        )


@dataclass(frozen=True)
class _Need:
    """Something a node's hardware needs from its software profile."""

    what: str
    suffix: str
    field: str
    """Where the fix goes, under the profile."""
    at: str
    """Where the problem is reported, under the profile."""
    applies: Callable[[Node, ResolvedCatalogue], bool]
    met: Callable[[SoftwareProfile], bool]
    value: Callable[[SoftwareProfile], Any]

    def words(self, p: SoftwareProfile) -> str:
        """The setting, for a fix text."""
        return f"{self.field}: {_flow(self.value(p))}"


def _flow(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_flow(v)}" for k, v in value.items()) + "}"
    return str(value).lower() if isinstance(value, bool) else str(value)


def _meeting(p: SoftwareProfile, needs: Sequence[_Need]) -> SoftwareProfile:
    """The profile with every need met."""
    data = p.model_dump(mode="json")
    for need in needs:
        head, _, tail = need.field.partition(".")
        if tail:
            data[head][tail] = need.value(p)
        else:
            data[head] = need.value(p)
    return SoftwareProfile.model_validate(data)


_NEEDS = (
    _Need(
        "fabric manager",
        "nvswitch",
        "fabric_manager",
        "fabric_manager.enabled",
        lambda n, cat: n.gpu.nvswitch,
        lambda p: p.fabric_manager.enabled,
        lambda p: {"enabled": True, "version": p.driver.version},
    ),
    _Need(
        "open kernel modules",
        "open",
        "driver.open_modules",
        "driver.open_modules",
        lambda n, cat: n.gpu.model in cat.gpus and cat.gpus[n.gpu.model].open_modules_required,
        lambda p: p.driver.open_modules,
        lambda p: True,
    ),
)


def _why(need: _Need, n: Node) -> str:
    return "has NVSwitch" if need.suffix == "nvswitch" else f"has {n.gpu.model} GPUs (no proprietary-module support)"


def _move_suggestions(
    site: Site, name: str, p: SoftwareProfile, needs: Sequence[_Need], node_index: int, sound: bool
) -> tuple[Suggestion, ...]:
    """Move one node to a profile meeting its needs, leaving the profile it shares with others alone."""
    target = _meeting(p, needs)
    if site.nodes[node_index].fabric_ports and target.rdma is None:
        # The node is on a fabric: the profile it moves to needs an RDMA stack too. Take the site's own
        # pinned one (versions cannot be invented); without any, offer no move (the rdma rule explains).
        pinned = next((q.rdma for q in site.profiles.values() if q.rdma is not None), None)
        if pinned is None:
            return ()
        target = target.model_copy(update={"rdma": pinned})
    for other, q in site.profiles.items():
        if other != name and q == target:
            return (suggest(f"profile {other}", (f"nodes[{node_index}].profile", other)),)
    if not sound:
        return ()  # a copy of a profile with its own problems would repeat them under a new name
    stem = f"{name}-{'-'.join(n.suffix for n in needs)}"
    new = next(f"{stem}{k or ''}" for k in range(100) if f"{stem}{k or ''}" not in site.profiles)
    return (
        suggest(
            f"new profile {new} (= {name} with {' and '.join(n.what for n in needs)}) for this node",
            (f"profiles.{new}", target.model_dump(mode="json")),
            (f"nodes[{node_index}].profile", new),
        ),
    )


@rule
def versions(site: Site, cat: ResolvedCatalogue) -> Iterator[Problem]:
    """Driver, CUDA, fabric manager and DCGM are consistent and pinned, and meet every node's hardware."""
    users: dict[str, list[tuple[int, Node]]] = {}
    for i, n in enumerate(site.nodes):
        users.setdefault(profile_of(site, n), []).append((i, n))
    for name, p in site.profiles.items():
        own = list(_profile_problems(name, p, cat))
        yield from own
        mine = users.get(name, [])
        needs = {i: [d for d in _NEEDS if d.applies(n, cat) and not d.met(p)] for i, n in mine}
        for need in _NEEDS:
            short = [(i, n) for i, n in mine if need in needs[i]]
            if not short:
                continue
            if len(short) == len(mine):
                i, n = short[0]
                yield Problem(
                    f"profiles.{name}.{need.at}",
                    f"nodes[{i}] ({n.hostname}) {_why(need, n)} but this profile has no {need.what}",
                    f"set {need.words(p)}",
                    (suggest(f"set {need.words(p)}", (f"profiles.{name}.{need.field}", need.value(p))),),
                )
                continue
            # The profile is shared with nodes that do not need it: fix each node, not the shared profile.
            others = _some([n.hostname for i, n in mine if need not in needs[i]])
            for i, n in short:
                yield Problem(
                    f"nodes[{i}].profile",
                    f"{n.hostname} {_why(need, n)} but its profile {name!r} (shared with {others}) has no {need.what}",
                    f"give such nodes their own profile with {need.words(p)}",
                    _move_suggestions(site, name, p, needs[i], i, sound=not own),
                )


def max_context(svc: InferenceService, cat: ResolvedCatalogue) -> int | None:
    """Longest context engines accept for the served model: explicit field over its catalogue entry."""
    if svc.model.max_context is not None:
        return svc.model.max_context
    base = cat.models.get(svc.model.name)
    return base.max_context if base is not None else None


@lru_cache(maxsize=4096)
def _vram_plan(arch: sizing.Architecture, dep: sizing.Deployment, suggest: bool = True) -> sizing.VramPlan:
    """`sizing.plan` is pure: every node with the same GPU model and count shares one computation."""
    return sizing.plan(arch, dep, suggest=suggest)


def _hardware(
    svc: InferenceService, nodes: dict[str, tuple[int, Node]], cat: ResolvedCatalogue
) -> dict[tuple[str, int], list[tuple[int, Node]]]:
    """The service's known nodes grouped by GPU model and count (what its VRAM budget depends on)."""
    out: dict[tuple[str, int], list[tuple[int, Node]]] = {}
    for host in dict.fromkeys(svc.nodes):
        if host in nodes and nodes[host][1].gpu.model in cat.gpus:
            i, n = nodes[host]
            out.setdefault((n.gpu.model, n.gpu.count), []).append((i, n))
    return out


def gpus_per_node(svc: InferenceService) -> int:
    """GPUs the service takes on each of its nodes.

    TP × PP for a replica; TP when it spans its nodes (the pipeline stages are then the nodes).
    """
    return svc.tensor_parallel if svc.span_nodes else svc.tensor_parallel * svc.pipeline_parallel


def _passes(
    svc: InferenceService, arch: sizing.Architecture, nodes: dict[str, tuple[int, Node]], cat: ResolvedCatalogue
) -> bool:
    """Whether the service passes the model rules on every one of its nodes (what a suggestion must do)."""
    limit = max_context(svc, cat)
    if limit is not None and svc.model.context_length > limit:
        return False
    if svc.engine is Engine.LLAMACPP:
        return True
    if sizing.tp_errors(arch, svc.tensor_parallel, svc.pipeline_parallel):
        return False
    return all(
        gpus_per_node(svc) <= count and _vram_plan(arch, deployment(svc, group[0][1], cat), False).fits
        for (_, count), group in _hardware(svc, nodes, cat).items()
    )


# Fields of `sizing.Suggestion` → (config path under the service, how the site model spells the value).
_VRAM_FIELDS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "tensor_parallel": ("tensor_parallel", int),
    "kv_cache_dtype": ("kv_cache_dtype", KvCacheDType),
    "dtype": ("model.dtype", DType),
    "gpu_memory_utilization": ("gpu_memory_utilization", float),
    "context_length": ("model.context_length", int),
    "max_concurrency": ("max_concurrency", int),
}


def _with(svc: InferenceService, field: str, value: Any) -> InferenceService:
    """The service with one field (`model.x` for the model's) changed."""
    if field.startswith("model."):
        model = svc.model.model_copy(update={field.removeprefix("model."): value})
        return svc.model_copy(update={"model": model})
    return svc.model_copy(update={field: value})


def _try(
    svc: InferenceService,
    index: int,
    changes: Sequence[tuple[str, str, Any]],
    arch: sizing.Architecture,
    nodes: dict[str, tuple[int, Node]],
    cat: ResolvedCatalogue,
) -> list[Suggestion]:
    """Those of `(words, field, value)` changes after which the service passes on every node."""
    out = []
    for words, field, value in changes:
        path, spell = _VRAM_FIELDS.get(field, (field, lambda v: v))
        if _passes(_with(svc, path, spell(value)), arch, nodes, cat):
            out.append(suggest(words, (f"services[{index}].{path}", value)))
    return out


def _tensor_parallel_choices(
    svc: InferenceService,
    index: int,
    arch: sizing.Architecture,
    nodes: dict[str, tuple[int, Node]],
    cat: ResolvedCatalogue,
) -> list[Suggestion]:
    """The nearest tensor-parallel sizes (one below, one above) that pass on every node of the service."""
    below = list(range(svc.tensor_parallel - 1, 0, -1))
    above = list(range(svc.tensor_parallel + 1, 17))
    out: list[Suggestion] = []
    for candidates in (below, above):
        for t in candidates:
            found = _try(svc, index, [(f"tensor_parallel {t}", "tensor_parallel", t)], arch, nodes, cat)
            if found:
                out += found
                break
    return out


@rule
def services(site: Site, cat: ResolvedCatalogue) -> Iterator[Problem]:
    """Images where needed; context within the model's limit; TP divides the heads; the model fits every node."""
    nodes = {n.hostname: (i, n) for i, n in enumerate(site.nodes)}
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
        limit = max_context(svc, cat)
        if limit is not None and svc.model.context_length > limit:
            yield Problem(
                f"{path}.model.context_length",
                f"{svc.model.context_length} exceeds the {limit}-token maximum context of {svc.model.name} "
                "(max_position_embeddings in its config.json); engines refuse to start above it",
                f"set context_length to at most {limit}, or serve weights built for a longer context",
                tuple(
                    _try(svc, i, [(f"context_length {limit}", "context_length", limit)], arch, nodes, cat)
                    if arch is not None
                    else [suggest(f"context_length {limit}", (f"{path}.model.context_length", limit))]
                ),
            )
        if arch is None:
            yield Problem(
                f"{path}.model",
                f"model {svc.model.name!r} is not in the catalogue and its architecture is incomplete",
                "set parameters, layers, heads, kv_heads, head_dim and vocab, or add it under catalogue.models",
            )
            continue
        if svc.engine is Engine.LLAMACPP:
            continue  # llama.cpp on CPU/GPU offload: no vLLM budget rule applies
        tp_msgs = sizing.tp_errors(arch, svc.tensor_parallel, svc.pipeline_parallel)
        choices = _tensor_parallel_choices(svc, i, arch, nodes, cat) if tp_msgs else []
        for msg in tp_msgs:
            yield Problem(
                f"{path}.tensor_parallel",
                msg,
                "pick a size that divides the model's attention and KV heads",
                tuple(choices),
            )
        gpus = gpus_per_node(svc)
        hardware = _hardware(svc, nodes, cat)
        short = [(j, n) for (_, count), group in hardware.items() if count < gpus for j, n in group]
        if short and not tp_msgs:
            short.sort(key=lambda t: t[0])
            j, n = short[0]
            fixes = _tensor_parallel_choices(svc, i, arch, nodes, cat)
            fixes = [s for s in fixes if s.edits[0].value < svc.tensor_parallel]
            short_hosts = {m.hostname for _, m in short}
            rest = [h for h in dict.fromkeys(svc.nodes) if h not in short_hosts]
            if rest:
                fixes += _try(svc, i, [(f"serve only on {_some(rest)}", "nodes", rest)], arch, nodes, cat)
            yield Problem(
                f"{path}.tensor_parallel",
                ("tensor_parallel" if svc.span_nodes else "tensor_parallel × pipeline_parallel")
                + f" = {gpus} exceeds the {n.gpu.count} GPUs of {n.hostname} "
                f"(nodes[{j}].gpu.count)" + (f" and {len(short) - 1} more of its nodes" if len(short) > 1 else ""),
                f"use at most {least} GPUs or target nodes with more"
                if (least := min(m.gpu.count for _, m in short))
                else "take the nodes without GPUs out of services[].nodes or target nodes with GPUs",
                tuple(fixes),
            )
        if tp_msgs:
            continue
        for (model, count), group in hardware.items():
            if count < gpus:
                continue
            result = _vram_plan(arch, deployment(svc, group[0][1], cat))
            if result.fits or result.errors:
                continue
            ok = _try(svc, i, [(s.change, s.field, s.value) for s in result.suggestions], arch, nodes, cat)
            words = {s.change for s in ok}
            shown = replace(result, suggestions=[s for s in result.suggestions if s.change in words])
            yield Problem(
                f"{path}.model",
                f"{svc.model.name} on {_some([n.hostname for _, n in group])} ({count}× {model}) " + shown.verdict(),
                "apply one of the changes above" if ok else "use nodes with more or larger GPUs or a smaller model",
                tuple(ok),
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
    segments = site.segments_by_name
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
def engine_support(site: Site, cat: ResolvedCatalogue) -> Iterator[Problem]:
    """What each engine and runtime can really run (infra/plan/engines.py builds the invocations)."""
    nodes = site.nodes_by_name
    for i, svc in enumerate(site.services):
        path = f"services[{i}]"
        if svc.image is not None:
            for host in svc.nodes:
                node = nodes.get(host)
                profile = site.profiles.get((node.profile or site.default_profile) if node else "")
                if profile is not None and profile.container_runtime.engine is ContainerEngine.CONTAINERD:
                    name = node.profile or site.default_profile if node else ""
                    yield Problem(
                        f"{path}.nodes",
                        f"{host} runs containerd, which cannot run inference containers with GPUs here "
                        "(ctr is a debug client without CDI; nerdctl is not packaged for Debian 12)",
                        f"set profiles.{name}.container_runtime.engine: podman (or docker)",
                    )
                    break
        dtype, kv = svc.model.dtype, svc.kv_cache_dtype
        if svc.engine is Engine.VLLM and dtype is DType.INT4:
            yield Problem(
                f"{path}.model.dtype",
                "vLLM has no generic int4 quantisation",
                "serve an awq or gptq checkpoint and set dtype: awq (or gptq)",
            )
        if svc.engine is Engine.TGI:
            if svc.pipeline_parallel != 1:
                yield Problem(
                    f"{path}.pipeline_parallel", "TGI shards by tensor parallelism only", "set pipeline_parallel: 1"
                )
            if kv in (KvCacheDType.FP16, KvCacheDType.BF16) and kv.value != dtype.value:
                yield Problem(
                    f"{path}.kv_cache_dtype",
                    f"TGI keeps the KV cache in the model's dtype or fp8, not {kv.value}",
                    "set kv_cache_dtype: auto or fp8",
                )
        hub = parse_hf_source(svc.model.source)
        if svc.engine is Engine.LLAMACPP and hub is not None and hub.path is None:
            yield Problem(
                f"{path}.model.source",
                "llama.cpp serves one GGUF file; this hf:// source names a whole repository",
                f"name the file: hf://{hub.repo}@{hub.revision or svc.model.revision}/<file>.gguf",
            )
        if svc.engine is Engine.LLAMACPP and kv is not KvCacheDType.AUTO:
            yield Problem(
                f"{path}.kv_cache_dtype",
                "llama.cpp's KV cache type is not set by gpufleet",
                "set kv_cache_dtype: auto",
            )


@dataclass(frozen=True)
class _SegmentHostFixes:
    """What to tell the user about a host a segment names for a job (provisioning, execution)."""

    role: str
    other_segment: str
    unknown: str
    outside: str
    used: str


def _segment_host(
    path: str,
    host: str,
    address: IPv4Address | None,
    s: Segment,
    hosts: dict[str, tuple[str, IPv4Address]],
    fixes: _SegmentHostFixes,
) -> Iterator[Problem]:
    """A host a segment names is a node or mirror of that segment, or a dedicated host with a free address in it.

    `hosts` maps every node and mirror to (segment, address); one rule for each such job on a segment.
    """
    used = {addr: name for name, (_, addr) in hosts.items()}
    where = hosts.get(host)
    if where is not None:
        seg_name, _ = where
        if address is not None:
            yield Problem(
                f"{path}.address",
                f"{host} is a node or mirror; its address comes from its own entry",
                f"remove `address` (it is only for a dedicated {fixes.role})",
            )
        if seg_name != s.name:
            yield Problem(f"{path}.host", f"{host} is on segment {seg_name!r}, not {s.name!r}", fixes.other_segment)
    elif address is None:
        yield Problem(
            f"{path}.host", f"{host!r} is neither a node nor a mirror, and no address is given for it", fixes.unknown
        )
    elif address not in s.cidr:
        yield Problem(f"{path}.address", f"{address} is outside segment {s.name!r} ({s.cidr})", fixes.outside)
    elif address in (s.cidr.network_address, s.cidr.broadcast_address) or address == s.gateway:
        yield Problem(
            f"{path}.address",
            f"{address} is the network, broadcast or gateway address of {s.cidr}",
            "use a host address",
        )
    elif address in used:
        yield Problem(f"{path}.address", f"{address} is already used by {used[address]}", fixes.used)


@rule
def provisioning(site: Site, cat: ResolvedCatalogue) -> Iterator[Problem]:
    """Each provisioning host exists on its segment (an air gap is provisioned from inside); its port is free.

    PXE MACs (the first of each node) are unique through `unique_addresses`, which covers every MAC.
    """
    segments = site.segments_by_name
    hosts = {n.hostname: (n.segment, n.address) for n in site.nodes}
    hosts |= {m.name: (m.segment, m.address) for m in site.mirrors}
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
        yield from _segment_host(
            path,
            prov.host,
            prov.address,
            s,
            hosts,
            _SegmentHostFixes(
                role="provisioning host",
                other_segment=(
                    "an air-gapped segment is provisioned from a host on the segment itself (usually its mirror)"
                    if s.airgapped
                    else "name a node or mirror of this segment, or a dedicated host with its address here"
                ),
                unknown=f"name a node or mirror of {s.name!r}, or set `address` of the dedicated host "
                f"(inside {s.cidr})",
                outside="the provisioning host answers DHCP broadcasts, so it sits on the segment: "
                "use an address in it",
                used="give the dedicated provisioning host its own address",
            ),
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


# Engines that run one instance across several nodes: vLLM (its multi-node launcher over Ray), llama.cpp
# (its RPC backend: the head's llama-server offloads layers to `rpc-server` on the other nodes).
SPANNING_ENGINES = (Engine.VLLM, Engine.LLAMACPP)


@rule
def fabrics(site: Site, cat: ResolvedCatalogue) -> Iterator[Problem]:
    """Fabric settings fit their type; ports name a fabric, are unique, sit in its network at one speed."""
    yield from _duplicates(
        ((f"fabrics[{i}].name", f.name) for i, f in enumerate(site.fabrics)),
        "fabric name",
        "give each fabric its own name",
    )
    by_name = site.fabrics_by_name
    on_fabric: dict[str, set[str]] = {}
    for n in site.nodes:
        for port in n.fabric_ports:
            f = by_name.get(port.fabric)
            if f is not None:
                on_fabric.setdefault(f.name, set()).add(n.hostname)
    for i, f in enumerate(site.fabrics):
        path = f"fabrics[{i}]"
        ib = f.type is FabricType.INFINIBAND
        wrong = (
            [("vlan", f.vlan), ("qos", f.qos)]
            if ib
            else [("partition_key", f.partition_key), ("subnet_manager", f.subnet_manager)]
        )
        for field, value in wrong:
            if value is not None:
                yield Problem(
                    f"{path}.{field}",
                    f"`{field}` is a {'RoCE' if ib else 'InfiniBand'} setting and fabric {f.name!r} is {f.type.value}",
                    f"remove `{field}`, or set type: {'roce' if ib else 'infiniband'} if that is what is cabled",
                )
        if ib and f.mtu not in IB_MTUS:
            yield Problem(
                f"{path}.mtu",
                f"{f.mtu} is not an InfiniBand MTU",
                "use one of " + ", ".join(map(str, IB_MTUS)) + " (4096 on current HCAs)",
            )
        if not ib and f.mtu < 1280:
            yield Problem(
                f"{path}.mtu", f"Ethernet MTU {f.mtu} is too small for RoCE", "use 1500 or more (9000 is usual)"
            )
        if f.subnet_manager is not None and f.subnet_manager not in on_fabric.get(f.name, set()):
            yield Problem(
                f"{path}.subnet_manager",
                f"{f.subnet_manager!r} has no port on fabric {f.name!r}, so its opensm cannot manage it",
                "name a node with a fabric port on this fabric, or unset it when the switches run the subnet manager",
            )
        for seg_i, seg in enumerate(site.segments):
            if f.cidr.overlaps(seg.cidr):
                yield Problem(
                    f"{path}.cidr",
                    f"{f.cidr} overlaps segment {seg.name!r} ({seg.cidr}, segments[{seg_i}].cidr)",
                    "give the fabric a network of its own: RDMA traffic must not be routed over a management segment",
                )
    seen_ids: dict[tuple[str, str], str] = {}
    seen_addr: dict[object, str] = {}
    speeds: dict[str, tuple[int, str]] = {}
    mgmt_macs = {mac: f"nodes[{i}].macs[{k}]" for i, n in enumerate(site.nodes) for k, mac in enumerate(n.macs)}
    for i, n in enumerate(site.nodes):
        local: dict[tuple[str, str], str] = {}
        for j, port in enumerate(n.fabric_ports):
            path = f"nodes[{i}].fabric_ports[{j}]"
            f = by_name.get(port.fabric)
            if f is None:
                known = ", ".join(sorted(by_name)) or "none declared"
                yield Problem(
                    f"{path}.fabric",
                    f"fabric {port.fabric!r} is not declared (fabrics: {known})",
                    "declare it under `fabrics` or fix the name",
                )
                continue
            kind, ident = (
                ("pci", port.pci) if port.pci else ("mac", port.mac) if port.mac else ("netdev", port.netdev or "")
            )
            if (kind, ident) in local:
                yield Problem(
                    f"{path}.{kind}",
                    f"{kind} {ident} is already a fabric port of {n.hostname} at {local[(kind, ident)]}",
                    "list each port once",
                )
            local[(kind, ident)] = path
            if kind == "mac":
                if ("mac", ident) in seen_ids:
                    yield Problem(
                        f"{path}.mac", f"MAC {ident} is already used at {seen_ids[('mac', ident)]}", "MACs are unique"
                    )
                elif ident in mgmt_macs:
                    yield Problem(
                        f"{path}.mac",
                        f"MAC {ident} is a management interface ({mgmt_macs[ident]})",
                        "RDMA traffic needs its own port: give the fabric port's MAC",
                    )
                seen_ids[("mac", ident)] = path
            if port.address not in f.cidr or port.address in (f.cidr.network_address, f.cidr.broadcast_address):
                yield Problem(
                    f"{path}.address",
                    f"{port.address} is not a host address of fabric {f.name!r} ({f.cidr})",
                    f"use an address inside {f.cidr}",
                )
            elif port.address in seen_addr:
                yield Problem(
                    f"{path}.address",
                    f"{port.address} is already used at {seen_addr[port.address]}",
                    "give each fabric port its own address",
                )
            else:
                seen_addr[port.address] = path
            if port.soft_roce and f.type is not FabricType.ROCE:
                yield Problem(
                    f"{path}.soft_roce",
                    f"Soft-RoCE is RDMA over Ethernet; fabric {f.name!r} is InfiniBand",
                    "remove `soft_roce`, or put the port on a RoCE fabric",
                )
            first = speeds.setdefault(f.name, (port.speed_gbps, path))
            if first[0] != port.speed_gbps:
                yield Problem(
                    f"{path}.speed_gbps",
                    f"{port.speed_gbps} Gb/s on a fabric whose ports run at {first[0]} Gb/s ({first[1]})",
                    "check the cabling and the adapter: a collective runs at the speed of its slowest link",
                )
        profile_name = profile_of(site, n)
        profile = site.profiles.get(profile_name)
        if n.fabric_ports and profile is not None and profile.rdma is None:
            yield Problem(
                f"profiles.{profile_name}.rdma",
                f"{n.hostname} has fabric ports but its profile pins no RDMA stack",
                "set rdma.version (the distribution's rdma-core, e.g. 44.0-2 on Debian 12) and rdma.perftest_version",
            )
        sm_of = [f.name for f in site.fabrics if f.subnet_manager == n.hostname]
        if sm_of and profile is not None and profile.rdma is not None and profile.rdma.opensm_version is None:
            yield Problem(
                f"profiles.{profile_name}.rdma.opensm_version",
                f"{n.hostname} runs the subnet manager of {', '.join(sm_of)} but opensm is not pinned",
                "set rdma.opensm_version to the distribution's opensm version",
            )
        if n.fabric_ports and n.gpu.count == 0:
            yield Problem(
                f"nodes[{i}].fabric_ports",
                f"{n.hostname} has no GPUs: a GPU fabric port there carries no GPU traffic",
                "remove the fabric ports, or set the node's gpu.count",
            )
    for i, f in enumerate(site.fabrics):
        if f.min_bandwidth_gbps is not None and f.name in speeds and f.min_bandwidth_gbps > speeds[f.name][0]:
            yield Problem(
                f"fabrics[{i}].min_bandwidth_gbps",
                f"{f.min_bandwidth_gbps} Gb/s exceeds the {speeds[f.name][0]} Gb/s its ports are declared at",
                "lower the threshold (unset: 80 % of the port speed)",
            )


@rule
def fabric_affinity(site: Site, cat: ResolvedCatalogue) -> Iterator[Problem]:
    """A node of a server model the catalogue knows: the server's GPUs, fabric ports on its compute NICs.

    Each port serves (`gpu`) the GPU behind the same PCIe switch as its NIC.
    """
    for i, n in enumerate(site.nodes):
        path = f"nodes[{i}]"
        for j, port in enumerate(n.fabric_ports):
            if port.gpu is not None and port.gpu >= n.gpu.count:
                yield Problem(
                    f"{path}.fabric_ports[{j}].gpu",
                    f"GPU {port.gpu} does not exist on {n.hostname} ({n.gpu.count} GPUs, 0–{n.gpu.count - 1})",
                    "give the index of the GPU this port serves",
                )
        if n.server is None:
            continue
        server = cat.servers.get(n.server)
        if server is None:
            yield Problem(
                f"{path}.server",
                f"server model {n.server!r} is not in the catalogue (known: {', '.join(sorted(cat.servers))})",
                "name a catalogue server model, describe it under catalogue.servers, or unset `server`",
            )
            continue
        if (n.gpu.model, n.gpu.count) != (server.gpu, server.gpu_count):
            yield Problem(
                f"{path}.gpu",
                f"a {n.server} has {server.gpu_count}x {server.gpu}, not {n.gpu.count}x {n.gpu.model}",
                f"declare its {server.gpu_count}x {server.gpu}, or name the node's real server model",
            )
        by_pci = {nic.pci.lower(): nic for nic in server.compute_nics}
        by_netdev = {nic.netdev: nic for nic in server.compute_nics}
        for j, port in enumerate(n.fabric_ports):
            ppath = f"{path}.fabric_ports[{j}]"
            if port.pci is not None:
                key, ident, nic = "pci", port.pci, by_pci.get(port.pci.lower())
            elif port.netdev is not None:
                key, ident, nic = "netdev", port.netdev, by_netdev.get(port.netdev)
            else:
                continue  # a MAC is the adapter's own: the catalogue has nothing to check it against
            if nic is None:
                yield Problem(
                    f"{ppath}.{key}",
                    f"{ident} is not a compute-fabric NIC of a {n.server} (those are "
                    + ", ".join(x.pci if key == "pci" else x.netdev for x in server.compute_nics)
                    + ")",
                    "name one of the server's compute NICs (storage and in-band ports carry no GPU traffic)",
                )
                continue
            if port.gpu is not None and port.gpu != nic.gpu:
                yield Problem(
                    f"{ppath}.gpu",
                    f"{ident} sits behind GPU {nic.gpu}'s PCIe switch on a {n.server}, not GPU {port.gpu}'s: "
                    "its RDMA traffic would cross the CPU",
                    f"set gpu: {nic.gpu}, or use GPU {port.gpu}'s NIC "
                    + next((x.pci if key == "pci" else x.netdev for x in server.compute_nics if x.gpu == port.gpu),
                           "(none)"),
                    (suggest(f"gpu {nic.gpu}", (f"{ppath}.gpu", nic.gpu)),),
                )


@rule
def spanning_services(site: Site, cat: ResolvedCatalogue) -> Iterator[Problem]:
    """A service across nodes: an engine that can, at least two nodes, pipeline stages = nodes, one fabric."""
    nodes = site.nodes_by_name
    for i, svc in enumerate(site.services):
        if not svc.span_nodes:
            continue
        path = f"services[{i}]"
        hosts = list(dict.fromkeys(svc.nodes))
        if svc.engine not in SPANNING_ENGINES:
            yield Problem(
                f"{path}.span_nodes",
                f"{svc.engine.value} does not run one instance across nodes",
                "serve it with vllm or llamacpp, or remove span_nodes (one replica per node)",
            )
            continue
        if len(hosts) < 2:
            yield Problem(
                f"{path}.nodes",
                "a service that spans nodes needs at least two",
                "add the other nodes, or remove span_nodes",
            )
            continue
        if svc.engine is Engine.VLLM and svc.pipeline_parallel != len(hosts):
            yield Problem(
                f"{path}.pipeline_parallel",
                f"pipeline_parallel is {svc.pipeline_parallel} but the service spans {len(hosts)} nodes "
                "(one pipeline stage per node)",
                f"set pipeline_parallel: {len(hosts)}",
                (suggest(f"pipeline_parallel {len(hosts)}", (f"{path}.pipeline_parallel", len(hosts))),),
            )
        if svc.engine is Engine.LLAMACPP and svc.image is not None:
            yield Problem(
                f"{path}.image",
                "a llamacpp service spans nodes through llama.cpp's RPC backend, which gpufleet runs from the "
                "native install only",
                "remove `image` and set `wheel` (the native llama-cpp-python install)",
            )
        segments = {nd.segment for h in hosts if (nd := nodes.get(h)) is not None}
        if len(segments) > 1:
            yield Problem(
                f"{path}.nodes",
                f"its nodes are on segments {', '.join(sorted(segments))}: they would converge in different waves "
                "and the head would start before its workers",
                "place the nodes of a spanning service on one segment",
            )
        # llama.cpp: each worker's RPC backend listens on rpc_port; vLLM: the head's torch.distributed store
        # (`--master-port`) does.
        for host in hosts[1:] if svc.engine is Engine.LLAMACPP else hosts[:1]:
            clash = [
                f"services[{k}] ({other.name})"
                for k, other in enumerate(site.services)
                if host in other.nodes and other.port == svc.rpc_port
            ]
            if clash:
                yield Problem(
                    f"{path}.rpc_port",
                    f"port {svc.rpc_port} on {host} is already used by {clash[0]}",
                    "give the RPC backend another port (llama.cpp's default is 50052)"
                    if svc.engine is Engine.LLAMACPP
                    else "give the group's master port another port (rpc_port; the default is 50052)",
                )
                break
        shared: set[str] | None = None
        for host in hosts:
            node = nodes.get(host)
            if node is None:
                continue
            mine = {p.fabric for p in node.fabric_ports}
            shared = mine if shared is None else shared & mine
        if shared is not None and not shared:
            missing = [h for h in hosts if (nd := nodes.get(h)) is not None and not nd.fabric_ports]
            yield Problem(
                f"{path}.nodes",
                "its nodes share no fabric"
                + (
                    f" ({_some(missing)} have no fabric ports)"
                    if missing
                    else " (their ports are on different fabrics)"
                ),
                "place the service on nodes with ports on one fabric (see nodes[].fabric_ports)",
            )


@rule
def execution_hosts(site: Site, cat: ResolvedCatalogue) -> Iterator[Problem]:
    """Each segment's execution host is `local` or a host on that segment with an address the controller can use.

    The execution host runs Ansible for the segment's nodes, so it must sit inside the segment: for an
    air-gapped segment that is what lets the controller reach the nodes through one SSH hop and no route.
    """
    hosts = {n.hostname: (n.segment, n.address) for n in site.nodes}
    hosts |= {m.name: (m.segment, m.address) for m in site.mirrors}
    used = {addr: name for name, (_, addr) in hosts.items()}
    for i, s in enumerate(site.segments):
        ex = s.execution
        path = f"segments[{i}].execution"
        if ex.local:
            if ex.address is not None:
                yield Problem(
                    f"{path}.address",
                    "is set but the segment runs Ansible on the controller (`host: local`)",
                    "remove `address`, or name the execution host in `host`",
                )
            continue
        taken = used.get(ex.address) if ex.address is not None else None
        yield from _segment_host(
            path,
            ex.host,
            ex.address,
            s,
            hosts,
            _SegmentHostFixes(
                role="execution host",
                other_segment="an execution host runs Ansible inside its own segment: name a node or mirror of "
                f"{s.name!r} (air-gapped: usually its mirror), a dedicated host with `address`, or `local`",
                unknown=f"name a node or mirror of {s.name!r}, set `address` of the dedicated host (inside {s.cidr}), "
                "or use `local`",
                outside="the execution host reaches the segment's nodes from inside: use an address in the segment",
                used=f"name {taken} in `host` instead, or give the dedicated execution host its own address",
            ),
        )
