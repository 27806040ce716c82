"""What the `monitoring_server` role installs on each Prometheus host, derived from the plan. Pure.

Each segment's Prometheus host (a node or a mirror of that segment, `observability.prometheus`) gets Debian's
`prometheus` and `prometheus-alertmanager` at the stack's exact versions, from the segment's own package source
(its mirror when it has one, like every other package), the files `infra.observe.render` writes for that
segment, and the SLO probe as a self-contained zipapp (stdlib only: a mirror needs no gpufleet install).

The federation path is one flow per federated segment: the site view's host opens TCP to the other segment's
Prometheus host on its declared port. `federation_flows` is the one place that says so; the lab's boundary
firewall allows exactly those flows and nothing else between segments.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from importlib.resources import files
from ipaddress import IPv4Address
from typing import Any

from infra.model.site import PrometheusHost, Site
from infra.observe import config, render
from infra.plan.node import SitePlan
from infra.plan.packages import monitoring_server_packages

GROUP = "gpufleet_monitoring"
ROLE = "monitoring_server"
# Where the role writes the rules (Debian's prometheus.yml lives beside it in /etc/prometheus).
RULES_PATH = config.RULES_FILE
# The zipapp's modules: the probe and the streaming client it shares with bench-inference (both stdlib only).
_PROBE_MODULES = (("infra.observe", "probe.py"), ("infra.inference", "stream.py"))
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed member times: the same sources give the same bytes (idempotent copy)


@dataclass(frozen=True)
class MonitoringHost:
    """One segment's Prometheus host and how Ansible reaches it."""

    name: str
    segment: str
    address: IPv4Address
    user: str
    is_mirror: bool
    prometheus: PrometheusHost


@dataclass(frozen=True)
class FederationFlow:
    """The one connection the site view opens into another segment: TCP to that segment's Prometheus."""

    from_host: str
    from_segment: str
    from_address: IPv4Address
    to_host: str
    to_segment: str
    to_address: IPv4Address
    port: int


def server_packages(site: Site) -> list[dict[str, str]]:
    """The pinned server packages every Prometheus host installs (empty when the stack pins no versions)."""
    return [p.as_dict() for p in monitoring_server_packages(site)]


def monitoring_hosts(site: Site) -> list[MonitoringHost]:
    """Every Prometheus host of the site, in stack order."""
    out = []
    for p in site.observability.prometheus:
        node = site.nodes_by_name.get(p.host)
        if node is not None:
            out.append(MonitoringHost(p.host, p.segment, node.address, node.ssh_user, False, p))
            continue
        mirror = site.mirror(p.host)
        if mirror is None:  # the model's rules refuse this; a KeyError here means a rule is missing
            raise KeyError(f"no node or mirror {p.host!r}")
        out.append(MonitoringHost(p.host, p.segment, mirror.address, "root", True, p))
    return out


def federation_flows(site: Site) -> list[FederationFlow]:
    """The site view's pull from each other segment's Prometheus (the only flow that crosses segments)."""
    obs = site.observability
    hosts = {h.segment: h for h in monitoring_hosts(site)}
    view = hosts.get(obs.site_view or "")
    if view is None:
        return []
    return [
        FederationFlow(view.name, view.segment, view.address, h.name, h.segment, h.address, h.prometheus.port)
        for seg, h in hosts.items()
        if seg != view.segment
    ]


def _own_apt_source(site: Site, host: MonitoringHost) -> list[dict[str, Any]]:
    """A mirror host installs from the repository it serves itself (nodes keep the sources `base` manages)."""
    if not host.is_mirror:
        return []
    m = site.mirror(host.name)
    assert m is not None
    port = "" if m.http_port == 80 else f":{m.http_port}"
    return [
        {"name": m.name, "uris": f"http://{m.address}{port}/apt", "suites": "/", "components": [], "keyring": m.keyring}
    ]


def host_vars(
    plan: SitePlan, host: MonitoringHost, probe_app: str, rendered: dict[str, str] | None = None
) -> dict[str, Any]:
    """Role variables of one Prometheus host.

    `probe_app` is the controller path of the probe zipapp; `rendered` the plan's `render.files`, when the
    caller already has it.
    """
    site = plan.site
    obs = site.observability
    rendered = rendered or render.files(plan, rules_path=RULES_PATH)
    has_probe = bool(config.probe_endpoints(plan, host.segment))
    return {
        "monitoring_server_packages": server_packages(site),
        "monitoring_server_apt_sources": _own_apt_source(site, host),
        "monitoring_server_port": host.prometheus.port,
        "monitoring_server_alertmanager_port": obs.alertmanager_port,
        "monitoring_server_prometheus_config": rendered[f"{host.segment}/prometheus.yml"],
        "monitoring_server_rules": rendered["rules.yml"],
        "monitoring_server_alertmanager_config": rendered["alertmanager.yml"],
        "monitoring_server_probe_config": rendered[f"{host.segment}/probe.json"] if has_probe else "",
        "monitoring_server_probe_app": probe_app if has_probe else "",
    }


def inventory(plan: SitePlan, probe_app: str, only: list[str] | None = None) -> dict[str, Any]:
    """Inventory of the Prometheus hosts (group `gpufleet_monitoring`), plain values (see ansible.inventory)."""
    hosts = {}
    rendered = render.files(plan, rules_path=RULES_PATH)
    for h in monitoring_hosts(plan.site):
        if only is not None and h.name not in only:
            continue
        hosts[h.name] = {
            "ansible_host": str(h.address),
            "ansible_user": h.user,
            "ansible_become": h.user != "root",
            **host_vars(plan, h, probe_app, rendered),
        }
    return {"all": {"children": {GROUP: {"hosts": hosts}}}}


def probe_zipapp() -> bytes:
    """The SLO probe as a zipapp (`python3 probe.pyz --config probe.json`): stdlib only, deterministic bytes."""
    buf = io.BytesIO()
    members: dict[str, str] = {
        "__main__.py": "import sys\n\nfrom infra.observe.probe import main\n\nsys.exit(main())\n",
        "infra/__init__.py": "",
        "infra/observe/__init__.py": "",
        "infra/inference/__init__.py": "",
    }
    for package, name in _PROBE_MODULES:
        members[package.replace(".", "/") + "/" + name] = files(package).joinpath(name).read_text(encoding="utf-8")
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for path in sorted(members):
            info = zipfile.ZipInfo(path, _ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            z.writestr(info, members[path])
    return b"#!/usr/bin/python3\n" + buf.getvalue()
