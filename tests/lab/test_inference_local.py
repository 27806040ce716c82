"""The llama.cpp serving path on this machine: built wheel → offline venv install → server on loopback.

Marked `lab`: the first run builds the llama-cpp-python wheel from the PyPI sdist (≈6 min on 2 shared
cores) and downloads the `[server]` dependency wheels; later runs reuse /var/cache/gpufleet/. Needs
PyPI on the first run only; the venv install itself is offline (`--no-index`), as on a node.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.cli import main
from infra.inference.bench import Endpoint, LoadSpec, run_load, stream_completion
from infra.inference.serve import LlamaServer, server_venv
from infra.inference.tinymodel import MODEL_NAME, ensure_tiny_model
from infra.inference.wheel import ensure_server_wheelhouse

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    house = ensure_server_wheelhouse()
    python = server_venv(tmp_path_factory.mktemp("venv") / "llama", house)
    srv = LlamaServer(python, ensure_tiny_model(), log=tmp_path_factory.mktemp("log") / "server.log")
    srv.start()
    yield srv
    srv.stop()


def test_server_answers_a_completion(server: LlamaServer) -> None:
    """The tiny model served by the built wheel streams the requested number of printable tokens."""
    r = stream_completion(Endpoint(server.url, MODEL_NAME), LoadSpec(max_tokens=12))
    assert r.success, r.error
    assert r.output_tokens == 12
    assert r.text.isprintable() and len(r.text) == 12


def test_bench_against_llama_server(server: LlamaServer) -> None:
    """Concurrent requests queue (none cut short) and the bench reports tokens/s and ordered percentiles."""
    b = run_load(Endpoint(server.url, MODEL_NAME), LoadSpec(num_requests=8, concurrency=2, max_tokens=16))
    m = b.metrics
    assert m["completed"] == 8 and m["failed"] == 0
    # llama-cpp-python's default `interrupt_requests` would truncate all but the newest stream.
    assert m["total_output_tokens"] == 8 * 16
    assert m["output_throughput"] > 0
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        assert 0 < m[key]["p50"] <= m[key]["p90"] <= m[key]["p99"]


def test_smoke_cli_against_llama_server(server: LlamaServer, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """`gpufleet bench-inference --smoke --endpoint URL --json` succeeds against the real server."""
    code = main(["bench-inference", "--smoke", "--endpoint", server.url, "--model", MODEL_NAME,
                 "--facts-dir", str(tmp_path), "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and data["ok"], data
    assert data["endpoints"][0]["output_tokens"] == 8
