"""Prometheus configuration, recording rules and alert rules of a site, derived from its plan. Pure.

One Prometheus per monitored segment scrapes only that segment's nodes: node exporter, DCGM exporter,
each engine's own /metrics and the SLO probe running beside it. The site view's Prometheus federates
the others' SLO figures and alerts over their declared port, so an air-gapped segment's metrics leave it
only that way. Every SLO figure is one recording rule per service (`gpufleet:<figure>`), fed by the
engine's own histogram where the engine has one and by the probe otherwise, and every alert compares a
recording rule with the stack's objective, so `gpufleet status`, the alerts and the dashboards read the
same series.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from infra.model.ports import DCGM_EXPORTER_PORT, NODE_EXPORTER_PORT
from infra.model.site import Engine, InferenceService, ServiceSlo, Site
from infra.observe.metrics import (
    ENGINE_METRICS,
    PROBE_FAILURES,
    PROBE_ITL_BUCKET,
    PROBE_PORT,
    PROBE_REQUESTS,
    PROBE_TOKENS_PER_S,
    PROBE_TTFT_BUCKET,
    PROBE_UP,
)
from infra.plan.fabric import serves_endpoint
from infra.plan.node import NodePlan, SitePlan
from infra.plan.packages import Component

RULES_FILE = "/etc/gpufleet/monitoring/rules.yml"  # our own directory: no Debian conffile is edited
WINDOW = "5m"
# Series the site view pulls from the other segments' Prometheus (`/federate?match[]=`): the SLO figures,
# the alerts and scrape health — not raw histograms, which stay where they are scraped.
FEDERATE_MATCH = ('{__name__=~"gpufleet:.+"}', '{__name__="ALERTS"}', '{__name__="up"}')

# Recording rules: (name, unit for people, PromQL over the engine's or the probe's series).
TTFT = "gpufleet:ttft_seconds:p99"
ITL = "gpufleet:itl_seconds:p99"
TOKENS = "gpufleet:generated_tokens_per_second"
ERRORS = "gpufleet:error_ratio"
UP = "gpufleet:service_up"


@dataclass(frozen=True)
class Target:
    """One scrape target with the labels gpufleet's rules group by."""

    address: str
    labels: dict[str, str]


def slo_of(site: Site, svc: InferenceService) -> ServiceSlo:
    """A service's objectives: its own, else the site's defaults."""
    return svc.slo or site.observability.slo


def host_address(plan: SitePlan, host: str) -> str:
    """Address of a node or mirror by name."""
    for n in plan.nodes:
        if n.hostname == host:
            return str(n.node.address)
    for m in plan.site.mirrors:
        if m.name == host:
            return str(m.address)
    raise KeyError(f"no node or mirror {host!r}")


def _monitored(n: NodePlan) -> bool:
    return "monitoring" in n.roles


def scrape_targets(plan: SitePlan, segment: str) -> dict[str, list[Target]]:
    """Targets of one segment's Prometheus, by job."""
    nodes = [n for n in plan.nodes if n.segment.name == segment]
    jobs: dict[str, list[Target]] = {"node": [], "dcgm": [], "inference": []}
    for n in nodes:
        labels = {"node": n.hostname, "segment": segment}
        if _monitored(n) and n.packages_of(Component.MONITORING):
            jobs["node"].append(Target(f"{n.node.address}:{NODE_EXPORTER_PORT}", labels))
        if _monitored(n) and n.profile.monitoring.dcgm_exporter_image:
            jobs["dcgm"].append(Target(f"{n.node.address}:{DCGM_EXPORTER_PORT}", labels))
        for s in n.services:
            if ENGINE_METRICS[s.service.engine].requests is not None and serves_endpoint(s.span, n.hostname):
                jobs["inference"].append(
                    Target(
                        f"{n.node.address}:{s.service.port}",
                        labels | {"service": s.name, "engine": s.service.engine.value},
                    )
                )
    return jobs


def probe_endpoints(plan: SitePlan, segment: str) -> list[dict[str, Any]]:
    """What the segment's SLO probe sends its small streaming request to (one entry per service and node)."""
    out = []
    for n in plan.nodes:
        if n.segment.name != segment:
            continue
        for s in (s for s in n.services if serves_endpoint(s.span, n.hostname)):
            out.append(
                {
                    "service": s.name,
                    "node": n.hostname,
                    "engine": s.service.engine.value,
                    "url": f"http://{n.node.address}:{s.service.port}/v1",
                    "model": s.service.model.name,
                }
            )
    return sorted(out, key=lambda e: (e["service"], e["node"]))


def prometheus_config(plan: SitePlan, segment: str, rules_path: str = RULES_FILE) -> dict[str, Any]:
    """prometheus.yml of one segment's Prometheus (rules loaded from `rules_path`)."""
    site = plan.site
    obs = site.observability
    interval = f"{obs.scrape_interval_s}s"
    jobs: list[dict[str, Any]] = []
    for job, targets in scrape_targets(plan, segment).items():
        if targets:
            jobs.append(
                {
                    "job_name": job,
                    "static_configs": [{"targets": [t.address], "labels": t.labels} for t in targets],
                }
            )
    if probe_endpoints(plan, segment):
        jobs.append({"job_name": "gpufleet-probe", "static_configs": [{"targets": [f"127.0.0.1:{PROBE_PORT}"]}]})
    if segment == obs.site_view:
        others = [p for p in obs.prometheus if p.segment != segment]
        if others:
            jobs.append(
                {
                    "job_name": "federate",
                    "honor_labels": True,
                    "metrics_path": "/federate",
                    "params": {"match[]": list(FEDERATE_MATCH)},
                    "static_configs": [
                        {
                            "targets": [f"{host_address(plan, p.host)}:{p.port}"],
                            "labels": {"federated_from": p.segment},
                        }
                        for p in others
                    ],
                }
            )
    return {
        "global": {
            "scrape_interval": interval,
            "evaluation_interval": interval,
            "external_labels": {"site": site.name, "segment": segment},
        },
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{obs.alertmanager_port}"]}]}]},
        "rule_files": [rules_path],
        "scrape_configs": jobs,
    }


def _quantile(bucket: str, selector: str) -> str:
    return f"histogram_quantile(0.99, sum by (service, node, le) (rate({bucket}{{{selector}}}[{WINDOW}])))"


def _with(selector_metric: str, extra: str) -> str:
    """`metric{a="b"}` + `c="d"` → `metric{a="b",c="d"}`."""
    if selector_metric.endswith("}"):
        return selector_metric[:-1] + "," + extra + "}"
    return f"{selector_metric}{{{extra}}}"


def service_records(svc: InferenceService) -> list[dict[str, Any]]:
    """Recording rules of one service: each SLO figure from the engine where it exports it, else the probe."""
    m = ENGINE_METRICS[svc.engine]
    sel = f'service="{svc.name}"'
    ttft = _quantile(m.ttft_bucket or PROBE_TTFT_BUCKET, sel)
    itl = _quantile(m.itl_bucket or PROBE_ITL_BUCKET, sel)
    if m.generated_tokens:
        tokens = f"sum by (service, node) (rate({_with(m.generated_tokens, sel)}[{WINDOW}]))"
    else:
        tokens = f"max by (service, node) ({PROBE_TOKENS_PER_S}{{{sel}}})"
    requests, failed = (
        (m.requests, m.failed_requests)
        if m.requests and m.failed_requests
        else (
            PROBE_REQUESTS,
            PROBE_FAILURES,
        )
    )
    errors = (
        f"sum by (service, node) (rate({_with(failed, sel)}[{WINDOW}]))"
        f" / sum by (service, node) (rate({_with(requests, sel)}[{WINDOW}]))"
    )
    figures = {
        TTFT: ttft,
        ITL: itl,
        TOKENS: tokens,
        ERRORS: errors,
        UP: f"max by (service, node) ({PROBE_UP}{{{sel}}})",
    }
    # The service label on the rule keeps each service's rule distinct (promtool: no duplicate rules).
    return [{"record": name, "expr": expr, "labels": {"service": svc.name}} for name, expr in figures.items()]


def _alert(name: str, expr: str, for_: str, severity: str, summary: str, **labels: str) -> dict[str, Any]:
    return {
        "alert": name,
        "expr": expr,
        "for": for_,
        "labels": {"severity": severity, **labels},
        "annotations": {"summary": summary, "runbook": "docs/observability.md#" + name.lower()},
    }


def service_alerts(site: Site, svc: InferenceService) -> list[dict[str, Any]]:
    """Alert rules of one service from its objectives."""
    slo = slo_of(site, svc)
    sel = f'service="{svc.name}"'
    out = [
        _alert(
            "GpufleetServiceDown",
            f"{UP}{{{sel}}} == 0",
            f"{site.observability.service_down_for_s}s",
            "critical",
            f"{svc.name} on {{{{ $labels.node }}}} does not answer the SLO probe",
            service=svc.name,
        ),
        _alert(
            "GpufleetTtftAboveObjective",
            f"{TTFT}{{{sel}}} > {slo.ttft_p99_ms / 1000:g}",
            "5m",
            "warning",
            f"{svc.name} on {{{{ $labels.node }}}}: TTFT p99 above {slo.ttft_p99_ms:g} ms",
            service=svc.name,
        ),
        _alert(
            "GpufleetItlAboveObjective",
            f"{ITL}{{{sel}}} > {slo.itl_p99_ms / 1000:g}",
            "5m",
            "warning",
            f"{svc.name} on {{{{ $labels.node }}}}: inter-token latency p99 above {slo.itl_p99_ms:g} ms",
            service=svc.name,
        ),
        _alert(
            "GpufleetErrorRateAboveObjective",
            f"{ERRORS}{{{sel}}} > {slo.max_error_rate:g}",
            "5m",
            "critical",
            f"{svc.name} on {{{{ $labels.node }}}}: more than {slo.max_error_rate:.1%} of requests fail",
            service=svc.name,
        ),
    ]
    if slo.min_tokens_per_s > 0:
        running = ENGINE_METRICS[svc.engine].running
        busy = f" and on (service, node) sum by (service, node) ({running}{{{sel}}}) > 0" if running else ""
        out.append(
            _alert(
                "GpufleetThroughputBelowObjective",
                f"{TOKENS}{{{sel}}} < {slo.min_tokens_per_s:g}{busy}",
                "10m",
                "warning",
                f"{svc.name} on {{{{ $labels.node }}}}: fewer than {slo.min_tokens_per_s:g} generated tokens/s",
                service=svc.name,
            )
        )
    return out


def gpu_alerts(site: Site) -> list[dict[str, Any]]:
    """GPU and node health alerts (DCGM fields of `infra.observe.metrics.DCGM_FIELDS`)."""
    gpu = site.observability.gpu
    return [
        _alert("GpufleetNodeDown", 'up{job="node"} == 0', "2m", "critical", "{{ $labels.node }} is not scraped"),
        _alert(
            "GpufleetGpuTemperature",
            f"DCGM_FI_DEV_GPU_TEMP > {gpu.max_temperature_c}",
            "5m",
            "warning",
            f"{{{{ $labels.node }}}} GPU {{{{ $labels.gpu }}}} above {gpu.max_temperature_c} °C",
        ),
        _alert(
            "GpufleetGpuMemoryFull",
            f"DCGM_FI_DEV_FB_USED / (DCGM_FI_DEV_FB_USED + DCGM_FI_DEV_FB_FREE) > {gpu.max_memory_used_fraction:g}",
            "15m",
            "warning",
            f"{{{{ $labels.node }}}} GPU {{{{ $labels.gpu }}}} above {gpu.max_memory_used_fraction:.0%} memory",
        ),
        # The gauge holds the *last* XID, so a new XID shows as a change, not as a value.
        _alert(
            "GpufleetGpuXid",
            "changes(DCGM_FI_DEV_XID_ERRORS[10m]) > 0",
            "0s",
            "critical",
            "{{ $labels.node }} GPU {{ $labels.gpu }} reported a new XID error (DCGM_FI_DEV_XID_ERRORS)",
        ),
        _alert(
            "GpufleetGpuUncorrectableEcc",
            "increase(DCGM_FI_DEV_ECC_DBE_VOL_TOTAL[10m]) > 0",
            "0s",
            "critical",
            "{{ $labels.node }} GPU {{ $labels.gpu }} had a double-bit ECC error",
        ),
        _alert(
            "GpufleetGpuRowRemapFailed",
            "DCGM_FI_DEV_ROW_REMAP_FAILURE > 0",
            "0s",
            "critical",
            "{{ $labels.node }} GPU {{ $labels.gpu }} could not remap a memory row: replace the GPU",
        ),
        _alert(
            "GpufleetNvlinkCrcErrors",
            "increase(DCGM_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL[10m])"
            " + increase(DCGM_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL[10m]) > 0",
            "0s",
            "warning",
            "{{ $labels.node }} GPU {{ $labels.gpu }} has NVLink CRC errors",
        ),
    ]


def rules(plan: SitePlan) -> dict[str, Any]:
    """The rules file every Prometheus of the site loads (each evaluates what it scrapes)."""
    site = plan.site
    records = [r for svc in site.services for r in service_records(svc)]
    alerts = [a for svc in site.services for a in service_alerts(site, svc)] + gpu_alerts(site)
    # One group: its rules are evaluated in order, so each alert reads the figure of the same evaluation
    # (in a group of its own it could read one an evaluation interval old).
    return {"groups": [{"name": "gpufleet", "rules": records + alerts}]}


def alertmanager_config(site: Site) -> dict[str, Any]:
    """A minimal Alertmanager config: group per service/node; receivers are the site's to add."""
    return {
        "route": {
            "receiver": "default",
            "group_by": ["alertname", "service", "node"],
            "group_wait": "30s",
            "group_interval": "5m",
            "repeat_interval": "4h",
        },
        "receivers": [{"name": "default"}],
    }


def probe_config(plan: SitePlan, segment: str) -> dict[str, Any]:
    """The SLO probe's configuration on one segment's Prometheus host."""
    return {
        "listen": f"127.0.0.1:{PROBE_PORT}",
        "interval_s": plan.site.observability.scrape_interval_s,
        "endpoints": probe_endpoints(plan, segment),
    }


def monitored_segments(site: Site) -> list[str]:
    """Segments with a Prometheus, in stack order."""
    return [p.segment for p in site.observability.prometheus]


def engine_has_metrics(engine: Engine) -> bool:
    """Whether gpufleet scrapes the engine's own /metrics (else only the probe measures it)."""
    return ENGINE_METRICS[engine].requests is not None
