"""What people read: no raw Python shapes, no negative sizes, every check of validate-node named (issue 17)."""

from __future__ import annotations

import pytest

import infra.commands.converge as converge_cmd
from infra.ansible.rollout import NodeOutcome, RolloutResult
from infra.cli import main
from infra.commands.bmc import _cell
from infra.model.load import load_site
from infra.plan.node import plan_site
from infra.plan.nodestate import probe_spec
from tests.unit.nodestates import converged_state


def test_vram_never_prints_a_negative_kv_cache(capsys: pytest.CaptureFixture[str]) -> None:
    """A model that does not fit says by how much, instead of a negative KV cache per GPU."""
    assert main(["vram", "--model", "llama-3.1-70b", "--gpu", "L4"]) == 1
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("KV cache per GPU"))
    assert "exceed the budget by" in row and "-" not in row.split("by", 1)[1]


def test_bmc_inventory_cells_are_for_people() -> None:
    """Nested BMC answers print as key=value pairs, never as a Python dict or list."""
    cell = _cell({"state": "Enabled", "macs": ["aa:bb", "cc:dd"], "extra": None})
    assert cell == "state=Enabled, macs=aa:bb, cc:dd, extra=-"
    assert not any(c in cell for c in "{}[]'")


@pytest.mark.parametrize("reboot", [True, False])
def test_validate_node_text_names_cdi_devices_endpoints_and_why_a_reboot(
    reboot: bool, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The text of validate-node shows what --json has (CDI devices, endpoints) and explains a pending reboot."""
    plan = plan_site(load_site(stack="lab")).node("lab-gpu03")
    state = converged_state(plan, reboot_required=reboot).as_dict()
    node = NodeOutcome(plan.hostname, "airgapped", 0, "ok", 0, {"facts": {"gpu_validate_result": state}})
    monkeypatch.setattr(converge_cmd, "converge", lambda *a, **k: RolloutResult([node], [], {}))
    assert main(["validate-node", "--stack", "lab", "--node", plan.hostname]) == 0
    out = capsys.readouterr().out
    devices = [f"nvidia.com/gpu={i}" for i in range(plan.node.gpu.count)] + ["nvidia.com/gpu=all"]
    assert f"cdi devices: {', '.join(devices)}" in out
    (name, port, path), = probe_spec(plan).endpoints
    assert f"endpoint {name}: http://127.0.0.1:{port}{path} → 200" in out
    assert ("loaded only after a reboot" in out) is reboot and ("reboot: not needed" in out) is not reboot


def test_bench_inference_says_what_load_it_applied(capsys: pytest.CaptureFixture[str]) -> None:
    """The table of a bench run is headed by the load that produced it."""
    from infra.inference.fakeserver import FakeOpenAIServer

    with FakeOpenAIServer() as server:
        code = main(["bench-inference", "--endpoint", server.url, "--requests", "4", "--concurrency", "2",
                     "--max-tokens", "8", "--facts-dir", "-"])
    out = capsys.readouterr().out
    assert code == 0
    assert out.splitlines()[0].startswith("load: 4 requests × 8 tokens, 2 in flight")
