"""A blank VM node installed, then reinstalled, by the product's reimage — through a real Redfish BMC and firmware.

The VM node comes from infra/lab/vm.py: a libvirt `type='qemu'` domain (TCG) with a blank disk whose serial is
the stack's root-disk hint, its NIC on the throwaway bridge gpf-prov0, persistent boot order disk first, and
sushy-emulator's **libvirt driver** as its BMC. The provisioning side is the product's:

- the HTTP root is laid out by roles/provisioning's own script tasks (real ansible-playbook, local
  connection: the provisioning host is this machine here), and served by infra/provision/httpd.py started
  the way the role's unit starts it; dnsmasq runs the rendered configuration;
- the install is armed by `infra.provision.firstboot.arm_install` — the step `gpufleet bmc reimage` and
  `gpufleet rebuild` run first for an image node. Its SSH transport is the one stand-in: the command it would
  send to the provisioning host (`python3 provision_httpd.py --root … --arm <mac>`, first-boot data on stdin)
  runs locally, on the test's HTTP root;
- the reimage is `infra.bmc.lifecycle.reimage` (arm → power off → one-time PXE → power on → pin the key
  store's key → wait for SSH with it through `infra.dr.remote.wait_ssh` → disk back if "Once" was ignored),
  with gpufleet's own Redfish client.

It shows: a provisioning converge leaves the blank node unarmed; reimage installs it (image written and its
sha256 checked, boot from disk, SSH with the pinned store key, StrictHostKeyChecking=yes); a converge after the
install does not re-arm it; a second reimage rewrites the disk (a file written after the first install is
gone) and the node answers with the same key through a byte-identical known_hosts; every IP packet the node
sent went to the provisioning host's address or DHCP broadcast (nft bridge counters by the node's MAC).

Not shown here: converge and `validate-node` of the VM node, and the two-segment lab (issue 20, see
docs/bare-metal.md "What is NOT built yet"). Under the VM lock, with an image built outside it:
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
from collections.abc import Iterator
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
NODE = vm.VmNode(name="vm-node1", mac=KNOWN_MAC, bridge=BRIDGE, disk_serial="GPFROOT01")
NFT_TABLE = "gpf_vm_count"


def _need(cond: bool, why: str) -> None:
    if not cond:
        pytest.skip(why)


@contextlib.contextmanager
def _counters() -> Iterator[None]:
    """Bridge-level counters of the node's IP packets: to the provisioning host / broadcast, and to anything else."""
    subprocess.run(["nft", "delete", "table", "bridge", NFT_TABLE], capture_output=True, check=False)
    rules = f"""table bridge {NFT_TABLE} {{
  chain pre {{
    type filter hook prerouting priority 0; policy accept;
    ether saddr {KNOWN_MAC} ip daddr {{ {BRIDGE_ADDR}, 255.255.255.255 }} counter comment "provisioning"
    ether saddr {KNOWN_MAC} ip daddr != {{ {BRIDGE_ADDR}, 255.255.255.255 }} counter comment "elsewhere"
  }}
}}
"""
    subprocess.run(["nft", "-f", "-"], input=rules, text=True, check=True, capture_output=True)
    try:
        yield
    finally:
        subprocess.run(["nft", "delete", "table", "bridge", NFT_TABLE], capture_output=True, check=False)


def _counted() -> dict[str, int]:
    out = json.loads(subprocess.run(["nft", "-j", "list", "table", "bridge", NFT_TABLE], capture_output=True,
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


def test_blank_vm_node_is_installed_and_reinstalled_by_the_products_reimage(built_image: Path, tmp_path: Path) -> None:
    _need(os.geteuid() == 0, "needs root (bridge, libvirt, DHCP port 67)")
    _need(not vm.missing_tools(), f"missing host packages: {' '.join(vm.missing_tools())} (./scripts/setup.sh --test)")
    for tool in ("dnsmasq", "nft", "ssh"):
        _need(shutil.which(tool) is not None, f"{tool} is not installed (./scripts/setup.sh --test)")
    _need(subprocess.run(["/usr/bin/python3", "-c", "import libvirt"], capture_output=True).returncode == 0,
          "Debian's python3-libvirt is not installed (./scripts/setup.sh --test)")
    vm.sushy_exe()

    admin = tmp_path / "admin"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(admin)], check=True)
    (tmp_path / "ssh_config").write_text(f"Host *\n  IdentityFile {admin}\n  IdentitiesOnly yes\n")
    known = tmp_path / "known_hosts"
    http_root = tmp_path / "http"
    for rel in (f"images/{IMAGE}.img", "deploy/vmlinuz", "deploy/initrd.img"):
        (http_root / rel).parent.mkdir(parents=True, exist_ok=True)
        os.link(built_image / rel, http_root / rel)
    records = image_records(built_image)
    store = HostKeyStore(tmp_path / "keys")
    mac = KNOWN_MAC.replace(":", "-")
    live = http_root / "ipxe" / f"{mac}.ipxe"
    procs: list[subprocess.Popen[bytes]] = []
    work = tmp_path / "vm"
    work.mkdir()

    with _bridge(), _counters(), vm.libvirt(work), vm.nodes(work, [NODE]) as consoles, vm.bmc(work, [NODE]) as url:
        console = consoles[NODE.name]
        assert vm.boot_order(NODE.name) == "hd"  # the persistent order of a server set up as docs/bare-metal.md says
        try:
            port = vm.free_port(BRIDGE_ADDR)
            raw = _stack(port)
            raw["nodes"][0] |= {  # type: ignore[index]
                "image": IMAGE, "root_disk": {"serial": NODE.disk_serial}, "boot_mode": "bios",
                "bmc": {"endpoint": url, "system_id": NODE.uuid, "username": "admin",
                        "password": {"file": str(tmp_path / "bmc-password")}},
            }  # fmt: skip
            raw["admin_keys"] = [(tmp_path / "admin.pub").read_text().strip()]
            raw["controller"] = {"ssh_config": str(tmp_path / "ssh_config"), "known_hosts": str(known)}
            site = parse_site(raw)
            node = site.nodes[0]
            (svc,) = render_site(site, tftp_root=str(tmp_path), lease_file=str(tmp_path / "leases"), images=records)

            # The provisioning host, as roles/provisioning sets it up: scripts (never arming), server, DHCP.
            converge_scripts(tmp_path, http_root, svc.http_files)
            assert live.read_text() == svc.http_files[f"ipxe/local/{mac}.ipxe"]  # blank, but not armed
            procs.append(subprocess.Popen(
                [sys.executable, str(ROOT / "infra/provision/httpd.py"), "--root", str(http_root), "--bind",
                 BRIDGE_ADDR, "--port", str(port)],
                stdout=subprocess.DEVNULL, stderr=(tmp_path / "httpd.log").open("wb"),
            ))  # fmt: skip
            (tmp_path / "dnsmasq.conf").write_text(svc.dnsmasq_conf)
            log = tmp_path / "dnsmasq.log"
            procs.append(_dnsmasq(tmp_path / "dnsmasq.conf", log))
            assert _wait(lambda: log.exists() and "static leases only" in log.read_text(), 15)

            def on_provisioning_host(argv: list[str], *, host: str, stdin: bytes,
                                     timeout: float) -> subprocess.CompletedProcess[bytes]:
                """The SSH transport's stand-in: the remote command arm_install sends, run here on the test's root."""
                words = shlex.split(argv[-1])
                assert words[:4] == ["python3", HTTPD_PATH, "--root", HTTP_ROOT], words
                local = [sys.executable, str(ROOT / "infra/provision/httpd.py"), "--root", str(http_root), *words[4:]]
                return subprocess.run(local, input=stdin, capture_output=True, timeout=timeout, check=False)

            def booted() -> str:
                """What rebuild's host-key step does for an image node: pin the store's key, wait for SSH with it."""
                pinned = pin_key(known, node, *parse_public_key(store.get(node.hostname).public))
                wait_ssh(site, node, timeout=600)
                return pinned

            def run(cmd: str) -> str:
                res = ssh(site, node, cmd, timeout=60)
                assert res.returncode == 0, res.stderr
                return res.stdout

            def install(since: int) -> tuple[str, float]:
                with RedfishClient(url, "", "", system_id=NODE.uuid, verify=False) as bmc:
                    result = reimage(bmc, arm=lambda: arm_install(site, node, store, run=on_provisioning_host),
                                     booted=booted, power_timeout=120)
                text = _console(console)[since:]
                assert "gpufleet-deploy: deploy of vm-node1 done" in text, text[-4000:]
                assert f"written bytes verified: sha256 {records[IMAGE].sha256}" in text
                # The libvirt driver keeps PXE (it has no "Once"): the reimage put the disk back first.
                assert result.once_ignored and result.restored is not None and vm.boot_order(NODE.name) == "hd"
                return text, result.seconds

            # 1. Blank node → installed.
            text, first_s = install(0)
            assert "root disk: /dev/vda (hint serial:GPFROOT01)" in text
            assert run("hostname; touch /root/written-after-install").split() == ["vm-node1"]
            known_before = known.read_bytes()
            assert parse_public_key(known_before.decode()) == parse_public_key(store.get(node.hostname).public)
            # A provisioning converge after the install does not re-arm it (done switched it to the disk).
            converge_scripts(tmp_path, http_root, svc.http_files)
            assert live.read_text() == svc.http_files[f"ipxe/local/{mac}.ipxe"]
            assert not (http_root / "firstboot" / f"{mac}.tar.gz").exists()

            # 2. Reimage (the rebuild path): disk rewritten, same key, known_hosts unchanged.
            _, second_s = install(len(_console(console)))
            assert run("hostname; ls /root/written-after-install 2>/dev/null || echo gone").split() == [
                "vm-node1", "gone"]
            assert known.read_bytes() == known_before

            counts = _counted()
            assert counts["provisioning"] > 0 and counts["elsewhere"] == 0, counts
            print(json.dumps({"blank_to_ssh_s": round(first_s, 1), "reimage_to_ssh_s": round(second_s, 1),
                              "packets": counts}))
        finally:
            for p in reversed(procs):
                _stop(p)
    assert not Path(f"/sys/class/net/{BRIDGE}").exists()
