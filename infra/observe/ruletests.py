"""`promtool test rules` suites for a site's alerts: for every alert, series that must fire it and series that must not.

The series are built from the objective, not from the rule text: a histogram whose observations all sit
in a bucket twice the objective must fire, one whose observations sit at half the objective must not. promtool
evaluates the real PromQL of `infra.observe.config.rules`, so a wrong expression, label or threshold fails.
"""

from __future__ import annotations

import functools
from typing import Any

from infra.model.site import InferenceService, Site
from infra.observe.config import RULES_FILE, gpu_alerts, service_alerts, slo_of
from infra.observe.metrics import (
    ENGINE_METRICS,
    PROBE_FAILURES,
    PROBE_ITL_BUCKET,
    PROBE_REQUESTS,
    PROBE_TOKENS_PER_S,
    PROBE_TTFT_BUCKET,
    PROBE_UP,
)
from infra.plan.node import SitePlan

INTERVAL = "1m"
STEPS = 30  # 30 minutes of series: longer than every `for:` plus the 5-minute rate window
EVAL_AT = "25m"


def _labels(metric: str, labels: dict[str, str]) -> str:
    """`name{a="b"}` for a metric that may already carry a selector (`http_requests_total{handler=~…}`)."""
    name, _, rest = metric.partition("{")
    own = {}
    for part in rest.rstrip("}").split(","):
        if part and "=~" not in part:
            k, v = part.split("=", 1)
            own[k] = v.strip('"')
    if "=~" in rest:  # a regex selector: give the series a value it matches
        own["handler"] = "/v1/completions"
    merged = {**own, **labels}
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(merged.items())) + "}"


def _histogram(bucket: str, labels: dict[str, str], value_s: float) -> list[dict[str, str]]:
    """A histogram where every observation (10 a minute) lies just under `value_s`."""
    name = bucket
    lower, upper = value_s / 2, value_s
    out = []
    for le, per_minute in ((f"{lower:g}", 0), (f"{upper:g}", 10), ("+Inf", 10)):
        out.append({"series": _labels(name, labels | {"le": le}), "values": f"0+{per_minute}x{STEPS}"})
    return out


def _counter(metric: str, labels: dict[str, str], per_minute: float) -> dict[str, str]:
    return {"series": _labels(metric, labels), "values": f"0+{per_minute:g}x{STEPS}"}


def _gauge(metric: str, labels: dict[str, str], value: float) -> dict[str, str]:
    return {"series": _labels(metric, labels), "values": f"{value:g}x{STEPS}"}


def _case(
    name: str,
    series: list[dict[str, str]],
    alert: str,
    fires: bool,
    labels: dict[str, str],
    annotations: dict[str, dict[str, str]] | None = None,
) -> dict[str, Any]:
    expected: list[dict[str, Any]] = []
    if fires:
        expected = [{"exp_labels": labels, "exp_annotations": _expanded((annotations or {}).get(alert, {}), labels)}]
    return {
        "name": name,
        "interval": INTERVAL,
        "input_series": series,
        "alert_rule_test": [{"eval_time": EVAL_AT, "alertname": alert, "exp_alerts": expected}],
    }


def _expanded(annotations: dict[str, str], labels: dict[str, str]) -> dict[str, str]:
    """Annotations as Prometheus renders them for an alert with `labels` (only `$labels.x` is used in ours)."""
    out = {}
    for key, text in annotations.items():
        for k, v in labels.items():
            text = text.replace("{{ $labels." + k + " }}", v)
        out[key] = text
    return out


def _service_cases(site: Site, svc: InferenceService) -> list[dict[str, Any]]:
    slo = slo_of(site, svc)
    notes = {a["alert"]: a["annotations"] for a in service_alerts(site, svc)}
    m = ENGINE_METRICS[svc.engine]
    node = svc.nodes[0]
    lab = {"service": svc.name, "node": node}
    healthy = [_gauge(PROBE_UP, lab, 1)]
    cases = []

    ttft = m.ttft_bucket or PROBE_TTFT_BUCKET
    itl = m.itl_bucket or PROBE_ITL_BUCKET
    alert_labels = {"service": svc.name, "node": node}
    for alert, bucket, objective_s, severity in (
        ("GpufleetTtftAboveObjective", ttft, slo.ttft_p99_ms / 1000, "warning"),
        ("GpufleetItlAboveObjective", itl, slo.itl_p99_ms / 1000, "warning"),
    ):
        exp = alert_labels | {"severity": severity}
        cases.append(
            _case(
                f"{svc.name}: {alert} fires at 2x",
                healthy + _histogram(bucket, lab, objective_s * 2),
                alert,
                True,
                exp,
                notes,
            )
        )
        cases.append(
            _case(
                f"{svc.name}: {alert} quiet at 1/2",
                healthy + _histogram(bucket, lab, objective_s / 2),
                alert,
                False,
                exp,
            )
        )

    requests, failed = (
        (m.requests, m.failed_requests) if m.requests and m.failed_requests else (PROBE_REQUESTS, PROBE_FAILURES)
    )
    exp = alert_labels | {"severity": "critical"}
    ratios = [(slo.max_error_rate / 2, False)]
    if slo.max_error_rate < 0.5:
        ratios.append((max(slo.max_error_rate * 2, 0.02), True))
    for ratio, fires in ratios:
        series = [*healthy, _counter(failed, lab, 100 * ratio)]
        if requests.partition("{")[0] == failed.partition("{")[0]:
            # One counter for all requests, failures told apart by their status label.
            series.append(_counter(requests, lab | {"status": "2xx"}, 100 * (1 - ratio)))
        else:
            series.append(_counter(requests, lab, 100))
        cases.append(
            _case(f"{svc.name}: error ratio {ratio:g}", series, "GpufleetErrorRateAboveObjective", fires, exp, notes)
        )

    exp = alert_labels | {"severity": "critical"}
    cases.append(_case(f"{svc.name}: probe fails", [_gauge(PROBE_UP, lab, 0)], "GpufleetServiceDown", True, exp, notes))
    cases.append(_case(f"{svc.name}: probe answers", healthy, "GpufleetServiceDown", False, exp))

    if slo.min_tokens_per_s > 0:
        exp = alert_labels | {"severity": "warning"}
        for rate, fires in ((slo.min_tokens_per_s / 2, True), (slo.min_tokens_per_s * 2, False)):
            if m.generated_tokens:
                series = [*healthy, _counter(m.generated_tokens, lab, rate * 60)]
            else:
                series = [*healthy, _gauge(PROBE_TOKENS_PER_S, lab, rate)]
            if m.running:
                series.append(_gauge(m.running, lab, 1))
            cases.append(
                _case(f"{svc.name}: {rate:g} tokens/s", series, "GpufleetThroughputBelowObjective", fires, exp, notes)
            )
    return cases


def _gpu_cases(site: Site) -> list[dict[str, Any]]:
    gpu = site.observability.gpu
    case = functools.partial(_case, annotations={a["alert"]: a["annotations"] for a in gpu_alerts(site)})
    lab = {"node": "gpu-node", "gpu": "0"}
    crit, warn = lab | {"severity": "critical"}, lab | {"severity": "warning"}
    used = gpu.max_memory_used_fraction
    return [
        case(
            "hot GPU",
            [_gauge("DCGM_FI_DEV_GPU_TEMP", lab, gpu.max_temperature_c + 5)],
            "GpufleetGpuTemperature",
            True,
            warn,
        ),
        case(
            "cool GPU",
            [_gauge("DCGM_FI_DEV_GPU_TEMP", lab, gpu.max_temperature_c - 5)],
            "GpufleetGpuTemperature",
            False,
            warn,
        ),
        case(
            "full GPU memory",
            [
                _gauge("DCGM_FI_DEV_FB_USED", lab, 1000 * min(1.0, used + (1 - used) / 2)),
                _gauge("DCGM_FI_DEV_FB_FREE", lab, 1000 * (1 - min(1.0, used + (1 - used) / 2))),
            ],
            "GpufleetGpuMemoryFull",
            True,
            warn,
        ),
        case(
            "GPU memory with room",
            [
                _gauge("DCGM_FI_DEV_FB_USED", lab, 1000 * used / 2),
                _gauge("DCGM_FI_DEV_FB_FREE", lab, 1000 * (1 - used / 2)),
            ],
            "GpufleetGpuMemoryFull",
            False,
            warn,
        ),
        # XID: the gauge steps from 0 to 79 (GPU fell off the bus) five minutes before evaluation.
        case(
            "new XID",
            [{"series": _labels("DCGM_FI_DEV_XID_ERRORS", lab), "values": "0x20 79x10"}],
            "GpufleetGpuXid",
            True,
            crit,
        ),
        # The same old XID held for the whole window is not new: no alert (the gauge keeps the last XID).
        case("old XID", [_gauge("DCGM_FI_DEV_XID_ERRORS", lab, 79)], "GpufleetGpuXid", False, crit),
        case(
            "double-bit ECC",
            [{"series": _labels("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", lab), "values": "0x20 1x10"}],
            "GpufleetGpuUncorrectableEcc",
            True,
            crit,
        ),
        case(
            "no ECC errors",
            [_gauge("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", lab, 0)],
            "GpufleetGpuUncorrectableEcc",
            False,
            crit,
        ),
        case(
            "row remap failed",
            [_gauge("DCGM_FI_DEV_ROW_REMAP_FAILURE", lab, 1)],
            "GpufleetGpuRowRemapFailed",
            True,
            crit,
        ),
        case(
            "NVLink CRC errors",
            [
                {"series": _labels("DCGM_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL", lab), "values": "0x20 5x10"},
                _gauge("DCGM_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL", lab, 0),
            ],
            "GpufleetNvlinkCrcErrors",
            True,
            warn,
        ),
        case(
            "node down",
            [{"series": 'up{job="node",node="gpu-node"}', "values": f"0x{STEPS}"}],
            "GpufleetNodeDown",
            True,
            {"job": "node", "node": "gpu-node", "severity": "critical"},
        ),
        case(
            "node up",
            [{"series": 'up{job="node",node="gpu-node"}', "values": f"1x{STEPS}"}],
            "GpufleetNodeDown",
            False,
            {"job": "node", "node": "gpu-node", "severity": "critical"},
        ),
    ]


def rule_tests(plan: SitePlan, rules_path: str = RULES_FILE) -> dict[str, Any]:
    """A promtool test file for every alert of the site's rules file at `rules_path`."""
    site = plan.site
    cases = [c for svc in site.services for c in _service_cases(site, svc)] + _gpu_cases(site)
    return {"rule_files": [rules_path], "evaluation_interval": INTERVAL, "tests": cases}
