"""DR logic without hosts: fingerprints and their differences, drift against the plan, check output, host keys."""

from __future__ import annotations

import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from infra.dr import fingerprint as fp
from infra.dr.drift import CheckOutcome, CheckUnavailable, NodeDrift, drift
from infra.dr.probe import remote_program
from infra.dr.remote import RemoteError
from infra.dr.steps import StepResult, parse_check
from infra.hostkeys import HostKeyError, key_fingerprint, parse_public_key, pin_key
from infra.model.load import load_site
from infra.model.site import Site
from infra.plan.node import NodePlan, plan_site
from infra.plan.nodestate import NodeState, ServiceState, compare, expected_services
from tests.unit.nodestates import converged_state

BLOB = "AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"


@pytest.fixture(scope="module")
def site() -> Site:
    return load_site(stack="lab")


def plan_of(site: Site, host: str) -> NodePlan:
    return plan_site(site).node(host)


# --- fingerprints ---------------------------------------------------------------------------------------


def test_identical_fingerprints_have_no_differences(site: Site) -> None:
    """Two probes of the same state compare equal, whatever the order of GPUs or files."""
    plan = plan_of(site, "lab-gpu01")
    a = converged_state(plan)
    b = replace(a, gpus=tuple(reversed(a.gpus)), files=dict(reversed(list(a.files.items()))))
    assert fp.compare(fp.fingerprint(a), fp.fingerprint(b)) == []


def test_each_kind_of_difference_is_named(site: Site) -> None:
    """Package version, file hash, hold, service and GPU differences are each reported with before/after."""
    plan = plan_of(site, "lab-gpu02")
    a = converged_state(plan)
    pk = {**a.packages, "nvidia-driver": "580.65.06-1"}
    files = {**a.files, "/etc/cdi/nvidia.yaml": "c" * 64}
    services = {**a.services, "nvidia-fabricmanager.service": ServiceState("inactive", "enabled")}
    b = replace(a, packages=pk, files=files, services=services, held=a.held[1:], gpus=a.gpus[:-1])
    diffs = {(d.kind, d.item): d for d in fp.compare(fp.fingerprint(a), fp.fingerprint(b))}
    assert set(diffs) == {
        ("package", "nvidia-driver"),
        ("file", "/etc/cdi/nvidia.yaml"),
        ("service", "nvidia-fabricmanager.service"),
        ("hold", a.held[0]),
        ("gpu", "GPU-0007"),
    }
    assert diffs[("package", "nvidia-driver")].after == "580.65.06-1"
    assert "570.133.20-1 → 580.65.06-1" in str(diffs[("package", "nvidia-driver")])
    assert diffs[("gpu", "GPU-0007")].after is None


def test_fingerprint_record_round_trip(site: Site, tmp_path: Path) -> None:
    """A saved fingerprint loads back equal; a node never recorded gives None."""
    f = fp.fingerprint(converged_state(plan_of(site, "lab-gpu03")))
    fp.save(tmp_path, "lab", f)
    assert fp.load(tmp_path, "lab", "lab-gpu03") == f
    assert fp.load(tmp_path, "lab", "lab-gpu04") is None


# --- drift against the plan -----------------------------------------------------------------------------


def test_converged_node_has_no_drift(site: Site) -> None:
    """A node exactly as planned has no drift items."""
    for plan in plan_site(site).nodes:
        assert compare(plan, converged_state(plan)) == []


def test_out_of_band_changes_are_reported_precisely(site: Site) -> None:
    """Removed package, lost hold, stopped service, pending reboot, missing GPU each give one item."""
    plan = plan_of(site, "lab-gpu01")
    ok = converged_state(plan)
    packages = {**ok.packages, "prometheus-node-exporter": None}
    held = tuple(h for h in ok.held if h != "cuda-toolkit-12-8")
    services = {
        **ok.services,
        "gpufleet-inference-tiny-connected.service": ServiceState("inactive", "enabled"),
    }
    st = replace(ok, packages=packages, held=held, services=services, reboot_required=True, gpus=ok.gpus[:1])
    items = {(i.kind, i.item): i for i in compare(plan, st)}
    assert set(items) == {
        ("package", "prometheus-node-exporter"),
        ("hold", "cuda-toolkit-12-8"),
        ("service", "gpufleet-inference-tiny-connected.service"),
        ("reboot", "pending"),
        ("gpu", "count"),
    }
    assert items[("package", "prometheus-node-exporter")].have is None
    assert items[("gpu", "count")].want == 2 and items[("gpu", "count")].have == 1


def test_loaded_driver_other_than_pinned_is_drift(site: Site) -> None:
    """nvidia-smi reporting another driver than the pin shows as gpu driver_version drift."""
    plan = plan_of(site, "lab-gpu03")
    ok = converged_state(plan)
    st = replace(ok, gpus=tuple(replace(g, driver_version="570.124.06") for g in ok.gpus))
    assert [(i.kind, i.item, i.have) for i in compare(plan, st)] == [("gpu", "driver_version", "570.124.06")]


def test_expected_services_follow_the_plan(site: Site) -> None:
    """Fabric manager only on NVSwitch nodes; the inference unit only where the service runs."""
    assert "nvidia-fabricmanager.service" in expected_services(plan_of(site, "lab-gpu02"))
    assert "nvidia-fabricmanager.service" not in expected_services(plan_of(site, "lab-gpu01"))
    assert "gpufleet-inference-tiny-airgap.service" in expected_services(plan_of(site, "lab-gpu03"))
    assert not any("tiny-" in u for u in expected_services(plan_of(site, "lab-gpu04")))


def test_drift_merges_probe_and_check_and_keeps_unreachable_apart(site: Site) -> None:
    """Check-mode file changes join probe items; an unreachable node is reported, not called clean."""
    plans = list(plan_site(site).nodes)

    def probe(_s: Site, p: NodePlan) -> NodeState:
        if p.hostname == "lab-gpu04":
            raise RemoteError(p.hostname, "unreachable", "no route")
        return converged_state(p)

    seen: list[str] = []

    def check(ps: list[NodePlan]) -> dict[str, CheckOutcome]:
        seen.extend(p.hostname for p in ps)
        return {
            p.hostname: CheckOutcome(files=("/etc/chrony/chrony.conf",) if p.hostname == "lab-gpu02" else ())
            for p in ps
        }

    reports = {r.hostname: r for r in drift(site, plans, check=check, probe_fn=probe)}
    assert seen == ["lab-gpu01", "lab-gpu02", "lab-gpu03"]  # unreachable node not sent to check mode
    assert reports["lab-gpu01"].status == "clean" and reports["lab-gpu01"].check == "ran"
    assert reports["lab-gpu02"].status == "drift"
    assert [(i.kind, i.item, i.source) for i in reports["lab-gpu02"].items] == [
        ("file", "/etc/chrony/chrony.conf", "check")
    ]
    assert reports["lab-gpu04"].status == "unreachable" and not reports["lab-gpu04"].drifted


def test_drift_without_check_mode_says_so(site: Site) -> None:
    """When check mode cannot run, every node says why instead of pretending it ran."""

    def check(_p: list[NodePlan]) -> dict[str, CheckOutcome]:
        raise CheckUnavailable("`gpufleet check` is not installed")

    reports = drift(site, [plan_of(site, "lab-gpu01")], check=check, probe_fn=lambda s, p: converged_state(p))
    assert reports[0].check.startswith("unavailable") and isinstance(reports[0], NodeDrift)


@pytest.mark.parametrize(
    "payload",
    [
        {
            "nodes": [
                {
                    "hostname": "n1",
                    "changed_tasks": ["Base | Render chrony"],
                    "diffs": [{"path": "/etc/x.conf"}],
                    "reboot_required": True,
                }
            ]
        },
        {
            "hosts": {
                "n1": {
                    "would_change": [{"name": "Base | Render chrony"}],
                    "files": ["/etc/x.conf"],
                    "reboot_required": True,
                }
            }
        },
    ],
)
def test_check_output_shapes_are_read(payload: dict[str, Any]) -> None:
    """The roles' check JSON (list or mapping of nodes) becomes tasks, files and the reboot flag."""
    out = parse_check(StepResult(True, 0.1, 0, payload), "n1")
    assert out == CheckOutcome(would_change=("Base | Render chrony",), files=("/etc/x.conf",), reboot_required=True)


def test_check_without_json_is_a_failure_not_clean() -> None:
    """A check that printed no JSON is reported as failed for the node."""
    assert parse_check(StepResult(False, 0.1, 1, None, "boom"), "n1").failed.startswith("check gave no JSON")


def test_remote_program_is_valid_python_with_plan_inputs(site: Site) -> None:
    """The probe program compiles and carries the plan's package names and services."""
    plan = plan_of(site, "lab-gpu02")
    text = remote_program(plan)
    compile(text, "probe", "exec")
    assert "nvidia-fabricmanager-570" in text and "nvidia-fabricmanager.service" in text


def test_probe_program_runs_locally(site: Site) -> None:
    """Run the probe on this machine: JSON with every planned package (absent here) and no crash."""
    import json
    import sys

    plan = plan_of(site, "lab-gpu01")
    p = subprocess.run(
        [sys.executable, "-"], input=remote_program(plan), capture_output=True, text=True, timeout=60, check=True
    )
    data = json.loads(p.stdout)
    assert set(data["packages"]) == {pk.name for pk in plan.packages}
    assert set(data["services"]) == set(expected_services(plan))


# --- host keys ------------------------------------------------------------------------------------------


def test_parse_public_key_from_pub_or_known_hosts_line() -> None:
    """Both `.pub` and known_hosts lines give the key; garbage is refused."""
    assert parse_public_key(f"ssh-ed25519 {BLOB} root@x") == ("ssh-ed25519", BLOB)
    assert parse_public_key(f"gpu01,10.0.0.1 ssh-ed25519 {BLOB}") == ("ssh-ed25519", BLOB)
    with pytest.raises(HostKeyError):
        parse_public_key("hello world")


def test_pin_key_replaces_only_this_nodes_entries(site: Site, tmp_path: Path) -> None:
    """Old entries of the node (by name and address) go, other hosts stay, no .old backup lingers."""
    node = plan_of(site, "lab-gpu01").node
    kh = tmp_path / "known_hosts"
    other = "lab-gpu02,198.18.1.12 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBBBB"
    kh.write_text(f"lab-gpu01,198.18.1.11 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOLD\n{other}\n")
    fpr = pin_key(kh, node, "ssh-ed25519", BLOB)
    lines = kh.read_text().splitlines()
    assert other in lines and f"lab-gpu01,198.18.1.11 ssh-ed25519 {BLOB}" in lines and len(lines) == 2
    assert not (tmp_path / "known_hosts.old").exists()
    assert fpr == key_fingerprint(BLOB) and fpr.startswith("SHA256:")


def test_pin_key_leaves_the_file_untouched_when_the_node_keeps_its_key(site: Site, tmp_path: Path) -> None:
    """A rebuild that kept the node's key edits nothing: same bytes, same order, same inode; another key, or a
    second entry of the node, is still replaced."""
    node = plan_of(site, "lab-gpu01").node
    kh = tmp_path / "known_hosts"
    mine = f"lab-gpu01,198.18.1.11 ssh-ed25519 {BLOB}"
    other = "lab-gpu02,198.18.1.12 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBBBB"
    kh.write_text(f"{mine}\n{other}\n")
    before, inode = kh.read_bytes(), kh.stat().st_ino
    assert pin_key(kh, node, "ssh-ed25519", BLOB) == key_fingerprint(BLOB)
    assert kh.read_bytes() == before and kh.stat().st_ino == inode
    kh.write_text(f"{mine}\n{other}\n198.18.1.11 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOLD\n")
    pin_key(kh, node, "ssh-ed25519", BLOB)
    assert kh.read_text().splitlines() == [other, mine]


def test_failed_step_output_names_node_task_and_message() -> None:
    """A failed converge is summarised as `node: task: message` lines, not a JSON tail."""
    from infra.dr.steps import _failures

    data = {
        "nodes": [
            {
                "hostname": "lab-gpu02",
                "failures": [
                    {"task": "nvidia_driver : Blacklist nouveau", "msg": "Destination directory /etc/modprobe.d"}
                ],
            }
        ]
    }
    assert _failures(data) == "lab-gpu02: nvidia_driver : Blacklist nouveau: Destination directory /etc/modprobe.d"
    assert (
        _failures({"node": "n1", "facts": {"problems": ["2 GPUs seen, 8 declared"]}}) == "n1: 2 GPUs seen, 8 declared"
    )


def test_probe_reads_held_and_installed_packages(site: Site, tmp_path: Path) -> None:
    """dpkg's `hi` (held, installed) counts as installed and held; `rc`/`un` are absent."""
    import json
    import os
    import sys

    plan = plan_of(site, "lab-gpu01")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "dpkg-query").write_text(
        "#!/bin/sh\nprintf 'nvidia-driver\\t570.133.20-1\\thi \\npodman\\t4.3.1\\tii \\n"
        "cuda-toolkit-12-8\\t12.8.1-1\\trc \\nnvidia-persistenced\\t570.133.20-1\\tun \\n'\n"
    )
    (bindir / "apt-mark").write_text("#!/bin/sh\necho podman\n")
    for f in bindir.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}
    p = subprocess.run(
        [sys.executable, "-"],
        input=remote_program(plan),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env=env,
    )
    data = json.loads(p.stdout)
    assert data["packages"]["nvidia-driver"] == "570.133.20-1" and data["packages"]["podman"] == "4.3.1"
    assert data["packages"]["cuda-toolkit-12-8"] is None and data["packages"]["nvidia-persistenced"] is None
    assert data["held"] == ["nvidia-driver", "podman"]


def test_pending_reboot_is_drift_except_where_the_node_cannot_reboot(site: Site) -> None:
    """A pending reboot is drift, unless the node declared it cannot reboot: then a note carrying the reason.

    The driver fact is what roles/nvidia_driver/tasks/reboot.yml records (`can_reboot`, `reboot_reason`).
    """
    plan = plan_of(site, "lab-gpu02")
    reason = "reboot needed to load driver 570.133.20; this host cannot reboot (capability reboot=false)"
    stuck = {"reboot_required": True, "can_reboot": False, "reboot_reason": reason}
    able = {"reboot_required": True, "can_reboot": True, "reboot_reason": "reboot needed; the reboot policy is never"}
    cannot = drift(site, [plan], probe_fn=lambda s, p: converged_state(p, reboot_required=True, driver_fact=stuck))[0]
    can = drift(site, [plan], probe_fn=lambda s, p: converged_state(p, reboot_required=True, driver_fact=able))[0]
    old = drift(site, [plan], probe_fn=lambda s, p: converged_state(p, reboot_required=True))[0]
    assert cannot.status == "clean" and cannot.notes == [f"reboot pending, not counted as drift: {reason}"]
    assert can.status == "drift" and [(i.kind, i.item) for i in can.items] == [("reboot", "pending")]
    assert old.status == "drift" and [(i.kind, i.item) for i in old.items] == [("reboot", "pending")]


def test_rebuild_key_source_is_what_the_cli_registered_never_a_lab_switch(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No source registered: refused even for a lab stack. The lab registers its source for its own stacks only."""
    from infra import hostkeys
    from infra.dr.rebuild import Refused, plan_host_key_source
    from infra.dr.steps import StackRef
    from infra.lab import hostkeys as lab_hostkeys

    monkeypatch.setattr(hostkeys, "_lab_source", None)
    node = plan_of(site, "lab-gpu02").node
    ref = StackRef("lab", None)
    with pytest.raises(Refused, match="--host-key FILE"):
        plan_host_key_source(site, node, None, ref)
    real = site.model_copy(update={"lab_mode": False})
    lab_hostkeys.register(real)
    with pytest.raises(Refused, match="--host-key FILE"):
        plan_host_key_source(real, node, None, ref)
    lab_hostkeys.register(site)
    assert isinstance(plan_host_key_source(site, node, None, ref), lab_hostkeys.LabSource)
