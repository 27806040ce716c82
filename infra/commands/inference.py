"""`gpufleet bench-inference`: open-loop streaming load, an SLO rate sweep, or a one-request smoke."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from infra.commands.site import add_stack_args, site_from_args
from infra.console import Exit, emit, table
from infra.inference.bench import Endpoint, LoadSpec, Slo, endpoints_of, run_load, smoke, sweep
from infra.model.site import ServiceSlo, Site
from infra.observe.config import slo_of

FACTS_DIR = Path(os.environ.get("GPUFLEET_FACTS_DIR", "/var/lib/gpufleet/facts"))


def register(sub: Any) -> None:
    """Register `bench-inference`."""
    p = sub.add_parser("bench-inference",
                       help="stream a bounded load of /v1/completions to inference endpoints: TTFT, TPOT, ITL, "
                            "E2EL percentiles, tokens/s (or --smoke: one short completion)")
    add_stack_args(p)
    p.add_argument("--service", help="only this service (default: all services of the stack)")
    p.add_argument("--node", help="only this node's endpoints")
    p.add_argument("--endpoint", action="append", default=[], metavar="URL",
                   help="bench this base URL instead of the plan's (repeatable; e.g. http://127.0.0.1:8080/v1)")
    p.add_argument("--model", default="default", help="model name sent with --endpoint (default: 'default')")
    p.add_argument("--smoke", action="store_true", help="one short completion per endpoint (gpu_validate)")
    p.add_argument("--requests", "--num-prompts", dest="requests", type=int, default=16,
                   help="requests per endpoint (per rate when sweeping; default 16)")
    p.add_argument("--concurrency", "--max-concurrency", dest="concurrency", type=int, default=None,
                   help="most requests in flight (default: 4 with all-at-once arrivals, unlimited with "
                        "--request-rate or --sweep, as vllm bench serve)")
    p.add_argument("--request-rate", type=_rate, default=math.inf, metavar="REQ_PER_S",
                   help="open-loop arrivals per second, Poisson like `vllm bench serve` (default inf: all at once)")
    p.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of arrival gaps: 1 Poisson, < 1 burstier, > 1 more regular (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of arrivals and lengths (default 0)")
    p.add_argument("--max-tokens", "--output-len", dest="max_tokens", type=int, default=32,
                   help="tokens to generate per request (default 32)")
    p.add_argument("--input-len", type=int, default=None,
                   help="prompt length in words (default: a fixed 36-word prompt)")
    p.add_argument("--range-ratio", type=float, default=0.0,
                   help="prompt and output lengths uniform within ±this fraction (vLLM's --random-range-ratio)")
    p.add_argument("--ignore-eos", action="store_true", help="ask the server to ignore EOS (vLLM's extension)")
    p.add_argument("--sweep", nargs="?", const="auto", default=None, metavar="RATES",
                   help="find the highest request rate meeting the SLO: 'auto' (double from --sweep-start "
                        "until a miss, then bisect twice) or a comma list of rates")
    p.add_argument("--sweep-start", type=_rate, default=0.5, help="first rate of an auto sweep (default 0.5)")
    p.add_argument("--sweep-max", type=_rate, default=64.0, help="highest rate an auto sweep tries (default 64)")
    p.add_argument("--sweep-seconds", type=float, default=0.0,
                   help="each swept rate sends at least rate × this many seconds of requests (default 0: "
                        "--requests only), so an overloaded server's queue shows in the percentiles")
    p.add_argument("--slo-ttft-ms", type=float, default=None,
                   help="p99 TTFT objective (default: the service's SLO from the stack's observability model)")
    p.add_argument("--slo-itl-ms", type=float, default=None, help="p99 ITL objective (default: as above)")
    p.add_argument("--timeout", type=float, default=60.0, help="per-request timeout, seconds (default 60)")
    p.add_argument("--max-duration", type=float, default=120.0,
                   help="no request starts after this many seconds per endpoint and rate (default 120)")
    p.add_argument("--facts-dir", type=Path, default=None,
                   help=f"where to write the JSON fact file (default {FACTS_DIR}; '-' for none)")
    p.set_defaults(func=cmd_bench_inference)


def _rate(text: str) -> float:
    """A request rate: a positive number or `inf`."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a rate: give requests per second or inf") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a rate: it must be > 0 (or inf)")
    return value


def _slo(args: argparse.Namespace, site: Site | None) -> Slo:
    """The SLO to sweep against: flags over the service's own SLO over the stack's default over the model's."""
    base, source = ServiceSlo(), "gpufleet's default observability.slo"
    if site is not None:
        svcs = [s for s in site.services if args.service in (None, s.name)]
        if len(svcs) == 1:
            base = slo_of(site, svcs[0])
            own = "its own slo" if svcs[0].slo else "the stack's observability.slo"
            source = f"service {svcs[0].name}: {own}"
        else:
            base, source = site.observability.slo, "the stack's observability.slo"
    if args.slo_ttft_ms is not None or args.slo_itl_ms is not None:
        source = "command line" + (f" (rest from {source})" if None in (args.slo_ttft_ms, args.slo_itl_ms) else "")
    return Slo(ttft_p99_ms=args.slo_ttft_ms or base.ttft_p99_ms, itl_p99_ms=args.slo_itl_ms or base.itl_p99_ms,
               max_error_rate=base.max_error_rate, source=source)


def _write_facts(facts_dir: Path, name: str, data: dict[str, Any]) -> Path | None:
    """Write the fact file atomically; a read-only controller only loses the file, not the result."""
    try:
        facts_dir.mkdir(parents=True, exist_ok=True)
        path = facts_dir / name
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        tmp.replace(path)
        return path
    except OSError as exc:
        sys.stderr.write(f"warning: could not write fact file in {facts_dir}: {exc}\n")
        return None


def _render(data: dict[str, Any]) -> str:
    if data["mode"] == "smoke":
        rows = [(r["label"] or r["endpoint"], "ok" if r["ok"] else "FAILED", r["output_tokens"], r["ttft_ms"],
                 r["e2el_ms"], r["error"]) for r in data["endpoints"]]
        return table(rows, ["endpoint", "result", "tokens", "TTFT ms", "E2EL ms", "error"])
    if data["mode"] == "sweep":
        lines: list[str] = []
        for r in data["endpoints"]:
            slo = r["slo"]
            lines.append(f"{r['label'] or r['endpoint']}: load {r['load']}")
            lines.append(f"SLO: p99 TTFT ≤ {slo['ttft_p99_ms']:g} ms, p99 ITL ≤ {slo['itl_p99_ms']:g} ms, "
                         f"≤ {slo['max_error_rate']:.0%} failed ({slo['source']})")
            steps: list[tuple[str, ...]] = [
                (f"{s['request_rate']:g}", f"{s['request_throughput']:.2f}", f"{s['output_throughput']:.1f}",
                 f"{s['median_ttft_ms']:.1f}/{s['p99_ttft_ms']:.1f}/{s['p99_ttft_incl_client_queue_ms']:.1f}",
                 f"{s['median_itl_ms']:.1f}/{s['p99_itl_ms']:.1f}",
                 f"{s['completed']}/{s['completed'] + s['failed'] + s['not_sent']}",
                 "meets" if s["meets_slo"] else "; ".join(s["misses"])) for s in r["steps"]]
            lines.append(table(steps, ["offered req/s", "req/s", "out tok/s", "TTFT p50/p99/p99+queue ms",
                                       "ITL p50/p99 ms", "ok",
                                       "SLO"]))
            best = r["max_rate_meeting_slo"]
            lines.append("highest rate meeting the SLO: " + (f"{best:g} req/s" if best is not None
                                                              else "none (even the lowest rate missed it)"))
        return "\n".join(lines)
    rows = []
    for r in data["endpoints"]:
        m = r["metrics"]
        rows.append((r["label"] or r["endpoint"], f"{m['completed']}/{m['completed'] + m['failed']}",
                     f"{m['output_throughput']:.1f}", f"{m['request_throughput']:.2f}",
                     *(f"{m[k]['p50']:.1f}/{m[k]['p90']:.1f}/{m[k]['p99']:.1f}"
                       for k in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"))))
    text = table(rows, ["endpoint", "ok", "out tok/s", "req/s", "TTFT p50/90/99 ms", "TPOT p50/90/99 ms",
                       "ITL p50/90/99 ms", "E2EL p50/90/99 ms"])
    errors = [f"{r['label'] or r['endpoint']}: {e}" for r in data["endpoints"] for e in r["metrics"]["errors"]]
    applied = "; ".join(sorted({f"{r['load']['applied']}, each endpoint alone" for r in data["endpoints"]}))
    return (f"load: {applied}\n" if applied else "") + text + ("\nerrors:\n  " + "\n  ".join(errors) if errors else "")


def cmd_bench_inference(args: argparse.Namespace) -> int:
    """Bench, sweep or smoke-test the endpoints; exit 0 when every endpoint produced tokens, else 1."""
    site: Site | None = None
    if args.endpoint:
        eps = [Endpoint(u, args.model, u) for u in args.endpoint]
        stack = None
    else:
        site = site_from_args(args)
        stack = site.name
        eps = endpoints_of(site, args.service, args.node)
        if not eps:
            what = f"service {args.service!r}" if args.service else "any inference service"
            sys.stderr.write(f"error: the stack has no endpoint for {what}"
                             f"{f' on {args.node}' if args.node else ''}\n")
            return Exit.INVALID
    open_loop = args.sweep is not None or not math.isinf(args.request_rate)
    concurrency = args.concurrency or (args.requests if open_loop else 4)
    try:
        for ep in eps:
            _ = ep.host_port  # refuse https or a malformed URL before anything is sent
        spec = LoadSpec(num_requests=args.requests, concurrency=concurrency, max_tokens=args.max_tokens,
                        request_timeout_s=args.timeout, max_duration_s=args.max_duration,
                        request_rate=args.request_rate, burstiness=args.burstiness, seed=args.seed,
                        input_len=args.input_len, range_ratio=args.range_ratio, ignore_eos=args.ignore_eos)
        rates = None if args.sweep in (None, "auto") else [_rate(x) for x in args.sweep.split(",") if x.strip()]
    except (ValueError, argparse.ArgumentTypeError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return Exit.INVALID
    if args.smoke:
        results = [smoke(ep, timeout_s=args.timeout) for ep in eps]
        ok = all(r["ok"] for r in results)
        data: dict[str, Any] = {"mode": "smoke", "stack": stack, "ok": ok, "endpoints": results}
    elif args.sweep is not None:
        slo = _slo(args, site)
        sweeps = [sweep(ep, spec, slo, rates=rates, start=args.sweep_start, limit=args.sweep_max,
                        min_seconds=args.sweep_seconds) for ep in eps]
        ok = all(any(s["completed"] > 0 for s in w["steps"]) for w in sweeps)
        data = {"mode": "sweep", "stack": stack, "ok": ok, "endpoints": sweeps}
    else:
        benches = [run_load(ep, spec).as_dict() for ep in eps]
        ok = all(b["metrics"]["completed"] > 0 and b["metrics"]["total_output_tokens"] > 0 for b in benches)
        data = {"mode": "bench", "stack": stack, "ok": ok, "endpoints": benches}
    facts_dir = args.facts_dir or FACTS_DIR
    if str(facts_dir) != "-":
        name = f"{data['mode']}-inference-{stack or 'adhoc'}{f'-{args.service}' if args.service else ''}.json"
        written = _write_facts(facts_dir, name, data)
        data["fact_file"] = str(written) if written else None
    emit(args.json, data, _render)
    return Exit.OK if ok else Exit.FAILED
