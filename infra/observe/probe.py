"""The SLO probe: one small streaming completion per endpoint and interval, exported as Prometheus metrics.

Engines that export no latency histograms (llama.cpp's servers) and TGI, which has
no time-to-first-token histogram, are measured from outside by this probe; for vLLM it is a second opinion
and the `gpufleet:service_up` source. It runs beside each segment's Prometheus (`probe.json` from
`infra.observe.config.probe_config`) and serves the text exposition format on 127.0.0.1 only.

Series (labels service, node): `gpufleet_probe_ttft_seconds` and `gpufleet_probe_itl_seconds` histograms,
`gpufleet_probe_requests_total`, `gpufleet_probe_failures_total`, `gpufleet_probe_success` (last probe
answered: 1/0) and `gpufleet_probe_tokens_per_second` (decode speed of the last probe).

Stdlib only (with `infra.inference.stream`): monitoring hosts run it as a self-contained zipapp
(`infra.observe.server.probe_zipapp`), so a mirror host needs no gpufleet install and no Python packages.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from infra.inference.stream import Endpoint, LoadSpec, RequestResult, stream_completion

# Port of the SLO probe on each Prometheus host (the exporters' ports live in infra.model.ports).
PROBE_PORT = 9479
# The probe's own series, labelled service and node (the rules read them through infra.observe.metrics).
PROBE_TTFT_BUCKET = "gpufleet_probe_ttft_seconds_bucket"
PROBE_ITL_BUCKET = "gpufleet_probe_itl_seconds_bucket"
PROBE_TOKENS_PER_S = "gpufleet_probe_tokens_per_second"
PROBE_REQUESTS = "gpufleet_probe_requests_total"
PROBE_FAILURES = "gpufleet_probe_failures_total"
PROBE_UP = "gpufleet_probe_success"

# Bucket bounds (seconds) of both histograms: 10 ms to 60 s, like vLLM's TTFT buckets in spirit.
BUCKETS: tuple[float, ...] = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60)
PROBE_SPEC = LoadSpec(num_requests=1, concurrency=1, max_tokens=16, request_timeout_s=30.0, max_duration_s=30.0)


@dataclass
class Histogram:
    """Cumulative bucket counts, sum and count, as Prometheus histograms expose them."""

    counts: list[int] = field(default_factory=lambda: [0] * len(BUCKETS))
    total: int = 0
    sum: float = 0.0

    def observe(self, value: float) -> None:
        """Add one observation."""
        self.total += 1
        self.sum += value
        for i, bound in enumerate(BUCKETS):
            if value <= bound:
                self.counts[i] += 1


@dataclass
class Target:
    """What the probe keeps per endpoint."""

    service: str
    node: str
    endpoint: Endpoint
    ttft: Histogram = field(default_factory=Histogram)
    itl: Histogram = field(default_factory=Histogram)
    requests: int = 0
    failures: int = 0
    success: int = 0
    tokens_per_s: float = 0.0

    def record(self, r: RequestResult) -> None:
        """Fold one probe request into the series."""
        self.requests += 1
        if not r.success:
            self.failures += 1
            self.success = 0
            return
        self.success = 1
        self.ttft.observe(r.ttft)
        for gap in r.itl:
            self.itl.observe(gap)
        decode = r.latency - r.ttft
        self.tokens_per_s = (r.output_tokens - 1) / decode if r.output_tokens > 1 and decode > 0 else 0.0


class Probe:
    """The probe's state and its exposition."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.lock = threading.Lock()
        self.targets = [
            Target(e["service"], e["node"], Endpoint(e["url"], e["model"], f"{e['service']}@{e['node']}"))
            for e in config["endpoints"]
        ]

    def probe_once(self) -> None:
        """One request per endpoint, in order (the probe is a trickle, never load)."""
        for t in self.targets:
            result = stream_completion(t.endpoint, PROBE_SPEC)
            with self.lock:
                t.record(result)

    def exposition(self) -> str:
        """The text exposition format (version 0.0.4)."""
        out: list[str] = []
        with self.lock:
            for name, attr, help_ in (
                ("gpufleet_probe_ttft_seconds", "ttft", "Time to first token of the probe's requests."),
                ("gpufleet_probe_itl_seconds", "itl", "Time between streamed tokens of the probe's requests."),
            ):
                out += [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
                for t in self.targets:
                    h: Histogram = getattr(t, attr)
                    lab = _labels(t)
                    out += [f'{name}_bucket{{{lab},le="{b:g}"}} {c}' for b, c in zip(BUCKETS, h.counts, strict=True)]
                    out += [f'{name}_bucket{{{lab},le="+Inf"}} {h.total}', f"{name}_sum{{{lab}}} {h.sum:.6f}",
                            f"{name}_count{{{lab}}} {h.total}"]
            for name, kind, attr, help_ in (
                (PROBE_REQUESTS, "counter", "requests", "Probe requests sent."),
                (PROBE_FAILURES, "counter", "failures", "Probe requests that failed."),
                (PROBE_UP, "gauge", "success", "1 when the last probe request succeeded."),
                (PROBE_TOKENS_PER_S, "gauge", "tokens_per_s", "Decode speed of the last probe request."),
            ):
                base = name.removesuffix("_total")
                out += [f"# HELP {base} {help_}", f"# TYPE {base} {kind}"]
                out += [f"{name}{{{_labels(t)}}} {getattr(t, attr):g}" for t in self.targets]
        return "\n".join(out) + "\n"


def _labels(t: Target) -> str:
    # Service and node names have strict grammars in the model (no quotes, backslashes or newlines).
    return f'service="{t.service}",node="{t.node}"'


def serve(probe: Probe, host: str, port: int) -> ThreadingHTTPServer:
    """Serve `/metrics` (the exposition) in a background thread; returns the server (call `shutdown`)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?")[0] != "/metrics":
                self.send_error(404)
                return
            body = probe.exposition().encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet: Prometheus scrapes every few seconds."""

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def run(probe: Probe, interval_s: float, stop: threading.Event, rounds: int | None = None) -> None:
    """Probe every endpoint each `interval_s` until `stop` is set (or `rounds` rounds were done)."""
    done = 0
    while not stop.is_set() and (rounds is None or done < rounds):
        probe.probe_once()
        done += 1
        stop.wait(interval_s)


def parse_listen(listen: str) -> tuple[str, int]:
    """`127.0.0.1:9479` → (host, port); only loopback: the probe's metrics are for the local Prometheus."""
    host, _, port = listen.rpartition(":")
    if host not in ("127.0.0.1", "localhost") or not port.isdigit():
        raise ValueError(f"probe listen address {listen!r} must be 127.0.0.1:<port>")
    return host, int(port)


def endpoints_of(config: dict[str, Any]) -> Sequence[str]:
    """The probed URLs, for messages."""
    return [e["url"] for e in config["endpoints"]]


def load_config(path: str) -> tuple[Probe, str, int, float]:
    """Read probe.json: the probe, its listen host and port, its interval (ValueError when it is not one)."""
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
        host, port = parse_listen(str(cfg["listen"]))
        return Probe(cfg), host, port, float(cfg["interval_s"])
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: not a probe configuration ({exc})") from exc


def main(argv: Sequence[str] | None = None) -> int:
    """`gpufleet-slo-probe --config probe.json [--rounds N]`: serve the metrics and probe until stopped."""
    parser = argparse.ArgumentParser(prog="gpufleet-slo-probe", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="probe.json written by `gpufleet monitoring render`")
    parser.add_argument("--rounds", type=int, help="stop after this many rounds (default: run until stopped)")
    args = parser.parse_args(argv)
    try:
        state, host, port, interval = load_config(args.config)
    except ValueError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    server = serve(state, host, port)
    stop = threading.Event()
    try:
        run(state, interval, stop, args.rounds)
    except KeyboardInterrupt:
        stop.set()
    finally:
        server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
