"""What people read: no raw Python shapes, no negative sizes, every check of validate-node named (issue 17)."""

from __future__ import annotations

from typing import Any

import pytest

import infra.commands.converge as converge_cmd
from infra.ansible.rollout import NodeOutcome, RolloutResult
from infra.cli import main
from infra.commands.bmc import _cell


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


def _facts(reboot: bool) -> dict[str, Any]:
    return {
        "passed": True,
        "problems": [],
        "gpus": {"declared": {"product_name": "NVIDIA L4", "count": 2, "memory_mib": 23034}, "seen": [{}, {}]},
        "driver": {"pinned": "570.133.20", "seen": ["570.133.20"]},
        "cuda": {"pinned": "12.8.1"},
        "cdi": {"devices": ["nvidia.com/gpu=0", "nvidia.com/gpu=1", "nvidia.com/gpu=all"], "ok": True},
        "endpoints": [{"name": "tiny", "url": "http://127.0.0.1:8080/v1/models", "status": 200, "ok": True}],
        "reboot_required": reboot,
    }


@pytest.mark.parametrize("reboot", [True, False])
def test_validate_node_text_names_cdi_devices_endpoints_and_why_a_reboot(
    reboot: bool, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The text of validate-node shows what --json has (CDI devices, endpoints) and explains a pending reboot."""
    node = NodeOutcome("lab-gpu01", "connected", 0, "ok", 0, {"facts": {"gpu_validate_result": _facts(reboot)}})
    monkeypatch.setattr(converge_cmd, "converge", lambda *a, **k: RolloutResult([node], [], {}))
    assert main(["validate-node", "--stack", "lab", "--node", "lab-gpu01"]) == 0
    out = capsys.readouterr().out
    assert "cdi devices: nvidia.com/gpu=0, nvidia.com/gpu=1, nvidia.com/gpu=all" in out
    assert "endpoint tiny: http://127.0.0.1:8080/v1/models → 200" in out
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
