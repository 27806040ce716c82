"""The SLO probe measures a real streaming server and exposes what it saw in Prometheus' text format."""

from __future__ import annotations

import threading
import urllib.request

import pytest

from infra.inference.fakeserver import FakeBehaviour, FakeOpenAIServer
from infra.observe import probe


def _config(url: str) -> dict[str, object]:
    return {
        "listen": "127.0.0.1:0",
        "interval_s": 0.01,
        "endpoints": [{"service": "svc", "node": "n1", "engine": "llamacpp", "url": url, "model": "m"}],
    }


def _series(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_probe_histograms_follow_the_servers_delays() -> None:
    """With 60 ms to the first token and 30 ms between tokens, no TTFT lands at or under 0.05 s and first token
    plus gaps last at least what the server waited; counters and the success gauge follow the requests.

    Only bounds the server guarantees are asserted: no first token before its delay, no last token before all
    gaps have passed since the request. A busy machine may answer later (an upper bound failed under load), and
    a descheduled client reads chunks back to back, so a single gap (or the gaps alone) bounds nothing.
    """
    with FakeOpenAIServer(FakeBehaviour(first_delay_s=0.06, gap_s=0.03)) as server:
        p = probe.Probe(_config(server.url))
        probe.run(p, 0.0, threading.Event(), rounds=3)
    s = _series(p.exposition())
    lab = 'service="svc",node="n1"'
    assert s[f'gpufleet_probe_ttft_seconds_bucket{{{lab},le="0.05"}}'] == 0
    assert s[f'gpufleet_probe_ttft_seconds_count{{{lab}}}'] == 3
    gaps = s[f'gpufleet_probe_itl_seconds_count{{{lab}}}']
    waited = s[f'gpufleet_probe_ttft_seconds_sum{{{lab}}}'] + s[f'gpufleet_probe_itl_seconds_sum{{{lab}}}']
    # Per request, the last gap may be the finish chunk, sent without a delay.
    assert gaps >= 3 * 10 and waited >= (3 * 0.06 + (gaps - 3) * 0.03) * 0.999
    assert s[f'gpufleet_probe_itl_seconds_bucket{{{lab},le="60"}}'] == gaps
    assert s[f"gpufleet_probe_requests_total{{{lab}}}"] == 3 and s[f"gpufleet_probe_failures_total{{{lab}}}"] == 0
    assert s[f"gpufleet_probe_success{{{lab}}}"] == 1 and s[f"gpufleet_probe_tokens_per_second{{{lab}}}"] > 0


def test_probe_counts_failures_and_serves_metrics_on_loopback() -> None:
    """A server answering 500 is a failure (success 0); `/metrics` answers over HTTP, anything else is 404."""
    with FakeOpenAIServer(FakeBehaviour(status=500)) as server:
        p = probe.Probe(_config(server.url))
        probe.run(p, 0.0, threading.Event(), rounds=2)
    http = probe.serve(p, "127.0.0.1", 0)
    try:
        port = http.server_address[1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            s = _series(r.read().decode())
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=5)
    finally:
        http.shutdown()
    lab = 'service="svc",node="n1"'
    assert s[f"gpufleet_probe_failures_total{{{lab}}}"] == 2 and s[f"gpufleet_probe_success{{{lab}}}"] == 0


@pytest.mark.parametrize("listen", ["0.0.0.0:9479", "198.18.1.11:9479", "127.0.0.1:x"])
def test_probe_listens_on_loopback_only(listen: str) -> None:
    """The probe's metrics are for the Prometheus beside it: any other listen address is refused."""
    with pytest.raises(ValueError):
        probe.parse_listen(listen)
