"""The Ansible execution layer: plan → variables → inventory, events → typed results, rollout, secrets."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from infra import procs as procs_mod
from infra.ansible import runner as runner_mod
from infra.ansible.converge import VERDICT_TASK, check_report, judge, select
from infra.ansible.inventory import build_inventory
from infra.ansible.rollout import NOT_RUN, roll, waves
from infra.ansible.runner import HostResult, RunResult, _Collector, run_playbook, scrub
from infra.ansible.settings import SshSettings, Tuning, runner_env
from infra.model.load import load_site
from infra.plan.node import NodePlan, SitePlan, plan_site
from infra.plan.nodestate import NodeState
from infra.plan.packages import packages_for
from infra.plan.rolevars import host_vars, wheel_requirement

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def lab() -> tuple[Any, SitePlan]:
    site = load_site("lab")
    return site, plan_site(site)


def make_result(hosts: dict[str, dict[str, Any]]) -> RunResult:
    """A RunResult with per-host overrides (failed=1, unreachable=True, changed=n …)."""
    out = {}
    for name, over in hosts.items():
        h = HostResult(name)
        for k, v in over.items():
            setattr(h, k, v)
        out[name] = h
    return RunResult("node.yml", False, "successful", 0, 0.1, out, "/nonexistent")


def test_role_vars_carry_plan_packages(lab: tuple[Any, SitePlan]) -> None:
    """Driver, fabric manager and toolkit package pins reach the roles exactly as the plan has them."""
    site, plan = lab
    n = plan.node("lab-gpu02")
    hv = host_vars(n, site)
    assert hv["nvidia_driver_packages"] == [p.as_dict() for p in n.packages if p.component.value == "nvidia_driver"]
    assert hv["nvidia_driver_fabric_manager_packages"] == [
        {"name": "nvidia-fabricmanager-570", "version": "570.133.20-1"}
    ]
    # The probe reads what the plan names: the fabric manager's package and unit, and the fact file the
    # driver role writes (one path, given to both roles).
    probe = hv["gpu_validate_probe"]
    assert "nvidia-fabricmanager-570" in probe["packages"] and "nvidia-fabricmanager.service" in probe["services"]
    assert probe["fact_file"] == hv["nvidia_driver_fact_file"]


def test_airgapped_node_gets_mirror_only_and_firewall(lab: tuple[Any, SitePlan]) -> None:
    """An air-gapped node installs from its mirror only, exclusively, behind the egress firewall."""
    site, plan = lab
    hv = host_vars(plan.node("lab-gpu03"), site)
    assert [s["uris"] for s in hv["base_apt_sources"]] == ["http://198.18.2.10/apt"]
    assert hv["base_apt_sources_exclusive"] is True
    assert "airgap_firewall" in hv["gpufleet_roles"]
    assert hv["airgap_firewall_allow"] == ["198.18.2.0/24", "198.18.2.10/32"]
    assert hv["airgap_firewall_probe_address"] == "198.18.1.250"
    svc = hv["inference_server_services"][0]
    assert svc["pip_find_links"] == "http://198.18.2.10/files/wheels/" and svc["pip_trusted_host"] == "198.18.2.10"


def test_plan_gives_lab_and_real_nodes_the_same_variables(lab: tuple[Any, SitePlan]) -> None:
    """What a host cannot do is its own declaration (capabilities fact), never a lab switch in the plan."""
    site, plan = lab
    real = site.model_copy(update={"lab_mode": False})
    real_plan = plan_site(real)
    for node in plan.nodes:
        hv = host_vars(node, site)
        assert hv == host_vars(real_plan.node(node.hostname), real), node.hostname
        assert not {k for k in hv if "lab" in k}
        # Switches the roles default to "on" and gate by the host's capabilities are not set by the plan.
        assert not {"nvidia_driver_reboot_enabled", "network_apply", "base_sysctl_apply"} & set(hv)
    never = load_site("example-airgap")
    assert host_vars(plan_site(never).nodes[0], never)["nvidia_driver_reboot_policy"] == "never"


def test_roles_hold_no_package_version() -> None:
    """No pinned version from any example profile is written in roles/ (versions come from the plan)."""
    versions = set()
    for stack in ("lab", "example-prod", "example-airgap"):
        site = load_site(stack)
        for prof in site.profiles.values():
            for os_ in ("debian-12", "ubuntu-22.04", "rhel-9"):
                versions |= {p.version for p in packages_for(prof, os_, fabric_manager=True)}  # type: ignore[arg-type]
    text = "\n".join(
        p.read_text(errors="replace")
        for p in (ROOT / "roles").rglob("*")
        if p.is_file() and "mirror" not in p.relative_to(ROOT / "roles").parts[:1]
    )
    assert versions and not [v for v in versions if v in text]


def test_wheel_requirement_parses_pep427_names() -> None:
    """A wheel URL becomes `name==version` plus the directory pip finds its dependencies in."""
    assert wheel_requirement("http://m/files/wheels/llama_cpp_python-0.3.36-cp311-cp311-linux_x86_64.whl") == (
        "llama_cpp_python==0.3.36",
        "http://m/files/wheels/",
    )
    with pytest.raises(ValueError, match="wheel"):
        wheel_requirement("http://m/files/wheels/llama.tar.gz")


def test_inventory_connects_with_plan_addresses(lab: tuple[Any, SitePlan]) -> None:
    """Inventory hosts use the plan's addresses and users, root without sudo."""
    site, plan = lab
    inv = build_inventory(site, plan.nodes)
    hosts = inv["all"]["children"]["gpufleet_nodes"]["hosts"]
    assert set(hosts) == {"lab-gpu01", "lab-gpu02", "lab-gpu03", "lab-gpu04"}
    assert hosts["lab-gpu03"]["ansible_host"] == "198.18.2.11"
    assert hosts["lab-gpu03"]["ansible_become"] is False


def test_ssh_settings_pin_host_keys(lab: tuple[Any, SitePlan]) -> None:
    """Every connection uses the stack's ssh config and known_hosts with strict host key checking."""
    site, _ = lab
    args = SshSettings.of(site).args()
    assert args[:2] == ["-F", "/var/lib/gpufleet/lab/ssh/config"]
    assert "StrictHostKeyChecking=yes" in args and "UserKnownHostsFile=/var/lib/gpufleet/lab/ssh/known_hosts" in args


def test_tuning_profiles_differ_as_documented(tmp_path: Path) -> None:
    """Tuned: Mitogen, a fork per host; pipelined: pipelining + ControlPersist; defaults: forks 5, none of it."""
    ssh = SshSettings("/etc/lab/ssh_config", "/etc/lab/known_hosts")
    tuned, forks = runner_env(Tuning.TUNED, hosts=8, ssh=ssh, work_dir=tmp_path, control_dir=tmp_path, fact_cache=None)
    assert forks == 8 and tuned["ANSIBLE_STRATEGY"] == "mitogen_free"
    assert (Path(tuned["ANSIBLE_STRATEGY_PLUGINS"]) / "mitogen_free.py").is_file()
    # Mitogen builds its ssh command from these: the pinned known_hosts and strict checking stay.
    assert tuned["ANSIBLE_SSH_ARGS"] == " ".join(ssh.args()) and tuned["ANSIBLE_HOST_KEY_CHECKING"] == "true"
    piped, forks = runner_env(
        Tuning.PIPELINED, hosts=8, ssh=ssh, work_dir=tmp_path, control_dir=tmp_path, fact_cache=None
    )
    assert forks == 8 and piped["ANSIBLE_PIPELINING"] == "true" and "ControlPersist=" in piped["ANSIBLE_SSH_ARGS"]
    assert piped["ANSIBLE_STRATEGY"] == "free"
    assert tuned["ANSIBLE_INJECT_FACT_VARS"] == piped["ANSIBLE_INJECT_FACT_VARS"] == "false"
    plain, forks = runner_env(
        Tuning.DEFAULTS, hosts=8, ssh=ssh, work_dir=tmp_path, control_dir=tmp_path, fact_cache=None
    )
    assert forks == 5 and plain["ANSIBLE_PIPELINING"] == "false" and "ControlMaster=no" in plain["ANSIBLE_SSH_ARGS"]
    assert "ANSIBLE_STRATEGY" not in plain  # Ansible's default, linear
    assert "ANSIBLE_INJECT_FACT_VARS" not in plain  # Ansible's default, facts injected as variables
    assert tuned["PATH"].split(":")[0] == str(Path(sys.executable).parent)


def test_waves_group_batch_k_of_every_segment(lab: tuple[Any, SitePlan]) -> None:
    """Batch k of every segment runs in the same wave (lab: batch_size 2, two segments → one wave)."""
    _, plan = lab
    assert [[n.hostname for n in w] for w in waves(plan, plan.nodes)] == [
        ["lab-gpu01", "lab-gpu02", "lab-gpu03", "lab-gpu04"]
    ]


def _batch1_plan() -> SitePlan:
    site = load_site("lab")
    site = site.model_copy(update={"rollout": site.rollout.model_copy(update={"batch_size": 1})})
    return plan_site(site)


def test_failure_stops_the_segment_and_leaves_later_batches_untouched() -> None:
    """With max_failures 0 a failure stops its segment's later batches; the other segment carries on."""
    plan = _batch1_plan()
    calls: list[list[str]] = []

    def run(batch: list[NodePlan]) -> RunResult:
        names = [n.hostname for n in batch]
        calls.append(names)
        return make_result({h: {"failed": 1} if h == "lab-gpu01" else {"changed": 3} for h in names})

    result = roll(plan, plan.nodes, run, max_failures=0)
    assert calls == [["lab-gpu01", "lab-gpu03"], ["lab-gpu04"]]
    status = {n.hostname: n.status for n in result.nodes}
    assert status == {"lab-gpu01": "failed", "lab-gpu02": NOT_RUN, "lab-gpu03": "ok", "lab-gpu04": "ok"}
    assert list(result.stopped_segments) == ["connected"] and not result.succeeded


def test_failures_below_threshold_continue() -> None:
    """With max_failures 1 one failure is tolerated and the next batch still runs."""
    plan = _batch1_plan()

    def run(batch: list[NodePlan]) -> RunResult:
        return make_result({n.hostname: {"unreachable": n.hostname == "lab-gpu01"} for n in batch})

    result = roll(plan, plan.nodes, run, max_failures=1)
    assert {n.hostname: n.status for n in result.nodes}["lab-gpu02"] == "ok"
    assert {n.hostname: n.status for n in result.nodes}["lab-gpu01"] == "unreachable"
    assert not result.stopped_segments


def test_select_by_node_and_segment(lab: tuple[Any, SitePlan]) -> None:
    """--node picks nodes, --segment picks a segment, unknown names are errors that list what exists."""
    _, plan = lab
    assert [n.hostname for n in select(plan, None, "airgap")] == ["lab-gpu03", "lab-gpu04"]
    assert [n.hostname for n in select(plan, ["lab-gpu02"], None)] == ["lab-gpu02"]
    with pytest.raises(KeyError, match="lab-gpu01"):
        select(plan, ["nope"], None)
    with pytest.raises(ValueError, match="connected"):
        select(plan, None, "nope")


def _event(kind: str, host: str, task: str, res: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"event": kind, "event_data": {"host": host, "task": task, "role": "nvidia_driver", "res": res, **extra}}


def test_collector_turns_events_into_changes_and_reboot_verdict() -> None:
    """Package changes, reboot verdict, changed tasks, file paths and failures come out of runner events."""
    c = _Collector(["n1"], None)
    c(
        _event(
            "runner_on_ok",
            "n1",
            "Packages | Publish which driver packages change",
            {
                "changed": False,
                "ansible_facts": {
                    "pinned_packages_published": {"nvidia_driver": ["nvidia-driver=580.95.05-1"], "cuda_toolkit": []}
                },
            },
        )
    )
    c(
        _event(
            "runner_on_ok",
            "n1",
            "Reboot | Decide",
            {
                "changed": False,
                "ansible_facts": {"nvidia_driver_reboot_for_change": False, "nvidia_driver_reboot_required": True},
            },
        )
    )
    c(
        _event(
            "runner_on_ok",
            "n1",
            "Pin",
            {"changed": True, "diff": [{"before_header": "/etc/apt/preferences.d/x", "before": "a", "after": "b"}]},
        )
    )
    c(_event("runner_on_failed", "n1", "Ignored", {"msg": "no"}, ignore_errors=True))
    c(_event("runner_on_failed", "n1", "Broken", {"msg": "apt failed"}))
    h = c.hosts["n1"]
    assert h.package_changes == {"nvidia_driver": ["nvidia-driver=580.95.05-1"]}
    # An earlier change still waits for a reboot, this run changed no driver package.
    assert h.reboot_pending and not h.reboot_required and h.files_changed == ["/etc/apt/preferences.d/x"]
    assert h.changed_tasks == ["nvidia_driver : Pin"]
    assert h.failures == [{"task": "nvidia_driver : Broken", "msg": "apt failed"}]


def test_check_report_lists_packages_files_and_reboot() -> None:
    """`gpufleet check` JSON says per node which packages and files change and whether a reboot is needed."""
    plan = _batch1_plan()
    h = {
        "changed": 2,
        "package_changes": {"nvidia_driver": ["nvidia-driver=580.95.05-1"]},
        "facts": {
            "nvidia_driver_reboot_for_change": True,
            "nvidia_driver_stale_packages": ["nvidia-fabricmanager-570"],
        },
        "changed_tasks": ["x"],
    }
    result = roll(plan, [plan.node("lab-gpu02")], lambda b: make_result({"lab-gpu02": h}), max_failures=0)
    rep = check_report(result)
    node = rep["nodes"][0]
    assert rep["drift"] and node["packages"] == ["nvidia-driver=580.95.05-1"]
    assert node["packages_removed"] == ["nvidia-fabricmanager-570"] and node["reboot_required"] is True
    assert node["reboot_pending"] is False


def test_scrub_masks_raw_and_json_escaped_secrets(tmp_path: Path) -> None:
    """Secret values vanish from every file of a run directory, also in their JSON-escaped form."""
    secret = 'canary-"Zq9\\x'
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "events.json").write_text('{"v": ' + __import__("json").dumps(secret) + "}")
    (tmp_path / "stdout").write_text(f"token={secret}\n")
    (tmp_path / "clean").write_text("nothing here")
    assert scrub(tmp_path, [secret]) == 2
    assert all("canary" not in p.read_text() for p in tmp_path.rglob("*") if p.is_file())


def test_real_run_is_typed_and_leaves_no_secret(
    lab: tuple[Any, SitePlan], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real ansible-runner run (validate.yml on localhost) gives a typed result; canary secrets are gone after.

    One canary is an extra var of the run, the other a secret in gpufleet's own environment (as a
    Pulumi command passes BMC credentials), which Ansible must neither inherit nor record.
    """
    monkeypatch.setenv(runner_mod.RUNS_ENV, str(tmp_path / "runs"))
    env_canary = "gpf-env-canary-51c0ffee"
    monkeypatch.setenv("GPUFLEET_SECRET_BMC_LAB_GPU01", env_canary)
    site, plan = lab
    node = plan.node("lab-gpu01")
    inv = {
        "all": {
            "children": {
                "gpufleet_nodes": {
                    "hosts": {
                        "lab-gpu01": {
                            **host_vars(node, site),
                            "ansible_connection": "local",
                            "ansible_python_interpreter": sys.executable,
                            "ansible_become": False,
                            "gpu_validate_result_file": str(tmp_path / "validate.json"),
                        }
                    }
                }
            }
        }
    }
    canary = "gpf-canary-7d1e4b2a9c"
    result = run_playbook(
        "validate.yml",
        inv,
        ["lab-gpu01"],
        ssh=SshSettings(None, None),
        secrets={"inference_server_registry_token": canary},
    )
    h = result.hosts["lab-gpu01"]
    # No GPU here: the probe only reads and publishes the state; the controller's comparison with the plan
    # (the one validate-node and drift use) is what fails the node.
    assert h.succeeded
    state = NodeState.from_json("lab-gpu01", h.facts["gpu_validate_result"])
    assert set(state.packages) == {p.name for p in node.packages} and state.recorded_files is None
    judge(node, result)
    assert h.failed and not h.unreachable
    assert any(f["task"] == VERDICT_TASK and "GPUs seen" in f["msg"] for f in h.failures)
    assert (tmp_path / "validate.json").exists()
    run_dir = Path(result.run_dir)
    assert (run_dir / "pdd" / "artifacts").is_dir() and not (run_dir / "pdd" / "env").exists()
    leaks = [
        p
        for p in run_dir.rglob("*")
        if p.is_file() and (canary.encode() in p.read_bytes() or env_canary.encode() in p.read_bytes())
    ]
    assert leaks == []
    assert not list(run_dir.rglob("secrets-*"))
    child_env = json.loads((run_dir / "pdd" / "artifacts" / "artifacts" / "command").read_text())["env"]
    assert "GPUFLEET_SECRET_BMC_LAB_GPU01" not in child_env and child_env["ANSIBLE_ROLES_PATH"].endswith("roles")


def test_no_pinned_version_pattern_in_task_files() -> None:
    """Task files name packages only through variables (no `name=1.2.3` literals)."""
    pat = re.compile(r"\b[a-z0-9][a-z0-9.+-]*=\d+[\d.:~+-]*\b")
    for f in (ROOT / "roles").glob("*/tasks/*.yml"):
        if f.parts[-3] == "mirror":
            continue
        assert not pat.search(f.read_text()), f


class _Tty(__import__("io").StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_shows_current_task_and_counts_per_host() -> None:
    """At a terminal every host gets a line with its counts and current task, redrawn in place."""
    out = _Tty()
    p = runner_mod.Progress(["n1", "n2"], out)
    p.update("n1", task="base : Apt | Write sources")
    p.update("n1", outcome="changed")
    p.update("n2", task="nvidia_driver : Packages | Install")
    p.update("n2", outcome="failed")
    last = out.getvalue().split("\x1b[2A")[-1]
    assert "n1" in last and "changed=1" in last and "base : Apt | Write sources" in last
    assert "failed=1" in last and "nvidia_driver : Packages | Install" in last


def test_progress_without_terminal_reports_failures_and_summary() -> None:
    """Piped output gets no redraw codes: a line per failure and one summary line per host."""
    out = __import__("io").StringIO()
    p = runner_mod.Progress(["n1"], out)
    p.update("n1", task="gpu_validate : Fail")
    p.update("n1", outcome="failed")
    p.finish(make_result({"n1": {"failed": 1, "ok": 7}}))
    text = out.getvalue()
    assert "\x1b[" not in text and "n1: FAILED gpu_validate : Fail" in text and "n1: FAILED ok=7" in text


def test_leftover_processes_of_a_run_are_stopped_even_if_they_ignore_sigterm(tmp_path: Path) -> None:
    """Orphaned Ansible workers (own session) of a run are found by the run's path and stopped."""
    marker = str(tmp_path / "pdd" / "inventory" / "hosts.json")
    code = "import signal, sys, time\nif sys.argv[1] == 'stubborn': signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    code += "print('up', flush=True)\ntime.sleep(120)"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, kind, marker], start_new_session=True, stdout=subprocess.PIPE
        )
        for kind in ("polite", "stubborn")
    ]
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "other"])
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline() == b"up\n"
        found = procs_mod.pids_mentioning(marker)
        assert sorted(found) == sorted(p.pid for p in procs)
        killed = procs_mod.terminate(found, lambda pid: procs_mod.cmdline_contains(pid, marker), grace_s=0.5)
        assert killed == [procs[1].pid]
        assert [p.wait(timeout=5) for p in procs] == [-signal.SIGTERM, -signal.SIGKILL]
        assert bystander.poll() is None
        assert procs_mod.pids_mentioning(marker) == []
    finally:
        for p in [*procs, bystander]:
            p.kill()
            p.wait()


def test_progress_without_terminal_has_a_heartbeat_per_role_and_change(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CI log sees each role a host enters and each change, once, as plain lines (issue 17:
    converge was silent for minutes when not at a terminal); `converge` shows it unless --json."""
    out = __import__("io").StringIO()
    p = runner_mod.Progress(["n1"], out)
    for task in ("base : Apt | Write sources", "base : Chrony | Enable", "nvidia_driver : Packages | Install"):
        p.update("n1", task=task)
    p.update("n1", outcome="changed")
    assert out.getvalue().splitlines() == [
        "n1: base", "n1: nvidia_driver", "n1: changed: nvidia_driver : Packages | Install"
    ]
