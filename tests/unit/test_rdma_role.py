"""The `rdma` role's rendered files, run for real where this machine can (issue 23).

The port setup program is rendered by Ansible from the plan's variables and then executed inside a
private network namespace (root only) against dummy interfaces: it must set what the plan says, be
idempotent, and fail naming the port when a port or its RDMA device is missing. Hostile values forced
past validation must reach the program as plain words (the template quotes every value).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.model.load import parse_site
from infra.plan.node import plan_site
from infra.plan.rolevars import host_vars
from tests.unit.ansible_local import run_local_play

ROOT = Path(__file__).resolve().parents[2]
ROLE = ROOT / "roles" / "rdma"
UNSHARE = shutil.which("unshare")
NETNS = os.geteuid() == 0 and UNSHARE is not None and shutil.which("ip") is not None
needs_netns = pytest.mark.skipif(not NETNS, reason="needs root, unshare and ip to run the program in a netns")


def _kernel_has_vlan() -> bool:
    if not NETNS:
        return False
    probe = "ip link add v0 type veth peer name v1 && ip link add link v0 name v0.9 type vlan id 9"
    assert UNSHARE is not None
    return subprocess.run([UNSHARE, "--net", "bash", "-c", probe], capture_output=True, check=False).returncode == 0


def _site(ports: list[dict[str, Any]], fabric: dict[str, Any]) -> dict[str, Any]:
    doc = yaml.safe_load((ROOT / "stacks" / "Pulumi.example-prod.yaml").read_text())
    site: dict[str, Any] = doc["config"]["gpufleet:site"]
    site["fabrics"] = [fabric]
    for n in site["nodes"][:4]:
        n.pop("fabric_ports", None)
    site["nodes"][0]["fabric_ports"] = ports
    return site


def _vars(site: dict[str, Any]) -> dict[str, Any]:
    s = parse_site(site)
    plan = plan_site(s).node("hgx-01")
    hv = host_vars(plan, s)
    assert "rdma" in hv["gpufleet_roles"]
    return hv


def _render(vars_: dict[str, Any], work: Path) -> dict[str, str]:
    """Render every template of the role with Ansible's own templating; returns name → text."""
    role_vars: dict[str, Any] = {}
    for f in ("defaults/main.yml", "vars/main.yml"):
        role_vars |= yaml.safe_load((ROLE / f).read_text()) or {}
    templates = sorted(p.name for p in (ROLE / "templates").glob("*.j2"))
    tasks: list[dict[str, Any]] = [
        {
            "name": f"Render {t}",
            "ansible.builtin.set_fact": {
                f"t_{i}": "{{ lookup('ansible.builtin.template', '%s') }}" % (ROLE / "templates" / t)
            },
            "vars": role_vars | vars_ | {"rdma_setup_path": str(work / "rdma-setup")},
        }
        for i, t in enumerate(templates)
    ]
    tasks.append(
        {
            "name": "Write",
            "ansible.builtin.copy": {
                "content": "{{ [" + ", ".join(f"t_{i}" for i in range(len(templates))) + "] | to_json }}",
                "dest": str(work / "out.json"),
                "mode": "0644",
            },
        }
    )
    run_local_play([{"name": "Render rdma", "hosts": "localhost", "gather_facts": False, "tasks": tasks}], work)
    texts = json.loads((work / "out.json").read_text())
    return dict(zip(templates, texts, strict=True))


IB = {"name": "ib-compute", "type": "infiniband", "cidr": "10.50.0.0/24", "mtu": 4096}
ROCE = {"name": "roce-lab", "type": "roce", "cidr": "10.60.0.0/24", "mtu": 9000, "vlan": 60}


def _program(rendered: dict[str, str], work: Path) -> Path:
    path = work / "rdma-setup"
    path.write_text(rendered["rdma-setup.sh.j2"])
    path.chmod(0o755)
    subprocess.run(["bash", "-n", str(path)], check=True)
    return path


def _in_netns(script: str) -> subprocess.CompletedProcess[str]:
    assert UNSHARE is not None
    # A private mount namespace too: sysfs mounted again shows this network namespace's interfaces.
    return subprocess.run(
        [UNSHARE, "--net", "--mount", "bash", "-c", f"mount -t sysfs sysfs /sys && {script}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_modules_follow_the_ports(tmp_path: Path) -> None:
    ib = _render(
        _vars(_site([{"fabric": "ib-compute", "pci": "0000:1a:00.0", "speed_gbps": 400, "address": "10.50.0.11"}], IB)),
        tmp_path,
    )
    mods = [line for line in ib["modules-load.conf.j2"].splitlines() if line and not line.startswith("#")]
    assert mods == ["ib_umad", "ib_uverbs", "rdma_ucm", "ib_ipoib"]  # open modules: GPUDirect via dma-buf
    soft = _vars(
        _site(
            [{"fabric": "roce-lab", "netdev": "eth1", "soft_roce": True, "speed_gbps": 10, "address": "10.60.0.11"}],
            ROCE,
        )
    )
    work = tmp_path / "soft"
    work.mkdir()
    mods = [
        line for line in _render(soft, work)["modules-load.conf.j2"].splitlines() if line and not line.startswith("#")
    ]
    assert "rdma_rxe" in mods and "ib_ipoib" not in mods


def test_partitions_include_the_fabric_key(tmp_path: Path) -> None:
    fabric = IB | {"partition_key": "0x0010", "subnet_manager": "hgx-01"}
    site = _site([{"fabric": "ib-compute", "pci": "0000:1a:00.0", "speed_gbps": 400, "address": "10.50.0.11"}], fabric)
    site["profiles"]["hgx-570"]["rdma"]["opensm_version"] = "3.3.24-1"
    hv = _vars(site)
    assert hv["rdma_subnet_manager_fabrics"] == ["ib-compute"]
    assert any(p["name"] == "opensm" for p in hv["rdma_packages"])
    text = _render(hv, tmp_path)["partitions.conf.j2"]
    assert "Default=0x7fff, ipoib, defmember=full : ALL=full;" in text
    assert "p0010=0x0010, ipoib, defmember=full : ALL=full;" in text


@needs_netns
def test_infiniband_port_gets_its_address_idempotently(tmp_path: Path) -> None:
    """An IPoIB-like port found by name: address and link state set; a second run changes nothing."""
    hv = _vars(_site([{"fabric": "ib-compute", "netdev": "fab0", "speed_gbps": 400, "address": "10.50.0.11"}], IB))
    prog = _program(_render(hv, tmp_path), tmp_path)
    p = _in_netns(f"ip link add fab0 type veth peer name fab0p && {prog} && {prog} && ip -j address show dev fab0")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert lines[0] == "gpufleet-rdma: fabric ib-compute: fab0 10.50.0.11/24"
    info = json.loads(lines[-1])[0]
    assert [(a["local"], a["prefixlen"]) for a in info["addr_info"] if a["family"] == "inet"] == [("10.50.0.11", 24)]
    assert "UP" in info["flags"]


@needs_netns
@pytest.mark.parametrize("vlan", [0, 60])
def test_roce_port_gets_mtu_and_vlan_then_demands_an_rdma_device(tmp_path: Path, vlan: int) -> None:
    """A RoCE port on an interface without RDMA: MTU (and VLAN interface) set, then it fails by name."""
    if vlan and not _kernel_has_vlan():
        pytest.skip("this kernel has no 802.1Q support (no 8021q): VLAN interfaces cannot be created here")
    fabric = ROCE | {"vlan": vlan} if vlan else {k: v for k, v in ROCE.items() if k != "vlan"}
    hv = _vars(_site([{"fabric": "roce-lab", "netdev": "fab1", "speed_gbps": 100, "address": "10.60.0.11"}], fabric))
    port = hv["rdma_ports"][0]
    assert (port["roce_tos"], port["pfc_priority"], port["pfc"]) == (26 << 2, 3, True)  # the model's defaults
    prog = _program(_render(hv, tmp_path), tmp_path)
    ifc = f"fab1.{vlan}" if vlan else "fab1"
    p = _in_netns(
        f"ip link add fab1 type veth peer name fab1p && {{ {prog}; echo rc=$?; }}; ip -j -d address show dev {ifc}"
    )
    assert "rc=1" in p.stdout, p.stdout + p.stderr
    assert "fabric roce-lab: no RDMA device on fab1" in p.stderr
    link = json.loads(p.stdout.strip().splitlines()[-1])[0]
    assert link["mtu"] == 9000
    assert [a["local"] for a in link["addr_info"] if a["family"] == "inet"] == ["10.60.0.11"]
    if vlan:
        assert link["linkinfo"]["info_data"]["id"] == vlan


@needs_netns
def test_missing_port_is_named(tmp_path: Path) -> None:
    hv = _vars(_site([{"fabric": "ib-compute", "pci": "0000:99:00.0", "speed_gbps": 400, "address": "10.50.0.11"}], IB))
    prog = _program(_render(hv, tmp_path), tmp_path)
    p = _in_netns(str(prog))
    assert p.returncode == 1
    assert "fabric ib-compute: no interface for pci 0000:99:00.0" in p.stderr


@needs_netns
def test_hostile_values_stay_words(tmp_path: Path) -> None:
    """Values forced past validation (the model refuses them) reach the program as data, never as code."""
    canary = tmp_path / "canary"
    hv = _vars(_site([{"fabric": "ib-compute", "netdev": "fab0", "speed_gbps": 400, "address": "10.50.0.11"}], IB))
    hv["rdma_ports"][0] |= {
        "netdev": f"x$(touch {canary})",
        "fabric": f"a;touch {canary}",
        "address": f"10.50.0.11/24`touch {canary}`",
    }
    prog = _program(_render(hv, tmp_path), tmp_path)
    p = _in_netns(str(prog))
    assert p.returncode == 1
    assert not canary.exists()
    assert f"no interface for netdev x$(touch {canary})" in p.stderr
