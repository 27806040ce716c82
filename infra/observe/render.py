"""Every monitoring file of a site, as text by relative path (pure; the role and `gpufleet monitoring` write them)."""

from __future__ import annotations

import json
from typing import Any

import yaml

from infra.observe import config, dashboards, ruletests
from infra.observe.metrics import dcgm_counters_csv
from infra.plan.node import SitePlan

HEADER = "# Written by gpufleet from the stack (infra/observe): edit the stack, not this file.\n"


def _yaml(data: Any) -> str:
    return HEADER + yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)


def files(plan: SitePlan, rules_path: str = config.RULES_FILE) -> dict[str, str]:
    """Every file by relative path; `rules_path` is where prometheus.yml finds the rules.

    `rules.yml`, `rules.test.yml`, `alertmanager.yml`, `dcgm-counters.csv`, `grafana/gpufleet.json` (the site
    dashboard) with its provisioning file `grafana/provisioning.yml`, and per monitored segment
    `<segment>/prometheus.yml` and `<segment>/probe.json`.
    """
    site = plan.site
    out = {
        "rules.yml": _yaml(config.rules(plan)),
        "rules.test.yml": _yaml(ruletests.rule_tests(plan, "rules.yml")),
        "alertmanager.yml": _yaml(config.alertmanager_config(site)),
        "dcgm-counters.csv": dcgm_counters_csv(),
        "grafana/gpufleet.json": json.dumps(dashboards.site_dashboard(site), indent=2, sort_keys=True) + "\n",
        "grafana/provisioning.yml": _yaml(dashboards.provisioning()),
    }
    for segment in config.monitored_segments(site):
        out[f"{segment}/prometheus.yml"] = _yaml(config.prometheus_config(plan, segment, rules_path))
        out[f"{segment}/probe.json"] = json.dumps(config.probe_config(plan, segment), indent=2, sort_keys=True) + "\n"
    return out
