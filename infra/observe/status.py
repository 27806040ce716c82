"""`gpufleet status`: one screen per site from the site view's Prometheus (HTTP API, instant queries).

Reads the recording rules of `infra.observe.config` (the same series the alerts and dashboards use) and
compares them with the stack's objectives; lists firing alerts from `ALERTS`, which the site view also
federates from the other segments.
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field
from typing import Any

from infra.observe import config
from infra.plan.fabric import serves_endpoint
from infra.plan.node import SitePlan


class PrometheusError(Exception):
    """Prometheus could not be asked (unreachable, or an answer that is not its API's)."""


def site_view_url(plan: SitePlan) -> str | None:
    """Base URL of the site view's Prometheus from the stack (None: the stack declares none)."""
    obs = plan.site.observability
    host = next((p for p in obs.prometheus if p.segment == obs.site_view), None)
    if host is None:
        return None
    return f"http://{config.host_address(plan, host.host)}:{host.port}"


def query(base: str, promql: str, timeout: float = 10) -> list[dict[str, Any]]:
    """An instant query's vector result (`/api/v1/query`)."""
    url = f"{base.rstrip('/')}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body = json.load(resp)
    except (OSError, urllib.error.URLError) as exc:
        raise PrometheusError(f"cannot reach Prometheus at {base}: {exc}") from None
    except ValueError:
        raise PrometheusError(f"{base} did not answer with Prometheus' JSON API") from None
    if not isinstance(body, dict) or body.get("status") != "success":
        raise PrometheusError(f"query failed: {str(body.get('error') if isinstance(body, dict) else body)[:200]}")
    data = body.get("data")
    if not isinstance(data, dict) or data.get("resultType") != "vector" or not isinstance(data.get("result"), list):
        raise PrometheusError("unexpected answer shape from /api/v1/query")
    return [r for r in data["result"] if isinstance(r, dict)]


def _value(sample: dict[str, Any]) -> float:
    try:
        return float(sample["value"][1])
    except (KeyError, IndexError, TypeError, ValueError):
        return math.nan


@dataclass
class Figure:
    """One SLO figure of one service on one node against its objective."""

    name: str
    value: float | None
    objective: float
    unit: str
    higher_is_better: bool = False

    @property
    def within(self) -> bool | None:
        """True/False against the objective; None when there is no data (yet)."""
        if self.value is None or math.isnan(self.value):
            return None
        return self.value >= self.objective if self.higher_is_better else self.value <= self.objective


@dataclass
class ServiceStatus:
    """A service's figures on one node."""

    service: str
    node: str
    up: bool | None
    figures: list[Figure] = field(default_factory=list)

    @property
    def within(self) -> bool:
        """Up and no figure outside its objective.

        A service the probe never reached (no data) is not within target; a figure without data (no traffic
        yet) does not count against it.
        """
        return self.up is True and all(f.within is not False for f in self.figures)


@dataclass
class SiteStatus:
    """What `gpufleet status` shows."""

    prometheus: str
    nodes_up: dict[str, bool]
    services: list[ServiceStatus]
    alerts: list[dict[str, str]]

    @property
    def ok(self) -> bool:
        """Every node up, every service within its objectives, no alert firing."""
        return all(self.nodes_up.values()) and all(s.within for s in self.services) and not self.alerts

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "prometheus": self.prometheus,
            "ok": self.ok,
            "nodes_up": self.nodes_up,
            "services": [
                {
                    **{k: v for k, v in asdict(s).items() if k != "figures"},
                    "within": s.within,
                    "figures": [{**asdict(f), "within": f.within} for f in s.figures],
                }
                for s in self.services
            ],
            "alerts": self.alerts,
        }


def _by_service_node(samples: list[dict[str, Any]]) -> dict[tuple[str, str], float]:
    out = {}
    for s in samples:
        m = s.get("metric") or {}
        out[(str(m.get("service", "")), str(m.get("node", "")))] = _value(s)
    return out


def collect(plan: SitePlan, base: str) -> SiteStatus:
    """Ask Prometheus for every node's scrape health, every service's figures and the firing alerts."""
    site = plan.site
    nodes_up = {n.hostname: False for n in plan.nodes if "monitoring" in n.roles}
    for s in query(base, 'up{job="node"}'):
        node = str((s.get("metric") or {}).get("node", ""))
        if node in nodes_up:
            nodes_up[node] = _value(s) == 1
    figures = {
        name: _by_service_node(query(base, name))
        for name in (config.TTFT, config.ITL, config.TOKENS, config.ERRORS, config.UP)
    }
    services = []
    for n in plan.nodes:
        for sp in (sp for sp in n.services if serves_endpoint(sp.span, n.hostname)):
            slo = config.slo_of(site, sp.service)
            key = (sp.name, n.hostname)

            def get(name: str, key: tuple[str, str] = key) -> float | None:
                v = figures[name].get(key)
                return None if v is None or math.isnan(v) else v

            up = get(config.UP)
            st = ServiceStatus(sp.name, n.hostname, None if up is None else up == 1)
            ttft, itl = get(config.TTFT), get(config.ITL)
            st.figures = [
                Figure("ttft_p99", None if ttft is None else ttft * 1000, slo.ttft_p99_ms, "ms"),
                Figure("itl_p99", None if itl is None else itl * 1000, slo.itl_p99_ms, "ms"),
                Figure("error_rate", get(config.ERRORS), slo.max_error_rate, "ratio"),
            ]
            if slo.min_tokens_per_s > 0:
                st.figures.append(Figure("tokens_per_s", get(config.TOKENS), slo.min_tokens_per_s, "tokens/s", True))
            services.append(st)
    alerts = []
    for s in query(base, 'ALERTS{alertstate="firing"}'):
        m = {str(k): str(v) for k, v in (s.get("metric") or {}).items()}
        keys: tuple[str, ...] = ("alertname", "severity", "service", "node", "segment")
        alerts.append({k: m[k] for k in keys if k in m})
    return SiteStatus(base, nodes_up, services, sorted(alerts, key=lambda a: sorted(a.items())))


def render(data: dict[str, Any]) -> str:
    """The one screen for people."""
    lines = [f"site view: {data['prometheus']}  —  {'all within target' if data['ok'] else 'NOT within target'}"]
    up = data["nodes_up"]
    down = sorted(n for n, ok in up.items() if not ok)
    lines.append(f"nodes: {len(up) - len(down)}/{len(up)} up" + (f" (down: {', '.join(down)})" if down else ""))
    for s in data["services"]:
        state = "no data" if s["up"] is None else ("up" if s["up"] else "DOWN")
        parts = []
        for f in s["figures"]:
            mark = {True: "ok", False: "OUT", None: "no data"}[f["within"]]
            value = "-" if f["value"] is None else f"{f['value']:.3g}"
            op = "≥" if f["higher_is_better"] else "≤"
            parts.append(f"{f['name']} {value} {f['unit']} ({op} {f['objective']:g}: {mark})")
        lines.append(f"{s['service']}@{s['node']}: {state}; " + "; ".join(parts))
    if data["alerts"]:
        lines.append("firing alerts:")
        lines += ["  " + " ".join(f"{k}={v}" for k, v in a.items()) for a in data["alerts"]]
    else:
        lines.append("firing alerts: none")
    return "\n".join(lines)
