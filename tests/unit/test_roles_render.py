"""Role templates rendered by real Ansible from the example stacks, then checked by real validators.

One local ansible-playbook run renders every template case into a temp dir (module fixture); the
tests then run `nft -c -f` and `systemd-analyze verify` on the output and check what the plan put in.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.model.load import load_site, parse_site
from infra.model.site import ContainerEngine
from infra.plan import engines
from infra.plan.node import plan_site
from infra.plan.rolevars import host_vars, service_vars
from tests.unit.ansible_local import run_local_play
from tests.unit.systemd_syntax import split_command
from tests.unit.test_span_vllm import vllm_span_site

ROOT = Path(__file__).resolve().parents[2]
ROLES = ROOT / "roles"
STACKS = ("lab", "example-prod", "example-airgap")
# Every runtime that runs inference containers, at the versions of the distributions gpufleet supports:
# Debian 12's podman and docker.io (20.10: GPUs through the NVIDIA runtime), a docker with CDI (≥ 25).
RUNTIMES = {
    "podman": (ContainerEngine.PODMAN, "4.3.1+ds1-8+deb12u1+b3"),
    "docker": (ContainerEngine.DOCKER, "26.1.3-0ubuntu1~22.04.1"),
    "docker20": (ContainerEngine.DOCKER, "20.10.24+dfsg1-1+deb12u1+b2"),
}
NFT = shutil.which("nft") or ("/usr/sbin/nft" if Path("/usr/sbin/nft").exists() else None)
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


def _role_vars(role: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in ("defaults/main.yml", "vars/main.yml"):
        p = ROLES / role / f
        if p.exists():
            out |= yaml.safe_load(p.read_text()) or {}
    return out


def _cases() -> list[dict[str, Any]]:
    """Template cases: each service once, each runtime once, the networking and apt files of a few nodes."""
    cases: list[dict[str, Any]] = []
    seen: set[str] = set()
    for stack in STACKS:
        site = load_site(stack)
        for n in plan_site(site).nodes:
            hv = host_vars(n, site)
            key = f"{stack}-{n.hostname}"
            for sp in n.services:
                svc = sp.service
                if svc.name in seen:
                    continue
                seen.add(svc.name)
                runtimes = RUNTIMES if svc.image else {"native": RUNTIMES["podman"]}
                for label, (rt, version) in runtimes.items():
                    for token in ("x", "") if label == "podman" else ("x",):
                        cases.append(
                            {
                                "role": "inference_server",
                                "template": "inference.service.j2",
                                "out": f"units/{stack}-{svc.name}-{label}{'' if token else '-noauth'}.service",
                                "vars": _role_vars("inference_server")
                                | hv
                                | {
                                    "inference_server_service": service_vars(svc, rt, version),
                                    "inference_server_registry_token": token,
                                },
                            }
                        )
            if hv["monitoring_dcgm_exporter_image"] and f"dcgm-{stack}" not in seen:
                seen.add(f"dcgm-{stack}")
                cases.append(
                    {
                        "role": "monitoring",
                        "template": "dcgm-exporter.service.j2",
                        "out": f"units/{stack}-dcgm-exporter.service",
                        "vars": _role_vars("monitoring") | hv,
                    }
                )
            if "airgap_firewall" in hv["gpufleet_roles"]:
                cases.append(
                    {
                        "role": "airgap_firewall",
                        "template": "airgap.nft.j2",
                        "out": f"nft/{key}.nft",
                        "vars": _role_vars("airgap_firewall") | hv,
                    }
                )
                if f"fw-{stack}" not in seen:
                    seen.add(f"fw-{stack}")
                    cases.append(
                        {
                            "role": "airgap_firewall",
                            "template": "airgap-firewall.service.j2",
                            "out": f"units/{stack}-airgap-firewall.service",
                            "vars": _role_vars("airgap_firewall") | hv,
                        }
                    )
            if n.hostname in ("lab-gpu01", "hgx-01"):
                for t in ("networkd-link.network.j2", "networkd-vlan.netdev.j2", "networkd-vlan.network.j2"):
                    cases.append(
                        {
                            "role": "network",
                            "template": t,
                            "out": f"networkd/{key}-{t[:-3]}",
                            "vars": _role_vars("network") | hv | {"item": hv["network_interfaces"][0]},
                        }
                    )
                cases.append(
                    {
                        "role": "network",
                        "template": "netplan.yaml.j2",
                        "out": f"netplan/{key}.yaml",
                        "vars": _role_vars("network") | hv,
                    }
                )
            if n.hostname in ("lab-gpu03", "lab-gpu04"):
                cases.append(
                    {
                        "role": "base",
                        "template": "51gpufleet-unattended-upgrades.j2",
                        "out": f"apt/{key}-unattended",
                        "vars": _role_vars("base") | hv,
                    }
                )
                for src in hv["base_apt_sources"]:
                    cases.append(
                        {
                            "role": "base",
                            "template": "source.sources.j2",
                            "out": f"apt/{key}-{src['name']}.sources",
                            "vars": _role_vars("base") | hv | {"item": src},
                        }
                    )
    cases += _spanning_cases()
    return cases


def _spanning_cases() -> list[dict[str, Any]]:
    """The units of each node of a spanning service: the lab's llama.cpp tiny-span (RPC worker, head) and
    the same group served by vLLM's multi-node mode (headless worker, head)."""
    out = []
    for label, data in (("llamacpp", None), ("vllm", vllm_span_site())):
        site = load_site("lab") if data is None else parse_site(data)
        for n in plan_site(site).nodes:
            hv = host_vars(n, site)
            for svc in hv["inference_server_services"]:
                if svc["span_role"]:
                    out.append(
                        {
                            "role": "inference_server",
                            "template": "inference.service.j2",
                            "out": f"units/span-{label}-{svc['span_role']}-{svc['name']}.service",
                            "vars": _role_vars("inference_server") | hv | {"inference_server_service": svc},
                        }
                    )
    return out


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every case rendered by one local ansible-playbook run.

    Each case is a `set_fact` of the template lookup (Ansible's own templating, on the controller, no
    module round trip) and one `copy` writes them all; a template task per case costs a module run
    each, which made this fixture take a minute on a busy machine.
    """
    out = tmp_path_factory.mktemp("rendered")
    cases = _cases()
    tasks: list[dict[str, Any]] = [
        {
            "name": f"Render {c['out']}",
            "ansible.builtin.set_fact": {
                f"case_{i}": "{{ lookup('ansible.builtin.template', '%s') }}"
                % (ROLES / c["role"] / "templates" / c["template"])
            },
            "vars": c["vars"],
        }
        for i, c in enumerate(cases)
    ]
    names = ", ".join(f"case_{i}" for i in range(len(cases)))
    all_cases = "{{ [" + names + "] | to_json }}"
    tasks.append(
        {
            "name": "Write every rendering",
            "ansible.builtin.copy": {"content": all_cases, "dest": str(out / "rendered.json"), "mode": "0644"},
        }
    )
    run_local_play(
        [{"name": "Render role templates", "hosts": "localhost", "gather_facts": False, "tasks": tasks}], out
    )
    results = json.loads((out / "rendered.json").read_text())
    assert len(results) == len(cases)
    for c, text in zip(cases, results, strict=True):
        dest = out / c["out"]
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(text)
    return out


def _units(rendered: Path, suffix: str = ".service") -> list[Path]:
    return sorted((rendered / "units").glob(f"*{suffix}"))


def test_spanning_units_are_rendered_for_each_role(rendered: Path) -> None:
    """Head and worker units of both spanning engines are among the verified units, each with its own command."""
    names = {p.name for p in _units(rendered)}
    for label in ("llamacpp", "vllm"):
        assert {f"span-{label}-head-tiny-span.service", f"span-{label}-worker-tiny-span.service"} <= names
    argv = {n: _exec_start(rendered / "units" / f"span-{n}-tiny-span.service")
            for n in ("llamacpp-head", "llamacpp-worker", "vllm-head", "vllm-worker")}
    assert argv["llamacpp-worker"][1:3] == [engines.RPC_PROGRAM, "worker"]
    assert argv["llamacpp-head"][1:3] == [engines.RPC_PROGRAM, "head"]
    assert "--headless" in argv["vllm-worker"] and "--headless" not in argv["vllm-head"]
    assert "--node-rank=1" in argv["vllm-worker"] and "--node-rank=0" in argv["vllm-head"]


def test_every_engine_is_rendered(rendered: Path) -> None:
    """The example stacks together cover every offered engine under podman, docker and natively."""
    text = "\n".join(p.read_text() for p in _units(rendered))
    for engine in ("(vllm serving", "(tgi serving", "(llamacpp serving"):
        assert engine in text
    for runtime in ("ExecStart=/usr/bin/podman run", "ExecStart=/usr/bin/docker run", "-m llama_cpp.server"):
        assert runtime in text
    assert "/usr/bin/ctr" not in text  # containerd's debug client never runs a service


def _exec_start(unit: Path) -> list[str]:
    lines = [ln for ln in unit.read_text().splitlines() if ln.startswith("ExecStart=")]
    assert len(lines) == 1, lines
    return split_command(lines[0].split("=", 1)[1], "gpufleet-inference-x.service")


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_units_pass_systemd_analyze_verify(rendered: Path, tmp_path: Path) -> None:
    """Every rendered unit passes `systemd-analyze verify` with no warning at all."""
    root = tmp_path / "root"
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    units = _units(rendered)
    assert units
    for unit in units:
        for line in unit.read_text().splitlines():
            # The runtimes are not installed on the controller: stand-in executables under the
            # verify root, at exactly the paths the units name (verify checks they exist).
            if line.startswith(("ExecStart=", "ExecStartPre=", "ExecStop=", "ExecReload=")):
                exe = line.split("=", 1)[1].lstrip("-@+!").split()[0]
                stub = root / exe.lstrip("/")
                stub.parent.mkdir(parents=True, exist_ok=True)
                stub.write_text("#!/bin/sh\n")
                stub.chmod(0o755)
        shutil.copy(unit, root / "etc/systemd/system" / unit.name)
    for unit in units:
        p = subprocess.run(
            [SYSTEMD_ANALYZE, "verify", f"--root={root}", f"/etc/systemd/system/{unit.name}"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        noise = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.strip()]
        assert p.returncode == 0 and not noise, f"{unit.name}: {noise}"


def test_a_broken_unit_fails_verify(tmp_path: Path) -> None:
    """The verify harness above would notice an invalid unit (it is not a test that cannot fail)."""
    if SYSTEMD_ANALYZE is None:
        pytest.skip("systemd-analyze is not installed")
    unit = tmp_path / "broken.service"
    unit.write_text("[Service]\nExecStart=relative/path\nBogusKey=1\n")
    p = subprocess.run([SYSTEMD_ANALYZE, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False)
    assert p.returncode != 0 or (p.stdout + p.stderr).strip()


@pytest.mark.skipif(NFT is None, reason="nft is not installed")
def test_airgap_rules_pass_nft_check(rendered: Path) -> None:
    """Every air-gapped node's egress rules pass `nft -c -f`."""
    files = sorted((rendered / "nft").glob("*.nft"))
    assert {f.stem for f in files} >= {"lab-lab-gpu03", "lab-lab-gpu04", "example-airgap-h200-01"}
    for f in files:
        p = subprocess.run([str(NFT), "-c", "-f", str(f)], capture_output=True, text=True, timeout=30, check=False)
        assert p.returncode == 0, f"{f.name}: {p.stderr}"


def test_airgap_rules_allow_only_segment_and_mirror(rendered: Path) -> None:
    """The lab air-gap rules drop by default and allow exactly the segment and the mirror."""
    text = (rendered / "nft" / "lab-lab-gpu03.nft").read_text()
    assert "policy drop;" in text
    assert "elements = { 198.18.2.0/24, 198.18.2.10/32 }" in text
    assert "198.18.1.250" not in text


def test_units_run_offline_by_digest_with_plan_arguments(rendered: Path) -> None:
    """Each unit's ExecStart, read back as systemd reads it, is exactly the argv engines.py computed.

    And that argv carries the runtime's GPU access, the plan's limits, the offline settings and the
    image by digest (the per-flag checks against the engines' definitions are in test_engines.py).
    """
    site = load_site("example-prod")
    svc = next(s for s in site.services if s.name == "llama-70b")
    for label, (rt, version) in RUNTIMES.items():
        argv = _exec_start(rendered / "units" / f"example-prod-llama-70b-{label}.service")
        want = engines.unit_commands(svc, rt, version).exec_start
        assert argv == [w if isinstance(w, str) else w.text.replace("%N", "gpufleet-inference-x") for w in want]
        assert argv[argv.index(svc.image or "") + 1] == "/models"  # `vllm serve MODEL`: positional
        assert "--max-model-len=8192" in argv and "--max-num-seqs=32" in argv and "--ipc=host" in argv
        assert "--tensor-parallel-size=8" in argv and "--env=HF_HUB_OFFLINE=1" in argv
        assert ("--device=nvidia.com/gpu=all" in argv) == (label != "docker20")
    tgi = _exec_start(rendered / "units" / "example-airgap-qwen-72b-podman.service")
    assert "--usage-stats=off" in tgi and "--num-shard=4" in tgi and "--quantize=fp8" in tgi
    podman = (rendered / "units" / "example-airgap-qwen-72b-podman.service").read_text()
    assert "Environment=REGISTRY_AUTH_FILE=/etc/gpufleet/registry/config.json" in podman
    noauth = rendered / "units" / "example-airgap-qwen-72b-podman-noauth.service"
    assert "REGISTRY_AUTH_FILE" not in noauth.read_text()
    llama = _exec_start(rendered / "units" / "lab-tiny-airgap-native.service")
    assert llama[1:3] == ["-m", "llama_cpp.server"] and "--port=8080" in llama and "--n_ctx=512" in llama
    assert "--interrupt_requests=False" in llama  # concurrent clients queue instead of cutting each other off
    assert "--model=/var/lib/gpufleet/models/gpufleet-tiny-lab/lab-1/model.gguf" in llama
    native = (rendered / "units" / "lab-tiny-airgap-native.service").read_text()
    assert "Environment=HF_HUB_OFFLINE=1" in native and "User=gpufleet-inference" in native


def test_networkd_keeps_management_address_on_vlan(rendered: Path) -> None:
    """Lab node networkd files put the management address on the segment's VLAN with its MTU."""
    vlan = (rendered / "networkd" / "lab-lab-gpu01-networkd-vlan.network").read_text()
    assert "Name=mgmt.101" in vlan and "Address=198.18.1.11/24" in vlan and "Gateway=198.18.1.1" in vlan
    link = (rendered / "networkd" / "lab-lab-gpu01-networkd-link.network").read_text()
    assert "MACAddress=02:47:46:01:00:11" in link and "VLAN=mgmt.101" in link


def test_netplan_is_valid_yaml_with_vlan(rendered: Path) -> None:
    """The Ubuntu netplan rendering parses and carries VLAN id, MTU and address."""
    doc = yaml.safe_load((rendered / "netplan" / "example-prod-hgx-01.yaml").read_text())
    vlan = doc["network"]["vlans"]["mgmt.40"]
    assert vlan["id"] == 40 and vlan["mtu"] == 9000 and vlan["addresses"] == ["10.40.0.11/24"]
    assert doc["network"]["ethernets"]["mgmt"]["match"]["macaddress"] == "b8:3f:d2:10:00:01"


def test_airgap_sources_name_only_the_mirror(rendered: Path) -> None:
    """An air-gapped node's apt source is its mirror with a signed-by keyring; GPU packages are blacklisted."""
    src = (rendered / "apt" / "lab-lab-gpu03-lab-mirror.sources").read_text()
    assert "URIs: http://198.18.2.10/apt" in src
    assert "Signed-By: /etc/apt/keyrings/gpufleet-lab-mirror.gpg" in src
    assert not list((rendered / "apt").glob("lab-lab-gpu03-lab-upstream*"))
    unattended = (rendered / "apt" / "lab-lab-gpu04-unattended").read_text()
    assert '"^nvidia\\-fabricmanager\\-570$";' in unattended or '"^nvidia-fabricmanager-570$";' in unattended
