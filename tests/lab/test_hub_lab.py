"""An `hf://` service locked, bundled, imported and served to the air-gapped lab node from the mirror.

The hub is a local one this test starts (tests/hubfake.py on 127.0.0.1, port chosen by the OS) holding
the lab's tiny GGUF model: no traffic to huggingface.co. A copy of the lab stack points lab-gpu03's
llama.cpp service at `hf://gpufleet-lab/tiny-gguf@main/model.gguf`; then exactly what a user runs:
`gpufleet lock` (HF_ENDPOINT at the local hub), `bundle build --segment airgap`, `bundle import` into
lab-mirror, `converge` of lab-gpu03, and a completion from the node. The node only ever talks to its mirror.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from infra.bundle.signing import generate_key
from infra.model.load import project_dir
from tests.hubfake import FakeHub
from tests.lab.test_bundle_lab import lab_artifacts, node_baseline  # the bundle test's connected-side store

pytestmark = pytest.mark.lab

LAB = Path("/var/lib/gpufleet/lab")
SSH_CONFIG = LAB / "ssh/config"
MIRROR_GNUPG = LAB / "gnupg/lab-mirror"
OUTSIDE = "198.18.1.250"
MIRROR = "198.18.2.10"
NODE = "lab-gpu03"
SERVICE = "tiny-airgap"
REPO = "gpufleet-lab/tiny-gguf"
REVISION = "hub-1"
CONFIG = b'{"model_type": "llama"}\n'


def ssh(host: str, cmd: str, timeout: int = 120) -> subprocess.CompletedProcess[str]:
    """Run a command on a lab host with the lab's pinned SSH config."""
    return subprocess.run(["ssh", "-F", str(SSH_CONFIG), host, cmd], capture_output=True, text=True,
                          timeout=timeout, check=False)


def gpufleet(*args: str, env: dict[str, str] | None = None, timeout: int = 900) -> subprocess.CompletedProcess[str]:
    """Run the CLI exactly as a user would."""
    return subprocess.run([str(project_dir() / ".venv/bin/gpufleet"), *args], capture_output=True, text=True,
                          timeout=timeout, check=False, cwd=project_dir(), env={**os.environ, **(env or {})})


def _ok(p: subprocess.CompletedProcess[str]) -> dict[str, object]:
    assert p.returncode == 0, f"exit {p.returncode}\nstdout: {p.stdout[-3000:]}\nstderr: {p.stderr[-3000:]}"
    data: dict[str, object] = json.loads(p.stdout)
    return data


@dataclass
class HubFlow:
    """What one run of lock → build → import → converge produced."""

    hub: FakeHub
    commit: str
    model: bytes
    stack: Path
    lock: Path
    bundle: Path
    node_address: str
    outputs: dict[str, subprocess.CompletedProcess[str]]


@pytest.fixture(scope="module")
def flow(lab: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubFlow]:
    """The whole flow once for the module, against a local hub."""
    if ssh("lab-mirror", "true", timeout=20).returncode != 0:
        pytest.skip("lab-mirror does not answer SSH")
    tmp = tmp_path_factory.mktemp("hub")
    art, _ = lab_artifacts()
    model = (art / "files/models/gpufleet-tiny-lab/lab-1/model.gguf").read_bytes()
    with FakeHub() as hub:
        # Two commits on main: the lock must pin the one `main` names when locking (the second).
        hub.repo(REPO).commit({"model.gguf": b"GGUF an older, broken upload", "config.json": CONFIG})
        commit = hub.repo(REPO).commit({"model.gguf": model, "config.json": CONFIG})
        raw = yaml.safe_load((project_dir() / "stacks/Pulumi.lab.yaml").read_text())
        site = raw["config"]["gpufleet:site"]
        svc = next(s for s in site["services"] if s["name"] == SERVICE)
        svc["model"]["source"] = f"hf://{REPO}@main/model.gguf"
        svc["model"]["revision"] = REVISION
        address = next(n["address"] for n in site["nodes"] if n["hostname"] == NODE)
        stack = tmp / "Pulumi.labhub.yaml"
        stack.write_text(yaml.safe_dump(raw, sort_keys=False))
        secret, keyring = tmp / "bundle.sec.asc", tmp / "bundle.pub.asc"
        generate_key(tmp / "gnupg", "gpufleet lab bundle key (SIMULATED) <bundle@lab.invalid>", secret, keyring)
        bundle = tmp / "bundle"
        hub_env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp / "hf-home")}
        out: dict[str, subprocess.CompletedProcess[str]] = {}
        out["lock"] = gpufleet("lock", "--stack-file", str(stack), "--artifacts", str(art), "--dpkg-status",
                               str(node_baseline()), "--json", env=hub_env)
        out["build"] = gpufleet("bundle", "build", "--stack-file", str(stack), "--segment", "airgap", "--out",
                                str(bundle), "--artifacts", str(art), "--signing-key", str(secret), "--serial",
                                str(int(time.time())), "--json", env=hub_env)
        # From here on the hub is gone, as it is for the isolated side: nothing after the build may need it.
    out["import"] = gpufleet("bundle", "import", str(bundle), "--stack-file", str(stack), "--mirror", "lab-mirror",
                             "--keyring", str(keyring), "--mirror-key", str(MIRROR_GNUPG), "--json")
    out["converge"] = gpufleet("converge", "--stack-file", str(stack), "--node", NODE, "--json", timeout=900)
    yield HubFlow(hub, commit, model, stack, stack.with_name("Pulumi.labhub.lock.json"), bundle, address, out)


def test_lock_pins_the_branch_and_records_the_hub_sha256(flow: HubFlow) -> None:
    """The lock names the commit `main` had, the file's sha256, and the mirror path it is served from."""
    _ok(flow.outputs["lock"])
    lock = json.loads(flow.lock.read_text())
    models = [a for a in lock["artifacts"] if a["kind"] == "model" and a["name"] == f"gpufleet-tiny-lab@{REVISION}"]
    assert [(a["version"], a["path"], a["sha256"], a["source"]) for a in models] == [
        (flow.commit, f"files/models/gpufleet-tiny-lab/{REVISION}/model.gguf",
         hashlib.sha256(flow.model).hexdigest(), f"hf://{REPO}@{flow.commit}/model.gguf")]


def test_bundle_carries_the_file_and_the_list_and_the_mirror_serves_them(flow: HubFlow) -> None:
    """The bundle holds the hub's bytes; after import the mirror serves them and the file list."""
    _ok(flow.outputs["build"])
    _ok(flow.outputs["import"])
    rel = f"files/models/gpufleet-tiny-lab/{REVISION}/model.gguf"
    assert (flow.bundle / rel).read_bytes() == flow.model
    got = ssh("lab-mirror", f"sha256sum /srv/gpufleet/{rel}").stdout.split()
    assert got and got[0] == hashlib.sha256(flow.model).hexdigest()
    index = json.loads(ssh(NODE, f"curl -sf -m 20 http://{MIRROR}/files/model-index/gpufleet-tiny-lab/"
                                 f"{REVISION}.json").stdout)
    assert index["commit"] == flow.commit


def test_air_gapped_node_serves_the_hub_model_from_the_mirror(flow: HubFlow) -> None:
    """lab-gpu03 converges, holds the locked bytes, runs with hub access off, and answers a completion."""
    r = flow.outputs["converge"]
    data = json.loads(r.stdout) if r.stdout.strip().startswith("{") else {}
    assert r.returncode == 0 and data.get("succeeded"), f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    path = f"/var/lib/gpufleet/models/gpufleet-tiny-lab/{REVISION}/model.gguf"
    got = ssh(NODE, f"sha256sum {path}").stdout.split()
    assert got and got[0] == hashlib.sha256(flow.model).hexdigest()
    env = ssh(NODE, f"systemctl show -p Environment gpufleet-inference-{SERVICE}.service").stdout
    assert "HF_HUB_OFFLINE=1" in env
    assert f"--model={path}" in ssh(NODE, f"systemctl show -p ExecStart gpufleet-inference-{SERVICE}.service").stdout
    req = urllib.request.Request(
        f"http://{flow.node_address}:8080/v1/completions",
        data=json.dumps({"model": "gpufleet-tiny-lab", "prompt": "The mirror says", "max_tokens": 8}).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        answer = json.loads(resp.read())
    assert answer["choices"] and answer["usage"]["completion_tokens"] > 0, answer
    probe = ssh(NODE, f"python3 -c \"import socket; socket.create_connection(('{OUTSIDE}', 80), 3)\"", timeout=30)
    assert probe.returncode != 0, "the air-gapped node reached the outside world"
    # The build downloaded the commit the lock pinned, not whatever `main` would name later.
    assert any(f"/{REPO}/resolve/{flow.commit}/model.gguf" in r for r in flow.hub.requests)
