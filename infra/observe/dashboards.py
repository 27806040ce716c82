"""Grafana dashboards generated from the same SLO definitions as the alerts, built with Grafana's own SDK.

`grafana-foundation-sdk` is generated from Grafana's published dashboard schema, so building through its
typed builders and serialising with its encoder gives JSON of the schema's shape; a test reads it back with
the SDK's `Dashboard.from_json` and requires the same document. Panels read the recording rules of
`infra.observe.config`, with the objective of each figure drawn as a threshold line.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from grafana_foundation_sdk.builders import common as gcommonb
from grafana_foundation_sdk.builders import dashboard as gdash
from grafana_foundation_sdk.builders import prometheus as gprom
from grafana_foundation_sdk.builders import stat as gstat
from grafana_foundation_sdk.builders import timeseries as gts
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as gcommon
from grafana_foundation_sdk.models import dashboard as gmodel

from infra.model.site import Site
from infra.observe import config

DATASOURCE = gmodel.DataSourceRef(type_val="prometheus", uid="${datasource}")


def _thresholds(objective: float | None, *, higher_is_better: bool = False) -> gdash.ThresholdsConfig:
    ok, bad = ("red", "green") if higher_is_better else ("green", "red")
    steps = [gmodel.Threshold(value=None, color=ok)]
    if objective is not None:
        steps.append(gmodel.Threshold(value=objective, color=bad))
    return gdash.ThresholdsConfig().mode(gmodel.ThresholdsMode.ABSOLUTE).steps(steps)


def _series(title: str, expr: str, unit: str, objective: float | None, *, higher_is_better: bool = False) -> gts.Panel:
    return (
        gts.Panel()
        .title(title)
        .datasource(DATASOURCE)
        .unit(unit)
        .with_target(gprom.Dataquery().expr(expr).legend_format("{{node}}").ref_id("A"))
        .thresholds(_thresholds(objective, higher_is_better=higher_is_better))
        .thresholds_style(gcommonb.GraphThresholdsStyleConfig().mode(gcommon.GraphTresholdsStyleMode.LINE))
        .span(6)
        .height(8)
    )


def site_dashboard(site: Site) -> dict[str, Any]:
    """The site's dashboard: a row per service (its four SLO figures against its objectives), then GPUs."""
    uid = "gpufleet-" + hashlib.sha256(site.name.encode()).hexdigest()[:12]
    d = (
        gdash.Dashboard(f"gpufleet — {site.name}")
        .uid(uid)
        .tags(["gpufleet", site.name])
        .time("now-6h", "now")
        .refresh("1m")
        .readonly()
        .with_variable(gdash.DatasourceVariable("datasource").label("Prometheus (site view)").type("prometheus"))
    )
    for svc in site.services:
        slo = config.slo_of(site, svc)
        sel = f'{{service="{svc.name}"}}'
        d = d.with_row(gdash.Row(f"{svc.name} ({svc.engine.value}, {svc.model.name})"))
        d = d.with_panel(
            gstat.Panel().title("answers the probe").datasource(DATASOURCE)
            .with_target(gprom.Dataquery().expr(config.UP + sel).legend_format("{{node}}").ref_id("A"))
            .thresholds(_thresholds(1, higher_is_better=True)).span(24).height(4)
        )
        d = d.with_panel(_series("TTFT p99", f"{config.TTFT}{sel} * 1000", "ms", slo.ttft_p99_ms))
        d = d.with_panel(_series("inter-token latency p99", f"{config.ITL}{sel} * 1000", "ms", slo.itl_p99_ms))
        d = d.with_panel(
            _series(
                "generated tokens/s",
                config.TOKENS + sel,
                "none",
                slo.min_tokens_per_s or None,
                higher_is_better=True,
            )
        )
        d = d.with_panel(_series("error ratio", config.ERRORS + sel, "percentunit", slo.max_error_rate))
    gpu = site.observability.gpu
    d = d.with_row(gdash.Row("GPUs"))
    d = d.with_panel(
        _series("GPU temperature", "max by (node, gpu) (DCGM_FI_DEV_GPU_TEMP)", "celsius", gpu.max_temperature_c)
    )
    d = d.with_panel(
        _series(
            "GPU memory in use",
            "max by (node, gpu) (DCGM_FI_DEV_FB_USED / (DCGM_FI_DEV_FB_USED + DCGM_FI_DEV_FB_FREE))",
            "percentunit",
            gpu.max_memory_used_fraction,
        )
    )
    d = d.with_panel(_series("XID changes (10 min)", "changes(DCGM_FI_DEV_XID_ERRORS[10m])", "none", 1))
    d = d.with_panel(
        _series("uncorrectable ECC errors (10 min)", "increase(DCGM_FI_DEV_ECC_DBE_VOL_TOTAL[10m])", "none", 1)
    )
    encoded: dict[str, Any] = json.loads(json.dumps(d.build(), cls=JSONEncoder, sort_keys=True))
    return encoded


def provisioning() -> dict[str, Any]:
    """Grafana's dashboard provisioning file pointing at the directory the dashboards are copied to."""
    return {
        "apiVersion": 1,
        "providers": [
            {
                "name": "gpufleet",
                "type": "file",
                "disableDeletion": True,
                "allowUiUpdates": False,
                "options": {"path": "/var/lib/grafana/dashboards/gpufleet"},
            }
        ],
    }
