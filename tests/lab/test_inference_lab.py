"""The llamacpp services of the lab stack, converged by the ROLES engineer's `gpufleet converge`, serve and bench.

Contract used (no private interfaces):
- `gpufleet converge --stack lab --node N --json` installs the `inference_server` role's llamacpp engine:
  `llama_cpp_python[server]==0.3.36` offline from the segment file store, the model from the store, a unit.
- `gpufleet bench-inference --stack lab --service S [--smoke] --json` reaches `http://<node>:<port>/v1`.
The file stores get the wheelhouse and the tiny model from `publish_llamacpp_files` (what the lab seeding
and the bundle import serve). Never takes the lab down.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from infra.cli import main
from infra.inference.publish import publish_llamacpp_files
from infra.inference.wheel import LLAMA_CPP_PYTHON_VERSION
from infra.lab.config import Paths
from infra.lab.session import Lab
from infra.model.load import project_dir

pytestmark = pytest.mark.lab

SRV = Path("/var/lib/gpufleet/lab/srv")
OUTSIDE = "198.18.1.250"


@pytest.fixture(scope="module")
def stable_lab(lab: Lab) -> Lab:
    """The session lab (a running lab is reused and left up)."""
    return lab


@pytest.fixture(scope="module")
def stores(stable_lab: Lab) -> None:
    """Both file stores (upstream and the air-gap mirror) hold the wheelhouse and the tiny model."""
    # The lab's drop-in directory (published on both serving hosts at every `lab up`) and, for the lab
    # already running, the serving hosts' stores themselves.
    publish_llamacpp_files(Paths().files_dir)
    for host in ("lab-upstream", "lab-mirror"):
        publish_llamacpp_files(SRV / host / "files")


_CONVERGED: dict[str, dict[str, object]] = {}


def converge(node: str) -> dict[str, object]:
    """Converge a node once per module (later tests reuse the result: converge is the expensive step)."""
    if node in _CONVERGED:
        return _CONVERGED[node]
    proc = subprocess.run([sys.executable, "-m", "infra.cli", "converge", "--stack", "lab", "--node", node,
                           "--json"], capture_output=True, text=True, timeout=1800, cwd=project_dir(),
                          check=False)
    assert proc.returncode == 0, f"converge {node} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    out: dict[str, object] = json.loads(proc.stdout) if proc.stdout.strip().startswith("{") else {}
    _CONVERGED[node] = out
    return out


def bench_json(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, object]]:
    code = main(["bench-inference", "--stack", "lab", "--facts-dir", "-", "--json", *args])
    return code, json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(("node", "service"), [("lab-gpu01", "tiny-connected"), ("lab-gpu03", "tiny-airgap")])
def test_converged_service_answers_and_benches(stable_lab: Lab, stores: None, node: str, service: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """After converge the service answers a smoke completion and a bounded bench reports tokens/s."""
    converge(node)
    code, smoke = bench_json(capsys, "--service", service, "--smoke")
    assert code == 0 and smoke["ok"], smoke
    code, bench = bench_json(capsys, "--service", service, "--requests", "16", "--concurrency", "2",
                             "--max-tokens", "32")
    assert code == 0, bench
    m = bench["endpoints"][0]["metrics"]  # type: ignore[index]
    assert m["completed"] == 16 and m["output_throughput"] > 0
    # Concurrent requests must queue, not cut each other off (llama.cpp needs `--interrupt_requests False`).
    assert m["total_output_tokens"] == 16 * 32
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        assert 0 < m[key]["p50"] <= m[key]["p90"] <= m[key]["p99"]


def test_airgapped_node_serves_from_the_mirror(stable_lab: Lab, stores: None) -> None:
    """lab-gpu03 runs the mirrored wheel and model and still cannot reach the outside world."""
    converge("lab-gpu03")
    venv = "/opt/gpufleet/inference/tiny-airgap/venv/bin/python"
    r = stable_lab.ssh("lab-gpu03", f"{venv} -c 'import llama_cpp; print(llama_cpp.__version__)'")
    assert r.returncode == 0 and r.stdout.strip() == LLAMA_CPP_PYTHON_VERSION, r.stderr
    mirror_model = SRV / "lab-mirror/files/models/gpufleet-tiny-lab/lab-1/model.gguf"
    r = stable_lab.ssh("lab-gpu03", "sha256sum /var/lib/gpufleet/models/gpufleet-tiny-lab/lab-1/model.gguf")
    assert r.stdout.split()[0] == hashlib.sha256(mirror_model.read_bytes()).hexdigest()
    probe = stable_lab.ssh("lab-gpu03", f"python3 -c \"import socket; socket.create_connection(('{OUTSIDE}', 80), 3)\"",
                           timeout=30)
    assert probe.returncode != 0, "the air-gapped node reached the outside world"
