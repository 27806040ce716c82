"""A vLLM service spanning nodes (issue 23): vLLM's own multiprocessing multi-node mode, sized per node.

TP inside each node, one pipeline stage per node. Every node runs `vllm serve` with the same model and
parallel sizes and `--nnodes/--node-rank/--master-addr/--master-port`; the nodes other than the head add
`--headless` (vLLM docs/serving/parallelism_scaling.md, "Running vLLM with MultiProcessing", and the flag
definitions of the vllm 0.33.0 wheel, read by tests/unit/vllm_flags.py). The head's fabric address is the
group's master address; each node announces its own (VLLM_HOST_IP).
"""

from __future__ import annotations

from typing import Any

import pytest

from infra.model import sizing
from infra.model.catalogue import resolve
from infra.model.load import parse_site
from infra.plan import engines
from infra.plan.node import plan_site
from infra.plan.rolevars import host_vars
from tests.unit import vllm_flags
from tests.unit.test_span_service import _problems, span_site

IMAGE = "198.18.1.250:5000/vllm/vllm-openai@sha256:" + "0" * 64
HEAD, WORKER = "lab-gpu02", "lab-gpu01"
HEAD_FABRIC, WORKER_FABRIC = "198.18.20.12", "198.18.20.11"


def vllm_span_site(**update: Any) -> dict[str, Any]:
    """The span site's tiny-span served by vLLM: TP 2 on each node (lab-gpu01 has two L4), PP 2 over the nodes."""
    site = span_site()
    svc = site["services"][-1]
    svc.update(engine="vllm", image=IMAGE, wheel=None, tensor_parallel=2, pipeline_parallel=2)
    svc["model"] = dict(svc["model"], source="http://198.18.1.250/files/models/gpufleet-tiny-lab/lab-1/", dtype="bf16")
    svc.update(update)
    return site


def _units(site: dict[str, Any]) -> dict[str, dict[str, Any]]:
    s = parse_site(site)
    out = {}
    for p in plan_site(s).nodes:
        for svc in host_vars(p, s)["inference_server_services"]:
            if svc["name"] == "tiny-span":
                out[p.hostname] = svc
    return out


def _vllm_words(exec_start: str) -> list[str]:
    """The words after the image: `vllm serve`'s own arguments."""
    words = exec_start.split()
    return words[words.index(IMAGE) + 1 :]


@pytest.fixture(scope="module")
def vllm_serve() -> vllm_flags.ServeFlags:
    try:
        path = vllm_flags.wheel()
    except vllm_flags.Unavailable as e:
        pytest.skip(f"the vllm wheel is not cached and PyPI is unreachable: {e}")
    return vllm_flags.serve_flags(path)


def test_vllm_span_site_is_valid() -> None:
    assert _problems(vllm_span_site()) == []


def test_every_node_runs_vllm_multi_node_mode_with_flags_vllm_defines(vllm_serve: vllm_flags.ServeFlags) -> None:
    """Head and worker argv: each `--flag=value` is an option of vllm serve 0.33.0 (values within its choices),
    `--headless` a switch, given on the worker only; ranks, node count and master address as the plan says."""
    assert {"--nnodes", "--node-rank", "--master-addr", "--master-port"} <= vllm_serve.options
    units = _units(vllm_span_site())
    seen: dict[str, dict[str, str]] = {}
    for node, unit in units.items():
        words = _vllm_words(unit["exec_start"])
        assert words[0] == engines.CONTAINER_MODEL_DIR
        opts: dict[str, str] = {}
        for w in words[1:]:
            if "=" not in w:
                assert w in vllm_serve.switches, f"{w} is not a switch of vllm serve"
                opts[w] = ""
                continue
            flag, value = w.split("=", 1)
            assert flag in vllm_serve.options, f"vllm serve has no {flag}"
            if flag in vllm_serve.choices:
                assert value in vllm_serve.choices[flag], f"{flag}={value} not in vLLM's choices"
            opts[flag] = value
        seen[node] = opts
    head, worker = seen[HEAD], seen[WORKER]
    for opts in (head, worker):
        assert opts["--distributed-executor-backend"] == "mp"
        assert (opts["--nnodes"], opts["--master-addr"], opts["--master-port"]) == ("2", HEAD_FABRIC, "50052")
        assert (opts["--tensor-parallel-size"], opts["--pipeline-parallel-size"]) == ("2", "2")
    assert (head["--node-rank"], worker["--node-rank"]) == ("0", "1")
    assert "--headless" in worker and "--headless" not in head
    assert f"--env=VLLM_HOST_IP={HEAD_FABRIC}" in units[HEAD]["exec_start"].split()
    assert f"--env=VLLM_HOST_IP={WORKER_FABRIC}" in units[WORKER]["exec_start"].split()


def test_vllm_workers_load_their_own_layers_and_the_head_answers_for_the_group() -> None:
    """A headless vLLM worker fetches the model (it loads its stage's weights) and serves no HTTP; no RPC
    backend to wait for; the head's /health answers only once every node has joined."""
    units = _units(vllm_span_site())
    head, worker = units[HEAD], units[WORKER]
    assert worker["model_source"] == head["model_source"] != ""
    assert worker["health_path"] == "" and worker["rpc_bind"] == "" and worker["span_role"] == "worker"
    assert head["health_path"] == "/health" and head["span_workers"] == [] and head["port"] == 8090
    assert not worker["native"]  # the engine's container, not the llama.cpp RPC program


def test_a_plan_that_is_not_one_stage_per_node_is_not_launched() -> None:
    s = parse_site(vllm_span_site())
    svc = s.services[-1]
    node = engines.NodeRank(rank=0, nnodes=3, master_addr=HEAD_FABRIC, master_port=50052, host_ip=HEAD_FABRIC)
    with pytest.raises(engines.EngineError, match="one pipeline stage per node"):
        engines.vllm_args(svc, node=node)


def test_master_port_clash_on_the_head_is_refused() -> None:
    """The head's master port (rpc_port) may not be another service's port on the head."""
    site = vllm_span_site(rpc_port=8080)  # nothing on lab-gpu02 uses 8080 …
    assert _problems(site) == []
    site["services"][0]["nodes"] = ["lab-gpu01", "lab-gpu02"]  # … until tiny-connected serves there too
    assert "services[2].rpc_port" in _problems(site)


def test_vram_planner_sizes_each_nodes_share() -> None:
    """405B in bf16 on two 8×H100 nodes (TP 8, PP 2): each node holds half the layers on its 8 GPUs; the same
    TP × PP on one node is refused."""
    cat = resolve()
    arch = sizing.architecture(cat.models["llama-3.1-405b"])
    h100 = cat.gpus["H100"]
    dep = sizing.Deployment(gpu="H100", gpu_usable_gib=h100.usable_gib, gpu_count=8, tensor_parallel=8,
                            pipeline_parallel=2, context_length=8192, nodes=2)
    spanning = sizing.plan(arch, dep)
    assert not spanning.errors and spanning.gpus_per_node == 8 and spanning.gpus_used == 16
    one_node = sizing.plan(arch, sizing.Deployment(**{**dep.__dict__, "nodes": 1}))
    assert any("exceeds the node's 8 GPUs" in e for e in one_node.errors)
    # Per GPU: 1/16 of the weights either way; per node: the node's 8 GPUs hold half of them.
    total = sizing.weight_bytes(arch, dep.dtype) / sizing.GIB
    assert spanning.weights_gib == pytest.approx(total / 16)
    assert spanning.weights_per_node_gib == pytest.approx(total / 2)
    three = sizing.plan(arch, sizing.Deployment(**{**dep.__dict__, "tensor_parallel": 8, "pipeline_parallel": 4}))
    assert any("pipeline stages per node = 16" in e for e in three.errors)  # 4 stages on 2 nodes: 2 each


def test_the_plan_gives_a_spanning_service_its_node_count() -> None:
    """`deployment()` of a spanning service counts its nodes; a replicated service stays on one."""
    s = parse_site(vllm_span_site())
    cat = resolve(s.catalogue)
    nodes = s.nodes_by_name
    assert sizing.deployment(s.services[-1], nodes[HEAD], cat).nodes == 2
    assert sizing.deployment(s.services[0], nodes[WORKER], cat).nodes == 1
