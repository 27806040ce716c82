"""A llama.cpp service spanning two nodes (issue 23): what the plan gives the head and the worker.

The head's engine argv names each worker's RPC backend at the worker's fabric address; the worker runs only
the RPC backend program, bound to that address, with no model file and no HTTP endpoint to validate; the
worker converges before (or with) its head. `tests/lab/test_llamacpp_rpc.py` runs these argv for real.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.inference.bench import endpoints_of
from infra.model.load import SiteError, parse_site
from infra.model.rules import check
from infra.observe.config import probe_endpoints
from infra.plan import engines
from infra.plan.fabric import endpoint_nodes, serves_endpoint, span_group
from infra.plan.node import plan_site
from infra.plan.rolevars import host_vars

ROOT = Path(__file__).resolve().parents[2]
LAB = yaml.safe_load((ROOT / "stacks" / "Pulumi.lab.yaml").read_text())["config"]["gpufleet:site"]


def replica_site() -> dict[str, Any]:
    """The lab stack without its fabric and its spanning service: the replicas only."""
    site: dict[str, Any] = copy.deepcopy(LAB)
    site.pop("fabrics", None)
    site["profiles"]["lab-570"].pop("rdma", None)
    for n in site["nodes"]:
        n.pop("fabric_ports", None)
    site["services"] = [s for s in site["services"] if not s.get("span_nodes")]
    return site


def span_site() -> dict[str, Any]:
    site = replica_site()
    site["fabrics"] = [{"name": "lab-fabric", "type": "roce", "cidr": "198.18.20.0/24", "mtu": 1500}]
    for i, host in enumerate(("lab-gpu01", "lab-gpu02")):
        node = next(n for n in site["nodes"] if n["hostname"] == host)
        node["fabric_ports"] = [
            {
                "fabric": "lab-fabric",
                "netdev": "fab0",
                "soft_roce": True,
                "speed_gbps": 10,
                "address": f"198.18.20.{11 + i}",
            }
        ]
    site["profiles"]["lab-570"]["rdma"] = {"version": "44.0-2", "perftest_version": "4.5+0.17-1"}
    svc = copy.deepcopy(site["services"][0])
    svc.update(name="tiny-span", port=8090, nodes=["lab-gpu02", "lab-gpu01"], span_nodes=True)
    site["services"].append(svc)
    return site


def _problems(site: dict[str, Any]) -> list[str]:
    try:
        return [p.path for p in check(parse_site(site))]
    except SiteError as e:
        return [p.path for p in e.problems]


def test_span_site_is_valid() -> None:
    assert _problems(span_site()) == []


def _vars(site: dict[str, Any]) -> dict[str, dict[str, Any]]:
    s = parse_site(site)
    plan = plan_site(s)
    return {p.hostname: host_vars(p, s) for p in plan.nodes}


def _svc(hv: dict[str, Any], name: str) -> dict[str, Any]:
    return next(s for s in hv["inference_server_services"] if s["name"] == name)


def test_head_names_its_worker_at_the_fabric_address() -> None:
    hv = _vars(span_site())
    head = _svc(hv["lab-gpu02"], "tiny-span")
    assert head["span_role"] == "head"
    words = head["exec_start"].split()
    # The RPC program registers the worker as a device, then runs the server with the usual arguments.
    assert words[1:5] == [engines.RPC_PROGRAM, "head", "--rpc=198.18.20.11:50052", "--"]
    assert "--port=8090" in words[5:] and any(w.startswith("--model=") for w in words[5:])
    assert head["health_path"] == engines.HEALTH_PATHS[engines.Engine.LLAMACPP]
    endpoints = hv["lab-gpu02"]["gpu_validate_probe"]["endpoints"]
    assert {"name": "tiny-span", "port": 8090, "path": head["health_path"]} in endpoints


def test_worker_runs_only_the_rpc_backend_on_its_fabric_address() -> None:
    hv = _vars(span_site())
    worker = _svc(hv["lab-gpu01"], "tiny-span")
    assert worker["span_role"] == "worker"
    words = worker["exec_start"].split()
    assert words[1:] == [engines.RPC_PROGRAM, "worker", "--host=198.18.20.11", "--port=50052"]
    assert words[0].endswith("/tiny-span/venv/bin/python")
    assert worker["model_path"] == ""  # the head sends the tensors: no model file on a worker
    assert worker["health_path"] == "" and worker["rpc_bind"] == "198.18.20.11" and worker["port"] == 50052
    assert all(e["name"] != "tiny-span" for e in hv["lab-gpu01"]["gpu_validate_probe"]["endpoints"])
    assert hv["lab-gpu01"]["inference_server_rpc_program"] == engines.RPC_PROGRAM


def test_workers_converge_no_later_than_their_head() -> None:
    site = span_site()
    site["rollout"]["batch_size"] = 1
    plan = plan_site(parse_site(site))
    order = [p.hostname for p in plan.nodes]
    assert order.index("lab-gpu01") < order.index("lab-gpu02")
    batch = {p.hostname: p.batch for p in plan.nodes}
    assert batch["lab-gpu01"] < batch["lab-gpu02"]


def test_replicas_are_unchanged_by_the_span_code() -> None:
    """A stack without spanning services plans its nodes in stack order, with no RPC argument anywhere."""
    site = replica_site()
    s = parse_site(site)
    plan = plan_site(s)
    assert [p.hostname for p in plan.nodes] == [n["hostname"] for n in site["nodes"]]
    for p in plan.nodes:
        for svc in host_vars(p, s)["inference_server_services"]:
            assert svc["span_role"] == "" and engines.RPC_PROGRAM not in svc["exec_start"]


@pytest.mark.parametrize(
    ("edit", "path"),
    [
        (lambda s: s["services"][-1].update(rpc_port=8080), "services[2].rpc_port"),  # tiny-connected's port
        (lambda s: s["services"][-1].update(nodes=["lab-gpu02", "lab-gpu03"]), "services[2].nodes"),
        (
            lambda s: s["services"][-1].update(image="198.18.1.250:5000/llama/server@sha256:" + "0" * 64, wheel=None),
            "services[2].image",
        ),
    ],
)
def test_span_mistakes(edit: Any, path: str) -> None:
    site = span_site()
    edit(site)
    assert path in _problems(site)


def test_head_checks_each_worker_of_its_group() -> None:
    """The head's variables name every worker's RPC backend (the group's health check); others name none."""
    hv = _vars(span_site())
    assert _svc(hv["lab-gpu02"], "tiny-span")["span_workers"] == [
        {"node": "lab-gpu01", "address": "198.18.20.11", "port": 50052}
    ]
    assert _svc(hv["lab-gpu01"], "tiny-span")["span_workers"] == []
    assert _svc(hv["lab-gpu01"], "tiny-connected")["span_workers"] == []


def test_only_the_head_is_an_endpoint() -> None:
    """Bench, SLO probe, scrape targets, the plan's and Pulumi's endpoints: the head's address only."""
    s = parse_site(span_site())
    plan = plan_site(s)
    head = "http://198.18.1.12:8090/v1"
    assert [e.url for e in endpoints_of(s, "tiny-span")] == [head]
    assert [e["url"] for e in probe_endpoints(plan, "connected") if e["service"] == "tiny-span"] == [head]
    assert endpoint_nodes(s, s.services[-1]) == ["lab-gpu02"]
    # The llama.cpp server exports no request metrics (no scrape target); the replicas keep their endpoints.
    assert [e.label for e in endpoints_of(s, "tiny-connected")] == ["tiny-connected@lab-gpu01"]
    assert serves_endpoint(None, "lab-gpu01")


def test_the_lab_stack_spans_tiny_span_over_its_fabric() -> None:
    """The shipped lab stack: tiny-span's head is lab-gpu02, its worker lab-gpu01 at its lab-roce address."""
    s = parse_site(copy.deepcopy(LAB))
    assert check(s) == []
    svc = next(x for x in s.services if x.name == "tiny-span")
    group = span_group(s, svc)
    assert group is not None and group.fabric.name == "lab-roce"
    assert group.head == "lab-gpu02" and group.workers == (("lab-gpu01", "198.18.8.11"),)
    same = next(x for x in s.services if x.name == "tiny-connected")
    assert (svc.model, svc.wheel) == (same.model, same.wheel)  # the same model and engine as the single-node one
