"""Soft-RoCE between two VM nodes with real kernels: the rdma role, `gpufleet fabric test`, `validate-node`.

Two QEMU (TCG) VMs boot Debian 12's *generic* kernel (`linux-image-amd64`: the cloud kernel has no
`rdma_rxe`) straight from a disk made from `gpufleet image build` (kernel and initramfs taken from that
disk, `-kernel`/`-initrd`: the bootloader path is test_deploy_vm.py's subject, not this one). Each disk gets
the node's first-boot data written into it (`infra.provision.firstboot.firstboot_tar`: hostname, address,
admin key, its own pinned host key) and an apt source naming the lab's flat repository, served over HTTP on
the management bridge (198.18.12.1/24). The fabric NICs (virtio-net with a declared 100 Gb/s link speed) sit
on a second throwaway bridge with no host address: the fabric 198.18.13.0/24 exists only between the VMs.

Then, through the product:
1. the `rdma` role alone, with the plan's host variables (`build_inventory`), through the product's runner
   (`run_playbook`, the tuned Mitogen profile): it installs the pinned rdma-core/perftest from the repository,
   loads the modules, creates the Soft-RoCE link and the fabric address; a second run changes nothing;
2. `ibv_devices` and `rdma link` on each node show `rxe_eth1` ACTIVE on eth1;
3. `gpufleet fabric test --iterations 1000` runs ib_write_bw + ib_write_lat over RDMA-CM between the nodes
   and passes against this fabric's thresholds (set for software RDMA on emulated CPUs);
4. `gpufleet validate-node` reports the fabric port present, up, at 100 Gb/s, with its RDMA device; with one
   more port declared that the node lacks, it fails naming the node, the port and the fix. (It fails the
   GPU checks too: these VMs have no GPU. Only its fabric verdict is asserted.)

The repository (image packages + the RDMA stack, ~140 MB) is made once from Debian's archive and cached under
/var/cache/gpufleet/rxe-repo, like tests/lab/image_fixtures.py's; the image is built once per repository
state and cached beside it. Nothing is downloaded while the VMs run.

Run under the VM lock: `flock /tmp/gpufleet-vm.lock pytest -m lab -s tests/lab/test_rxe_vm.py`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import io
import json
import os
import shutil
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.ansible.inventory import build_inventory
from infra.ansible.runner import run_playbook
from infra.ansible.settings import SshSettings
from infra.model.load import parse_site
from infra.plan.node import plan_site
from infra.provision.firstboot import HostKeyStore, firstboot_tar
from tests.lab.image_fixtures import GPUFLEET, UPSTREAM
from tests.unit.factories import make_profile

pytestmark = pytest.mark.lab

REPO = Path(os.environ.get("GPUFLEET_RXE_REPO", "/var/cache/gpufleet/rxe-repo"))
IMAGE_CACHE = Path(os.environ.get("GPUFLEET_RXE_IMAGE", "/var/cache/gpufleet/rxe-image"))
IMAGE = "rxe-node"
# The default image's set (infra/provision/image.py) with the generic kernel instead of the cloud one, and
# python3-apt for the package roles' apt module.
IMAGE_PACKAGES = (
    "linux-image-amd64", "systemd", "systemd-sysv", "dbus", "openssh-server", "python3", "python3-apt", "sudo",
    "iproute2", "netbase", "grub-pc-bin", "grub2-common", "e2fsprogs", "fdisk", "initramfs-tools", "busybox-static",
)  # fmt: skip
# What the rdma role installs from the repository (infra/plan/packages.py, Debian family), Debian 12's versions.
RDMA_PACKAGES = ("rdma-core", "ibverbs-providers", "ibverbs-utils", "rdmacm-utils", "infiniband-diags", "perftest")
RDMA_CORE_VERSION = "44.0-2"
PERFTEST_VERSION = "4.5+0.17-1"

MGMT_BRIDGE, MGMT_ADDR, MGMT_CIDR = "gpf-rxe0", "198.18.12.1", "198.18.12.0/24"
FABRIC_BRIDGE, FABRIC_CIDR = "gpf-rxe1", "198.18.13.0/24"
NODES = (
    # hostname, management address, management MAC, fabric MAC, fabric address
    ("rxe-a", "198.18.12.11", "52:54:00:9c:00:11", "52:54:00:9d:00:11", "198.18.13.11"),
    ("rxe-b", "198.18.12.12", "52:54:00:9c:00:12", "52:54:00:9d:00:12", "198.18.13.12"),
)
# The port the missing-port case declares on rxe-a: no such interface exists in the VM.
MISSING_NETDEV = "eth9"
# virtio-net's link speed (QEMU `speed=` in Mb/s, VIRTIO_NET_F_SPEED_DUPLEX): the kernel reports it as the
# interface speed, and rdma_rxe derives the RDMA port's rate from it (ib_get_eth_speed: > 40 Gb/s → 4X EDR).
LINK_MBPS = 100_000
# Soft-RoCE in TCG VMs is software on emulated CPUs: thresholds for *this* fabric, stated in its stack, so the
# test checks the pairwise machinery end to end (a real fabric keeps the default 80 % of the port speed).
MIN_BANDWIDTH_GBPS = 0.01
MAX_LATENCY_US = 20_000.0
# perftest's default 5,000 writes of 64 KiB took 48 s here (0.058 Gb/s), close to the server's 60 s limit on
# a loaded machine: 1,000 keep the pair at ~10 s.
ITERATIONS = 1000
VM_MEMORY_MB = 512
PLAYBOOK = """---
# The rdma role alone, with the plan's host variables (the inventory gpufleet builds for a converge).
- name: RDMA stack and fabric ports
  hosts: gpufleet_nodes
  become: true
  gather_facts: true
  roles:
    - role: rdma
"""


def _need(cond: bool, why: str) -> None:
    if not cond:
        pytest.skip(why)


def _run(cmd: list[str], timeout: int = 300, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=timeout, **kw)


def _make_repo() -> Path:
    """The flat repository: the image's packages and the RDMA stack, from Debian's archive (made once)."""
    if (REPO / "Packages").is_file():
        return REPO
    pool = REPO / "pool"
    pool.mkdir(parents=True, exist_ok=True)
    _run(["mmdebstrap", "--variant=apt", "--mode=root", "--quiet",
          "--include=" + ",".join(IMAGE_PACKAGES + RDMA_PACKAGES),
          "--skip=essential/unlink", '--setup-hook=mkdir -p "$1"/var/cache/apt/archives',
          f"--customize-hook=sync-out /var/cache/apt/archives {pool}", "bookworm", "/dev/null", UPSTREAM],
         timeout=1200)  # fmt: skip
    index = _run(["dpkg-scanpackages", "--multiversion", "pool"], cwd=REPO).stdout
    (REPO / "Packages.tmp").write_text(index)
    (REPO / "Packages.tmp").rename(REPO / "Packages")
    return REPO


def _image(repo: Path) -> Path:
    """`gpufleet image build` of the generic-kernel image; cached per repository index and package list."""
    key = hashlib.sha256((repo / "Packages").read_bytes() + ",".join(IMAGE_PACKAGES).encode()).hexdigest()[:12]
    out = IMAGE_CACHE / key
    if (out / f"images/{IMAGE}.json").is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    res = subprocess.run(
        [*GPUFLEET, "image", "build", IMAGE, "--repo", f"copy://{repo}",
         "--out", str(out), "--packages", ",".join(IMAGE_PACKAGES)],
        capture_output=True, text=True, timeout=1800, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    print(res.stdout)
    return out


@contextlib.contextmanager
def _mounted(disk: Path) -> Iterator[Path]:
    """The disk's root partition (at 1 MiB, infra/provision/image.py) mounted read-write."""
    mnt = disk.with_suffix(".mnt")
    mnt.mkdir()
    loop = _run(["losetup", "--find", "--show", "--offset", str(1 << 20), str(disk)]).stdout.strip()
    try:
        _run(["mount", loop, str(mnt)])
        try:
            yield mnt
        finally:
            _run(["umount", str(mnt)])
    finally:
        _run(["losetup", "-d", loop])
        mnt.rmdir()


def _site(admin_pub: str, ssh_dir: Path, extra_port: bool = False) -> dict[str, Any]:
    nodes = []
    for host, addr, mac, _fmac, faddr in NODES:
        ports: list[dict[str, Any]] = [
            {"fabric": "rxe-lab", "netdev": "eth1", "soft_roce": True, "speed_gbps": 100, "address": faddr}
        ]
        if extra_port and host == NODES[0][0]:
            ports.append({"fabric": "rxe-lab", "netdev": MISSING_NETDEV, "soft_roce": True, "speed_gbps": 100,
                          "address": "198.18.13.21"})  # fmt: skip
        nodes.append({
            "hostname": host, "segment": "rxe", "address": addr, "macs": [mac], "os": "debian-12",
            "gpu": {"model": "H100", "count": 8, "nvswitch": True}, "fabric_ports": ports,
        })  # fmt: skip
    return {
        "name": "rxe-vm",
        "default_profile": "hgx",
        "profiles": {"hgx": make_profile(rdma={"version": RDMA_CORE_VERSION, "perftest_version": PERFTEST_VERSION})},
        "segments": [{"name": "rxe", "cidr": MGMT_CIDR}],
        "nodes": nodes,
        "fabrics": [
            {
                "name": "rxe-lab",
                "type": "roce",
                "cidr": FABRIC_CIDR,
                "mtu": 1500,
                "min_bandwidth_gbps": MIN_BANDWIDTH_GBPS,
                "max_latency_us": MAX_LATENCY_US,
            }
        ],
        "admin_keys": [admin_pub],
        "controller": {"ssh_config": str(ssh_dir / "config"), "known_hosts": str(ssh_dir / "known_hosts")},
    }


def _stack_file(path: Path, site: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump({"config": {"gpufleet:site": site}}, sort_keys=False))
    return path


@contextlib.contextmanager
def _network() -> Iterator[None]:
    def clean() -> None:
        for i in range(len(NODES)):
            for br in (MGMT_BRIDGE, FABRIC_BRIDGE):
                subprocess.run(["ip", "link", "del", f"{br}t{i}"], capture_output=True, check=False)
        for br in (MGMT_BRIDGE, FABRIC_BRIDGE):
            subprocess.run(["ip", "link", "del", br], capture_output=True, check=False)

    clean()  # a crashed earlier run
    try:
        for br in (MGMT_BRIDGE, FABRIC_BRIDGE):
            _run(["ip", "link", "add", br, "type", "bridge"])
            _run(["ip", "link", "set", br, "up"])
        _run(["ip", "addr", "add", f"{MGMT_ADDR}/24", "dev", MGMT_BRIDGE])
        for i in range(len(NODES)):
            for br in (MGMT_BRIDGE, FABRIC_BRIDGE):
                _run(["ip", "tuntap", "add", f"{br}t{i}", "mode", "tap"])
                _run(["ip", "link", "set", f"{br}t{i}", "master", br, "up"])
        yield
    finally:
        clean()


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def _stop(p: subprocess.Popen[bytes]) -> None:
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)


def _ssh(ssh_dir: Path, addr: str, command: str, timeout: int = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ssh", "-F", str(ssh_dir / "config"), "-o", f"UserKnownHostsFile={ssh_dir / 'known_hosts'}",
         "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", addr, command],
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def _gpufleet(*args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*GPUFLEET, *args], capture_output=True, text=True,
                          timeout=timeout, check=False)  # fmt: skip


def test_soft_roce_fabric_between_two_vm_nodes(tmp_path: Path) -> None:
    _need(os.geteuid() == 0, "needs root (bridges, tap devices, loop mounts, mmdebstrap --mode=root)")
    for tool in ("qemu-system-x86_64", "mmdebstrap", "dpkg-scanpackages", "losetup", "ssh", "ssh-keygen", "ip"):
        _need(shutil.which(tool) is not None, f"{tool} is not installed (./scripts/setup.sh --test)")
    started = time.monotonic()
    repo = _make_repo()
    image = _image(repo)
    prepared = time.monotonic()

    ssh_dir = tmp_path / "ssh"
    ssh_dir.mkdir()
    admin = ssh_dir / "admin"
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(admin)])
    (ssh_dir / "config").write_text(f"Host *\n  User root\n  IdentityFile {admin}\n  IdentitiesOnly yes\n")
    raw = _site((ssh_dir / "admin.pub").read_text().strip(), ssh_dir)
    site = parse_site(raw)
    store = HostKeyStore(tmp_path / "keys")
    (ssh_dir / "known_hosts").write_text(
        "".join(f"{addr} {' '.join(store.get(host).public.split()[:2])}\n" for host, addr, *_ in NODES)
    )

    procs: list[subprocess.Popen[bytes]] = []
    httpd = None
    boot = tmp_path / "boot"
    boot.mkdir()
    with _network():
        try:
            httpd = http.server.ThreadingHTTPServer((MGMT_ADDR, 0), functools.partial(_Quiet, directory=str(repo)))
            threading.Thread(target=httpd.serve_forever, daemon=True).start()
            source = f"deb [trusted=yes] http://{MGMT_ADDR}:{httpd.server_address[1]}/ ./\n"
            # Each node's disk: the image, its first-boot data, and the lab repository as its only apt source.
            disks = []
            for host, *_ in NODES:
                disk = tmp_path / f"{host}.img"
                _run(["cp", "--sparse=always", str(image / f"images/{IMAGE}.img"), str(disk)])
                with _mounted(disk) as root:
                    data = firstboot_tar(site, site.nodes_by_name[host], store.get(host))
                    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
                        tar.extractall(root, filter="data")
                    (root / "etc/apt/sources.list").write_text(source)
                    if not (boot / "vmlinuz").exists():
                        shutil.copyfile(sorted((root / "boot").glob("vmlinuz-*"))[-1], boot / "vmlinuz")
                        shutil.copyfile(sorted((root / "boot").glob("initrd.img-*"))[-1], boot / "initrd.img")
                disks.append(disk)
            for i, ((_host, _addr, mac, fmac, _faddr), disk) in enumerate(zip(NODES, disks, strict=True)):
                procs.append(subprocess.Popen(
                    ["qemu-system-x86_64", "-accel", "tcg", "-m", str(VM_MEMORY_MB), "-smp", "1",
                     "-display", "none", "-monitor", "none", "-no-reboot",
                     "-kernel", str(boot / "vmlinuz"), "-initrd", str(boot / "initrd.img"),
                     # eth0 management, eth1 fabric (PCI order): the stack names the Soft-RoCE port `eth1`.
                     "-append", "root=/dev/vda1 ro console=ttyS0 net.ifnames=0 quiet",
                     "-drive", f"file={disk},format=raw,if=virtio,cache=unsafe",
                     "-netdev", f"tap,id=m,ifname={MGMT_BRIDGE}t{i},script=no,downscript=no",
                     "-device", f"virtio-net-pci,netdev=m,mac={mac},addr=0x4",
                     "-netdev", f"tap,id=f,ifname={FABRIC_BRIDGE}t{i},script=no,downscript=no",
                     "-device", f"virtio-net-pci,netdev=f,mac={fmac},addr=0x5,speed={LINK_MBPS},duplex=full",
                     "-serial", f"file:{tmp_path / f'vm{i}.serial'}"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                ))  # fmt: skip
            for i, (_host, addr, *_rest) in enumerate(NODES):
                deadline = time.monotonic() + 300
                while _ssh(ssh_dir, addr, "true", timeout=20).returncode != 0:
                    serial = tmp_path / f"vm{i}.serial"
                    assert time.monotonic() < deadline, f"{addr}: no SSH\n{serial.read_text(errors='replace')[-3000:]}"
                    time.sleep(2)
            booted = time.monotonic()

            # 1. The rdma role alone with the plan's host variables, through the product's runner; twice.
            plan = plan_site(site)
            hosts = [h for h, *_ in NODES]
            inventory = build_inventory(site, [plan.node(h) for h in hosts])
            playbook = tmp_path / "rdma.yml"
            playbook.write_text(PLAYBOOK)
            first = run_playbook(str(playbook), inventory, hosts, ssh=SshSettings.of(site), label="rxe")
            assert first.succeeded, json.dumps(first.as_dict(), indent=1)[-4000:]
            assert all(first.hosts[h].changed > 0 for h in hosts)
            second = run_playbook(str(playbook), inventory, hosts, ssh=SshSettings.of(site), label="rxe")
            assert second.succeeded and all(second.hosts[h].changed == 0 for h in hosts), second.as_dict()
            converged = time.monotonic()

            # 2. The verbs and RDMA-CM tools see the Soft-RoCE device on the fabric interface.
            seen: dict[str, str] = {}
            for host, addr, *_ in NODES:
                res = _ssh(ssh_dir, addr, "ibv_devices; rdma link show; ip -br addr show eth1; "
                           "ib_write_bw --help | grep -A1 -- --iters; uname -r; "
                           "cd /sys/class/infiniband/rxe_eth1/ports/1 && grep -H . state phys_state rate "
                           "gid_attrs/ndevs/0 /sys/class/net/eth1/speed /sys/class/net/eth1/operstate")  # fmt: skip
                assert res.returncode == 0, res.stderr
                seen[host] = res.stdout
                assert "rxe_eth1" in res.stdout.split("link ", 1)[0]  # ibv_devices lists it
                assert "link rxe_eth1/1 state ACTIVE physical_state LINK_UP netdev eth1" in res.stdout
                faddr = next(n[4] for n in NODES if n[0] == host)
                assert f"{faddr}/24" in res.stdout
            print(json.dumps({"tools": seen}, indent=1))

            # 3. The pairwise test through the CLI.
            stack = _stack_file(tmp_path / "Pulumi.rxe-vm.yaml", raw)
            res = _gpufleet("fabric", "test", "--stack-file", str(stack), "--json", "--iterations", str(ITERATIONS))
            assert res.returncode == 0, res.stdout + res.stderr
            report = json.loads(res.stdout)
            (pair,) = report["pairs"]
            assert pair["ok"] and pair["bandwidth_gbps"] > 0 and pair["latency_typical_us"] > 0, pair
            tested = time.monotonic()

            # 4. validate-node: the declared port passes its fabric checks ...
            res = _gpufleet("validate-node", "--stack-file", str(stack), "--node", "rxe-a", "--json")
            facts = json.loads(res.stdout)["facts"]
            assert facts["fabric"]["ok"], facts["fabric"]
            (port,) = facts["fabric"]["ports"]
            assert port["seen_gbps"] == 100 and port["seen"]["rdma_device"] == "rxe_eth1", port
            assert not [p for p in facts["problems"] if p.startswith("fabric")]
            # ... and a declared port the node lacks fails it, naming the node, the port and the fix.
            missing = _stack_file(tmp_path / "Pulumi.rxe-missing.yaml", _site(raw["admin_keys"][0], ssh_dir, True))
            res = _gpufleet("validate-node", "--stack-file", str(missing), "--node", "rxe-a", "--json")
            assert res.returncode == 1, res.stdout + res.stderr
            facts = json.loads(res.stdout)["facts"]
            assert not facts["fabric"]["ok"]
            fabric_problems = [p for p in facts["problems"] if p.startswith("fabric")]
            assert len(fabric_problems) == 1, facts["problems"]
            assert f"netdev {MISSING_NETDEV} of fabric rxe-lab on rxe-a" in fabric_problems[0]
            assert "no such interface on the node" in fabric_problems[0] and "fix:" in fabric_problems[0]
            res = _gpufleet("validate-node", "--stack-file", str(missing), "--node", "rxe-a")
            print(res.stdout)
            done = time.monotonic()
            # Reported, never asserted (docs/fabric.md, docs/benchmarks.md).
            seconds = {
                "repo_and_image": prepared - started,
                "boot_to_ssh": booted - prepared,
                "rdma_role_twice": converged - booted,
                "fabric_test": tested - converged,
                "validate_twice": done - tested,
            }
            print(json.dumps({"fabric_test": report, "validate_missing_port": fabric_problems,
                              "seconds": {k: round(v, 1) for k, v in seconds.items()}}, indent=1))  # fmt: skip
        finally:
            for p in procs:
                _stop(p)
            if httpd is not None:
                httpd.shutdown()
                httpd.server_close()
    assert not Path(f"/sys/class/net/{MGMT_BRIDGE}").exists()
