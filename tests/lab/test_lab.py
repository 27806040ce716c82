"""The lab itself: pinned SSH, air-gap enforcement, signed repos, Redfish power and reimage, clean down."""

from __future__ import annotations

import base64
import shutil
import string
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from infra.lab import hosts as lab_hosts
from infra.lab import lab as lab_mod
from infra.lab import network
from infra.lab.config import HostKind, LabHost, Paths, lab_spec
from infra.lab.measure import second_stack
from infra.lab.session import Lab
from infra.lab.standins import STANDIN_VERSIONS
from infra.model.load import stack_path

pytestmark = pytest.mark.lab

BMC_NODE = "lab-gpu04"  # the power/reimage tests take this node down briefly; other lab tests avoid it
AIRGAP_NODE = "lab-gpu03"
CONNECTED_NODE = "lab-gpu01"

# A probe the node runs: exit 0 if the URL answers 2xx within 3 s, 1 otherwise.
_FETCH = ("python3 -c 'import sys,urllib.request\n"
          "try:\n    urllib.request.urlopen(sys.argv[1], timeout=3).read(); sys.exit(0)\n"
          "except Exception as e:\n    print(e); sys.exit(1)' ")


def mirror_of(lab: Lab) -> LabHost:
    """The mirror of the air-gapped test node's segment."""
    seg = lab.host(AIRGAP_NODE).segment
    return next(h for h in lab.hosts if h.kind is HostKind.MIRROR and h.segment == seg)


def outside_of(lab: Lab) -> LabHost:
    """The outside-world host."""
    return next(h for h in lab.hosts if h.kind is HostKind.OUTSIDE)


def fetch(lab: Lab, host: str, url: str) -> subprocess.CompletedProcess[str]:
    """Fetch a URL from inside a lab host."""
    return lab.ssh(host, _FETCH + url, timeout=30)


def test_every_host_answers_ssh_against_pinned_known_hosts(lab: Lab) -> None:
    """Each host answers SSH with StrictHostKeyChecking=yes and the written known_hosts, as itself."""
    for h in lab.hosts:
        r = subprocess.run(["ssh", "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={lab.known_hosts}",
                            "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", "-i", str(lab.paths.ssh_key),
                            f"root@{h.address.ip}", "hostname"], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, f"{h.name}: {r.stderr}"
        assert r.stdout.strip() == h.name


def test_wrong_pinned_key_is_refused(lab: Lab, tmp_path: Path) -> None:
    """With another host's key pinned for a node, SSH refuses to connect (the pin is really checked)."""
    target, other = lab.host(AIRGAP_NODE), mirror_of(lab)
    other_key = lab_hosts.public_host_key(lab_hosts.root_of(lab.paths, other.name))
    kh = tmp_path / "known_hosts"
    kh.write_text(f"{target.address.ip} {other_key}\n")
    r = subprocess.run(["ssh", "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={kh}", "-o",
                        "BatchMode=yes", "-o", "ConnectTimeout=5", "-i", str(lab.paths.ssh_key),
                        f"root@{target.address.ip}", "true"], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert "HOST IDENTIFICATION HAS CHANGED" in r.stderr or "verification failed" in r.stderr


def test_airgapped_node_reaches_its_mirror_services(lab: Lab) -> None:
    """The air-gapped node gets the mirror's apt repo, registry API and file store over HTTP."""
    mirror = mirror_of(lab).address.ip
    for url in (f"http://{mirror}/apt/InRelease", f"http://{mirror}:5000/v2/", f"http://{mirror}/files/"):
        r = fetch(lab, AIRGAP_NODE, url)
        assert r.returncode == 0, f"{url}: {r.stdout}{r.stderr}"


def test_airgapped_node_cannot_reach_outside_or_the_lab_host(lab: Lab) -> None:
    """From the air-gapped node the outside-world host and the connected bridge are unreachable."""
    outside = outside_of(lab).address.ip
    for url in (f"http://{outside}/apt/InRelease", f"http://{lab.spec.bridge(outside_of(lab).segment).address.ip}/"):
        r = fetch(lab, AIRGAP_NODE, url)
        assert r.returncode == 1, f"{url} answered from the air-gapped segment"


def test_airgapped_node_cannot_get_out_even_with_a_route(lab: Lab) -> None:
    """A route via the lab host does not help: the host neither forwards nor accepts from the air gap."""
    outside = outside_of(lab).address.ip
    gw = lab.spec.bridge(lab.host(AIRGAP_NODE).segment).address.ip
    add = lab.ssh(AIRGAP_NODE, f"ip route add {outside}/32 via {gw}")
    assert add.returncode == 0, add.stderr
    try:
        assert fetch(lab, AIRGAP_NODE, f"http://{outside}/apt/InRelease").returncode == 1
        assert fetch(lab, AIRGAP_NODE, f"http://{gw}/").returncode == 1
    finally:
        lab.ssh(AIRGAP_NODE, f"ip route del {outside}/32 via {gw}")
    assert network.ip_forward() == "0"


def test_connected_node_reaches_the_outside_world(lab: Lab) -> None:
    """The connected node reaches the outside-world host's apt repo and file store."""
    outside = outside_of(lab).address.ip
    for url in (f"http://{outside}/apt/InRelease", f"http://{outside}/files/"):
        r = fetch(lab, CONNECTED_NODE, url)
        assert r.returncode == 0, f"{url}: {r.stdout}{r.stderr}"


def _apt(lab: Lab, host: str, url: str, keyring: Path, cmd: str) -> subprocess.CompletedProcess[str]:
    """Run apt against one source with a private state dir (the node's own apt config stays untouched)."""
    key = keyring.read_bytes().hex()
    d = "/tmp/gpufleet-lab-apt-test"
    script = (f"rm -rf {d} && mkdir -p {d}/lists/partial {d}/cache/archives/partial && "
              f"python3 -c 'import sys; open(\"{d}/key.gpg\",\"wb\").write(bytes.fromhex(sys.argv[1]))' {key} && "
              f"echo 'deb [signed-by={d}/key.gpg] {url} /' > {d}/sources.list && "
              f"apt-get -o Dir::Etc::SourceList={d}/sources.list -o Dir::Etc::SourceParts=- "
              f"-o Dir::State::Lists={d}/lists -o Dir::Cache={d}/cache -o Dir::Cache::pkgcache= "
              f"-o Dir::Cache::srcpkgcache= {cmd}")
    return lab.ssh(host, script, timeout=120)


def test_mirror_repo_is_signed_and_offers_every_standin_version(lab: Lab) -> None:
    """apt on the air-gapped node verifies the mirror with its keyring and sees all stand-in driver versions."""
    mirror = mirror_of(lab)
    url = f"http://{mirror.address.ip}/apt"
    r = _apt(lab, AIRGAP_NODE, url, lab.spec.keyrings[mirror.name],
             "update -q && apt-cache -o Dir::State::Lists=/tmp/gpufleet-lab-apt-test/lists "
             "-o Dir::Etc::SourceList=/tmp/gpufleet-lab-apt-test/sources.list -o Dir::Etc::SourceParts=- "
             "madison nvidia-driver podman")
    assert r.returncode == 0, r.stdout + r.stderr
    versions = {line.split("|")[1].strip() for line in r.stdout.splitlines() if line.startswith("nvidia-driver")}
    assert versions == {f"{v}-1" for v in STANDIN_VERSIONS["driver"]}
    assert any(line.startswith("    podman") or line.startswith("podman") for line in r.stdout.splitlines())


def test_repo_signed_by_another_key_is_rejected(lab: Lab) -> None:
    """The mirror's repo does not verify with lab-upstream's keyring: signed-by really pins the key."""
    url = f"http://{mirror_of(lab).address.ip}/apt"
    r = _apt(lab, AIRGAP_NODE, url, lab.spec.keyrings[outside_of(lab).name], "update -q")
    assert "NO_PUBKEY" in r.stdout + r.stderr or "not signed" in r.stdout + r.stderr


def _system(lab: Lab, name: str) -> str:
    r = requests.get(f"{lab.bmc_url}/redfish/v1/Systems", auth=lab.bmc_auth(), timeout=5)
    r.raise_for_status()
    for member in r.json()["Members"]:
        url = f"{lab.bmc_url}{member['@odata.id']}"
        if requests.get(url, auth=lab.bmc_auth(), timeout=5).json()["Name"] == name:
            return url
    raise AssertionError(f"no Redfish system named {name}")


def _reset(lab: Lab, system: str, kind: str) -> None:
    r = requests.post(f"{system}/Actions/ComputerSystem.Reset", json={"ResetType": kind}, auth=lab.bmc_auth(),
                      timeout=10)
    assert r.status_code in (200, 202, 204), r.text


def _wait_power(lab: Lab, system: str, state: str, timeout: float = 40) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if requests.get(system, auth=lab.bmc_auth(), timeout=10).json()["PowerState"] == state:
            return
        time.sleep(0.5)
    raise AssertionError(f"power state never became {state}")


def _wait_ssh(lab: Lab, host: str, up: bool, timeout: float = 40) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (lab.ssh(host, "true", timeout=15).returncode == 0) == up:
            return
        time.sleep(0.3)
    raise AssertionError(f"{host}: SSH {'never came up' if up else 'still answers'}")


def _reimage(lab: Lab, node: str) -> None:
    """One-time PXE override + reset through Redfish; returns once the node answers SSH again."""
    system = _system(lab, node)
    r = requests.patch(system, json={"Boot": {"BootSourceOverrideTarget": "Pxe", "BootSourceOverrideEnabled": "Once"}},
                       auth=lab.bmc_auth(), timeout=10)
    assert r.status_code in (200, 204), r.text
    _reset(lab, system, "ForceRestart")
    _wait_power(lab, system, "On")
    _wait_ssh(lab, node, up=True)


@pytest.fixture
def bmc_node(lab: Lab) -> Any:
    """The node the BMC tests power-cycle; powered on again through Redfish afterwards if a test left it off."""
    yield BMC_NODE
    system = _system(lab, BMC_NODE)
    if requests.get(system, auth=lab.bmc_auth(), timeout=10).json()["PowerState"] != "On":
        _reset(lab, system, "On")
        _wait_power(lab, system, "On")
    _wait_ssh(lab, BMC_NODE, up=True)


def test_redfish_rejects_requests_without_the_password(lab: Lab) -> None:
    """The emulated BMC wants HTTP basic auth."""
    assert requests.get(f"{lab.bmc_url}/redfish/v1/Systems", timeout=5).status_code == 401


def test_bmc_powers_a_node_off_and_on(lab: Lab, bmc_node: str) -> None:
    """ForceOff through Redfish stops the node (SSH stops answering); On brings it back."""
    system = _system(lab, bmc_node)
    _reset(lab, system, "ForceOff")
    _wait_power(lab, system, "Off")
    _wait_ssh(lab, bmc_node, up=False)
    # `lab up` (any session's fixture) keeps a node the BMC powered off, off.
    lab_mod.up(lab.spec, lab.paths, lab.stack_file)
    assert lab.ssh(bmc_node, "true", timeout=15).returncode != 0
    _reset(lab, system, "On")
    _wait_power(lab, system, "On")
    _wait_ssh(lab, bmc_node, up=True)


def test_pxe_reset_reimages_the_node_and_repins_its_key(lab: Lab, bmc_node: str) -> None:
    """A reset after a one-time PXE override gives back the base image: marker gone, new key, re-pinned."""
    assert lab.ssh(bmc_node, "touch /root/gpufleet-lab-marker").returncode == 0
    old_key = lab_hosts.public_host_key(lab_hosts.root_of(lab.paths, bmc_node))
    _reimage(lab, bmc_node)
    r2 = lab.ssh(bmc_node, "test -e /root/gpufleet-lab-marker && echo present || echo gone; "
                           "cat /etc/ssh/ssh_host_ed25519_key.pub")
    assert r2.returncode == 0, r2.stderr
    assert r2.stdout.splitlines()[0] == "gone"
    new_key = " ".join(r2.stdout.splitlines()[1].split()[:2])
    assert new_key != old_key
    assert f"{bmc_node},{lab.host(bmc_node).address.ip} {new_key}" in lab.known_hosts.read_text()


# Private apt and podman configuration under /tmp: a node another engineer has converged (its own
# mirror source, keyring path and container config) is neither broken nor changed by this test.
_NODE_STACK_SCRIPT = string.Template(r"""set -e
export DEBIAN_FRONTEND=noninteractive
d=/tmp/gpufleet-lab-stack-test
rm -rf $$d && mkdir -p $$d/lists/partial $$d/archives/partial $$d/run $$d/graph
echo $key | python3 -c 'import sys; sys.stdout.buffer.write(bytes.fromhex(sys.stdin.read().strip()))' > $$d/key.gpg
echo "deb [signed-by=$$d/key.gpg] http://$mirror/apt /" > $$d/sources.list
apt="apt-get -o Dir::Etc::SourceList=$$d/sources.list -o Dir::Etc::SourceParts=- -o Dir::State::Lists=$$d/lists
     -o Dir::Cache::Archives=$$d/archives -o Dir::Cache::pkgcache= -o Dir::Cache::srcpkgcache="
$$apt update -q >/dev/null
$$apt install -y -q $packages >/dev/null 2>&1
printf '[storage]\ndriver = "vfs"\nrunroot = "%s/run"\ngraphroot = "%s/graph"\n' $$d $$d > $$d/storage.conf
printf '[containers]\nkeyring = false\ncgroups = "disabled"\n' > $$d/containers.conf
export CONTAINERS_STORAGE_CONF=$$d/storage.conf CONTAINERS_CONF=$$d/containers.conf
nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml 2>/dev/null
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader,nounits
podman run --rm --network=none --tls-verify=false --device nvidia.com/gpu=all \
    $mirror:5000/gpufleet/lab-hello:1 /bin/sh -c 'ls /dev | grep -c "^nvidia[0-9]"'
rm -rf $$d
""")


def test_airgapped_node_installs_stack_and_runs_a_gpu_container_from_the_mirror(lab: Lab, bmc_node: str) -> None:
    """Mirror only: pinned stand-ins + podman install, nvidia-smi shows the stack's GPUs, a CDI container runs.

    Reimages the BMC node first, so it starts from the base image whatever other tests did to it.
    """
    _reimage(lab, BMC_NODE)
    node = lab.host(BMC_NODE)
    assert node.gpus is not None
    packages = [f"{p}=570.133.20-1" for p in ("nvidia-driver", "nvidia-kernel-open-dkms", "nvidia-persistenced")]
    packages += [f"{p}=1.17.8-1" for p in ("nvidia-container-toolkit", "nvidia-container-toolkit-base",
                                           "libnvidia-container-tools", "libnvidia-container1")]
    script = _NODE_STACK_SCRIPT.substitute(key=lab.spec.keyrings[mirror_of(lab).name].read_bytes().hex(),
                                           mirror=mirror_of(lab).address.ip,
                                           packages=" ".join([*packages, "podman"]))
    encoded = base64.b64encode(script.encode()).decode()
    r = lab.ssh(BMC_NODE, f"echo {encoded} | base64 -d | bash", timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.strip().splitlines()
    count = len(node.gpus["gpus"])
    assert lines[:count] == [f"{node.gpus['name']}, {node.gpus['memory_mib']}, 570.133.20"] * count
    assert lines[-1] == str(count)


def leftover_processes(paths: Paths) -> list[str]:
    """Processes of the lab with this state directory: nspawn hosts, BMC emulator and notifier, gpg-agents."""
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout.splitlines()
    marks = [f"{paths.hosts_dir}/", f"{paths.bmc_dir}/", f"{paths.gnupg_dir}/", f"--state-dir {paths.state}"]
    return [line for line in ps if any(m in line + "/" for m in marks)]


def test_down_leaves_nothing_behind(lab: Lab) -> None:
    """`lab down` stops every process and removes mounts, bridges, the nft table, propagate dirs; up again after."""
    if not lab.started_here:
        pytest.skip("the lab belongs to a developer session; never tear down a lab this run did not bring up")
    lab_mod.down(lab.paths)
    try:
        assert lab_hosts.supervisor_pids(lab.paths) == {}
        assert lab_hosts.lab_mounts(lab.paths) == []
        assert not any(network.bridge_exists(b.name) for b in lab.spec.bridges)
        assert not network.table_exists(network.table_name(lab.stack))
        assert not any((lab_mod.PROPAGATE_DIR / h.name).exists() for h in lab.hosts)
        assert leftover_processes(lab.paths) == []
    finally:
        lab_mod.up(lab.spec, lab.paths, lab.stack_file)  # later lab tests (other files) need it


def make_second_stack(tmp_path: Path) -> tuple[Path, Paths]:
    """A small second lab (2 nodes, mirror, outside world) on 198.19.x with its own names, state and BMC port."""
    path = second_stack(stack_path("lab"), tmp_path, prefix="ci", bmc_port=8100, nodes=("ci-gpu01", "ci-gpu03"))
    return path, Paths(state=tmp_path / "state")


def test_second_lab_comes_up_and_goes_down_without_touching_the_first(lab: Lab, tmp_path: Path) -> None:
    """Another stack's lab runs beside this one; its `down` removes all of its own traces and none of ours."""
    path, paths = make_second_stack(tmp_path)
    spec = lab_spec("labci", path)
    serving = {n: p for n, p in lab_hosts.supervisor_pids(lab.paths).items()
               if lab.host(n).kind is not HostKind.NODE}
    assert {h.name for h in spec.hosts} == {"ci-gpu01", "ci-gpu03", "ci-mirror", "ci-upstream"}
    try:
        result = lab_mod.up(spec, paths, path)
        assert all(h["ssh"] for h in result["hosts"]), result["hosts"]
        probe = subprocess.run([*lab_hosts.ssh_base(spec, 5), "ci-gpu03", _FETCH + "http://198.19.2.10/apt/InRelease"],
                               capture_output=True, text=True, timeout=60, check=False)
        assert probe.returncode == 0, probe.stdout + probe.stderr
        # The two labs are isolated from each other as well: the first lab's mirror is unreachable.
        assert fetch(lab, AIRGAP_NODE, "http://198.19.2.10/apt/InRelease").returncode == 1
    finally:
        lab_mod.down(paths)
    assert lab_hosts.supervisor_pids(paths) == {}
    shutil.rmtree(paths.rootfs_dir)  # ~600 MB of unpacked bases; pytest keeps tmp dirs of recent runs
    assert lab_hosts.lab_mounts(paths) == []
    assert not any(network.bridge_exists(b.name) for b in spec.bridges)
    assert not network.table_exists(network.table_name("labci"))
    assert not any((lab_mod.PROPAGATE_DIR / h.name).exists() for h in spec.hosts)
    assert leftover_processes(paths) == []
    # The first lab is untouched: its bridges, table and serving hosts (never power-cycled by anyone) remain.
    assert all(network.bridge_exists(b.name) for b in lab.spec.bridges)
    assert network.table_exists(network.table_name(lab.stack))
    assert {n: p for n, p in lab_hosts.supervisor_pids(lab.paths).items() if n in serving} == serving
