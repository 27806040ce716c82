"""Roles against the running lab: check on a fresh node, converge, idempotence, validation, air-gap,
driver upgrade through a stack change, rollout stop on failure, SIGKILL recovery, secret canary.

Uses lab-gpu02 (connected, NVSwitch) and lab-gpu04 (air-gapped, NVSwitch) for destructive steps
(reimage, driver changes): neither serves an inference service, so tests on lab-gpu01/03 are not
disturbed. Every converge runs through the `gpufleet` CLI with its own runs directory.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.lab import lab as lab_mod
from infra.lab.session import Lab
from infra.model.load import stack_path

pytestmark = pytest.mark.lab

GPUFLEET = str(Path(sys.executable).parent / "gpufleet")
UPGRADE_NODE, AIRGAP_NODE = "lab-gpu02", "lab-gpu04"
OUTSIDE = "198.18.1.250"


def gpufleet(
    *args: str, runs: Path, env: dict[str, str] | None = None, timeout: float = 1500
) -> tuple[int, dict[str, Any]]:
    """Run a gpufleet command with --json in its own runs dir; (exit code, parsed JSON)."""
    e = {**os.environ, "GPUFLEET_RUNS_DIR": str(runs), **(env or {})}
    p = subprocess.run([GPUFLEET, *args, "--json"], capture_output=True, text=True, timeout=timeout, env=e, check=False)
    try:
        data = json.loads(p.stdout)
    except json.JSONDecodeError:
        data = {"stdout": p.stdout[-3000:], "stderr": p.stderr[-3000:]}
    return p.returncode, data


def stack_copy(tmp: Path, edit: Any) -> Path:
    """A modified copy of the lab stack (edit(site_dict) mutates it) as a stack file."""
    data = yaml.safe_load(stack_path("lab").read_text())
    edit(data["config"]["gpufleet:site"])
    out = tmp / "Pulumi.lab-modified.yaml"
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def with_profile_580(site: dict[str, Any]) -> None:
    """lab-gpu02 gets a copy of the lab profile on driver/fabric manager 580.95.05."""
    prof = json.loads(json.dumps(site["profiles"]["lab-570"]))
    prof["driver"] = {"branch": "580", "version": "580.95.05", "open_modules": True}
    prof["fabric_manager"] = {"enabled": True, "version": "580.95.05"}
    site["profiles"]["lab-580"] = prof
    next(n for n in site["nodes"] if n["hostname"] == UPGRADE_NODE)["profile"] = "lab-580"


@pytest.fixture
def tmp_path() -> Iterator[Path]:
    """A per-test directory outside pytest's basetemp: on a shared machine other pytest sessions prune
    old basetemps (retention 3), which deleted a running converge's data dir under it."""
    d = Path(tempfile.mkdtemp(prefix="gpufleet-roles-test-", dir="/var/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def lab_ready(lab: Lab) -> Iterator[Lab]:
    """The lab, with lab-gpu02 and lab-gpu04 reimaged to the base OS (fresh nodes)."""
    for node in (UPGRADE_NODE, AIRGAP_NODE):
        # Other sessions on a shared lab may restart a stopped host in between: retry the pair.
        for _ in range(10):
            lab_mod.power_off(lab.spec, lab.paths, node)
            if lab_mod.power_on(lab.spec, lab.paths, node, reimage=True):
                break
            time.sleep(1)
        else:
            pytest.fail(f"could not reimage {node}")
    for node in (UPGRADE_NODE, AIRGAP_NODE):
        code, data = gpufleet("wait-ssh", "--stack", "lab", "--node", node, "--timeout", "120", runs=Path("/tmp"))
        assert code == 0, data
    yield lab


def test_check_on_fresh_nodes_completes(lab_ready: Lab, tmp_path: Path) -> None:
    """Check mode on freshly reimaged nodes finishes, changes nothing and lists every pinned package."""
    code, rep = gpufleet("check", "--stack", "lab", "--node", UPGRADE_NODE, "--node", AIRGAP_NODE, runs=tmp_path)
    assert code == 3, rep
    nodes = {n["hostname"]: n for n in rep["nodes"]}
    for name in (UPGRADE_NODE, AIRGAP_NODE):
        assert nodes[name]["status"] == "ok", nodes[name]["failures"]
        assert "nvidia-driver=570.133.20-1" in nodes[name]["packages"]
        assert "nvidia-fabricmanager-570=570.133.20-1" in nodes[name]["packages"]
        assert nodes[name]["reboot_required"] is True
    r = lab_ready.ssh(UPGRADE_NODE, "dpkg-query -W nvidia-driver 2>&1; ls /etc/apt/sources.list.d/")
    assert "gpufleet-" not in r.stdout and "570.133.20" not in r.stdout  # check mode wrote nothing


@pytest.fixture(scope="module")
def converged(lab_ready: Lab) -> Lab:
    """The whole lab converged once (after the fresh-node check, when that runs first)."""
    runs = Path(tempfile.mkdtemp(prefix="gpufleet-roles-converge-", dir="/var/tmp"))
    code, first = gpufleet("converge", "--stack", "lab", runs=runs)
    shutil.rmtree(runs, ignore_errors=True)
    assert code == 0, [(n["hostname"], n.get("failures")) for n in first.get("nodes", [])] or first
    return lab_ready


def test_converge_then_noop_everywhere(converged: Lab, tmp_path: Path) -> None:
    """After the lab converged, a second converge reports changed=0 on every node."""
    code, second = gpufleet("converge", "--stack", "lab", runs=tmp_path)
    assert code == 0, second
    assert {n["hostname"]: n["changed"] for n in second["nodes"]} == dict.fromkeys(
        ("lab-gpu01", "lab-gpu02", "lab-gpu03", "lab-gpu04"), 0
    ), [(n["hostname"], n["changed_tasks"]) for n in second["nodes"]]


@pytest.mark.parametrize("node", ["lab-gpu01", "lab-gpu02", "lab-gpu03", "lab-gpu04"])
def test_validate_node_passes(converged: Lab, tmp_path: Path, node: str) -> None:
    """validate-node reports the declared GPUs, pinned driver, no reboot pending after converge in lab mode."""
    code, data = gpufleet("validate-node", "--stack", "lab", "--node", node, runs=tmp_path)
    assert code == 0 and data["passed"], data
    facts = data["facts"]
    declared = facts["gpus"]["declared"]
    assert len(facts["gpus"]["seen"]) == declared["count"] > 0
    assert facts["driver"]["seen"] == ["570.133.20"] and facts["cdi"]["ok"]
    # The lab's hosts declare reboot=false (infra/lab/hosts.py): a pending reboot says so, never bare.
    if facts["reboot_required"]:
        assert facts["reboot_reason"] == (
            "reboot needed to load driver 570.133.20; this host cannot reboot (capability reboot=false)"
        )


@pytest.mark.parametrize("node", ["lab-gpu03", AIRGAP_NODE])
def test_airgapped_nodes_install_from_mirror_only(converged: Lab, node: str) -> None:
    """Air-gapped nodes have only the mirror as apt source, got every GPU package from it, cannot reach out."""
    r = converged.ssh(
        node, "cat /etc/apt/sources.list; ls /etc/apt/sources.list.d/; grep -h '^URIs' /etc/apt/sources.list.d/*"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("URIs:") == 1 and "URIs: http://198.18.2.10/apt" in r.stdout
    assert "deb " not in r.stdout
    r = converged.ssh(node, "apt-cache policy nvidia-driver cuda-toolkit-12-8 podman")
    origins = {
        ln.split()[1] for ln in r.stdout.splitlines() if ln.strip().startswith(("500 ", "1001 ")) and "http" in ln
    }
    assert origins == {"http://198.18.2.10/apt"}, r.stdout
    r = converged.ssh(node, "nft list table inet gpufleet_airgap")
    assert r.returncode == 0 and "policy drop" in r.stdout
    probe = converged.ssh(node, f"python3 -c \"import socket; socket.create_connection(('{OUTSIDE}', 80), 3)\"")
    assert probe.returncode != 0


def test_driver_upgrade_through_stack_change(converged: Lab, tmp_path: Path) -> None:
    """570→580 on one node: check names exactly that node and its packages + reboot; converge applies it;
    fabric manager follows the driver; the original stack downgrades it again."""
    modified = stack_copy(tmp_path, with_profile_580)
    code, rep = gpufleet("check", "--stack-file", str(modified), runs=tmp_path)
    assert code == 3, rep
    changed = {n["hostname"]: n for n in rep["nodes"] if n["changes"]}
    assert set(changed) == {UPGRADE_NODE}, {n["hostname"]: n["changed_tasks"] for n in rep["nodes"]}
    node = changed[UPGRADE_NODE]
    assert node["packages"] == sorted(
        [
            "nvidia-driver=580.95.05-1",
            "nvidia-kernel-open-dkms=580.95.05-1",
            "nvidia-persistenced=580.95.05-1",
            "nvidia-fabricmanager-580=580.95.05-1",
        ]
    )
    assert node["packages_removed"] == ["nvidia-fabricmanager-570"] and node["reboot_required"] is True

    code, conv = gpufleet("converge", "--stack-file", str(modified), "--node", UPGRADE_NODE, runs=tmp_path)
    assert code == 0, conv
    r = converged.ssh(
        UPGRADE_NODE,
        "nvidia-smi --query-gpu=driver_version --format=csv,noheader | sort -u; "
        "dpkg-query -W -f='${Package} ${Version} ${db:Status-Abbrev}\\n' "
        "'nvidia-fabricmanager-*' nvidia-driver; systemctl is-active nvidia-fabricmanager; "
        "cat /etc/ansible/facts.d/gpufleet.fact",
    )
    lines = r.stdout.splitlines()
    assert lines[0] == "580.95.05"
    assert "nvidia-fabricmanager-580 580.95.05-1 hi" in r.stdout and "nvidia-driver 580.95.05-1 hi" in r.stdout
    assert "nvidia-fabricmanager-570 570" not in r.stdout and "active" in lines
    fact = json.loads(r.stdout[r.stdout.index("{") :])
    assert fact["reboot_required"] is True and fact["can_reboot"] is False  # lab: recorded, not rebooted
    assert fact["reboot_reason"].endswith("this host cannot reboot (capability reboot=false)")
    assert conv["nodes"][0]["reboot_reason"] == fact["reboot_reason"]

    code, back = gpufleet("converge", "--stack", "lab", "--node", UPGRADE_NODE, runs=tmp_path)
    assert code == 0, back
    r = converged.ssh(UPGRADE_NODE, "nvidia-smi --query-gpu=driver_version --format=csv,noheader | sort -u")
    assert r.stdout.strip() == "570.133.20"


def test_failure_stops_rollout_and_leaves_rest_untouched(converged: Lab, tmp_path: Path) -> None:
    """Batch size 1, max_failures 0: lab-gpu01 fails validation, lab-gpu02 (next batch) is never run."""

    def edit(site: dict[str, Any]) -> None:
        site["rollout"] = {"batch_size": 1, "max_failures": 0}
        # The stack now declares a GPU the node does not have: gpu_validate must fail on it.
        next(n for n in site["nodes"] if n["hostname"] == "lab-gpu01")["gpu"]["count"] = 3

    modified = stack_copy(tmp_path, edit)
    before = converged.ssh(UPGRADE_NODE, "stat -c %Y /var/lib/gpufleet/validate.json").stdout
    code, res = gpufleet("converge", "--stack-file", str(modified), "--segment", "connected", runs=tmp_path)
    assert code == 1
    status = {n["hostname"]: n["status"] for n in res["nodes"]}
    assert status == {"lab-gpu01": "failed", UPGRADE_NODE: "not-run"}
    assert "connected" in res["stopped_segments"] and len(res["runs"]) == 1
    assert any("GPUs seen" in f["msg"] for f in res["nodes"][0]["failures"])
    assert converged.ssh(UPGRADE_NODE, "stat -c %Y /var/lib/gpufleet/validate.json").stdout == before


def _newest_events(runs: Path) -> list[str]:
    out = []
    for d in runs.glob("run-*/pdd/artifacts/*/job_events"):
        for f in d.glob("*.json"):
            try:
                out.append(json.loads(f.read_text()).get("event_data", {}).get("task") or "")
            except (OSError, ValueError):
                continue
    return out


def _tree(pid: int) -> list[int]:
    """`pid` and every descendant (ansible-playbook runs in its own session, out of our process group)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _processes_mentioning(text: str) -> list[str]:
    """Command lines of running processes that contain `text` (e.g. a runs directory)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in args:
            found.append(args)
    return found


def _start_converge(stack_file: Path, runs: Path, until_task: str) -> subprocess.Popen[bytes]:
    """`gpufleet converge` of UPGRADE_NODE in the background, returned once `until_task` has started."""
    p = subprocess.Popen(
        [GPUFLEET, "converge", "--stack-file", str(stack_file), "--node", UPGRADE_NODE, "--json"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "GPUFLEET_RUNS_DIR": str(runs)},
        start_new_session=True,
    )
    deadline = time.monotonic() + 900
    while until_task not in _newest_events(runs):
        if p.poll() is not None or time.monotonic() > deadline:
            p.kill()
            pytest.fail(f"converge ended or stalled before {until_task!r}")
        time.sleep(0.2)
    return p


def test_sigterm_stops_the_playbook_and_says_how_to_finish(converged: Lab, tmp_path: Path) -> None:
    """SIGTERM to `gpufleet converge` stops its ansible-playbook too (exit 130, message); a re-run finishes."""
    runs = tmp_path / "runs"
    p = _start_converge(stack_path("lab"), runs, "Role nvidia_driver")
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert b"Run the same command again" in err and UPGRADE_NODE.encode() in err
    time.sleep(1)
    assert _processes_mentioning(str(runs)) == []
    code, res = gpufleet("converge", "--stack", "lab", "--node", UPGRADE_NODE, runs=tmp_path)
    assert code == 0 and res["nodes"][0]["changed"] == 0, res


@pytest.mark.parametrize(
    ("version", "kill_at"),
    [
        ("570.124.06", "Packages | Install pinned driver packages"),
        ("570.133.20", "Reboot | Record the driver state"),
        # After the driver changed, before the container toolkit regenerates its CDI spec for it.
        ("570.124.06", "Packages | Probe installed versions of container toolkit packages"),
    ],
)
def test_sigkill_mid_converge_then_reconverge(converged: Lab, tmp_path: Path, version: str, kill_at: str) -> None:
    """SIGKILL of the whole converge at a task boundary; the next converge succeeds and dpkg is healthy."""

    def edit(site: dict[str, Any]) -> None:
        prof = site["profiles"]["lab-570"]
        prof["driver"]["version"] = version
        prof["fabric_manager"]["version"] = version

    modified = stack_copy(tmp_path, edit)
    runs = tmp_path / "runs"
    p = _start_converge(modified, runs, kill_at)
    # The whole converge dies at once, as in a crash or an OOM kill: gpufleet, ansible-playbook and
    # its workers (not only our process group: ansible-playbook runs in a session of its own).
    # Freeze the tree first (until no new process appears), so nothing forks between listing and killing.
    frozen: set[int] = set()
    while new := set(_tree(p.pid)) - frozen:
        for pid in new:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        frozen |= new
    for pid in frozen:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    p.wait(timeout=30)
    time.sleep(1)
    assert _processes_mentioning(str(runs)) == []
    code, res = gpufleet("converge", "--stack-file", str(modified), "--node", UPGRADE_NODE, runs=tmp_path)
    assert code == 0, res
    r = converged.ssh(
        UPGRADE_NODE,
        "dpkg --audit; apt-get check -q; nvidia-smi --query-gpu=driver_version --format=csv,noheader | sort -u",
    )
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == version, r.stdout + r.stderr
    if version != "570.133.20":
        code, res = gpufleet("converge", "--stack", "lab", "--node", UPGRADE_NODE, runs=tmp_path)
        assert code == 0, res


def test_secret_canary_never_left_on_controller(converged: Lab, tmp_path: Path) -> None:
    """A registry token used by the run reaches the node, but no artifact, log or file on the controller.

    A BMC password in gpufleet's environment (how Pulumi hands secrets to the commands it runs) must
    not leak either: ansible-runner would write its environment to env/envvars without
    suppress_env_files, and Ansible inherits it.
    """
    canary = f"gpf-canary-{os.getpid()}-{int(time.time())}"
    bmc_canary = f"gpf-bmc-canary-{os.getpid()}-{int(time.time())}"
    started = time.time()
    code, res = gpufleet(
        "converge",
        "--stack",
        "lab",
        "--node",
        "lab-gpu03",
        runs=tmp_path / "runs",
        env={"GPUFLEET_SECRET_REGISTRY_TOKEN": canary, "GPUFLEET_SECRET_BMC_LAB_GPU03": bmc_canary},
    )
    assert code == 0, res
    r = converged.ssh("lab-gpu03", "cat /etc/gpufleet/registry/config.json")
    auths = json.loads(r.stdout)["auths"]
    assert base64.b64decode(auths["198.18.2.10:5000"]["auth"]).decode() == f"gpufleet:{canary}"
    assert canary not in json.dumps(res) and bmc_canary not in json.dumps(res)
    needles = (canary.encode(), bmc_canary.encode())
    leaks = []
    # Node disks live under /var/lib/gpufleet/lab (the token is meant to be there); runs are not.
    for base in (tmp_path / "runs", Path("/tmp"), Path.home() / ".ansible", Path("/var/lib/gpufleet/runs")):
        for f in base.rglob("*") if base.exists() else []:
            try:
                if (
                    f.is_file()
                    and not f.is_symlink()
                    and f.stat().st_mtime >= started - 1
                    and f.stat().st_size < 50_000_000
                    and any(n in f.read_bytes() for n in needles)
                ):
                    leaks.append(str(f))
            except OSError:
                continue
    assert leaks == []
