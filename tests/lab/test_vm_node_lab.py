"""Blank VM nodes on a connected and an air-gapped segment, installed (and one reinstalled) by the product's reimage.

Each VM node comes from infra/lab/vm.py: a libvirt `type='qemu'` domain (TCG) with a blank disk whose serial is
the stack's root-disk hint, its NIC on its segment's throwaway bridge (`gpf-prov0` connected, `gpf-iso0`
air-gapped, 198.18.9.0/24 and 198.18.10.0/24), persistent boot order disk first, and sushy-emulator's
**libvirt driver** as its BMC. The provisioning side is the product's, once per segment (the air-gapped one
served by its mirror, as the model demands):

- the HTTP root is laid out by roles/provisioning's own script tasks (real ansible-playbook, local
  connection: both provisioning hosts are this machine, on each bridge's address), and served by
  infra/provision/httpd.py started the way the role's unit starts it; dnsmasq runs each rendered configuration;
- the install is armed by `infra.provision.firstboot.arm_install` — the step `gpufleet bmc reimage` and
  `gpufleet rebuild` run first for an image node. Its SSH transport is the one stand-in: the command it would
  send to the segment's provisioning host (`python3 provision_httpd.py --root … --arm <mac>`, first-boot data
  on stdin) runs locally, on that segment's HTTP root;
- the reimage is `infra.bmc.lifecycle.reimage` (arm → power off → one-time PXE → power on → pin the key
  store's key → wait for SSH with it through `infra.dr.remote.wait_ssh` → disk back if "Once" was ignored),
  with gpufleet's own Redfish client. Both nodes install at the same time.

It shows: a provisioning converge leaves blank nodes unarmed; reimage installs each (image written and its
sha256 checked, boot from disk, SSH with the pinned store key, StrictHostKeyChecking=yes); a converge after the
install does not re-arm; a second reimage of the connected node rewrites its disk (a file written after the
first install is gone) and it answers with the same key through a byte-identical known_hosts; every IPv4
packet each node sent went to its own segment's provisioning host or the DHCP broadcast (nft bridge counters
by MAC), and the connected segment's dnsmasq never heard the air-gapped node.

Not shown here: converge and `validate-node` of a VM node, VM nodes in a lab stack (docs/bare-metal.md,
"What is NOT built yet"). Under the VM lock, with an image built outside it:
`GPUFLEET_IMAGE_OUT=DIR flock /tmp/gpufleet-vm.lock pytest -m lab -s tests/lab/test_vm_node_lab.py`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from infra.bmc.lifecycle import reimage
from infra.bmc.redfish import RedfishClient
from infra.commands.provision import image_records
from infra.dr.remote import ssh, wait_ssh
from infra.hostkeys import parse_public_key, pin_key
from infra.lab import vm
from infra.model.load import parse_site
from infra.provision.firstboot import HostKeyStore, arm_install
from infra.provision.render import HTTP_ROOT, HTTPD_PATH, render_site
from tests.lab.image_fixtures import IMAGE, built_image
from tests.lab.test_provision_vm import BRIDGE, BRIDGE_ADDR, KNOWN_MAC, _bridge, _dnsmasq, _stack, _stop, _wait
from tests.unit.test_provision_arming import converge_scripts

pytestmark = pytest.mark.lab
__all__ = ["built_image"]  # the fixture, re-exported for pytest

ROOT = Path(__file__).resolve().parents[2]
ISO_BRIDGE, ISO_ADDR = "gpf-iso0", "198.18.10.1"
NODE = vm.VmNode(name="vm-node1", mac=KNOWN_MAC, bridge=BRIDGE, disk_serial="GPFROOT01")
ISO_NODE = vm.VmNode(name="vm-node3", mac="52:54:00:9a:00:31", bridge=ISO_BRIDGE, disk_serial="GPFROOT03")
#: Each node's segment provisioning host address (the only unicast destination its traffic may have).
PROV_ADDR = {NODE.name: BRIDGE_ADDR, ISO_NODE.name: ISO_ADDR}
NFT_TABLE = "gpf_vm_count"


def _need(cond: bool, why: str) -> None:
    if not cond:
        pytest.skip(why)


def need_vm_host(*tools: str) -> None:
    """Skip unless root with libvirt/QEMU, sushy-tools, Debian's python3-libvirt and `tools`."""
    _need(os.geteuid() == 0, "needs root (bridges, libvirt, DHCP port 67)")
    _need(not vm.missing_tools(), f"missing host packages: {' '.join(vm.missing_tools())} (./scripts/setup.sh --test)")
    for tool in tools:
        _need(shutil.which(tool) is not None, f"{tool} is not installed (./scripts/setup.sh --test)")
    _need(subprocess.run(["/usr/bin/python3", "-c", "import libvirt"], capture_output=True).returncode == 0,
          "Debian's python3-libvirt is not installed (./scripts/setup.sh --test)")
    vm.sushy_exe()


def admin_ssh(tmp: Path) -> None:
    """An administrator key (tmp/admin, tmp/admin.pub) and the ssh_config the test stacks name."""
    admin = tmp / "admin"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(admin)], check=True)
    (tmp / "ssh_config").write_text(f"Host *\n  IdentityFile {admin}\n  IdentitiesOnly yes\n")


@contextlib.contextmanager
def _iso_bridge() -> Iterator[None]:
    """The air-gapped segment's bridge: no route, no forwarding; only its mirror (this machine) on it."""
    subprocess.run(["ip", "link", "del", ISO_BRIDGE], capture_output=True, check=False)  # a crashed earlier run
    try:
        for cmd in (["link", "add", ISO_BRIDGE, "type", "bridge"], ["addr", "add", f"{ISO_ADDR}/24", "dev", ISO_BRIDGE],
                    ["link", "set", ISO_BRIDGE, "up"]):
            subprocess.run(["ip", *cmd], check=True, capture_output=True)
        yield
    finally:
        subprocess.run(["ip", "link", "del", ISO_BRIDGE], capture_output=True, check=False)


@contextlib.contextmanager
def _counters() -> Iterator[None]:
    """Bridge-level counters of each node's IPv4 packets: to its provisioning host / broadcast, and elsewhere."""
    subprocess.run(["nft", "delete", "table", "bridge", NFT_TABLE], capture_output=True, check=False)
    rules = [f"table bridge {NFT_TABLE} {{", "  chain pre {",
             "    type filter hook prerouting priority 0; policy accept;"]
    for n in (NODE, ISO_NODE):
        ok = f"{{ {PROV_ADDR[n.name]}, 255.255.255.255 }}"
        rules += [f'    ether saddr {n.mac} ip daddr {ok} counter comment "{n.name} provisioning"',
                  f'    ether saddr {n.mac} ip daddr != {ok} counter comment "{n.name} elsewhere"']
    rules += ["  }", "}", ""]
    subprocess.run(["nft", "-f", "-"], input="\n".join(rules), text=True, check=True, capture_output=True)
    try:
        yield
    finally:
        subprocess.run(["nft", "delete", "table", "bridge", NFT_TABLE], capture_output=True, check=False)


def _counted(table: str = NFT_TABLE) -> dict[str, int]:
    """Packets per counter comment of an nft bridge table."""
    out = json.loads(subprocess.run(["nft", "-j", "list", "table", "bridge", table], capture_output=True,
                                    text=True, check=True).stdout)
    counts = {}
    for item in out["nftables"]:
        rule = item.get("rule")
        if rule:
            counter = next(e["counter"] for e in rule["expr"] if "counter" in e)
            counts[rule["comment"]] = int(counter["packets"])
    return counts


def _console(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _site(ports: dict[str, int], bmc_url: str, tmp: Path) -> dict[str, object]:
    """test_provision_vm's site (connected segment `prov`) plus an air-gapped segment `iso` served by its mirror."""
    raw = _stack(ports["prov"])
    bmc = {"endpoint": bmc_url, "username": "admin", "password": {"file": str(tmp / "bmc-password")}}
    image = {"image": IMAGE, "boot_mode": "bios"}
    nodes: list[dict[str, object]] = raw["nodes"]  # type: ignore[assignment]
    nodes[0] |= image | {"root_disk": {"serial": NODE.disk_serial}, "bmc": bmc | {"system_id": NODE.uuid}}
    nodes.append(nodes[0] | {
        "hostname": ISO_NODE.name, "segment": "iso", "address": "198.18.10.21", "macs": [ISO_NODE.mac],
        "root_disk": {"serial": ISO_NODE.disk_serial}, "bmc": bmc | {"system_id": ISO_NODE.uuid},
    })  # fmt: skip
    raw["segments"].append({  # type: ignore[attr-defined]
        "name": "iso", "cidr": "198.18.10.0/24", "airgapped": True, "mirror": "gpf-mirror",
        "egress_allow": [f"{ISO_ADDR}/32"],
        "provisioning": {"host": "gpf-mirror", "mode": "dhcp", "http_port": ports["iso"]},
    })  # fmt: skip
    raw["mirrors"] = [{"name": "gpf-mirror", "segment": "iso", "address": ISO_ADDR,
                       "keyring": "/etc/gpufleet/keys/gpf-mirror.gpg"}]
    raw["admin_keys"] = [(tmp / "admin.pub").read_text().strip()]
    raw["controller"] = {"ssh_config": str(tmp / "ssh_config"), "known_hosts": str(tmp / "known_hosts")}
    return raw


def test_blank_vm_nodes_on_both_segments_are_installed_by_the_products_reimage(
    built_image: Path, tmp_path: Path
) -> None:
    need_vm_host("dnsmasq", "nft", "ssh")
    admin_ssh(tmp_path)
    known = tmp_path / "known_hosts"
    records = image_records(built_image)
    store = HostKeyStore(tmp_path / "keys")
    roots = {seg: tmp_path / f"http-{seg}" for seg in ("prov", "iso")}
    for root in roots.values():
        for rel in (f"images/{IMAGE}.img", "deploy/vmlinuz", "deploy/initrd.img"):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            os.link(built_image / rel, root / rel)
    procs: list[subprocess.Popen[bytes]] = []
    work = tmp_path / "vm"
    work.mkdir()
    vms = [NODE, ISO_NODE]

    with _bridge(), _iso_bridge(), _counters(), vm.libvirt(work), vm.nodes(work, vms) as consoles, \
            vm.bmc(work, vms) as url:
        assert {vm.boot_order(n.name) for n in vms} == {"hd"}  # servers set up as docs/bare-metal.md says
        try:
            ports = {"prov": vm.free_port(BRIDGE_ADDR), "iso": vm.free_port(ISO_ADDR)}
            site = parse_site(_site(ports, url, tmp_path))
            node = {n.hostname: n for n in site.nodes}
            services = {svc.segment: svc for svc in render_site(
                site, tftp_root=str(tmp_path), lease_file=str(tmp_path / "leases"), images=records)}
            segment_of = {NODE.name: "prov", ISO_NODE.name: "iso"}
            host_root = {services[seg].host: roots[seg] for seg in roots}

            def live(name: str) -> Path:
                return roots[segment_of[name]] / "ipxe" / f"{node[name].macs[0].replace(':', '-')}.ipxe"

            def local_script(name: str) -> str:
                mac = node[name].macs[0].replace(":", "-")
                return services[segment_of[name]].http_files[f"ipxe/local/{mac}.ipxe"]

            # Each provisioning host, as roles/provisioning sets it up: scripts (never arming), server, DHCP.
            logs = {}
            for seg, svc in services.items():
                converge_scripts(tmp_path, roots[seg], svc.http_files)
                procs.append(subprocess.Popen(
                    [sys.executable, str(ROOT / "infra/provision/httpd.py"), "--root", str(roots[seg]), "--bind",
                     str(svc.address), "--port", str(svc.http_port)],
                    stdout=subprocess.DEVNULL, stderr=(tmp_path / f"httpd-{seg}.log").open("wb"),
                ))  # fmt: skip
                (tmp_path / f"dnsmasq-{seg}.conf").write_text(
                    svc.dnsmasq_conf.replace(str(tmp_path / "leases"), str(tmp_path / f"leases-{seg}")))
                logs[seg] = tmp_path / f"dnsmasq-{seg}.log"
                procs.append(_dnsmasq(tmp_path / f"dnsmasq-{seg}.conf", logs[seg]))
            for log in logs.values():
                assert _wait(lambda log=log: log.exists() and "static leases only" in log.read_text(), 15)
            assert all(live(n.name).read_text() == local_script(n.name) for n in vms)  # blank, but not armed

            def on_provisioning_host(argv: list[str], *, host: str, stdin: bytes,
                                     timeout: float) -> subprocess.CompletedProcess[bytes]:
                """The SSH transport's stand-in: arm_install's remote command, run here on that host's root."""
                words = shlex.split(argv[-1])
                assert words[:4] == ["python3", HTTPD_PATH, "--root", HTTP_ROOT], words
                local = [sys.executable, str(ROOT / "infra/provision/httpd.py"), "--root", str(host_root[host]),
                         *words[4:]]
                return subprocess.run(local, input=stdin, capture_output=True, timeout=timeout, check=False)

            pin_lock = threading.Lock()

            def install(name: str, since: int) -> float:
                n = node[name]

                def booted() -> str:
                    """Rebuild's host-key step for an image node: pin the store's key, wait for SSH with it."""
                    with pin_lock:  # both nodes share the stack's known_hosts
                        pinned = pin_key(known, n, *parse_public_key(store.get(name).public))
                    wait_ssh(site, n, timeout=600)
                    return pinned

                uuid = NODE.uuid if name == NODE.name else ISO_NODE.uuid
                with RedfishClient(url, "", "", system_id=uuid, verify=False) as bmc:
                    result = reimage(bmc, arm=lambda: arm_install(site, n, store, run=on_provisioning_host),
                                     booted=booted, power_timeout=120)
                text = _console(consoles[name])[since:]
                assert f"gpufleet-deploy: deploy of {name} done" in text, text[-4000:]
                assert f"written bytes verified: sha256 {records[IMAGE].sha256}" in text
                # The libvirt driver keeps PXE (it has no "Once"): the reimage put the disk back first.
                assert result.once_ignored and result.restored is not None and vm.boot_order(name) == "hd"
                return result.seconds

            def run(name: str, cmd: str) -> str:
                res = ssh(site, node[name], cmd, timeout=60)
                assert res.returncode == 0, res.stderr
                return res.stdout

            # 1. Both blank nodes → installed, at the same time.
            with ThreadPoolExecutor(max_workers=2) as pool:
                first = dict(zip([n.name for n in vms], pool.map(lambda n: install(n.name, 0), vms), strict=True))
            for n in vms:
                assert run(n.name, "hostname; touch /root/written-after-install").split() == [n.name]
            known_before = known.read_bytes()
            pinned = {tuple(line.split()[1:3]) for line in known_before.decode().splitlines()}
            assert pinned == {parse_public_key(store.get(n.name).public) for n in vms}
            # A provisioning converge after the install does not re-arm (done switched each node to its disk).
            for seg, svc in services.items():
                converge_scripts(tmp_path, roots[seg], svc.http_files)
            assert all(live(n.name).read_text() == local_script(n.name) for n in vms)
            assert [f for r in roots.values() for f in (r / "firstboot").glob("*.tar.gz")] == []

            # 2. Reimage of the connected node (the rebuild path): disk rewritten, same key, known_hosts unchanged.
            second = install(NODE.name, len(_console(consoles[NODE.name])))
            assert run(NODE.name, "hostname; ls /root/written-after-install 2>/dev/null || echo gone").split() == [
                NODE.name, "gone"]
            assert run(ISO_NODE.name, "ls /root/written-after-install").strip() == "/root/written-after-install"
            assert known.read_bytes() == known_before

            # 3. Each node's provisioning traffic reached only its own segment's provisioning host.
            counts = _counted()
            for n in vms:
                assert counts[f"{n.name} provisioning"] > 0 and counts[f"{n.name} elsewhere"] == 0, counts
            assert ISO_NODE.mac not in logs["prov"].read_text() and NODE.mac not in logs["iso"].read_text()
            assert f"DHCPACK({ISO_BRIDGE}) 198.18.10.21 {ISO_NODE.mac}" in logs["iso"].read_text()
            print(json.dumps({"blank_to_ssh_s": {k: round(v, 1) for k, v in first.items()},
                              "reimage_to_ssh_s": round(second, 1), "packets": counts}))
        finally:
            for p in reversed(procs):
                _stop(p)
    assert not Path(f"/sys/class/net/{BRIDGE}").exists() and not Path(f"/sys/class/net/{ISO_BRIDGE}").exists()
