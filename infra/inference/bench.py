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

Stdlib only (http.client + threads): the client must run on a bare controller and never be the bottleneck
(its own overhead is a measured figure, `client_overhead`).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from infra.inference.stream import Endpoint, LoadSpec, RequestResult, stream_completion
from infra.model.site import Site
from infra.plan.node import plan_site

__all__ = [
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


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile with linear interpolation (numpy.percentile's default method)."""
    if not values:
        return 0.0
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _summary_ms(values: Sequence[float]) -> dict[str, float]:
    """mean, median and p50/p90/p99 in milliseconds (zeros when empty, as vLLM reports)."""
    out = {"mean": sum(values) / len(values) * 1000 if values else 0.0,
           "median": percentile(values, 50) * 1000}
    for q in PERCENTILES:
        out[f"p{q:g}"] = percentile(values, q) * 1000
    return {k: round(v, 3) for k, v in out.items()}


def calculate_metrics(results: Sequence[RequestResult], duration_s: float) -> dict[str, Any]:
    """Compute vLLM's serving metrics over finished requests (`duration_s`: first send → last finish)."""
    ok = [r for r in results if r.success]
    ttfts = [r.ttft for r in ok]
    e2els = [r.latency for r in ok]
    itls = [gap for r in ok for gap in r.itl]
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    total_output = sum(r.output_tokens for r in ok)
    dur = max(duration_s, 1e-9)
    return {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": round(duration_s, 4),
        "total_output_tokens": total_output,
        "request_throughput": round(len(ok) / dur, 4),
        "output_throughput": round(total_output / dur, 4),
        "ttft_ms": _summary_ms(ttfts),
        "tpot_ms": _summary_ms(tpots),
        "itl_ms": _summary_ms(itls),
        "e2el_ms": _summary_ms(e2els),
        "errors": sorted({r.error for r in results if r.error})[:5],
    }


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
    """`spec.num_requests` streamed requests, `spec.concurrency` at a time, none started after the deadline."""
    deadline = time.monotonic() + spec.max_duration_s
    lock = threading.Lock()
    started = 0

    def one(_: int) -> RequestResult | None:
        nonlocal started
        with lock:
            # A bounded run: past the deadline, queued requests are dropped instead of sent.
            if time.monotonic() >= deadline:
                return None
            started += 1
        return stream_completion(ep, spec)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=min(spec.concurrency, spec.num_requests)) as pool:
        done = [r for r in pool.map(one, range(spec.num_requests)) if r is not None]
    duration = time.perf_counter() - t0
    metrics = calculate_metrics(done, duration)
    metrics["not_sent"] = spec.num_requests - started
    return BenchResult(ep.url, ep.model, ep.label, asdict(spec), metrics, done)


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
            if service and s.name != service:
                continue
            out.append(Endpoint(f"http://{n.node.address}:{s.service.port}/v1", s.service.model.name,
                                f"{s.name}@{n.hostname}"))
    return sorted(out, key=lambda e: e.label)
