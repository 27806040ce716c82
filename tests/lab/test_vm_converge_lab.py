"""Blank VM nodes to validated through `rebuild`, one rebuilt the same, then a driver change with a real reboot.

Two libvirt/QEMU (TCG) nodes behind sushy-tools' libvirt BMC (infra/lab/vm.py), with the lab stack's GPU
profile and nothing lab-mode about them: `vm-gpu01` on a connected segment (`gpf-prov0`, 198.18.9.0/24) and
`vm-gpu02` on an air-gapped one (`gpf-iso0`, 198.18.10.0/24) whose mirror is its only way out. Their image is
the product's (`gpufleet image build`) plus one clearly labelled lab package (`vm.declarations`: the
capabilities fact "no NVIDIA module can load" and the simulated GPUs, so a reinstall keeps them). Their
packages come from a signed flat repository with the lab's repository content (Debian packages the lab
seeds, NVIDIA stand-ins), served from this machine: as the connected segment's `sources`, and as the
air-gapped segment's mirror.

The provisioning side is the one of tests/lab/test_vm_node_lab.py (this machine plays each segment's
provisioning host; arming's SSH transport is the one stand-in). Everything else is the product:

1. `infra.dr.rebuild.rebuild` — what `gpufleet rebuild` runs — takes each **blank** node to validated (both at
   once): no baseline (node down), arm → BMC one-time PXE → image written and checked → disk → SSH with the
   key store's pinned key → `gpufleet converge` → `gpufleet validate-node` (both CLI subprocesses) →
   fingerprint. The air-gapped node's converge applies its egress firewall; every IPv4 packet it sent, from
   its first DHCP request to the end of the test, went to its segment's mirror or the DHCP broadcast
   (nft bridge counters by MAC);
2. a second rebuild of the running connected node: baseline live, fingerprint identical, same host key,
   known_hosts byte-identical, a file written in between is gone (the disk was rewritten);
3. a driver change in the stack (570.133.20 → 570.124.06, a downgrade: the pinned packages change, so the
   driver needs a reboot) and `gpufleet converge`: the nvidia_driver role reboots the VM under the stack's
   reboot policy (`if-required`; the VM declares it can reboot), the node comes back with a new boot id, and
   `validate-node` passes with the new driver.

Under the VM lock (the image build runs inside it, ~3 min; GPUFLEET_VM_IMAGE_OUT reuses a build):
`flock /tmp/gpufleet-vm.lock pytest -m lab -s tests/lab/test_vm_converge_lab.py`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.commands.provision import image_records
from infra.dr.rebuild import RebuildReport, rebuild
from infra.dr.remote import ssh
from infra.dr.steps import StackRef, gpufleet
from infra.lab import repo, vm
from infra.model.load import load_site
from infra.plan.node import plan_site
from infra.provision.firstboot import HostKeyStore, arm_install
from infra.provision.image import DEFAULT_PACKAGES
from infra.provision.render import HTTP_ROOT, HTTPD_PATH, render_site
from tests.lab.image_fixtures import REPO, make_repo, need_build_tools
from tests.lab.labtools import lab_debs
from tests.lab.test_provision_vm import BRIDGE, BRIDGE_ADDR, CIDR, _bridge, _dnsmasq, _stop, _wait
from tests.lab.test_vm_node_lab import ISO_ADDR, ISO_BRIDGE, _counted, _iso_bridge, admin_ssh, need_vm_host
from tests.unit.test_provision_arming import converge_scripts

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[2]
LAB_STACK = ROOT / "stacks" / "Pulumi.lab.yaml"
IMAGE = "debian-12-vmnode"
NODE = vm.VmNode(name="vm-gpu01", mac="52:54:00:9a:01:21", bridge=BRIDGE, disk_serial="GPFROOT21", memory_mib=1536)
ISO_NODE = vm.VmNode(name="vm-gpu02", mac="52:54:00:9a:01:22", bridge=ISO_BRIDGE, disk_serial="GPFROOT22",
                     memory_mib=1536)
ADDRESS = {NODE.name: "198.18.9.21", ISO_NODE.name: "198.18.10.22"}
SEGMENT = {NODE.name: "prov", ISO_NODE.name: "iso"}
ISO_CIDR = "198.18.10.0/24"
FIRST_DRIVER, SECOND_DRIVER = "570.133.20", "570.124.06"
NFT_TABLE = "gpf_vm_conv_count"


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def _serve(root: Path, address: str, port: int) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer((address, port), partial(_Quiet, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _installed(status: Path) -> list[str]:
    """Names of the packages a dpkg status file lists as installed."""
    names, name = [], ""
    for line in status.read_text(encoding="utf-8").splitlines():
        if line.startswith("Package: "):
            name = line.split()[1]
        elif line.startswith("Status: ") and line.endswith(" installed"):
            names.append(name)
    return names


def _node_repo(tmp: Path) -> tuple[Path, Path, list[str]]:
    """The lab's repository content (seed Debian packages + stand-ins), signed with a key of its own; and the
    VM image's package set: the product's default set plus every package of the lab's node base — the seed
    closure was computed against that base (debootstrap minbase: tzdata, lsb-base… that mmdebstrap's `apt`
    variant does not install), so a VM node with it installs the same packages an nspawn node does."""
    debs, base = lab_debs()
    srv, keyring = tmp / "srv", tmp / "keys" / "vm-repo.gpg"
    repo.seed_repo("vm-repo", srv, debs, tmp / "gnupg", keyring)
    packages = list(dict.fromkeys([*DEFAULT_PACKAGES, *_installed(base / "var/lib/dpkg/status")]))
    return srv, keyring, packages


def _image(site_raw: dict[str, Any], packages: list[str], tmp: Path) -> Path:
    """`gpufleet image build` of the VM image from the image repository plus the declarations package."""
    given = os.environ.get("GPUFLEET_VM_IMAGE_OUT")
    if given:
        return Path(given)
    need_build_tools()
    make_repo(packages)
    merged = tmp / "image-repo"
    (merged / "pool").mkdir(parents=True)
    for deb in (REPO / "pool").glob("*.deb"):
        os.link(deb, merged / "pool" / deb.name)
    site = load_site(path=_write_stack(tmp / "decl.yaml", site_raw))
    vm.declarations_deb(site, [NODE.name, ISO_NODE.name], merged / "pool", tmp / "decl-work")
    index = subprocess.run(["dpkg-scanpackages", "--multiversion", "pool"], cwd=merged, check=True,
                           capture_output=True, timeout=300).stdout
    (merged / "Packages").write_bytes(index)
    out = tmp / "image"
    res = subprocess.run(
        [shutil.which("gpufleet") or "gpufleet", "image", "build", IMAGE, "--repo", f"copy://{merged}",
         "--out", str(out), "--packages", ",".join([*packages, vm.DECLARATIONS_PACKAGE])],
        capture_output=True, text=True, timeout=1800, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    print(res.stdout)
    return out


def _site_raw(tmp: Path, *, driver: str, ports: dict[str, int], bmc_url: str, keyring: Path) -> dict[str, Any]:
    """Two segments, one VM node each, the lab stack's GPU profile (its driver replaced), the repository."""
    lab = yaml.safe_load(LAB_STACK.read_text(encoding="utf-8"))["config"]["gpufleet:site"]
    profile = copy.deepcopy(lab["profiles"][lab["default_profile"]])
    profile["driver"]["version"] = driver
    profile["fabric_manager"]["version"] = driver

    def node(vmn: vm.VmNode) -> dict[str, Any]:
        return {
            "hostname": vmn.name, "segment": SEGMENT[vmn.name], "address": ADDRESS[vmn.name], "macs": [vmn.mac],
            "os": "debian-12", "gpu": {"model": "L4", "count": 2}, "image": IMAGE, "boot_mode": "bios",
            "root_disk": {"serial": vmn.disk_serial},
            "bmc": {"endpoint": bmc_url, "system_id": vmn.uuid, "username": "admin",
                    "password": {"file": str(tmp / "bmc-password")}},
        }  # fmt: skip

    return {
        "name": "vmlab",
        "reboot": {"policy": "if-required", "timeout_s": 600},
        "rollout": {"batch_size": 1, "max_failures": 0},
        "default_profile": "vm",
        "profiles": {"vm": profile},
        "segments": [
            {"name": "prov", "cidr": CIDR,
             "sources": [{"name": "vm-repo", "url": f"http://{BRIDGE_ADDR}:{ports['repo']}/apt", "suite": "/",
                          "keyring": str(keyring)}],
             "provisioning": {"host": "gpf-prov", "address": BRIDGE_ADDR, "mode": "dhcp",
                              "http_port": ports["prov"]}},
            {"name": "iso", "cidr": ISO_CIDR, "airgapped": True, "mirror": "gpf-mirror",
             "egress_allow": [f"{ISO_ADDR}/32"],
             "provisioning": {"host": "gpf-mirror", "mode": "dhcp", "http_port": ports["iso"]}},
        ],
        "mirrors": [{"name": "gpf-mirror", "segment": "iso", "address": ISO_ADDR, "http_port": ports["mirror"],
                     "keyring": str(keyring)}],
        "nodes": [node(NODE), node(ISO_NODE)],
        "admin_keys": [(tmp / "admin.pub").read_text(encoding="utf-8").strip()],
        "controller": {"ssh_config": str(tmp / "ssh_config"), "known_hosts": str(tmp / "known_hosts")},
    }  # fmt: skip


def _write_stack(path: Path, raw: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump({"config": {"gpufleet:site": raw}}, sort_keys=False), encoding="utf-8")
    return path


@contextlib.contextmanager
def _counters() -> Iterator[None]:
    """Bridge-level counters of the air-gapped node's IPv4 packets: to its mirror / DHCP broadcast, elsewhere."""
    subprocess.run(["nft", "delete", "table", "bridge", NFT_TABLE], capture_output=True, check=False)
    ok = f"{{ {ISO_ADDR}, 255.255.255.255 }}"
    rules = (f"table bridge {NFT_TABLE} {{\n  chain pre {{\n"
             "    type filter hook prerouting priority 0; policy accept;\n"
             f'    ether saddr {ISO_NODE.mac} ip daddr {ok} counter comment "mirror"\n'
             f'    ether saddr {ISO_NODE.mac} ip daddr != {ok} counter comment "elsewhere"\n  }}\n}}\n')
    subprocess.run(["nft", "-f", "-"], input=rules, text=True, check=True, capture_output=True)
    try:
        yield
    finally:
        subprocess.run(["nft", "delete", "table", "bridge", NFT_TABLE], capture_output=True, check=False)


@pytest.fixture
def vm_site(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """Bridges, repository servers, image, libvirt, the VM nodes and their BMC: all but the provisioning hosts."""
    need_vm_host("dnsmasq", "ssh", "nft", "dpkg-scanpackages", "gpg")
    admin_ssh(tmp_path)
    (tmp_path / "bmc-password").write_text("lab\n")
    srv, keyring, packages = _node_repo(tmp_path)
    work = tmp_path / "vm"
    work.mkdir()
    vms = [NODE, ISO_NODE]
    with _bridge(), _iso_bridge(), _counters():
        ports = {"repo": vm.free_port(BRIDGE_ADDR), "prov": vm.free_port(BRIDGE_ADDR),
                 "mirror": vm.free_port(ISO_ADDR), "iso": vm.free_port(ISO_ADDR)}
        raw = _site_raw(tmp_path, driver=FIRST_DRIVER, ports=ports, bmc_url="http://127.0.0.1:1", keyring=keyring)
        image = _image(raw, packages, tmp_path)
        servers = [_serve(srv, BRIDGE_ADDR, ports["repo"]), _serve(srv, ISO_ADDR, ports["mirror"])]
        try:
            with vm.libvirt(work), vm.nodes(work, vms) as consoles, vm.bmc(work, vms) as url:
                for n in raw["nodes"]:
                    n["bmc"]["endpoint"] = url
                yield {"raw": raw, "image": image, "consoles": consoles, "tmp": tmp_path}
        finally:
            for server in servers:
                server.shutdown()
                server.server_close()


def test_blank_vm_nodes_to_validated_then_rebuilt_the_same_then_rebooted_for_a_driver(
    vm_site: dict[str, Any],
) -> None:
    tmp: Path = vm_site["tmp"]
    raw: dict[str, Any] = vm_site["raw"]
    stack_file = _write_stack(tmp / "Pulumi.vmlab.yaml", raw)
    site = load_site(path=stack_file)
    node = {n.hostname: n for n in site.nodes}
    plans = plan_site(site)
    ref = StackRef(None, stack_file)
    records = image_records(vm_site["image"])
    store = HostKeyStore(tmp / "keys-store")
    known = tmp / "known_hosts"

    # Each segment's provisioning host, as roles/provisioning sets it up (this machine): HTTP root, server, DHCP.
    services = {svc.segment: svc for svc in render_site(
        site, tftp_root=str(tmp), lease_file=str(tmp / "leases"), images=records)}
    roots = {seg: tmp / f"http-{seg}" for seg in services}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for seg, svc in services.items():
            for rel in (f"images/{IMAGE}.img", "deploy/vmlinuz", "deploy/initrd.img"):
                (roots[seg] / rel).parent.mkdir(parents=True, exist_ok=True)
                os.link(vm_site["image"] / rel, roots[seg] / rel)
            converge_scripts(tmp, roots[seg], svc.http_files)
            procs.append(subprocess.Popen(
                [sys.executable, str(ROOT / "infra/provision/httpd.py"), "--root", str(roots[seg]), "--bind",
                 str(svc.address), "--port", str(svc.http_port)],
                stdout=subprocess.DEVNULL, stderr=(tmp / f"httpd-{seg}.log").open("wb")))  # fmt: skip
            conf = tmp / f"dnsmasq-{seg}.conf"
            conf.write_text(svc.dnsmasq_conf.replace(str(tmp / "leases"), str(tmp / f"leases-{seg}")))
            procs.append(_dnsmasq(conf, tmp / f"dnsmasq-{seg}.log"))
        for seg in services:
            log = tmp / f"dnsmasq-{seg}.log"
            assert _wait(lambda log=log: log.exists() and "static leases only" in log.read_text(), 15)
        host_root = {svc.host: roots[seg] for seg, svc in services.items()}

        def on_provisioning_host(argv: list[str], *, host: str, stdin: bytes,
                                 timeout: float) -> subprocess.CompletedProcess[bytes]:
            """arm_install's SSH transport, stand-in: its remote command, run here on that host's HTTP root."""
            words = shlex.split(argv[-1])
            assert words[:4] == ["python3", HTTPD_PATH, "--root", HTTP_ROOT], words
            return subprocess.run([sys.executable, str(ROOT / "infra/provision/httpd.py"), "--root",
                                   str(host_root[host]), *words[4:]], input=stdin, capture_output=True,
                                  timeout=timeout, check=False)

        def rebuilt(name: str) -> RebuildReport:
            report = rebuild(site, plans.node(name), ref, record_dir=tmp / "fingerprints",
                             host_key=store.public_path(name), power_timeout=120,
                             progress=lambda m: print(m, flush=True),
                             arm=lambda: arm_install(site, node[name], store, run=on_provisioning_host))
            print(json.dumps(report.as_dict(), indent=1)[:8000])
            return report

        def run(name: str, cmd: str) -> str:
            res = ssh(site, node[name], cmd, timeout=60)
            assert res.returncode == 0, res.stderr
            return res.stdout.strip()

        # 1. Blank → validated, both nodes at once: the first install is a rebuild with no baseline.
        for n in (NODE, ISO_NODE):
            store.get(n.name)  # the key the node will have, made now (a real site's store is made at enrolment)
        with ThreadPoolExecutor(max_workers=2) as pool:
            first = dict(zip([NODE.name, ISO_NODE.name], pool.map(rebuilt, [NODE.name, ISO_NODE.name]), strict=True))
        for name, report in first.items():
            assert report.ok and report.failed_step == "" and report.baseline == "none", (name, report.message)
            assert [s["step"] for s in report.steps] == ["preflight", "fingerprint-before", "bmc-reimage",
                                                        "converge", "validate", "fingerprint-after"]
            assert report.drift == [], [d.as_dict() for d in report.drift]
            console = vm_site["consoles"][name].read_text(errors="replace")
            assert f"written bytes verified: sha256 {records[IMAGE].sha256}" in console
            assert len(json.loads(run(name, "cat /etc/gpufleet-lab/gpus.json"))["gpus"]) == 2  # from the image
        # The air-gapped node: its firewall is on, and it never sent a packet past its mirror.
        assert "gpufleet" in run(ISO_NODE.name, "nft list tables")

        # 2. Rebuild of the running connected node: identical, same key, known_hosts untouched, disk rewritten.
        run(NODE.name, "touch /root/written-after-install")
        known_before = known.read_bytes()
        second = rebuilt(NODE.name)
        assert second.ok and second.baseline == "live" and second.identical is True, second.message
        assert second.differences == [] and known.read_bytes() == known_before
        assert run(NODE.name, "ls /root/written-after-install 2>/dev/null || echo gone") == "gone"

        # 3. A driver change: converge reboots the node under the reboot policy; it comes back and validates.
        boot_before = run(NODE.name, "cat /proc/sys/kernel/random/boot_id")
        raw2 = copy.deepcopy(raw)
        raw2["profiles"]["vm"]["driver"]["version"] = SECOND_DRIVER
        raw2["profiles"]["vm"]["fabric_manager"]["version"] = SECOND_DRIVER
        _write_stack(stack_file, raw2)
        t0 = time.monotonic()
        conv = gpufleet(["converge", *ref.argv(), "--node", NODE.name, "--json"], timeout=3600)
        converge_s = time.monotonic() - t0
        assert conv.ok, conv.output
        assert run(NODE.name, "cat /proc/sys/kernel/random/boot_id") != boot_before
        val = gpufleet(["validate-node", *ref.argv(), "--node", NODE.name, "--json"], timeout=600)
        assert val.ok, val.output
        assert SECOND_DRIVER in run(NODE.name, "nvidia-smi --query-gpu=driver_version --format=csv,noheader")

        counts = _counted(NFT_TABLE)
        assert counts["mirror"] > 0 and counts["elsewhere"] == 0, counts
        print(json.dumps({
            "blank_to_validated_s": {k: round(v.seconds, 1) for k, v in first.items()},
            "rebuild_s": round(second.seconds, 1), "driver_change_converge_with_reboot_s": round(converge_s, 1),
            "steps_first": {k: v.steps for k, v in first.items()}, "steps_rebuild": second.steps,
            "air_gapped_packets": counts,
        }))
    finally:
        for p in reversed(procs):
            _stop(p)
