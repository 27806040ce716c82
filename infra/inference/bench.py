"""A bounded load of OpenAI-compatible streaming completions, measured the way `vllm bench serve` measures.

Metric definitions follow vLLM's serving benchmark (`vllm/benchmarks/serve.py` `calculate_metrics` and
`benchmarks/lib/endpoint_request_func.py` `async_request_openai_completions`), so figures compare:

- TTFT: request sent → first streamed chunk that carries `choices`.
- ITL: the gap between consecutive such chunks, pooled over all requests.
- TPOT (excludes the first token): `(E2EL − TTFT) / (output_tokens − 1)` per request, only when
  output_tokens > 1.
- E2EL: request sent → last chunk with `choices` (the `[DONE]` marker is not a token).
- Output throughput: total output tokens / benchmark duration; request throughput: completed / duration;
  duration runs from the first request sent to the last one finished.
- Output tokens: the server's `usage.completion_tokens` when it streams usage, else the number of chunks
  with non-empty text (vLLM re-tokenizes the text instead; llama.cpp sends one token per chunk and a
  last empty chunk with only `finish_reason`, which TTFT/ITL count as vLLM does, but is not a token).
- Percentiles: linear interpolation between closest ranks (numpy's default, which vLLM uses).

Load is open loop like `vllm bench serve` (vllm/benchmarks/serve.py `get_request`): requests arrive at
`request_rate` per second with gamma-distributed gaps (shape `burstiness`, scale 1/(rate × burstiness);
burstiness 1 is a Poisson process), the schedule rescaled so the last arrival is at N / rate as vLLM does,
seeded; `inf` sends all at once. At most `concurrency` requests are in flight (vLLM's --max-concurrency);
a request that arrives while the cap is full waits on the client (its queue time is reported). Prompt and
output lengths are drawn uniformly within ±`range_ratio` of `input_len` / `output_len` (vLLM's random
dataset). The summary carries vLLM's result keys (`request_throughput`, `output_throughput`,
`mean_ttft_ms`, `median_ttft_ms`, `p99_ttft_ms`, … for ttft, tpot, itl and e2el) next to the nested form.
The random stream is Python's (`random.Random(seed)`), not numpy's, so schedules compare in law, not draw
by draw.

Stdlib only (http.client + threads): the client must run on a bare controller and never be the bottleneck
(its own overhead is a measured figure, `client_overhead`).
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from infra.inference.stream import DEFAULT_PROMPT, Endpoint, LoadSpec, RequestResult, stream_completion
from infra.model.site import Site
from infra.plan.fabric import serves_endpoint
from infra.plan.node import plan_site

__all__ = [
    "DEFAULT_PROMPT",
    "BenchResult",
    "Endpoint",
    "LoadSpec",
    "RequestResult",
    "calculate_metrics",
    "endpoints_of",
    "percentile",
    "run_load",
    "run_many",
    "smoke",
    "stream_completion",
]

PERCENTILES = (50.0, 90.0, 99.0)
def arrival_times(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Send times (seconds from the start) of `n` requests, as vLLM's `get_request` schedules them.

    Request i goes out after the first i + 1 gaps, each gamma(shape=burstiness, scale=1/(rate × burstiness))
    — exponential for burstiness 1 — and the cumulative schedule is rescaled so the last request goes out at
    exactly n / rate (vLLM does this to steady throughput across seeds).
    """
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    theta = 1.0 / (rate * burstiness)
    times, t = [], 0.0
    for _ in range(n):
        t += rng.gammavariate(burstiness, theta)
        times.append(t)
    scale = (n / rate) / times[-1]
    return [x * scale for x in times]


_WORDS = ("time", "person", "year", "way", "day", "thing", "man", "world", "life", "hand", "part", "child", "eye",
          "woman", "place", "work", "week", "case", "point", "government", "company", "number", "group", "problem")


def request_shapes(spec: LoadSpec) -> list[tuple[str, int]]:
    """(prompt, max_tokens) of every request: lengths uniform within ±range_ratio, seeded (vLLM's random set)."""
    rng = random.Random(spec.seed + 1)

    def length(base: int) -> int:
        lo, hi = max(1, math.floor(base * (1 - spec.range_ratio))), math.ceil(base * (1 + spec.range_ratio))
        return rng.randint(lo, max(lo, hi)) if spec.range_ratio else base

    out = []
    for i in range(spec.num_requests):
        if spec.input_len is None:
            prompt = spec.prompt
        else:
            # A distinct first word per request keeps prefix caches from serving later prompts for free.
            words = [str(i)] + [rng.choice(_WORDS) for _ in range(length(spec.input_len) - 1)]
            prompt = " ".join(words)
        out.append((prompt, length(spec.max_tokens)))
    return out


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile with linear interpolation (numpy.percentile's default method)."""
    if not values:
        return 0.0
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _summary_ms(values: Sequence[float]) -> dict[str, float]:
    """mean, median, std and p50/p90/p99 in milliseconds (zeros when empty, as vLLM reports)."""
    mean = sum(values) / len(values) if values else 0.0
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)) if values else 0.0
    out = {"mean": mean * 1000, "median": percentile(values, 50) * 1000, "std": std * 1000}
    for q in PERCENTILES:
        out[f"p{q:g}"] = percentile(values, q) * 1000
    return {k: round(v, 3) for k, v in out.items()}


VLLM_METRICS = ("ttft", "tpot", "itl", "e2el", "ttft_incl_client_queue")


def calculate_metrics(results: Sequence[RequestResult], duration_s: float) -> dict[str, Any]:
    """Compute vLLM's serving metrics over finished requests (`duration_s`: first send → last finish).

    Nested (`ttft_ms: {mean, median, std, p50, p90, p99}`) and flat under vLLM's own result keys
    (`mean_ttft_ms`, `median_ttft_ms`, `std_ttft_ms`, `p99_ttft_ms`, …, `request_throughput`,
    `output_throughput`, `total_token_throughput`), so a `vllm bench serve --save-result` JSON compares key
    by key.
    """
    ok = [r for r in results if r.success]
    ttfts = [r.ttft for r in ok]
    e2els = [r.latency for r in ok]
    itls = [gap for r in ok for gap in r.itl]
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    total_output = sum(r.output_tokens for r in ok)
    total_input = sum(r.prompt_tokens for r in ok)
    dur = max(duration_s, 1e-9)
    out: dict[str, Any] = {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": round(duration_s, 4),
        "duration": round(duration_s, 4),
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": round(len(ok) / dur, 4),
        "output_throughput": round(total_output / dur, 4),
        "total_token_throughput": round((total_input + total_output) / dur, 4),
        "ttft_ms": _summary_ms(ttfts),
        "tpot_ms": _summary_ms(tpots),
        "itl_ms": _summary_ms(itls),
        "e2el_ms": _summary_ms(e2els),
        "client_queue_time_ms": _summary_ms([r.queue_time for r in ok]),
        # What a user of an open-loop service waits for: the client-side wait for a slot plus TTFT.
        "ttft_incl_client_queue_ms": _summary_ms([r.queue_time + r.ttft for r in ok]),
        "errors": sorted({r.error for r in results if r.error})[:5],
    }
    for name in VLLM_METRICS:
        nested = out[f"{name}_ms"]
        for stat in ("mean", "median", "std"):
            out[f"{stat}_{name}_ms"] = nested[stat]
        for q in PERCENTILES:
            out[f"p{q:g}_{name}_ms"] = nested[f"p{q:g}"]
    return out


@dataclass
class BenchResult:
    """Metrics of one endpoint plus the load that produced them."""

    endpoint: str
    model: str
    label: str
    load: dict[str, Any]
    metrics: dict[str, Any]
    results: list[RequestResult] = field(repr=False, default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """JSON form (without per-request samples or generated text)."""
        load = {k: v for k, v in self.load.items() if k != "prompt"}
        return {"endpoint": self.endpoint, "model": self.model, "label": self.label, "load": load,
                "metrics": self.metrics}


def run_load(ep: Endpoint, spec: LoadSpec) -> BenchResult:
    """Send `spec.num_requests` on the arrival schedule, at most `spec.concurrency` in flight.

    A dispatcher sleeps until each scheduled arrival and hands the request to a pool of `concurrency`
    workers; a request that finds every worker busy waits (client queue time, as vLLM's semaphore). No
    request starts after `max_duration_s`: those are counted as `not_sent`.
    """
    schedule = arrival_times(spec.num_requests, spec.request_rate, spec.burstiness, spec.seed)
    shapes = request_shapes(spec)
    t0 = time.perf_counter()
    deadline = t0 + spec.max_duration_s
    lock = threading.Lock()
    started = 0

    def one(i: int) -> RequestResult | None:
        nonlocal started
        now = time.perf_counter()
        with lock:
            # A bounded run: past the deadline, queued requests are dropped instead of sent.
            if now >= deadline:
                return None
            started += 1
        r = stream_completion(ep, spec, *shapes[i])
        r.queue_time = max(0.0, now - (t0 + schedule[i]))
        return r

    futures: list[Future[RequestResult | None]] = []
    with ThreadPoolExecutor(max_workers=min(spec.concurrency, spec.num_requests)) as pool:
        for i, at in enumerate(schedule):
            wait = t0 + at - time.perf_counter()
            if t0 + at >= deadline:
                break
            if wait > 0:
                time.sleep(wait)
            futures.append(pool.submit(one, i))
    done = [r for r in (f.result() for f in futures) if r is not None]
    duration = time.perf_counter() - t0
    metrics = calculate_metrics(done, duration)
    metrics["not_sent"] = spec.num_requests - started
    load = {k: v for k, v in asdict(spec).items() if k != "prompt"}
    load["request_rate"] = "inf" if math.isinf(spec.request_rate) else spec.request_rate
    load["max_concurrency"] = spec.concurrency
    load["applied"] = spec.describe()
    return BenchResult(ep.url, ep.model, ep.label, load, metrics, done)


@dataclass(frozen=True)
class Slo:
    """Objectives a rate must meet: p99 TTFT and p99 ITL (ms) and the largest failed fraction."""

    ttft_p99_ms: float
    itl_p99_ms: float
    max_error_rate: float = 0.01
    source: str = ""

    def misses(self, metrics: dict[str, Any], not_sent: int = 0) -> list[str]:
        """Why the run misses the objectives (empty when it meets them).

        TTFT counts the client-side wait for a free slot too: with an in-flight cap, vLLM's TTFT alone would
        stay flat while arrivals queue on the client, and a rate would "meet" an SLO its users do not see.
        """
        out = []
        ttft = metrics.get("p99_ttft_incl_client_queue_ms", metrics["p99_ttft_ms"])
        if ttft > self.ttft_p99_ms:
            out.append(f"p99 TTFT {ttft:.0f} ms > {self.ttft_p99_ms:g} ms")
        if metrics["p99_itl_ms"] > self.itl_p99_ms:
            out.append(f"p99 ITL {metrics['p99_itl_ms']:.1f} ms > {self.itl_p99_ms:g} ms")
        total = metrics["completed"] + metrics["failed"] + not_sent
        errors = (metrics["failed"] + not_sent) / total if total else 1.0
        if errors > self.max_error_rate:
            out.append(f"{errors:.0%} of requests failed or were not sent (> {self.max_error_rate:.0%})")
        if metrics["completed"] == 0:
            out.append("no request completed")
        return out


@dataclass
class SweepStep:
    """One offered rate of a sweep and what it achieved."""

    request_rate: float
    metrics: dict[str, Any]
    misses: list[str]

    @property
    def meets(self) -> bool:
        """The rate met the SLO."""
        return not self.misses


def sweep_rates(measure: Callable[[float], SweepStep], *, rates: Sequence[float] | None = None,
                start: float = 0.5, limit: float = 64.0, refine: int = 2) -> tuple[list[SweepStep], float | None]:
    """Find the highest request rate that meets the SLO; returns every step and that rate (None: not even the first).

    With `rates`, measures them in increasing order and stops at the first miss. Without, doubles from
    `start` up to `limit` until a miss, then bisects `refine` times between the last pass and the first miss
    (geometric midpoints), so a sweep is O(log) runs, not a grid.
    """
    steps: list[SweepStep] = []
    best: float | None = None
    miss: float | None = None
    ladder = sorted(rates) if rates else []
    if not ladder:
        r = start
        while r <= limit:
            ladder.append(r)
            r *= 2
    for r in ladder:
        step = measure(r)
        steps.append(step)
        if not step.meets:
            miss = r
            break
        best = r
    if rates or best is None or miss is None:
        return steps, best
    lo, hi = best, miss
    for _ in range(refine):
        mid = round(math.sqrt(lo * hi), 3)
        step = measure(mid)
        steps.append(step)
        if step.meets:
            lo = best = mid
        else:
            hi = mid
    return steps, best


def sweep(ep: Endpoint, spec: LoadSpec, slo: Slo, *, min_seconds: float = 0.0, **kw: Any) -> dict[str, Any]:
    """Run `sweep_rates` against an endpoint with `spec` at each rate; JSON-ready summary.

    `min_seconds`: each rate sends at least rate × min_seconds requests, so a server slower than the
    offered rate builds a queue long enough to show in the percentiles (a short burst hides it).
    """

    def measure(rate: float) -> SweepStep:
        n = max(spec.num_requests, math.ceil(rate * min_seconds))
        b = run_load(ep, replace(spec, request_rate=rate, num_requests=n,
                                 concurrency=spec.concurrency if spec.concurrency < spec.num_requests else n))
        return SweepStep(rate, b.metrics, slo.misses(b.metrics, b.metrics["not_sent"]))

    steps, best = sweep_rates(measure, **kw)
    return {
        "endpoint": ep.url, "model": ep.model, "label": ep.label,
        "slo": asdict(slo),
        "load": spec.describe().replace("all arriving at once", "open loop at each swept rate")
        + (f"; at least rate × {min_seconds:g} s requests per rate" if min_seconds else ""),
        "max_rate_meeting_slo": best,
        "steps": [{"request_rate": s.request_rate, "meets_slo": s.meets, "misses": s.misses,
                   **{k: s.metrics[k] for k in ("completed", "failed", "not_sent", "request_throughput",
                                               "output_throughput", "p99_ttft_ms", "median_ttft_ms",
                                               "p99_ttft_incl_client_queue_ms", "p99_itl_ms", "median_itl_ms",
                                               "p99_tpot_ms")}}
                  for s in steps],
    }


def smoke(ep: Endpoint, *, max_tokens: int = 8, timeout_s: float = 30.0) -> dict[str, Any]:
    """One short completion: does the endpoint answer with tokens? (`gpu_validate`'s inference check)."""
    r = stream_completion(ep, LoadSpec(num_requests=1, concurrency=1, max_tokens=max_tokens,
                                       prompt="Hello", request_timeout_s=timeout_s, max_duration_s=timeout_s))
    return {"endpoint": ep.url, "model": ep.model, "label": ep.label, "ok": r.success and r.output_tokens > 0,
            "output_tokens": r.output_tokens, "ttft_ms": round(r.ttft * 1000, 3),
            "e2el_ms": round(r.latency * 1000, 3), "error": r.error}


def run_many(endpoints: Iterable[Endpoint], spec: LoadSpec) -> list[BenchResult]:
    """Bench each endpoint in turn (one at a time, so endpoints do not share the client's CPU)."""
    return [run_load(ep, spec) for ep in endpoints]


def endpoints_of(site: Site, service: str | None = None, node: str | None = None) -> list[Endpoint]:
    """Every (service, node) endpoint of the plan: `http://<node address>:<port>/v1`, sorted."""
    out = []
    for n in plan_site(site).nodes:
        if node and n.hostname != node:
            continue
        for s in n.services:
            if (service and s.name != service) or not serves_endpoint(s.span, n.hostname):
                continue
            out.append(Endpoint(f"http://{n.node.address}:{s.service.port}/v1", s.service.model.name,
                                f"{s.name}@{n.hostname}"))
    return sorted(out, key=lambda e: e.label)
