"""Monitoring derived from the stack, judged by the real Prometheus tools (promtool, prometheus)."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.cli import main
from infra.commands.monitoring import promtool_checks
from infra.model.load import load_site, parse_site
from infra.model.rules import check
from infra.observe import config, render
from infra.observe.metrics import dcgm_counters_csv
from infra.plan.node import plan_site

needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (apt: prometheus)")


@needs_promtool
@pytest.mark.parametrize("stack", ["lab", "example-prod", "example-airgap"])
def test_promtool_accepts_config_rules_and_passes_every_alert_test(stack: str) -> None:
    """Every rendered prometheus.yml and rules file passes promtool's checks, and every alert fires and stays
    quiet where its unit test says (vLLM, TGI/Triton and llama.cpp paths across the three stacks)."""
    assert main(["monitoring", "check", "--stack", stack]) == 0


@needs_promtool
def test_alert_tests_fail_when_the_threshold_is_not_the_objective(tmp_path: Path) -> None:
    """The generated tests judge the rules: rules from a 10x looser objective fail the suite."""
    raw = yaml.safe_load(Path("stacks/Pulumi.lab.yaml").read_text())["config"]["gpufleet:site"]
    strict = plan_site(parse_site(raw))
    raw["observability"]["slo"]["ttft_p99_ms"] *= 10
    loose = plan_site(parse_site(raw))
    files = render.files(strict, rules_path=str(tmp_path / "rules.yml"))
    files["rules.yml"] = render.files(loose)["rules.yml"]
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    results = {cmd: p.returncode for cmd, p in promtool_checks(tmp_path, ["connected"])}
    assert results["promtool check rules rules.yml"] == 0
    assert results["promtool test rules rules.test.yml"] != 0


def test_air_gapped_prometheus_is_federated_only_through_its_declared_port() -> None:
    """The site view scrapes the air-gapped Prometheus' /federate (SLO figures, alerts, up) and nothing else;
    the air-gapped Prometheus scrapes only its own segment's addresses."""
    plan = plan_site(load_site("lab"))
    connected = config.prometheus_config(plan, "connected")
    airgap = config.prometheus_config(plan, "airgap")
    fed = [j for j in connected["scrape_configs"] if j["job_name"] == "federate"]
    assert [c["targets"] for c in fed[0]["static_configs"]] == [["198.18.2.10:9090"]]
    assert fed[0]["metrics_path"] == "/federate" and fed[0]["honor_labels"] is True
    assert not any(j["job_name"] == "federate" for j in airgap["scrape_configs"])
    seg = plan.site.segments[1].cidr
    for job in airgap["scrape_configs"]:
        for sc in job["static_configs"]:
            for t in sc["targets"]:
                host = t.rsplit(":", 1)[0]
                assert host == "127.0.0.1" or __import__("ipaddress").ip_address(host) in seg, (job, t)


def test_dcgm_counter_list_carries_what_the_alerts_read() -> None:
    """Every DCGM field an alert reads is in the shipped counter list (the default list lacks ECC/NVLink)."""
    fields = {line.split(",")[0] for line in dcgm_counters_csv().splitlines() if line and not line.startswith("#")}
    exprs = " ".join(a["expr"] for a in config.gpu_alerts(load_site("lab")))
    used = {w for w in exprs.replace("(", " ").replace(")", " ").replace("[", " ").split() if w.startswith("DCGM_")}
    assert used and used <= fields


@pytest.mark.parametrize(
    ("patch", "path"),
    [
        ({"prometheus": [{"segment": "nowhere", "host": "lab-gpu01"}], "site_view": "nowhere"},
         "observability.prometheus[0].segment"),
        ({"prometheus": [{"segment": "connected", "host": "lab-gpu03"},
                         {"segment": "airgap", "host": "lab-mirror"}], "site_view": "connected"},
         "observability.prometheus[0].host"),
        ({"prometheus": [{"segment": "connected", "host": "lab-gpu01"}], "site_view": "connected"},
         "observability.prometheus"),
        ({"prometheus": [{"segment": "connected", "host": "lab-gpu01"},
                         {"segment": "airgap", "host": "lab-mirror"}], "site_view": "airgap"},
         "observability.site_view"),
        ({"prometheus": [{"segment": "connected", "host": "lab-gpu01"},
                         {"segment": "connected", "host": "lab-gpu02"},
                         {"segment": "airgap", "host": "lab-mirror"}], "site_view": "connected"},
         "observability.prometheus[1].segment"),
    ],
)
def test_observability_mistakes_are_caught_before_any_host_is_touched(patch: dict[str, Any], path: str) -> None:
    """Unknown segment, a host on another segment, a segment with nodes but no Prometheus, an air-gapped
    site view federating others, two Prometheus on one segment: each a problem naming its path."""
    raw = yaml.safe_load(Path("stacks/Pulumi.lab.yaml").read_text())["config"]["gpufleet:site"]
    raw["observability"] = patch
    from infra.model.site import Site

    problems = check(Site.model_validate(raw))
    assert path in [p.path for p in problems], problems


def test_status_without_prometheus_exits_5(capsys: pytest.CaptureFixture[str]) -> None:
    """Nothing listening: a one-line message and exit 5, no traceback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        code = main(["status", "--stack", "lab", "--prometheus", f"http://127.0.0.1:{port}"])
    err = capsys.readouterr().err
    assert code == 5 and "cannot reach Prometheus" in err and "Traceback" not in err


@pytest.mark.parametrize("stack", ["lab", "example-prod", "example-airgap"])
def test_dashboard_is_grafana_schema_shaped_and_follows_the_objectives(stack: str) -> None:
    """Grafana's SDK (generated from its published schema) reads the dashboard back to the same document;
    every service has its four figures with the stack's objective as the red threshold."""
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.dashboard import Dashboard

    from infra.observe.dashboards import site_dashboard

    site = load_site(stack)
    d = site_dashboard(site)
    assert json.loads(json.dumps(Dashboard.from_json(d), cls=JSONEncoder, sort_keys=True)) == d
    for svc in site.services:
        slo = config.slo_of(site, svc)
        panels = {
            p["title"]: p
            for p in d["panels"]
            if any(f'service="{svc.name}"' in t.get("expr", "") for t in p.get("targets") or [])
        }
        steps = panels["TTFT p99"]["fieldConfig"]["defaults"]["thresholds"]["steps"]
        assert steps[-1] == {"color": "red", "value": slo.ttft_p99_ms}
        assert {"TTFT p99", "inter-token latency p99", "generated tokens/s", "error ratio"} <= panels.keys()
