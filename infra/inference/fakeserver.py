"""An in-process OpenAI-compatible streaming server on loopback with fixed delays.

Used by the bench client's tests (the metric maths against known delays) and by `client_overhead`
(the client's own request rate against a server that does no work). Binds 127.0.0.1 only.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any


@dataclass(frozen=True)
class FakeBehaviour:
    """How the fake server answers: delay before the first chunk, between chunks, usage chunk or not."""

    first_delay_s: float = 0.0
    gap_s: float = 0.0
    send_usage: bool = True
    status: int = 200
    # Tokens per chunk > 1 imitates servers that bundle tokens (usage then differs from chunk count).
    tokens_per_chunk: int = 1
    # llama.cpp's habit: a last chunk with empty text and only `finish_reason`.
    final_empty_chunk: bool = False
    # A server that slows with load (as a batching engine does): every chunk gap grows by this much per
    # other request in flight at that moment. Lets a rate sweep find a knee against a known capacity.
    gap_per_other_s: float = 0.0


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Silence per-request logging (tests and overhead runs would drown in it)."""

    def do_POST(self) -> None:
        """Answer /v1/completions with a stream of `max_tokens` one-letter tokens."""
        b = self.server.behaviour
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))) or b"{}")
        self.server.requests.append(body)
        if b.status != 200 or self.path.rstrip("/") != "/v1/completions":
            self.send_response(b.status if b.status != 200 else 404)
            self.end_headers()
            self.wfile.write(b'{"error": "fake"}')
            return
        n = int(body.get("max_tokens", 16))
        with self.server.lock:
            self.server.in_flight_marked[threading.get_ident()] = True
            self.server.in_flight += 1
            self.server.max_in_flight = max(self.server.max_in_flight, self.server.in_flight)
        try:
            self._stream(b, body, n)
        finally:
            self._done()

    def _done(self) -> None:
        # Called before `[DONE]` is written: once the client sees it, it may send its next request.
        with self.server.lock:
            if self.server.in_flight_marked.pop(threading.get_ident(), False):
                self.server.in_flight -= 1

    def _stream(self, b: FakeBehaviour, body: dict[str, Any], n: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        time.sleep(b.first_delay_s)
        chunks = -(-n // b.tokens_per_chunk)
        for i in range(chunks):
            if i:
                time.sleep(b.gap_s + b.gap_per_other_s * max(self.server.in_flight - 1, 0))
            chunk = {"id": "cmpl-fake", "object": "text_completion", "model": body.get("model"),
                     "choices": [{"index": 0, "text": "a" * b.tokens_per_chunk, "finish_reason": None}]}
            self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        if b.final_empty_chunk:
            time.sleep(b.gap_s)
            last = {"id": "cmpl-fake", "choices": [{"index": 0, "text": "", "finish_reason": "length"}]}
            self.wfile.write(b"data: " + json.dumps(last).encode() + b"\n\n")
        if b.send_usage and body.get("stream_options", {}).get("include_usage"):
            # One prompt token per word: lets tests check the input-token totals.
            prompt_tokens = len(str(body.get("prompt", "")).split())
            usage = {"id": "cmpl-fake", "choices": [],
                     "usage": {"completion_tokens": n, "prompt_tokens": prompt_tokens}}
            self.wfile.write(b"data: " + json.dumps(usage).encode() + b"\n\n")
        self._done()
        self.wfile.write(b"data: [DONE]\n\n")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    behaviour: FakeBehaviour
    requests: list[dict[str, Any]]
    lock: threading.Lock
    in_flight: int = 0
    in_flight_marked: dict[int, bool]
    max_in_flight: int = 0


class FakeOpenAIServer:
    """Context manager: `with FakeOpenAIServer(FakeBehaviour(...)) as srv: srv.url`."""

    def __init__(self, behaviour: FakeBehaviour | None = None) -> None:
        self._srv = _Server(("127.0.0.1", 0), _Handler)
        self._srv.behaviour = behaviour or FakeBehaviour()
        self._srv.requests = []
        self._srv.lock = threading.Lock()
        self._srv.in_flight_marked = {}
        self._thread = threading.Thread(target=self._srv.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        """Base URL of the server (`http://127.0.0.1:PORT/v1`)."""
        return f"http://127.0.0.1:{self._srv.server_address[1]}/v1"

    @property
    def requests(self) -> list[dict[str, Any]]:
        """Request bodies received, in arrival order."""
        return self._srv.requests

    @property
    def max_in_flight(self) -> int:
        """Most requests the server was streaming at the same moment."""
        return self._srv.max_in_flight

    def __enter__(self) -> FakeOpenAIServer:
        self._thread.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self._srv.shutdown()
        self._srv.server_close()
        self._thread.join(timeout=5)
