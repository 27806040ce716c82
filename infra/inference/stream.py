"""One streamed OpenAI-compatible completion, timed chunk by chunk (stdlib only).

Shared by `bench-inference` (infra/inference/bench.py, where the metric definitions are explained) and the
SLO probe (infra/observe/probe.py). Stdlib only on purpose: the probe runs on monitoring hosts as a
self-contained zipapp, without gpufleet or its dependencies installed.
"""

from __future__ import annotations

import http.client
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

DEFAULT_PROMPT = "The quick brown fox jumps over the lazy dog. " * 4


@dataclass
class RequestResult:
    """One streamed request as the client saw it (seconds)."""

    success: bool = False
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    output_tokens: int = 0
    prompt_tokens: int = 0
    chunks: int = 0
    text: str = ""
    error: str = ""
    # Open loop: seconds between the scheduled arrival and the send (waiting for a free slot).
    queue_time: float = 0.0


@dataclass(frozen=True)
class LoadSpec:
    """How much load: arrivals, lengths, in-flight cap, all bounded in count and wall time."""

    num_requests: int = 16
    concurrency: int = 4
    max_tokens: int = 32
    prompt: str = DEFAULT_PROMPT
    temperature: float = 0.0
    request_timeout_s: float = 60.0
    max_duration_s: float = 120.0
    # Open loop (vLLM's --request-rate, --burstiness, --seed); inf: all requests arrive at once.
    request_rate: float = math.inf
    burstiness: float = 1.0
    seed: int = 0
    # Prompt length in words (None: `prompt` as given) and the ± spread of prompt and output lengths.
    input_len: int | None = None
    range_ratio: float = 0.0
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.num_requests < 1 or self.concurrency < 1 or self.max_tokens < 1:
            raise ValueError("num_requests, concurrency and max_tokens must be ≥ 1")
        if self.request_timeout_s <= 0 or self.max_duration_s <= 0:
            raise ValueError("timeouts must be > 0")
        if not self.request_rate > 0 or not self.burstiness > 0:
            raise ValueError("request rate and burstiness must be > 0 (inf for all at once)")
        if not 0 <= self.range_ratio < 1:
            raise ValueError("range ratio must be in [0, 1)")
        if self.input_len is not None and self.input_len < 1:
            raise ValueError("input length must be ≥ 1")

    def describe(self) -> str:
        """The applied load in one line, for people."""
        if math.isinf(self.request_rate):
            arrivals = "all arriving at once"
        else:
            law = "Poisson" if self.burstiness == 1 else f"gamma, burstiness {self.burstiness:g}"
            arrivals = f"open loop at {self.request_rate:g} req/s ({law}, seed {self.seed})"
        spread = f" ±{self.range_ratio:.0%}" if self.range_ratio else ""
        prompt = f"{self.input_len}{spread} words" if self.input_len else f"{len(self.prompt.split())} words"
        return (f"{self.num_requests} requests × {self.max_tokens}{spread} tokens, {self.concurrency} in flight, "
                f"{arrivals}; prompts {prompt}{'; EOS ignored' if self.ignore_eos else ''}, "
                f"temperature {self.temperature:g}; none started after {self.max_duration_s:g} s")



@dataclass(frozen=True)
class Endpoint:
    """An OpenAI-compatible server: base URL (`http://host:port` or `.../v1`) and the model name to send."""

    url: str
    model: str
    label: str = ""

    @property
    def host_port(self) -> tuple[str, int]:
        """Host and port from the URL (port 80 when absent)."""
        parts = urlsplit(self.url if "://" in self.url else f"http://{self.url}")
        if parts.scheme != "http":
            raise ValueError(f"{self.url}: only plain http endpoints are supported (lab and node-local)")
        return parts.hostname or "127.0.0.1", parts.port or 80

    @property
    def completions_path(self) -> str:
        """Path of /v1/completions under the base URL."""
        path = urlsplit(self.url if "://" in self.url else f"http://{self.url}").path.rstrip("/")
        return (path if path.endswith("/v1") else path + "/v1") + "/completions"


def stream_completion(ep: Endpoint, spec: LoadSpec, prompt: str | None = None,
                      max_tokens: int | None = None) -> RequestResult:
    """Send one streaming /v1/completions request and time its chunks (prompt/max_tokens: the spec's)."""
    host, port = ep.host_port
    payload: dict[str, Any] = {
        "model": ep.model,
        "prompt": spec.prompt if prompt is None else prompt,
        "max_tokens": spec.max_tokens if max_tokens is None else max_tokens,
        "temperature": spec.temperature,
        "stream": True,
        # vLLM and newer servers then send a final chunk with exact token counts.
        "stream_options": {"include_usage": True},
    }
    if spec.ignore_eos:
        payload["ignore_eos"] = True  # vLLM's extension, as `vllm bench serve --ignore-eos` sends it
    body = json.dumps(payload).encode()
    res = RequestResult()
    conn = http.client.HTTPConnection(host, port, timeout=spec.request_timeout_s)
    start = time.perf_counter()
    last = start
    usage_tokens: int | None = None
    text_chunks = 0
    try:
        conn.request("POST", ep.completions_path, body=body,
                     headers={"Content-Type": "application/json", "Accept": "text/event-stream"})
        resp = conn.getresponse()
        if resp.status != 200:
            res.error = f"HTTP {resp.status}: {resp.read(300).decode(errors='replace').strip()}"
            return res
        text: list[str] = []
        while True:
            raw = resp.readline()
            if not raw:
                break
            line = raw.strip()
            # SSE comments (":" pings) and blank separators carry no data.
            if not line or line.startswith(b":"):
                continue
            data = line.removeprefix(b"data:").strip()
            if data == b"[DONE]":
                break
            chunk = json.loads(data)
            if chunk.get("choices"):
                now = time.perf_counter()
                if res.chunks == 0:
                    res.ttft = now - start
                else:
                    res.itl.append(now - last)
                last = now
                res.chunks += 1
                piece = chunk["choices"][0].get("text") or ""
                text.append(piece)
                # llama.cpp ends with an empty chunk carrying only finish_reason: not a token.
                text_chunks += 1 if piece else 0
            usage = chunk.get("usage")
            if usage and usage.get("completion_tokens") is not None:
                usage_tokens = int(usage["completion_tokens"])
                res.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        res.text = "".join(text)
        res.output_tokens = usage_tokens if usage_tokens is not None else text_chunks
        res.latency = last - start
        res.success = res.chunks > 0
        if not res.success:
            res.error = "stream ended without any completion chunk"
    except (OSError, http.client.HTTPException, ValueError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()
    return res
