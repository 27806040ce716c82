"""Run the llama.cpp server from the built wheel on loopback, installed exactly as a node installs it.

`server_venv` installs `llama_cpp_python[server]` with `--no-index --find-links <wheelhouse>`, the same
offline install the `inference_server` role runs on a node, so a working local server also proves the
wheelhouse is complete. `LlamaServer` starts `python -m llama_cpp.server` on 127.0.0.1 and stops it by PID.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

from infra.inference.tinymodel import MODEL_NAME
from infra.inference.wheel import SERVER_REQUIREMENT


class ServerError(RuntimeError):
    """The venv could not be built or the server did not come up (message carries its log tail)."""


def server_venv(venv_dir: Path, wheelhouse: Path, *, timeout: float = 600) -> Path:
    """Create (once) a venv with the llama.cpp server installed offline from `wheelhouse`; its python."""
    python = venv_dir / "bin" / "python"
    marker = venv_dir / ".gpufleet-installed"
    if marker.is_file() and marker.read_text(encoding="utf-8").strip() == SERVER_REQUIREMENT:
        return python
    steps = [
        [sys.executable, "-m", "venv", "--clear", str(venv_dir)],
        # No index: the wheelhouse must hold every dependency, as on an air-gapped node.
        [str(python), "-m", "pip", "install", "--no-index", "--find-links", str(wheelhouse), SERVER_REQUIREMENT],
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    for cmd in steps:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
        if proc.returncode:
            raise ServerError(f"{' '.join(cmd[:4])} … exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    marker.write_text(SERVER_REQUIREMENT + "\n", encoding="utf-8")
    return python


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (the kernel's choice)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class LlamaServer:
    """`with LlamaServer(python, model) as srv: srv.url` — a llama.cpp server on loopback."""

    def __init__(self, python: Path, model: Path, *, alias: str = MODEL_NAME, n_ctx: int = 512,
                 port: int | None = None, startup_timeout: float = 120, log: Path | None = None) -> None:
        self.python, self.model, self.alias, self.n_ctx = python, model, alias, n_ctx
        self.port = port or free_port()
        self.startup_timeout = startup_timeout
        self.log = log or model.parent / f"llama-server-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_s = 0.0

    @property
    def url(self) -> str:
        """OpenAI-compatible base URL."""
        return f"http://127.0.0.1:{self.port}/v1"

    def _ready(self) -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
        try:
            conn.request("GET", "/v1/models")
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()

    def start(self) -> LlamaServer:
        """Start the server and wait until /v1/models answers."""
        cmd = [str(self.python), "-m", "llama_cpp.server", "--model", str(self.model), "--model_alias", self.alias,
               "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", str(self.n_ctx),
               # Default True: a new request cuts off the one streaming; concurrent clients must queue.
               "--interrupt_requests", "False"]
        t0 = time.monotonic()
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        while time.monotonic() - t0 < self.startup_timeout:
            if self.proc.poll() is not None:
                break
            if self._ready():
                self.startup_s = time.monotonic() - t0
                return self
            time.sleep(0.2)
        self.stop()
        tail = self.log.read_text(encoding="utf-8", errors="replace")[-2000:]
        raise ServerError(f"llama.cpp server on port {self.port} did not answer within "
                          f"{self.startup_timeout:.0f} s:\n{tail}")

    def stop(self) -> None:
        """Stop the server by its PID (its own process group: nothing else is touched)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def __enter__(self) -> LlamaServer:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
