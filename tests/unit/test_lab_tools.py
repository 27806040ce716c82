"""Stand-in tools on lab nodes: nvidia-smi, nvidia-ctk, dcgmi answer from a node's gpus.json (SIMULATED)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from infra.lab.standin_bin import dcgmi, nvidia_ctk, nvidia_smi
from infra.lab.standins import tool_script


def make_gpus(count: int = 2, name: str = "NVIDIA L4", memory_mib: int = 23034) -> dict[str, Any]:
    """A gpus.json as `lab up` writes it."""
    return {"simulated": True, "name": name, "model": "L4", "memory_mib": memory_mib, "nvswitch": False,
            "gpus": [{"index": i, "uuid": f"GPU-{i:08x}-0000-0000-0000-000000000000",
                      "pci_bus_id": f"00000000:{0x18 + 0x10 * i:02X}:00.0"} for i in range(count)]}


DRIVER = {"version": "570.133.20", "branch": "570", "cuda_version": "12.8"}


def test_query_csv_with_header_and_units() -> None:
    """--format=csv prints the header and MiB units, one line per GPU with the declared memory."""
    out = nvidia_smi.query(["name", "memory.total", "driver_version", "uuid", "index", "pci.bus_id"], {"csv"},
                           make_gpus(), DRIVER)
    lines = out.splitlines()
    assert lines[0] == "name, memory.total [MiB], driver_version, uuid, index, pci.bus_id"
    uuid = "GPU-00000000-0000-0000-0000-000000000000"
    assert lines[1] == f"NVIDIA L4, 23034 MiB, 570.133.20, {uuid}, 0, 00000000:18:00.0"
    assert len(lines) == 3


def test_query_csv_noheader_nounits() -> None:
    """noheader,nounits gives bare values, as scripts parse them."""
    out = nvidia_smi.query(["memory.total", "index"], {"csv", "noheader", "nounits"}, make_gpus(4, memory_mib=81920),
                           DRIVER)
    assert out.splitlines() == ["81920, 0", "81920, 1", "81920, 2", "81920, 3"]


def test_list_and_summary_report_declared_gpus() -> None:
    """-L lists each GPU with its UUID; the plain table is headed SIMULATED with driver and CUDA version."""
    decl = make_gpus(3)
    listed = nvidia_smi.listing(decl).splitlines()
    assert listed[2] == "GPU 2: NVIDIA L4 (UUID: GPU-00000002-0000-0000-0000-000000000000)"
    text = nvidia_smi.summary(decl, DRIVER, now=0)
    assert "SIMULATED" in text.splitlines()[2]
    assert "Driver Version: 570.133.20" in text and "CUDA Version: 12.8" in text
    assert text.count("0MiB / 23034MiB") == 3
    widths = {len(line) for line in text.splitlines()[1:] if line.startswith(("|", "+"))}
    assert widths == {91}  # every table line the same width


def _run_tool(module: str, args: list[str], gpus: dict[str, Any] | None, tmp_path: Path,
              extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the shipped single-file tool the way a node runs it, with the lab files in tmp_path."""
    script = tmp_path / module
    script.write_text(tool_script(module))
    env = {"GPUFLEET_LAB_GPUS_FILE": str(tmp_path / "gpus.json"),
           "GPUFLEET_LAB_DRIVER_FILE": str(tmp_path / "drv.json"), **(extra_env or {})}
    if gpus is not None:
        (tmp_path / "gpus.json").write_text(json.dumps(gpus))
    (tmp_path / "drv.json").write_text(json.dumps(DRIVER))
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env, timeout=30,
                          check=False)


def test_shipped_nvidia_smi_runs_standalone(tmp_path: Path) -> None:
    """The single-file nvidia-smi answers a query; without a GPU declaration it fails like a missing driver."""
    r = _run_tool("nvidia_smi", ["--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                  make_gpus(2, "NVIDIA H100 80GB HBM3", 81559), tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "NVIDIA H100 80GB HBM3, 81559\nNVIDIA H100 80GB HBM3, 81559\n"
    (tmp_path / "gpus.json").unlink()
    r = _run_tool("nvidia_smi", [], None, tmp_path)
    assert r.returncode == 9 and "couldn't communicate with the NVIDIA driver" in r.stderr


def test_unknown_query_field_is_an_error(tmp_path: Path) -> None:
    """An unsupported field fails with nvidia-smi's message instead of printing wrong data."""
    r = _run_tool("nvidia_smi", ["--query-gpu=name,clocks.bogus", "--format=csv"], make_gpus(), tmp_path)
    assert r.returncode == 2 and 'Field "clocks.bogus" is not a valid field to query.' in r.stderr


def test_cdi_spec_has_one_device_per_gpu_and_all() -> None:
    """The CDI spec is kind nvidia.com/gpu with index and UUID devices per GPU plus `all` covering every GPU."""
    spec = nvidia_ctk.cdi_spec(make_gpus(2))
    assert spec["kind"] == "nvidia.com/gpu"
    names = [d["name"] for d in spec["devices"]]
    assert names == ["0", "GPU-00000000-0000-0000-0000-000000000000", "1",
                     "GPU-00000001-0000-0000-0000-000000000000", "all"]
    assert len(spec["devices"][-1]["containerEdits"]["deviceNodes"]) == 2
    nodes = [n for d in spec["devices"] for n in d["containerEdits"]["deviceNodes"]]
    assert {n["hostPath"] for n in nodes} == {"/dev/null"}  # no GPU devices exist on lab nodes


def test_cdi_generate_then_list(tmp_path: Path) -> None:
    """`cdi generate --output` writes a spec that `cdi list` finds."""
    out = tmp_path / "cdi" / "nvidia.yaml"
    r = _run_tool("nvidia_ctk", ["cdi", "generate", f"--output={out}"], make_gpus(1), tmp_path)
    assert r.returncode == 0, r.stderr
    assert nvidia_ctk.cdi_devices((str(tmp_path / "cdi"),)) == [
        "nvidia.com/gpu=0", "nvidia.com/gpu=GPU-00000000-0000-0000-0000-000000000000", "nvidia.com/gpu=all"]


def test_runtime_configure_is_idempotent(tmp_path: Path) -> None:
    """Configuring docker twice gives the same daemon.json, keeping existing settings; containerd adds one block."""
    cfg = tmp_path / "daemon.json"
    cfg.write_text('{"log-driver": "journald"}')
    for _ in range(2):
        r = _run_tool("nvidia_ctk", ["runtime", "configure", "--runtime=docker", f"--config={cfg}"], None, tmp_path)
        assert r.returncode == 0, r.stderr
    data = json.loads(cfg.read_text())
    assert data["log-driver"] == "journald" and data["runtimes"]["nvidia"]["path"] == "nvidia-container-runtime"
    once = nvidia_ctk.configure_toml("")
    assert nvidia_ctk.configure_toml(once) == once and "runtimes.nvidia]" in once


def test_runtime_configure_rejects_unknown_runtime(tmp_path: Path) -> None:
    """Like the real tool, podman is not a runtime nvidia-ctk configures (podman uses CDI)."""
    r = _run_tool("nvidia_ctk", ["runtime", "configure", "--runtime=podman"], None, tmp_path)
    assert r.returncode == 1 and "unrecognized runtime 'podman'" in r.stderr


@pytest.mark.parametrize("count", [1, 4])
def test_dcgmi_discovery_lists_gpus(count: int) -> None:
    """`dcgmi discovery -l` counts and lists every declared GPU, labelled SIMULATED."""
    text = dcgmi.discovery(make_gpus(count))
    assert text.startswith("# SIMULATED")
    assert f"{count} GPU{'s' if count > 1 else ''} found." in text
    assert text.count("Device UUID: GPU-") == count
