"""`gpufleet bench-inference`: bounded streaming load (or a one-request smoke) against deployed endpoints."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from infra.commands.site import add_stack_args, site_from_args
from infra.console import Exit, emit, table
from infra.inference.bench import Endpoint, LoadSpec, endpoints_of, run_load, smoke

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
    p.add_argument("--requests", type=int, default=16, help="requests per endpoint (default 16)")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight (default 4)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens to generate per request (default 32)")
    p.add_argument("--timeout", type=float, default=60.0, help="per-request timeout, seconds (default 60)")
    p.add_argument("--max-duration", type=float, default=120.0,
                   help="no request starts after this many seconds per endpoint (default 120)")
    p.add_argument("--facts-dir", type=Path, default=None,
                   help=f"where to write the JSON fact file (default {FACTS_DIR}; '-' for none)")
    p.set_defaults(func=cmd_bench_inference)


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
    rows = []
    for r in data["endpoints"]:
        m = r["metrics"]
        rows.append((r["label"] or r["endpoint"], f"{m['completed']}/{m['completed'] + m['failed']}",
                     f"{m['output_throughput']:.1f}", f"{m['request_throughput']:.2f}",
                     *(f"{m[k]['p50']:.1f}/{m[k]['p90']:.1f}/{m[k]['p99']:.1f}"
                       for k in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"))))
    out = table(rows, ["endpoint", "ok", "out tok/s", "req/s", "TTFT p50/90/99 ms", "TPOT p50/90/99 ms",
                       "ITL p50/90/99 ms", "E2EL p50/90/99 ms"])
    errors = [f"{r['label'] or r['endpoint']}: {e}" for r in data["endpoints"] for e in r["metrics"]["errors"]]
    loads = {json.dumps(r["load"], sort_keys=True): r["load"] for r in data["endpoints"]}
    applied = "; ".join(
        f"{d['num_requests']} requests × {d['max_tokens']} tokens, {d['concurrency']} in flight, temperature "
        f"{d['temperature']}, each endpoint alone, none started after {d['max_duration_s']:g} s"
        for d in loads.values()
    )
    return (f"load: {applied}\n" if applied else "") + out + ("\nerrors:\n  " + "\n  ".join(errors) if errors else "")


def cmd_bench_inference(args: argparse.Namespace) -> int:
    """Bench (or smoke-test) the endpoints; exit 0 when every endpoint produced tokens, else 1."""
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
    try:
        for ep in eps:
            _ = ep.host_port  # refuse https or a malformed URL before anything is sent
        spec = LoadSpec(num_requests=args.requests, concurrency=args.concurrency, max_tokens=args.max_tokens,
                        request_timeout_s=args.timeout, max_duration_s=args.max_duration)
    except ValueError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return Exit.INVALID
    if args.smoke:
        results = [smoke(ep, timeout_s=args.timeout) for ep in eps]
        ok = all(r["ok"] for r in results)
        data: dict[str, Any] = {"mode": "smoke", "stack": stack, "ok": ok, "endpoints": results}
    else:
        benches = [run_load(ep, spec).as_dict() for ep in eps]
        ok = all(b["metrics"]["completed"] > 0 and b["metrics"]["total_output_tokens"] > 0 for b in benches)
        data = {"mode": "bench", "stack": stack, "ok": ok, "endpoints": benches}
    facts_dir = args.facts_dir or FACTS_DIR
    if str(facts_dir) != "-":
        mode = "smoke" if args.smoke else "bench"
        name = f"{mode}-inference-{stack or 'adhoc'}{f'-{args.service}' if args.service else ''}.json"
        written = _write_facts(facts_dir, name, data)
        data["fact_file"] = str(written) if written else None
    emit(args.json, data, _render)
    return Exit.OK if ok else Exit.FAILED
