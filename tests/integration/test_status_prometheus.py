"""`gpufleet status` against a real Prometheus (Debian's prometheus binary) loading the lab stack's real rules.

Marked `integration`: it runs a server for tens of seconds, so it stays out of the fast unit run; CI runs it.
"""

from __future__ import annotations

import http.server
import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml

from infra.cli import main
from infra.model.load import load_site
from infra.observe import render
from infra.plan.node import plan_site

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus not installed (apt: prometheus)"),
]


class _Exporter(http.server.BaseHTTPRequestHandler):
    """Probe series for every lab service; each scrape adds observations at the current TTFT.

    Slow answers come 20 times as often as fast ones did, so they dominate the 5-minute window after a scrape
    or two however long the fast phase took on a loaded machine.
    """

    ttft_s = 0.05
    counts: ClassVar[dict[str, float]] = {}

    def do_GET(self) -> None:
        lines = []
        step = 10 if type(self).ttft_s < 1 else 200
        # tiny-span spans lab-gpu02 (head) and lab-gpu01: probed, like every spanning service, at its head only.
        for svc, node in (("tiny-connected", "lab-gpu01"), ("tiny-airgap", "lab-gpu03"), ("tiny-span", "lab-gpu02")):
            lab = f'service="{svc}",node="{node}"'
            for le in ("0.1", "1", "10", "+Inf"):
                key = f"{svc}{le}"
                if le == "+Inf" or float(le) >= type(self).ttft_s:
                    self.counts[key] = self.counts.get(key, 0) + step
                lines.append(f'gpufleet_probe_ttft_seconds_bucket{{{lab},le="{le}"}} {self.counts.get(key, 0)}')
                # Inter-token gaps all under 0.1 s: far inside the lab's 1 s objective in either phase.
                itl = self.counts.get(svc + "+Inf", 0)
                lines.append(f'gpufleet_probe_itl_seconds_bucket{{{lab},le="{le}"}} {itl}')
            n = self.counts.get(svc + "+Inf", 0)
            lines += [f"gpufleet_probe_requests_total{{{lab}}} {n}", f"gpufleet_probe_failures_total{{{lab}}} 0",
                      f"gpufleet_probe_success{{{lab}}} 1", f"gpufleet_probe_tokens_per_second{{{lab}}} 40"]
        body = ("\n".join(lines) + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[tuple[str, type[_Exporter]]]:
    """A real Prometheus (1 s scrapes) over a local exporter, loading the lab stack's real rules."""
    exporter = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Exporter)
    threading.Thread(target=exporter.serve_forever, daemon=True).start()
    target = f"127.0.0.1:{exporter.server_address[1]}"
    plan = plan_site(load_site("lab"))
    (tmp_path / "rules.yml").write_text(render.files(plan)["rules.yml"])
    cfg = {
        "global": {"scrape_interval": "500ms", "evaluation_interval": "500ms"},
        "rule_files": [str(tmp_path / "rules.yml")],
        "scrape_configs": [
            {"job_name": "node", "static_configs": [{"targets": [target], "labels": {"node": n.hostname}}
                                                    for n in plan.nodes]},
            {"job_name": "gpufleet-probe", "static_configs": [{"targets": [target]}]},
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    port = _free_port()
    proc = subprocess.Popen(
        ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        ready_by = time.monotonic() + 60  # a loaded CI machine can take a while to start it
        while time.monotonic() < ready_by:
            try:
                with urllib.request.urlopen(base + "/-/ready", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.1)
        else:
            pytest.fail("prometheus did not become ready")
        yield base, _Exporter
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        exporter.shutdown()


def _status(base: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any]]:
    code = main(["status", "--stack", "lab", "--prometheus", base, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_status_reads_slo_figures_from_prometheus_and_exits_3_outside_target(
    prometheus: tuple[str, type[_Exporter]], capsys: pytest.CaptureFixture[str]
) -> None:
    """Fast answers: every node up, both services within target, exit 0. Then the probe sees TTFT above the
    objective (5 s): the recording rule moves and status exits 3 naming the figure."""
    base, exporter = prometheus
    deadline = time.monotonic() + 60
    code, data = _status(base, capsys)
    while (code != 0 or any(f["value"] is None for s in data["services"] for f in s["figures"][:1])) \
            and time.monotonic() < deadline:
        time.sleep(0.5)
        code, data = _status(base, capsys)
    assert code == 0, data
    assert all(data["nodes_up"].values()) and len(data["nodes_up"]) == 4
    ttft = {s["service"]: s["figures"][0] for s in data["services"]}
    assert ttft["tiny-connected"]["value"] < 100 and ttft["tiny-connected"]["within"] is True

    exporter.ttft_s = 8.0

    def connected_ttft(d: dict[str, Any]) -> dict[str, Any]:
        return next(s["figures"][0] for s in d["services"] if s["service"] == "tiny-connected")

    # Wait for the TTFT figure itself to cross the objective: status may also leave its target for a moment
    # for another reason while the window fills (one scrape of a series missing), which is not what is tested.
    deadline = time.monotonic() + 60
    while (connected_ttft(data)["value"] or 0) <= 5000 and time.monotonic() < deadline:
        time.sleep(0.5)
        code, data = _status(base, capsys)
    assert connected_ttft(data)["value"] > 5000 and connected_ttft(data)["within"] is False, data
    assert code == 3, data
