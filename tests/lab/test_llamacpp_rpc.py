"""llama.cpp across two processes through its RPC backend, as a spanning service's head and worker run it.

The worker and the head run the program the inference_server role ships (roles/inference_server/files/
gpufleet-llama-rpc.py) from a venv of the built wheel, with the argv the plan computes for each
(`engines.rpc_worker_commands`, `engines.unit_commands` with `rpc_servers`). Both on loopback here (the
lab's nspawn nodes have no fabric addresses yet). At temperature 0 the spanning pair must
generate exactly what one process generates alone, and the worker must have served the head.

Marked `lab`: it needs the llama-cpp-python wheel built with GGML_RPC (the lab's wheel, built once per
machine in /var/cache/gpufleet/wheels).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.inference.bench import Endpoint, LoadSpec, run_load, stream_completion
from infra.inference.serve import LlamaServer, ServerError, free_port, server_venv
from infra.inference.tinymodel import MODEL_NAME, ensure_tiny_model
from infra.inference.wheel import ensure_server_wheelhouse
from infra.model.load import load_site
from infra.model.site import ContainerEngine
from infra.plan import engines

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[2]
PROGRAM = ROOT / "roles" / "inference_server" / "files" / "gpufleet-llama-rpc.py"
SPEC = LoadSpec(max_tokens=24, prompt="The fabric carries", temperature=0.0)


@pytest.fixture(scope="module")
def python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return server_venv(tmp_path_factory.mktemp("venv") / "llama", ensure_server_wheelhouse())


@pytest.fixture(scope="module")
def worker(python: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    port = free_port()
    log = tmp_path_factory.mktemp("worker") / "rpc.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(python), str(PROGRAM), "worker", "--host", "127.0.0.1", "--port", str(port), "--threads", "1"],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while "transport" not in log.read_text(errors="replace"):
            assert proc.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, "the RPC backend did not start within 60 s"
            time.sleep(0.2)
        yield port, log
    finally:
        proc.terminate()
        proc.wait(timeout=10)


class HeadServer(LlamaServer):
    """The llama.cpp server started with a head's engine arguments (the plan's), on loopback."""

    def __init__(self, python: Path, model: Path, rpc_port: int, log: Path) -> None:
        super().__init__(python, model, log=log, startup_timeout=180)
        self.argv = _head_argv(model, self.port, rpc_port)

    def start(self) -> HeadServer:
        t0 = time.monotonic()
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [str(self.python), *self.argv],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        while time.monotonic() - t0 < self.startup_timeout:
            if self.proc.poll() is not None:
                break
            if self._ready():
                return self
            time.sleep(0.2)
        self.stop()
        raise ServerError(self.log.read_text(errors="replace")[-2000:])


def _head_argv(model: Path, port: int, rpc_port: int) -> list[str]:
    """The plan's head command for the lab's tiny service (the node's paths swapped for this machine's)."""
    svc = load_site(stack="lab").services[0].model_copy(update={"span_nodes": True, "rpc_port": rpc_port})
    cmds = engines.unit_commands(
        svc, ContainerEngine.PODMAN, "4.3.1", model_root="/m", venv_root="/v", rpc_servers=[f"127.0.0.1:{rpc_port}"]
    )
    argv = [str(w) for w in cmds.exec_start]
    assert argv[1:5] == [engines.RPC_PROGRAM, "head", f"--rpc=127.0.0.1:{rpc_port}", "--"]
    server = [a for a in argv[5:] if not a.startswith(("--host=", "--port=", "--model="))]
    return [str(PROGRAM), *argv[2:5], *server, f"--model={model}", "--host=127.0.0.1", f"--port={port}"]


def test_spanning_pair_generates_what_one_node_generates(
    python: Path, worker: tuple[int, Path], tmp_path: Path
) -> None:
    rpc_port, worker_log = worker
    model = ensure_tiny_model()
    with LlamaServer(python, model, log=tmp_path / "single.log") as single:
        alone = stream_completion(Endpoint(single.url, MODEL_NAME), SPEC)
    assert alone.success, alone.error
    head = HeadServer(python, model, rpc_port, tmp_path / "head.log").start()
    try:
        spanned = stream_completion(Endpoint(head.url, MODEL_NAME), SPEC)
        bench = run_load(Endpoint(head.url, MODEL_NAME), LoadSpec(num_requests=4, concurrency=1, max_tokens=16))
    finally:
        head.stop()
    assert spanned.success, spanned.error
    assert spanned.text == alone.text and spanned.output_tokens == SPEC.max_tokens
    assert bench.metrics["completed"] == 4
    text = worker_log.read_text(errors="replace")
    assert "Accepted client connection" in text, text  # the head's layers really went to the worker
    head_log = (tmp_path / "head.log").read_text(errors="replace")
    assert "assigned to device RPC0" in head_log, head_log[-2000:]  # the layers live on the worker
