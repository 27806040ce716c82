"""One streamed OpenAI-compatible completion, timed chunk by chunk (stdlib only).

Shared by `bench-inference` (infra/inference/bench.py, where the metric definitions are explained) and the
SLO probe (infra/observe/probe.py). Stdlib only on purpose: the probe runs on monitoring hosts as a
self-contained zipapp, without gpufleet or its dependencies installed.
"""

from __future__ import annotations

import http.client
import json
import time
from dataclasses import dataclass, field
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
    chunks: int = 0
    text: str = ""
    error: str = ""


@dataclass(frozen=True)
class LoadSpec:
    """How much load: bounded in count, concurrency and wall time."""

    num_requests: int = 16
    concurrency: int = 4
    max_tokens: int = 32
    prompt: str = DEFAULT_PROMPT
    temperature: float = 0.0
    request_timeout_s: float = 60.0
    max_duration_s: float = 120.0

    def __post_init__(self) -> None:
        if self.num_requests < 1 or self.concurrency < 1 or self.max_tokens < 1:
            raise ValueError("num_requests, concurrency and max_tokens must be ≥ 1")
        if self.request_timeout_s <= 0 or self.max_duration_s <= 0:
            raise ValueError("timeouts must be > 0")


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


def stream_completion(ep: Endpoint, spec: LoadSpec) -> RequestResult:
    """Send one streaming /v1/completions request and time its chunks."""
    host, port = ep.host_port
    body = json.dumps({
        "model": ep.model,
        "prompt": spec.prompt,
        "max_tokens": spec.max_tokens,
        "temperature": spec.temperature,
        "stream": True,
        # vLLM and newer servers then send a final chunk with exact token counts.
        "stream_options": {"include_usage": True},
    }).encode()
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
