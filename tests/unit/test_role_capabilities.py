"""Node capabilities: a host declares what it cannot do in a local fact file; the roles read it there.

Runs the roles' own task and vars files on this machine against temp paths (tests/unit/ansible_local.py):
the fact file is read by Ansible's `setup` module from a temp `fact_path`, as it is from
/etc/ansible/facts.d on a node.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.unit.ansible_local import run_local_play

ROOT = Path(__file__).resolve().parents[2]
LAB_HOST = {  # what infra/lab/hosts.py declares for its nspawn hosts
    "reboot": False,
    "kernel_modules": False,
    "sysctl": False,
    "time_sync": False,
    "network_apply": False,
    "container_cgroups": False,
    "overlay_storage": False,
    "kernel_keyring": False,
}


def _facts_task(work: Path, declared: dict[str, Any] | None) -> dict[str, Any]:
    facts = work / "facts.d"
    facts.mkdir()
    if declared is not None:
        (facts / "gpufleet_capabilities.fact").write_text(json.dumps(declared))
    return {
        "name": "Read local facts",
        "ansible.builtin.setup": {"gather_subset": ["!all", "local"], "fact_path": str(facts)},
    }


def _driver_play(work: Path, declared: dict[str, Any] | None, policy: str = "if-required") -> list[dict[str, Any]]:
    """The nvidia_driver role's reboot step right after a driver change (pinned_packages published one)."""
    role = ROOT / "roles" / "nvidia_driver"
    return [
        {
            "hosts": "localhost",
            "gather_facts": False,
            "vars": {
                "nvidia_driver_version": "580.65.06",
                "nvidia_driver_branch": "580",
                "nvidia_driver_reboot_policy": policy,
                "nvidia_driver_reboot_enabled": True,
                "nvidia_driver_reboot_timeout": 5,
                "nvidia_driver_manage_kernel_modules": True,
                "nvidia_driver_fact_file": str(work / "state" / "gpufleet.fact"),
                "pinned_packages_published": {"nvidia_driver": ["nvidia-driver=580.65.06-1"]},
            },
            "tasks": [
                _facts_task(work, declared),
                {"name": "Role vars", "ansible.builtin.include_vars": str(role / "vars" / "main.yml")},
                {"name": "Reboot step", "ansible.builtin.include_tasks": str(role / "tasks" / "reboot.yml")},
            ],
        }
    ]


def test_host_that_cannot_reboot_records_why_and_is_not_rebooted(tmp_path: Path) -> None:
    """A driver change on a host declaring reboot=false: no reboot, no modprobe, and the fact file says why."""
    run_local_play(_driver_play(tmp_path, LAB_HOST), tmp_path)
    state = json.loads((tmp_path / "state" / "gpufleet.fact").read_text())
    assert state["reboot_required"] is True and state["can_reboot"] is False
    assert state["reboot_reason"] == (
        "reboot needed to load driver 580.65.06; this host cannot reboot (capability reboot=false)"
    )


def test_policy_never_is_the_reason_on_a_host_that_can_reboot(tmp_path: Path) -> None:
    """No capability file: the host can do everything; with policy `never` the reason names the policy."""
    run_local_play(_driver_play(tmp_path, None, policy="never"), tmp_path)
    state = json.loads((tmp_path / "state" / "gpufleet.fact").read_text())
    assert state["reboot_required"] is True and state["can_reboot"] is True
    assert state["reboot_reason"].startswith("reboot needed to load driver 580.65.06; the reboot policy is never")


@pytest.mark.parametrize("declared", [None, {}, LAB_HOST])
def test_podman_settings_follow_the_declared_capabilities(tmp_path: Path, declared: dict[str, Any] | None) -> None:
    """containers.conf and storage.conf: full capability when nothing is declared, the fallbacks when declared."""
    role = ROOT / "roles" / "container_runtime"
    play = [
        {
            "hosts": "localhost",
            "gather_facts": False,
            "vars": {
                "ansible_managed": "managed",
                "container_runtime_podman_storage_driver": "overlay",
                "container_runtime_podman_keyring": True,
                "container_runtime_podman_runroot": "/run/containers/storage",
                "container_runtime_podman_graphroot": "/var/lib/containers/storage",
            },
            "tasks": [
                _facts_task(tmp_path, declared),
                {"name": "Role vars", "ansible.builtin.include_vars": str(role / "vars" / "main.yml")},
                *(
                    {
                        "name": f"Render {t}",
                        "ansible.builtin.template": {
                            "src": str(role / "templates" / f"{t}.j2"),
                            "dest": str(tmp_path / t),
                        },
                    }
                    for t in ("containers.conf", "storage.conf")
                ),
            ],
        }
    ]
    run_local_play(play, tmp_path)
    containers = (tmp_path / "containers.conf").read_text()
    storage = (tmp_path / "storage.conf").read_text()
    if declared == LAB_HOST:
        assert "keyring = false" in containers and 'cgroups = "disabled"' in containers
        assert 'driver = "vfs"' in storage
    else:
        assert "keyring = true" in containers and "cgroups" not in containers
        assert 'driver = "overlay"' in storage


def test_base_and_network_switches_need_the_capability(tmp_path: Path) -> None:
    """sysctl, chrony start and network apply happen only where both the role input and the host allow."""
    out = tmp_path / "out.json"
    play = [
        {
            "hosts": "localhost",
            "gather_facts": False,
            "vars": {"base_time_sync_start": True, "base_sysctl_apply": True, "network_apply": True},
            "tasks": [
                _facts_task(tmp_path, {"sysctl": False, "network_apply": False}),
                {"name": "Base vars", "ansible.builtin.include_vars": str(ROOT / "roles/base/vars/main.yml")},
                {"name": "Network vars", "ansible.builtin.include_vars": str(ROOT / "roles/network/vars/main.yml")},
                {
                    "name": "Write the effective switches",
                    "ansible.builtin.copy": {
                        "dest": str(out),
                        "content": "{{ {'time': _base_start_time_sync, 'sysctl': _base_apply_sysctl,"
                        " 'network': _network_do_apply} | to_json }}",
                    },
                },
            ],
        }
    ]
    run_local_play(play, tmp_path)
    assert json.loads(out.read_text()) == {"time": True, "sysctl": False, "network": False}


def _present_play(work: Path, names: list[str]) -> list[dict[str, Any]]:
    """pinned_packages' `present` entry point as base/airgap_firewall/inference_server include it (check mode)."""
    return [
        {
            "hosts": "localhost",
            "gather_facts": False,
            "check_mode": True,
            "tasks": [
                {"name": "OS family", "ansible.builtin.setup": {"gather_subset": ["!all", "!min", "distribution"]}},
                {
                    "name": "Install missing test packages",
                    "ansible.builtin.include_role": {
                        "name": "pinned_packages",
                        "tasks_from": "present.yml",
                        "rolespec_validate": False,
                    },
                    "vars": {"pinned_packages_present": names, "pinned_packages_label": "test"},
                },
                {
                    "name": "Write the probe",
                    "ansible.builtin.copy": {
                        "dest": str(work / "probe.json"),
                        "content": "{{ _pinned_packages_present_installed.stdout_lines | to_json }}",
                    },
                    "check_mode": False,
                },
            ],
        }
    ]


def _task_outcome(output: str, task: str) -> str:
    """The first status word (ok/changed/skipping/fatal) after a task's header in ansible-playbook output."""
    after = output.split(f"TASK [pinned_packages : {task}]", 1)[1]
    return after.split("*\n", 1)[1].split(":", 1)[0].strip()


@pytest.mark.skipif(not Path("/usr/bin/dpkg-query").exists(), reason="needs a Debian-family machine (dpkg)")
def test_shared_probe_then_install_skips_the_package_manager_when_nothing_is_missing(tmp_path: Path) -> None:
    """Installed packages only: one read-only probe, the package manager is never called."""
    (tmp_path / "roles").symlink_to(ROOT / "roles")  # the play looks roles up next to itself
    out = run_local_play(_present_play(tmp_path, ["coreutils", "bash"]), tmp_path)
    assert _task_outcome(out, "Packages | Install missing test packages") == "skipping"
    assert sorted(json.loads((tmp_path / "probe.json").read_text())) == ["bash ii ", "coreutils ii "]
    # Nothing about a missing package is asserted here: installing one would need a package source.


def _versionlock_play(work: Path, packages: list[dict[str, str]]) -> list[dict[str, Any]]:
    """pinned_packages' RHEL tasks against a temp versionlock list; a stand-in `rpm` reports the plan's
    versions as installed, so only the lock steps act (no dnf here)."""
    role = ROOT / "roles" / "pinned_packages"
    bin_dir = work / "bin"
    bin_dir.mkdir(exist_ok=True)
    rpm = bin_dir / "rpm"
    # `rpm -q --qf '%{NAME}=%{VERSION}-%{RELEASE}\n' names…` prints one name=version line per package.
    rpm.write_text("#!/bin/sh\n" + "".join(f"echo '{p['name']}={p['version']}'\n" for p in packages))
    rpm.chmod(0o755)
    return [
        {
            "hosts": "localhost",
            "gather_facts": False,
            "environment": {"PATH": f"{bin_dir}:/usr/bin:/bin"},
            "vars": {
                "pinned_packages_list": packages,
                "pinned_packages_label": "driver",
                "pinned_packages_pin_file": "gpufleet-nvidia-driver",
                "pinned_packages_publish_as": "nvidia_driver",
            },
            "tasks": [
                {"name": "Role vars", "ansible.builtin.include_vars": str(role / "vars" / "main.yml")},
                {
                    "name": "Point the lock list at a temp file",
                    "ansible.builtin.set_fact": {"_pinned_packages_versionlock_list": str(work / "versionlock.list")},
                },
                {"name": "RHEL tasks", "ansible.builtin.include_tasks": str(role / "tasks" / "RedHat.yml")},
            ],
        }
    ]


def test_rhel_version_lock_lines_are_replaced_not_appended(tmp_path: Path) -> None:
    """A version change leaves exactly one lock line per package; other packages' and the operator's lines stay.

    Line format: dnf versionlock plugin's list, `name-[epoch:]version-release.*` (dnf-plugins-core
    versionlock.list, as `dnf versionlock add` writes it).
    """
    lock = tmp_path / "versionlock.list"
    lock.write_text(
        "# operator's own locks\n"
        "kernel-0:5.14.0-427.13.1.el9_4.*\n"
        "nvidia-driver-3:565.57.01-1.el9.*\n"  # older versions of the same package (earlier appends)
        "nvidia-driver-3:570.124.06-1.el9.*\n"
        "nvidia-driver-cuda-3:565.57.01-1.el9.*\n"  # a different package whose name starts the same
        "cuda-toolkit-12-8-12.8.0-1.*\n"  # a numbered name: not a line of cuda-toolkit-12
    )
    packages = [
        {"name": "nvidia-driver", "version": "3:570.133.20-1.el9"},
        {"name": "cuda-toolkit-12", "version": "12.9.1-1"},
    ]
    first = run_local_play(_versionlock_play(tmp_path, packages), tmp_path)
    assert lock.read_text().splitlines() == [
        "# operator's own locks",
        "kernel-0:5.14.0-427.13.1.el9_4.*",
        "nvidia-driver-cuda-3:565.57.01-1.el9.*",
        "cuda-toolkit-12-8-12.8.0-1.*",
        "nvidia-driver-3:570.133.20-1.el9.*",
        "cuda-toolkit-12-12.9.1-1.*",
    ]
    assert "changed=0" not in first
    second = run_local_play(_versionlock_play(tmp_path, packages), tmp_path)
    assert "changed=0" in second.split("PLAY RECAP", 1)[1]  # idempotent: nothing to replace the second time
    # The next driver version replaces the line in place of appending beside it.
    packages[0] = {"name": "nvidia-driver", "version": "3:580.65.06-1.el9"}
    run_local_play(_versionlock_play(tmp_path, packages), tmp_path)
    assert [line for line in lock.read_text().splitlines() if line.startswith("nvidia-driver-3")] == [
        "nvidia-driver-3:580.65.06-1.el9.*"
    ]


def test_rhel_version_lock_list_is_created_when_absent(tmp_path: Path) -> None:
    """A node without a versionlock list gets one with the plan's lines (releasing old locks is a no-op)."""
    packages = [{"name": "nvidia-driver", "version": "3:570.133.20-1.el9"}]
    run_local_play(_versionlock_play(tmp_path, packages), tmp_path)
    assert (tmp_path / "versionlock.list").read_text() == "nvidia-driver-3:570.133.20-1.el9.*\n"


def test_lab_declares_exactly_the_capabilities_the_roles_read_and_the_docs_list() -> None:
    """One vocabulary: the keys the roles look up, the lab's declaration and docs/roles.md's table agree."""
    import re

    from infra.lab.hosts import CAPABILITIES

    read = set()
    for path in (ROOT / "roles").glob("*/vars/main.yml"):
        read |= set(re.findall(r"_capabilities\['([a-z_]+)'\]", path.read_text()))
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", (ROOT / "docs" / "roles.md").read_text(), re.M))
    assert read == set(CAPABILITIES) == documented & set(CAPABILITIES) and read <= documented
    assert LAB_HOST == CAPABILITIES  # the declaration the play tests above use is the lab's


def test_lab_trusts_its_plain_http_mirror_on_its_own_hosts() -> None:
    """Nodes of a segment with a mirror get a podman drop-in for the mirror's registry; the plan sets nothing."""
    from infra.lab.config import lab_spec
    from infra.lab.hosts import lab_registry_dropin

    spec = lab_spec("lab")
    for host in spec.nodes:
        segment = spec.site.segment(host.segment)
        mirror = spec.site.mirror(segment.mirror) if segment else None
        text = lab_registry_dropin(spec, host)
        if mirror is None:
            assert text is None
        else:
            assert text is not None and f'location = "{mirror.address}:{mirror.registry_port}"' in text
            assert "insecure = true" in text
