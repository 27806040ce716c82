"""DR on the lab: drift sees out-of-band changes and converge repairs them; rebuild gives back the same node.

Uses lab-gpu02 (connected, NVSwitch) and lab-gpu04 (air-gapped, NVSwitch): neither serves an inference
service, so other engineers' inference tests on lab-gpu01/03 are not disturbed by a reimage.
Needs the ROLES engineer's `gpufleet converge`/`check`/`validate-node` working on the lab.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from infra.lab.session import Lab

pytestmark = pytest.mark.lab

CONNECTED, AIRGAPPED = "lab-gpu02", "lab-gpu04"


def gpufleet(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "infra.cli", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def as_json(r: subprocess.CompletedProcess[str]) -> Any:
    try:
        return json.loads(r.stdout)
    except ValueError:
        pytest.fail(f"no JSON (exit {r.returncode}): {r.stdout[-1500:]} {r.stderr[-1500:]}")


_CONVERGED: set[str] = set()


def ensure_converged(lab: Lab, *nodes: str) -> Lab:
    """The nodes converged to the plan (once per session each): the starting point of every DR story."""
    todo = [n for n in nodes if n not in _CONVERGED]
    if todo:
        r = gpufleet("converge", "--stack", lab.stack, *[a for n in todo for a in ("--node", n)], "--json")
        if r.returncode != 0:
            pytest.fail(
                f"`gpufleet converge` (ROLES) failed, DR cannot be shown on the lab: "
                f"{r.stdout[-2000:]} {r.stderr[-1000:]}"
            )
        _CONVERGED.update(todo)
    return lab


@pytest.fixture
def converged(lab: Lab, request: pytest.FixtureRequest) -> Lab:
    """The lab with this test's node(s) converged (a rebuild's `node` parameter, else both DR nodes)."""
    callspec = getattr(request.node, "callspec", None)
    nodes = (callspec.params["node"],) if callspec and "node" in callspec.params else (CONNECTED, AIRGAPPED)
    return ensure_converged(lab, *nodes)


def test_drift_is_clean_after_converge(converged: Lab) -> None:
    """A freshly converged node has no drift: exit 0, check mode ran, no items."""
    r = gpufleet("drift", "--stack", converged.stack, "--node", CONNECTED, "--node", AIRGAPPED, "--json")
    data = as_json(r)
    assert r.returncode == 0, data
    assert all(n["status"] == "clean" and n["check"] == "ran" for n in data["nodes"]), data


def test_out_of_band_changes_are_reported_and_converge_repairs_them(lab: Lab) -> None:
    """Removed package, lost hold, edited config, stopped service: drift and check name each; converge repairs."""
    node = CONNECTED
    converged = ensure_converged(lab, node)
    changes = (
        "apt-get remove -y -q --allow-change-held-packages datacenter-gpu-manager-4-cuda12 >/dev/null",
        "apt-mark unhold cuda-toolkit-12-8 >/dev/null",
        "echo '# edited by hand' >> /etc/sysctl.d/90-gpufleet.conf",
        "systemctl stop nvidia-fabricmanager.service",
    )
    for cmd in changes:
        r = converged.ssh(node, cmd)
        assert r.returncode == 0, (cmd, r.stderr)

    r = gpufleet("drift", "--stack", converged.stack, "--node", node, "--json")
    data = as_json(r)
    assert r.returncode == 3, data
    items = data["nodes"][0]["items"]
    probe = {
        (i["kind"], i["item"], i["have"] if i["kind"] == "package" else None) for i in items if i["source"] == "probe"
    }
    # The probe compares the managed files with the record of the last converge, so it names the edit too.
    assert probe == {
        ("package", "datacenter-gpu-manager-4-cuda12", None),
        ("hold", "cuda-toolkit-12-8", None),
        ("file", "/etc/sysctl.d/90-gpufleet.conf", None),
        ("service", "nvidia-fabricmanager.service", None),
    }, items

    # Check mode (what a converge would change) names the lost hold and the edited file as well.
    r = gpufleet("check", "--stack", converged.stack, "--node", node, "--json")
    assert r.returncode == 3, r.stdout[-2000:]
    (checked,) = as_json(r)["nodes"]
    assert "cuda-toolkit-12-8" in checked["holds"], checked
    assert "/etc/sysctl.d/90-gpufleet.conf" in checked["files"], checked
    # And validate-node, the step `pulumi up` runs, reads the node with the same probe and comparison.
    r = gpufleet("validate-node", "--stack", converged.stack, "--node", node, "--json")
    facts = as_json(r)["facts"]
    assert r.returncode == 1 and facts["packages"]["not_held"] == ["cuda-toolkit-12-8"], facts
    assert facts["files"]["changed"] == ["/etc/sysctl.d/90-gpufleet.conf"], facts

    r = gpufleet("converge", "--stack", converged.stack, "--node", node, "--json")
    assert r.returncode == 0, r.stdout[-2000:]
    r = gpufleet("drift", "--stack", converged.stack, "--node", node, "--json")
    assert r.returncode == 0, as_json(r)


@pytest.mark.parametrize("node", [CONNECTED, AIRGAPPED])
def test_rebuild_gives_back_the_same_node(converged: Lab, node: str, tmp_path: Path) -> None:
    """Rebuild through the lab BMC: reimaged (marker gone, new host key), validated, identical fingerprint."""
    assert converged.ssh(node, "touch /root/gpufleet-dr-marker").returncode == 0
    key_before = _pinned_key(converged, node)

    r = gpufleet(
        "rebuild",
        "--stack",
        converged.stack,
        "--node",
        node,
        "--yes",
        "--json",
        "--records",
        str(tmp_path / "fingerprints"),
        timeout=3600,
    )
    report = as_json(r)
    assert r.returncode == 0, f"failed at {report.get('failed_step')}: {report.get('message')}"
    assert report["identical"] is True and report["baseline"] == "live", report["differences"]
    steps = [s["step"] for s in report["steps"]]
    assert steps[:3] == ["preflight", "fingerprint-before", "bmc-reimage"] and "validate" in steps
    print(
        f"\n{node}: rebuild {report['seconds']:.1f} s; steps: "
        + ", ".join(f"{s['step']} {s['seconds']:.1f}" for s in report["steps"])
    )

    assert converged.ssh(node, "test ! -e /root/gpufleet-dr-marker").returncode == 0  # a fresh disk
    assert _pinned_key(converged, node) != key_before  # a new host key, pinned from the host's own disk
    r = gpufleet("bmc", "status", "--stack", converged.stack, "--node", node, "--json")
    assert as_json(r)["nodes"][0]["boot_target"] == "Hdd"  # next reboot boots the disk, not PXE again


def _pinned_key(lab: Lab, node: str) -> str:
    address = str(lab.host(node).address.ip)
    for line in lab.known_hosts.read_text().splitlines():
        hosts = line.split(" ", 1)[0].split(",")
        if node in hosts or address in hosts:
            return line.split()[-1]
    raise AssertionError(f"{node} not pinned in {lab.known_hosts}")
