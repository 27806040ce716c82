"""bench-inference: vLLM's metric maths, the streaming client against a loopback fake server, the CLI."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from infra.cli import main
from infra.inference.bench import (
    Endpoint,
    LoadSpec,
    RequestResult,
    calculate_metrics,
    endpoints_of,
    percentile,
    run_load,
    smoke,
    stream_completion,
)
from infra.inference.fakeserver import FakeBehaviour, FakeOpenAIServer
from infra.model.load import load_site


def ok(ttft: float, itl: list[float], tokens: int | None = None) -> RequestResult:
    return RequestResult(success=True, ttft=ttft, itl=itl, latency=ttft + sum(itl),
                         output_tokens=tokens if tokens is not None else len(itl) + 1, chunks=len(itl) + 1)


def test_percentile_is_numpy_linear() -> None:
    """Percentiles equal numpy.percentile's default (linear) method, which vLLM's report uses."""
    rng = random.Random(7)
    for n in (1, 2, 5, 10, 101):
        values = [rng.random() for _ in range(n)]
        for q in (0, 50, 90, 99, 100):
            assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert percentile([], 50) == 0.0


def test_metrics_follow_vllm_definitions() -> None:
    """TTFT, TPOT (excl. first token), pooled ITL, E2EL and throughputs computed as vLLM computes them."""
    a = ok(0.100, [0.010, 0.020, 0.030])          # 4 tokens, E2EL 0.160, TPOT 0.020
    b = ok(0.200, [0.040], tokens=5)               # usage says 5 tokens in 2 chunks: TPOT 0.040/4
    c = ok(0.300, [])                               # a single token: no TPOT, no ITL
    failed = RequestResult(error="HTTP 500: boom")
    m = calculate_metrics([a, b, c, failed], duration_s=2.0)
    assert m["completed"] == 3 and m["failed"] == 1
    assert m["total_output_tokens"] == 4 + 5 + 1
    assert m["output_throughput"] == pytest.approx(10 / 2.0)
    assert m["request_throughput"] == pytest.approx(3 / 2.0)
    assert m["ttft_ms"]["mean"] == pytest.approx(200.0)
    assert m["ttft_ms"]["p50"] == pytest.approx(200.0)
    assert m["ttft_ms"]["p90"] == pytest.approx(float(np.percentile([100, 200, 300], 90)))
    assert m["tpot_ms"]["mean"] == pytest.approx((20.0 + 10.0) / 2)
    assert m["itl_ms"]["mean"] == pytest.approx(np.mean([10, 20, 30, 40]))
    assert m["itl_ms"]["p99"] == pytest.approx(float(np.percentile([10, 20, 30, 40], 99)))
    assert m["e2el_ms"]["median"] == pytest.approx(240.0)
    assert m["errors"] == ["HTTP 500: boom"]


def test_metrics_of_nothing_are_zero() -> None:
    """No successful request gives zero throughput and zero percentiles, not a crash."""
    m = calculate_metrics([RequestResult(error="x")], 1.0)
    assert m["completed"] == 0 and m["output_throughput"] == 0 and m["ttft_ms"]["p99"] == 0


def test_client_times_chunks_against_known_delays() -> None:
    """Against a server that waits 30 ms then 5 ms per chunk, chunk k arrives ≥ 30 + 5k ms; E2EL = TTFT+ΣITL."""
    with FakeOpenAIServer(FakeBehaviour(first_delay_s=0.03, gap_s=0.005)) as srv:
        r = stream_completion(Endpoint(srv.url, "tiny"), LoadSpec(max_tokens=6))
        body = srv.requests[0]
    assert r.success, r.error
    assert r.chunks == 6 and r.output_tokens == 6 and len(r.itl) == 5
    assert r.ttft >= 0.03
    # Gaps jitter (a late chunk shortens the next gap), but no chunk can arrive before the server sent it.
    for k in range(1, 6):
        assert r.ttft + sum(r.itl[:k]) >= 0.03 + 0.005 * k
    assert r.latency == pytest.approx(r.ttft + sum(r.itl))
    assert r.text == "aaaaaa"
    assert body["stream"] is True and body["max_tokens"] == 6 and body["model"] == "tiny"


def test_usage_tokens_win_over_chunk_count() -> None:
    """A server bundling 4 tokens per chunk reports usage: output tokens come from usage, TPOT uses them."""
    with FakeOpenAIServer(FakeBehaviour(gap_s=0.002, tokens_per_chunk=4)) as srv:
        r = stream_completion(Endpoint(srv.url, "m"), LoadSpec(max_tokens=16))
    assert r.chunks == 4 and r.output_tokens == 16
    m = calculate_metrics([r], r.latency)
    assert m["tpot_ms"]["mean"] == pytest.approx((r.latency - r.ttft) / 15 * 1000, abs=0.001)


def test_without_usage_chunks_are_counted() -> None:
    """Servers that stream no usage (llama.cpp) get one token per chunk."""
    with FakeOpenAIServer(FakeBehaviour(send_usage=False)) as srv:
        r = stream_completion(Endpoint(srv.url, "m"), LoadSpec(max_tokens=5))
    assert r.output_tokens == r.chunks == 5


def test_final_empty_chunk_is_timed_but_not_a_token() -> None:
    """llama.cpp's closing chunk (empty text, finish_reason) adds an ITL gap as in vLLM, not a token."""
    with FakeOpenAIServer(FakeBehaviour(send_usage=False, final_empty_chunk=True)) as srv:
        r = stream_completion(Endpoint(srv.url, "m"), LoadSpec(max_tokens=5))
    assert r.chunks == 6 and len(r.itl) == 5
    assert r.output_tokens == 5


def test_http_error_and_unreachable_are_failures() -> None:
    """An HTTP 500 and a closed port are failed requests with a readable error, never exceptions."""
    with FakeOpenAIServer(FakeBehaviour(status=500)) as srv:
        r = stream_completion(Endpoint(srv.url, "m"), LoadSpec())
    assert not r.success and r.error.startswith("HTTP 500")
    with FakeOpenAIServer() as srv:
        url = srv.url
    gone = stream_completion(Endpoint(url, "m"), LoadSpec(request_timeout_s=2))
    assert not gone.success and "ConnectionRefused" in gone.error


def test_load_is_bounded_in_count_and_concurrency() -> None:
    """run_load sends exactly num_requests, never more than `concurrency` at once."""
    with FakeOpenAIServer(FakeBehaviour(first_delay_s=0.01, gap_s=0.001)) as srv:
        b = run_load(Endpoint(srv.url, "m"), LoadSpec(num_requests=12, concurrency=3, max_tokens=4))
        assert len(srv.requests) == 12
        assert srv.max_in_flight <= 3
    m = b.metrics
    assert m["completed"] == 12 and m["not_sent"] == 0
    assert m["total_output_tokens"] == 48
    assert m["output_throughput"] == pytest.approx(48 / m["duration_s"], rel=1e-3)


def test_load_is_bounded_in_time() -> None:
    """Past max_duration no new request starts: the rest are reported as not sent."""
    with FakeOpenAIServer(FakeBehaviour(first_delay_s=0.2)) as srv:
        b = run_load(Endpoint(srv.url, "m"),
                     LoadSpec(num_requests=50, concurrency=1, max_tokens=1, max_duration_s=0.3))
        sent = len(srv.requests)
    assert sent < 50
    assert b.metrics["not_sent"] == 50 - sent


def test_endpoint_paths() -> None:
    """Base URLs with or without /v1 map to /v1/completions; https is refused (lab and node-local only)."""
    assert Endpoint("http://198.18.1.11:8080/v1", "m").completions_path == "/v1/completions"
    assert Endpoint("http://198.18.1.11:8080", "m").completions_path == "/v1/completions"
    assert Endpoint("198.18.1.11:8080", "m").host_port == ("198.18.1.11", 8080)
    with pytest.raises(ValueError, match="plain http"):
        _ = Endpoint("https://198.18.1.11/v1", "m").host_port


def test_endpoints_come_from_the_plan() -> None:
    """The lab stack's endpoints are node address + service port, one per (service, node)."""
    site = load_site(stack="lab")
    eps = endpoints_of(site)
    assert [(e.label, e.url, e.model) for e in eps] == [
        ("tiny-airgap@lab-gpu03", "http://198.18.2.11:8080/v1", "gpufleet-tiny-lab"),
        ("tiny-connected@lab-gpu01", "http://198.18.1.11:8080/v1", "gpufleet-tiny-lab"),
    ]
    assert [e.label for e in endpoints_of(site, service="tiny-connected")] == ["tiny-connected@lab-gpu01"]
    assert endpoints_of(site, service="tiny-connected", node="lab-gpu03") == []


def test_smoke_function() -> None:
    """smoke() sends one short completion and says ok with the token count."""
    with FakeOpenAIServer() as srv:
        r = smoke(Endpoint(srv.url, "m"))
        assert len(srv.requests) == 1 and srv.requests[0]["max_tokens"] == 8
    assert r["ok"] and r["output_tokens"] == 8 and r["error"] == ""


def test_cli_bench_json_and_fact_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`bench-inference --endpoint URL --json` prints metrics, writes the fact file, exits 0."""
    with FakeOpenAIServer(FakeBehaviour(gap_s=0.001)) as srv:
        code = main(["bench-inference", "--endpoint", srv.url, "--requests", "6", "--concurrency", "2",
                     "--max-tokens", "5", "--facts-dir", str(tmp_path), "--json"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    m = data["endpoints"][0]["metrics"]
    assert data["ok"] and data["mode"] == "bench"
    assert m["completed"] == 6 and m["total_output_tokens"] == 30
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        assert {"p50", "p90", "p99", "mean"} <= m[key].keys()
    assert json.loads(Path(data["fact_file"]).read_text()) == {k: v for k, v in data.items() if k != "fact_file"}


def test_cli_smoke_table_and_failure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--smoke` prints a table and exits 0; a failing endpoint exits 1 and names the error."""
    with FakeOpenAIServer() as srv:
        assert main(["bench-inference", "--smoke", "--endpoint", srv.url, "--facts-dir", str(tmp_path)]) == 0
    assert "ok" in capsys.readouterr().out
    with FakeOpenAIServer(FakeBehaviour(status=503)) as srv:
        assert main(["bench-inference", "--smoke", "--endpoint", srv.url, "--facts-dir", "-"]) == 1
    assert "HTTP 503" in capsys.readouterr().out


def test_cli_unknown_service_and_bad_load(capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown service or a zero request count is invalid input (exit 2) and sends nothing."""
    assert main(["bench-inference", "--stack", "lab", "--service", "nope"]) == 2
    assert "no endpoint for service 'nope'" in capsys.readouterr().err
    assert main(["bench-inference", "--endpoint", "http://127.0.0.1:9/v1", "--requests", "0"]) == 2
    assert main(["bench-inference", "--endpoint", "https://127.0.0.1:9/v1", "--facts-dir", "-"]) == 2
    assert "plain http" in capsys.readouterr().err
