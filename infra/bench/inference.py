"""Inference figures for the benchmark harness (issue 8): client overhead and llama.cpp serving numbers.

Plain functions the harness (or anyone) can call; importing this module also registers them as
harness figures `6a`–`6e` (`infra/bench/figures.py` imports it).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from infra.bench.harness import Context, Measurement, Skip, figure
from infra.inference.bench import Endpoint, LoadSpec, Slo, run_load, sweep
from infra.inference.fakeserver import FakeBehaviour, FakeOpenAIServer
from infra.model.site import ServiceSlo


def client_overhead(num_requests: int = 2000, concurrency: int = 4, max_tokens: int = 16) -> dict[str, Any]:
    """The client's request and chunk rate against a loopback server that does no work.

    Server and client share this process (and its GIL), so the figure is a lower bound of what the
    client alone sustains; a real endpoint slower than this is never limited by the client.
    """
    with FakeOpenAIServer(FakeBehaviour()) as srv:
        b = run_load(Endpoint(srv.url, "fake"),
                     LoadSpec(num_requests=num_requests, concurrency=concurrency, max_tokens=max_tokens,
                              max_duration_s=600))
    m = b.metrics
    return {"requests": m["completed"], "concurrency": concurrency, "tokens_per_request": max_tokens,
            "requests_per_s": m["request_throughput"], "chunks_per_s": m["output_throughput"],
            "e2el_p50_ms": m["e2el_ms"]["p50"]}


def llama_local(num_requests: int = 32, concurrency: int = 1, max_tokens: int = 32,
                work: Path | None = None) -> dict[str, Any]:
    """Build (once) the wheel, venv and tiny model, serve on loopback, bench it; figures and timings."""
    from infra.inference.serve import LlamaServer, server_venv
    from infra.inference.tinymodel import MODEL_NAME, ensure_tiny_model
    from infra.inference.wheel import ensure_llama_wheel_build, ensure_server_wheelhouse

    build = ensure_llama_wheel_build()
    house = ensure_server_wheelhouse()
    with tempfile.TemporaryDirectory(prefix="gpufleet-llama-bench-", dir=work) as tmp:
        t0 = time.monotonic()
        python = server_venv(Path(tmp) / "venv", house)
        venv_s = time.monotonic() - t0
        with LlamaServer(python, ensure_tiny_model(), log=Path(tmp) / "server.log") as srv:
            b = run_load(Endpoint(srv.url, MODEL_NAME),
                         LoadSpec(num_requests=num_requests, concurrency=concurrency, max_tokens=max_tokens))
            startup = srv.startup_s
    return {"wheel_build_s": round(build.seconds, 1), "wheel_cached": build.cached,
            "offline_venv_install_s": round(venv_s, 2), "server_startup_s": round(startup, 2),
            "load": {"requests": num_requests, "concurrency": concurrency, "max_tokens": max_tokens},
            "metrics": b.metrics}


@figure("6a", "bench-inference client overhead",
        "Requests/s and streamed chunks/s the bench client sustains against an in-process loopback server "
        "that answers instantly (16 chunks per request, 4 in flight): the ceiling above which the client, "
        "not the endpoint, would be measured. Quick mode sends 300 requests, full mode 2,000.")
def fig_client_overhead(ctx: Context) -> dict[str, Any]:
    """Client overhead against a no-work server."""
    runs = [client_overhead(300 if ctx.quick else 2000) for _ in range(max(1, ctx.repeats))]
    return {"requests/s": Measurement([r["requests_per_s"] for r in runs], "req/s"),
            "chunks/s": Measurement([r["chunks_per_s"] for r in runs], "chunks/s")}


@figure("6b", "llama.cpp serving the tiny lab model (loopback, CPU)",
        "The lab's serving path run on this machine: llama-cpp-python built from the PyPI sdist (CPU-only), "
        "installed offline into a venv, serving the seeded gpufleet-tiny-lab GGUF on 127.0.0.1; bench-inference "
        "with 32 requests × 32 tokens, one at a time. Output tokens/s and TTFT/TPOT/ITL/E2EL p50/p90/p99.")
def fig_llama_local(ctx: Context) -> dict[str, Any]:
    """Local llama.cpp bench (builds the wheel on first use)."""
    try:
        return llama_local(num_requests=16 if ctx.quick else 32)
    except OSError as exc:  # e.g. /var/cache not writable: say so instead of a number
        raise Skip(f"cannot build or run the llama.cpp server here: {exc}") from exc


def lab_services(stack: str = "lab", num_requests: int = 32, concurrency: int = 1,
                 max_tokens: int = 32) -> dict[str, Any]:
    """Bench every deployed endpoint of a stack (the lab's converged llama.cpp services); per-endpoint metrics."""
    from infra.inference.bench import endpoints_of, smoke
    from infra.model.load import load_site

    out: dict[str, Any] = {}
    for ep in endpoints_of(load_site(stack=stack)):
        probe = smoke(ep, timeout_s=5)
        if not probe["ok"]:
            out[ep.label] = {"skipped": probe["error"] or "no tokens"}
            continue
        out[ep.label] = run_load(ep, LoadSpec(num_requests=num_requests, concurrency=concurrency,
                                              max_tokens=max_tokens)).metrics
    return out


@figure("6c", "llama.cpp services of the lab stack (converged nodes)",
        "bench-inference against the lab stack's services as `gpufleet converge` deployed them (tiny-connected "
        "on lab-gpu01 via the upstream store, tiny-airgap on lab-gpu03 via lab-mirror): 32 requests × 32 tokens, "
        "one at a time. Skipped when the lab is not up or the services are not converged.")
def fig_lab_services(ctx: Context) -> dict[str, Any]:
    """Bench the lab's converged services."""
    if not ctx.use_lab:
        raise Skip("lab figures are off (--no-lab)")
    res = lab_services(num_requests=16 if ctx.quick else 32)
    if not res or all("skipped" in v for v in res.values()):
        raise Skip("no lab inference endpoint answers (lab down or services not converged)")
    return {label: (f"{m['output_throughput']:.0f} tok/s, TTFT p50 {m['ttft_ms']['p50']:.1f} ms, "
                    f"TPOT p50 {m['tpot_ms']['p50']:.2f} ms, E2EL p99 {m['e2el_ms']['p99']:.0f} ms"
                    if "skipped" not in m else f"skipped: {m['skipped']}")
            for label, m in res.items()}


# A loopback server that slows with load like a batching engine: 2 ms per chunk plus 2 ms per other request
# in flight. Its knee is known in shape, so the sweep's answer can be judged.
KNEE = FakeBehaviour(first_delay_s=0.005, gap_s=0.002, gap_per_other_s=0.002)
KNEE_SLO = Slo(ttft_p99_ms=1000, itl_p99_ms=20, source="figure 6d: p99 ITL ≤ 20 ms")


def knee_sweep(requests: int = 8, min_seconds: float = 2.0) -> dict[str, Any]:
    """Open-loop rate sweep (Poisson, seed 0) against the load-dependent loopback server; the summary."""
    spec = LoadSpec(num_requests=requests, concurrency=10_000, max_tokens=16, request_timeout_s=30,
                    max_duration_s=60)
    with FakeOpenAIServer(KNEE) as srv:
        return sweep(Endpoint(srv.url, "fake"), spec, KNEE_SLO, start=4.0, limit=256.0, refine=2,
                     min_seconds=min_seconds)


def _steps_line(res: dict[str, Any]) -> str:
    return ", ".join(f"{s['request_rate']:g}→{'ok' if s['meets_slo'] else 'miss'} (ITL p99 {s['p99_itl_ms']:.0f} ms, "
                     f"TTFT+queue p99 {s['p99_ttft_incl_client_queue_ms']:.0f} ms)" for s in res["steps"])


@figure("6d", "bench-inference rate sweep against a server that slows with load (loopback)",
        "`bench-inference --sweep` logic end to end on loopback: Poisson arrivals (seed 0), 16 tokens per "
        "request, each rate at least 8 requests and 2 s of arrivals (quick: 1 s); the fake server adds 2 ms "
        "per chunk per other request in flight, so ITL grows with the offered rate. The sweep doubles from "
        "4 req/s until p99 ITL passes 20 ms, then bisects twice. Shows the highest rate meeting that SLO and "
        "every step (offered rate → met or missed).")
def fig_knee_sweep(ctx: Context) -> dict[str, Any]:
    """Sweep against the load-dependent fake server."""
    res = knee_sweep(min_seconds=1.0 if ctx.quick else 2.0)
    return {"highest rate meeting p99 ITL ≤ 20 ms": f"{res['max_rate_meeting_slo']} req/s",
            "steps": _steps_line(res)}


def lab_sweep(stack: str = "lab", requests: int = 32, min_seconds: float = 8.0, max_tokens: int = 32,
              start: float = 4.0, limit: float = 128.0) -> dict[str, Any]:
    """Sweep every answering endpoint of a stack against its service's SLO (the stack's observability model)."""
    from infra.inference.bench import endpoints_of, smoke
    from infra.model.load import load_site
    from infra.observe.config import slo_of

    site = load_site(stack=stack)
    by_name = {s.name: s for s in site.services}
    out: dict[str, Any] = {}
    for ep in endpoints_of(site):
        probe = smoke(ep, timeout_s=5)
        if not probe["ok"]:
            out[ep.label] = {"skipped": probe["error"] or "no tokens"}
            continue
        svc = by_name[ep.label.split("@")[0]]
        base: ServiceSlo = slo_of(site, svc)
        slo = Slo(base.ttft_p99_ms, base.itl_p99_ms, base.max_error_rate, source=f"service {svc.name} (stack)")
        spec = LoadSpec(num_requests=requests, concurrency=10_000, max_tokens=max_tokens, max_duration_s=120)
        out[ep.label] = sweep(ep, spec, slo, start=start, limit=limit, min_seconds=min_seconds)
    return out


@figure("6e", "bench-inference rate sweep of the lab stack's llama.cpp services",
        "Open-loop sweep (Poisson, seed 0, 32 tokens per request, at least 8 s of arrivals per rate) of each converged "
        "lab service against its own SLO from the stack's observability model (lab: p99 TTFT ≤ 5000 ms including "
        "client queueing, p99 ITL ≤ 1000 ms, ≤ 5 % failed), doubling from 4 req/s then bisecting twice. "
        "llama-cpp-python serves one request at a time, so past its capacity the queue, and TTFT with it, grows "
        "with the length of the run. Skipped when the lab is not up or the services are not converged.")
def fig_lab_sweep(ctx: Context) -> dict[str, Any]:
    """Sweep the lab's converged services."""
    if not ctx.use_lab:
        raise Skip("lab figures are off (--no-lab)")
    res = lab_sweep()
    if not res or all("skipped" in v for v in res.values()):
        raise Skip("no lab inference endpoint answers (lab down or services not converged)")
    out: dict[str, Any] = {}
    for label, r in res.items():
        if "skipped" in r:
            out[label] = f"skipped: {r['skipped']}"
            continue
        out[f"{label}: highest rate meeting its SLO"] = f"{r['max_rate_meeting_slo']} req/s"
        out[f"{label}: steps"] = _steps_line(r)
    return out
