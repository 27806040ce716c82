"""bench-inference: vLLM's metric maths, the streaming client against a loopback fake server, the CLI."""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from infra.cli import main
from infra.commands.inference import _slo
from infra.inference.bench import (
    DEFAULT_PROMPT,
    Endpoint,
    LoadSpec,
    RequestResult,
    Slo,
    SweepStep,
    arrival_times,
    calculate_metrics,
    endpoints_of,
    percentile,
    request_shapes,
    run_load,
    smoke,
    stream_completion,
    sweep,
    sweep_rates,
)
from infra.inference.fakeserver import FakeBehaviour, FakeOpenAIServer
from infra.model.load import load_site
from infra.model.site import ServiceSlo


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
    """The lab stack's endpoints are node address + service port, one per (service, node); a spanning
    service (tiny-span: head lab-gpu02, worker lab-gpu01) has one, its head's."""
    site = load_site(stack="lab")
    eps = endpoints_of(site)
    assert [(e.label, e.url, e.model) for e in eps] == [
        ("tiny-airgap@lab-gpu03", "http://198.18.2.11:8080/v1", "gpufleet-tiny-lab"),
        ("tiny-connected@lab-gpu01", "http://198.18.1.11:8080/v1", "gpufleet-tiny-lab"),
        ("tiny-span@lab-gpu02", "http://198.18.1.12:8090/v1", "gpufleet-tiny-lab"),
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


# --- open loop, lengths, sweep (vllm/benchmarks/serve.py `get_request`, `calculate_metrics`, result keys) ---


def test_arrivals_are_seeded_poisson_rescaled_like_vllm() -> None:
    """Gaps are exponential at burstiness 1 (CV ≈ 1), more regular at 4 (CV ≈ 0.5); the last send is at n/rate."""
    t = arrival_times(4000, rate=20.0, seed=3)
    assert t == arrival_times(4000, rate=20.0, seed=3)
    assert t != arrival_times(4000, rate=20.0, seed=4)
    assert t[-1] == pytest.approx(4000 / 20.0)
    assert (np.diff(t) >= 0).all() and t[0] > 0
    gaps = np.diff([0.0, *t])
    assert gaps.mean() == pytest.approx(1 / 20.0, rel=0.01)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.06)
    regular = np.diff([0.0, *arrival_times(4000, rate=20.0, burstiness=4.0, seed=3)])
    assert regular.std() / regular.mean() == pytest.approx(0.5, abs=0.05)
    assert arrival_times(5, float("inf")) == [0.0] * 5


def test_request_lengths_follow_range_ratio() -> None:
    """Prompt words and max_tokens stay within ±range_ratio of the asked lengths and differ per request."""
    spec = LoadSpec(num_requests=200, max_tokens=40, input_len=100, range_ratio=0.25, seed=1)
    shapes = request_shapes(spec)
    words = [len(p.split()) for p, _ in shapes]
    outs = [n for _, n in shapes]
    assert min(words) >= 75 and max(words) <= 125 and len(set(words)) > 20
    assert min(outs) >= 30 and max(outs) <= 50 and len(set(outs)) > 10
    assert len({p.split()[0] for p, _ in shapes}) == 200  # no shared prefix for a cache to serve
    fixed = request_shapes(LoadSpec(num_requests=3, max_tokens=7))
    assert fixed == [(DEFAULT_PROMPT, 7)] * 3


def test_open_loop_run_reports_vllm_keys_and_the_applied_load() -> None:
    """An open-loop run sends every request, sums prompt/output tokens, and names its load and vLLM's keys."""
    spec = LoadSpec(num_requests=10, concurrency=10, max_tokens=4, request_rate=200.0, input_len=12,
                    range_ratio=0.5, seed=2)
    with FakeOpenAIServer(FakeBehaviour(gap_s=0.001)) as srv:
        b = run_load(Endpoint(srv.url, "m"), spec)
        sent = srv.requests
    shapes = request_shapes(spec)
    assert sorted(r["max_tokens"] for r in sent) == sorted(n for _, n in shapes)
    m = b.metrics
    assert m["completed"] == 10 and m["not_sent"] == 0
    assert m["total_input_tokens"] == sum(len(p.split()) for p, _ in shapes)
    assert m["total_output_tokens"] == sum(n for _, n in shapes)
    for key in ("request_throughput", "output_throughput", "total_token_throughput", "duration"):
        assert key in m
    for name in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "std", "p99"):
            assert f"{stat}_{name}_ms" in m
        assert m[f"p99_{name}_ms"] == m[f"{name}_ms"]["p99"]
    assert b.load["request_rate"] == 200.0 and b.load["max_concurrency"] == 10
    assert "open loop at 200 req/s (Poisson, seed 2)" in b.load["applied"]
    assert "prompts 12 ±50% words" in b.load["applied"]


def test_cap_holds_in_open_loop_too() -> None:
    """All-at-once arrivals with a cap of 2: the server never sees more than 2 in flight; the rest queue."""
    with FakeOpenAIServer(FakeBehaviour(first_delay_s=0.01)) as srv:
        b = run_load(Endpoint(srv.url, "m"), LoadSpec(num_requests=8, concurrency=2, max_tokens=2))
        assert srv.max_in_flight <= 2
    assert b.metrics["completed"] == 8
    assert b.metrics["client_queue_time_ms"]["p99"] > 0  # later requests waited for a slot


def _step(rate: float, capacity: float) -> SweepStep:
    m = {"p99_ttft_ms": 100.0, "p99_itl_ms": 10.0 if rate <= capacity else 500.0, "completed": 10, "failed": 0}
    return SweepStep(rate, m, Slo(ttft_p99_ms=1000, itl_p99_ms=50).misses(m))


def test_sweep_doubles_then_bisects_to_the_slo_limit() -> None:
    """Capacity 10 req/s: 0.5…8 pass, 16 misses, geometric bisection lands between 8 and 11.3."""
    seen: list[float] = []

    def measure(rate: float) -> SweepStep:
        seen.append(rate)
        return _step(rate, 10.0)

    steps, best = sweep_rates(measure, start=0.5, limit=64, refine=2)
    assert seen[:6] == [0.5, 1, 2, 4, 8, 16]
    assert seen[6] == pytest.approx(math.sqrt(8 * 16), abs=0.001)  # 11.314: misses
    assert seen[7] == pytest.approx(math.sqrt(8 * 11.314), abs=0.001)  # 9.514: meets
    assert best == seen[7] and len(steps) == 8
    assert not steps[5].meets and "p99 ITL 500.0 ms > 50 ms" in steps[5].misses


def test_sweep_with_given_rates_stops_at_first_miss_and_may_find_none() -> None:
    """A rate list is measured in order up to the first miss; if the lowest misses, the answer is None."""
    steps, best = sweep_rates(lambda r: _step(r, 3.0), rates=[5, 1, 2, 4, 8])
    assert [s.request_rate for s in steps] == [1, 2, 4] and best == 2
    steps, best = sweep_rates(lambda r: _step(r, 0.1), rates=[1, 2])
    assert best is None and len(steps) == 1


def test_slo_counts_errors_and_unsent_requests() -> None:
    """More failed or unsent requests than max_error_rate misses the SLO even when latencies are fine."""
    slo = Slo(ttft_p99_ms=1000, itl_p99_ms=50, max_error_rate=0.1)
    good = {"p99_ttft_ms": 1.0, "p99_itl_ms": 1.0, "completed": 9, "failed": 1}
    assert slo.misses(good) == []
    assert slo.misses(good, not_sent=5) == ["40% of requests failed or were not sent (> 10%)"]  # 6 of 15


def test_sweep_uses_the_stack_slo_of_the_service() -> None:
    """Without flags the sweep takes the service's SLO from the stack's observability model and says so."""
    site = load_site(stack="lab")
    svc = site.services[0]
    args = argparse.Namespace(service=svc.name, slo_ttft_ms=None, slo_itl_ms=None)
    slo = _slo(args, site)
    expected = svc.slo or site.observability.slo
    assert (slo.ttft_p99_ms, slo.itl_p99_ms) == (expected.ttft_p99_ms, expected.itl_p99_ms)
    assert svc.name in slo.source
    flags = _slo(argparse.Namespace(service=None, slo_ttft_ms=500.0, slo_itl_ms=None), None)
    assert flags.ttft_p99_ms == 500.0 and flags.itl_p99_ms == ServiceSlo().itl_p99_ms
    assert flags.source.startswith("command line")


def test_cli_sweep_json_runs_each_rate(capsys: pytest.CaptureFixture[str]) -> None:
    """`--sweep 20,40` runs both rates open loop and reports the highest meeting a generous SLO."""
    with FakeOpenAIServer(FakeBehaviour(gap_s=0.001)) as srv:
        code = main(["bench-inference", "--endpoint", srv.url, "--requests", "4", "--max-tokens", "3",
                     "--sweep", "20,40", "--slo-ttft-ms", "60000", "--slo-itl-ms", "60000", "--facts-dir", "-",
                     "--json"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    w = data["endpoints"][0]
    assert data["mode"] == "sweep"
    assert [s["request_rate"] for s in w["steps"]] == [20, 40]
    assert w["max_rate_meeting_slo"] == 40 and all(s["meets_slo"] for s in w["steps"])
    assert "open loop at each swept rate" in w["load"]


def test_cli_open_loop_bad_input_is_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    """A zero rate, a range ratio of 1 or more and a bad rate list are refused before anything is sent."""
    with pytest.raises(SystemExit) as exc:
        main(["bench-inference", "--endpoint", "http://127.0.0.1:9/v1", "--request-rate", "0"])
    assert exc.value.code == 2
    assert main(["bench-inference", "--endpoint", "http://127.0.0.1:9/v1", "--range-ratio", "1.5",
                 "--facts-dir", "-"]) == 2
    assert "range ratio" in capsys.readouterr().err
    assert main(["bench-inference", "--endpoint", "http://127.0.0.1:9/v1", "--sweep", "1,x",
                 "--facts-dir", "-"]) == 2
    assert "not a rate" in capsys.readouterr().err


def test_slo_ttft_counts_the_client_queue() -> None:
    """A flat TTFT with seconds of client-side queueing misses the TTFT objective (users wait for both)."""
    slo = Slo(ttft_p99_ms=1000, itl_p99_ms=50)
    m = {"p99_ttft_ms": 10.0, "p99_ttft_incl_client_queue_ms": 9000.0, "p99_itl_ms": 1.0, "completed": 5,
         "failed": 0}
    assert slo.misses(m) == ["p99 TTFT 9000 ms > 1000 ms"]


def test_sweep_sends_at_least_rate_times_min_seconds() -> None:
    """`min_seconds` stretches each rate's run: 50 req/s × 0.2 s = 10 requests even when 2 are asked."""
    with FakeOpenAIServer(FakeBehaviour(gap_s=0.001)) as srv:
        out = sweep(Endpoint(srv.url, "m"), LoadSpec(num_requests=2, concurrency=2, max_tokens=2),
                    Slo(ttft_p99_ms=60000, itl_p99_ms=60000), rates=[50], min_seconds=0.2)
        assert len(srv.requests) == 10
    assert out["steps"][0]["completed"] == 10 and out["max_rate_meeting_slo"] == 50
    assert "at least rate × 0.2 s requests per rate" in out["load"]
