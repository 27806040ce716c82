"""A blank VM node to validated through `rebuild`, rebuilt the same, then a driver change with a real reboot.

One libvirt/QEMU (TCG) node on the connected throwaway segment (`gpf-prov0`, 198.18.9.0/24), behind sushy-tools'
libvirt BMC (infra/lab/vm.py), with the lab stack's GPU profile and nothing lab-mode about it: its image is
the product's (`gpufleet image build`) plus one clearly labelled lab package (`vm.declarations`: the
capabilities fact "no NVIDIA module can load" and its simulated GPUs, so a reinstall keeps them), and its
packages come from a signed flat repository the segment's `sources` name — the lab's own repository content
(Debian packages the lab seeds, NVIDIA stand-ins), served from this machine on the bridge.

The provisioning side is the one of tests/lab/test_vm_node_lab.py (this machine plays the segment's
provisioning host; arming's SSH transport is the one stand-in). Everything else is the product:

1. `infra.dr.rebuild.rebuild` — what `gpufleet rebuild` runs — takes the **blank** node to validated: no
   baseline (node down), arm → BMC one-time PXE → image written and checked → disk → SSH with the key store's
   pinned key → `gpufleet converge` → `gpufleet validate-node` (both as CLI subprocesses) → fingerprint;
2. a second rebuild of the running node: baseline live, fingerprint identical, same host key, known_hosts
   byte-identical, a file written in between is gone (the disk was rewritten);
3. a driver change in the stack (570.133.20 → 570.124.06, a downgrade: the pinned packages change, so the
   driver needs a reboot) and `gpufleet converge`: the nvidia_driver role reboots the VM under the stack's
   reboot policy (`if-required`; the VM declares it can reboot), the node comes back with a new boot id, and
   `validate-node` passes with the new driver.

Under the VM lock (the image build runs inside it, ~3 min; GPUFLEET_VM_IMAGE_OUT reuses a build):
`flock /tmp/gpufleet-vm.lock pytest -m lab -s tests/lab/test_vm_converge_lab.py`.
"""

from __future__ import annotations

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
from infra.lab import repo, rootfs, standins, vm
from infra.lab.config import Paths, lab_spec
from infra.model.load import load_site
from infra.plan.node import plan_site
from infra.provision.firstboot import HostKeyStore, arm_install
from infra.provision.image import DEFAULT_PACKAGES
from infra.provision.render import HTTP_ROOT, HTTPD_PATH, render_site
from tests.lab.image_fixtures import REPO, make_repo, need_build_tools
from tests.lab.test_provision_vm import BRIDGE, BRIDGE_ADDR, CIDR, KNOWN_MAC, _bridge, _dnsmasq, _stop, _wait
from tests.unit.test_provision_arming import converge_scripts

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[2]
LAB_STACK = ROOT / "stacks" / "Pulumi.lab.yaml"
IMAGE = "debian-12-vmnode"
NODE = vm.VmNode(name="vm-gpu01", mac=KNOWN_MAC, bridge=BRIDGE, disk_serial="GPFROOT21", memory_mib=1536)
ADDRESS = "198.18.9.21"
FIRST_DRIVER, SECOND_DRIVER = "570.133.20", "570.124.06"
#: The image: the product's default set, the lab base every nspawn node has (so the lab repository's seed
#: closure fits), and the lab declarations.
IMAGE_PACKAGES = tuple(dict.fromkeys([*DEFAULT_PACKAGES, *rootfs.BASE_PACKAGES]))


def _need(cond: bool, why: str) -> None:
    if not cond:
        pytest.skip(why)


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def _serve(root: Path, port: int) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer((BRIDGE_ADDR, port), partial(_Quiet, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _node_repo(tmp: Path) -> tuple[Path, Path]:
    """The lab's repository content (seed Debian packages + stand-ins), signed with a key of its own."""
    paths = Paths.from_env()
    key, _ = rootfs.ensure_rootfs(paths, rootfs.seed_package_specs(lab_spec("lab", LAB_STACK)))
    debs = sorted([*rootfs.seed_debs_path(paths, key).glob("*.deb"),
                   *standins.ensure_standins(paths.standins_dir).glob("*.deb")])
    srv, keyring = tmp / "srv", tmp / "keys" / "vm-repo.gpg"
    repo.seed_repo("vm-repo", srv, debs, tmp / "gnupg", keyring)
    return srv, keyring


def _image(site_raw: dict[str, Any], tmp: Path) -> Path:
    """`gpufleet image build` of the VM image from the image repository plus the declarations package."""
    given = os.environ.get("GPUFLEET_VM_IMAGE_OUT")
    if given:
        return Path(given)
    need_build_tools()
    make_repo(IMAGE_PACKAGES)
    merged = tmp / "image-repo"
    (merged / "pool").mkdir(parents=True)
    for deb in (REPO / "pool").glob("*.deb"):
        os.link(deb, merged / "pool" / deb.name)
    site = load_site(path=_write_stack(tmp / "decl.yaml", site_raw))
    vm.declarations_deb(site, [NODE.name], merged / "pool", tmp / "decl-work")
    index = subprocess.run(["dpkg-scanpackages", "--multiversion", "pool"], cwd=merged, check=True,
                           capture_output=True, timeout=300).stdout
    (merged / "Packages").write_bytes(index)
    out = tmp / "image"
    res = subprocess.run(
        [shutil.which("gpufleet") or "gpufleet", "image", "build", IMAGE, "--repo", f"copy://{merged}",
         "--out", str(out), "--packages", ",".join([*IMAGE_PACKAGES, vm.DECLARATIONS_PACKAGE])],
        capture_output=True, text=True, timeout=1800, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    print(res.stdout)
    return out


def _site_raw(tmp: Path, *, driver: str, repo_port: int, http_port: int, bmc_url: str, keyring: Path) -> dict[str, Any]:
    """A one-node site: the lab stack's GPU profile (its driver replaced), the VM node, the repository."""
    lab = yaml.safe_load(LAB_STACK.read_text(encoding="utf-8"))["config"]["gpufleet:site"]
    profile = copy.deepcopy(lab["profiles"][lab["default_profile"]])
    profile["driver"]["version"] = driver
    profile["fabric_manager"]["version"] = driver
    return {
        "name": "vmlab",
        "reboot": {"policy": "if-required", "timeout_s": 600},
        "rollout": {"batch_size": 1, "max_failures": 0},
        "default_profile": "vm",
        "profiles": {"vm": profile},
        "segments": [{
            "name": "prov", "cidr": CIDR,
            "sources": [{"name": "vm-repo", "url": f"http://{BRIDGE_ADDR}:{repo_port}/apt", "suite": "/",
                         "keyring": str(keyring)}],
            "provisioning": {"host": "gpf-prov", "address": BRIDGE_ADDR, "mode": "dhcp", "http_port": http_port},
        }],
        "nodes": [{
            "hostname": NODE.name, "segment": "prov", "address": ADDRESS, "macs": [NODE.mac], "os": "debian-12",
            "gpu": {"model": "L4", "count": 2}, "image": IMAGE, "boot_mode": "bios",
            "root_disk": {"serial": NODE.disk_serial},
            "bmc": {"endpoint": bmc_url, "system_id": NODE.uuid, "username": "admin",
                    "password": {"file": str(tmp / "bmc-password")}},
        }],
        "admin_keys": [(tmp / "admin.pub").read_text(encoding="utf-8").strip()],
        "controller": {"ssh_config": str(tmp / "ssh_config"), "known_hosts": str(tmp / "known_hosts")},
    }  # fmt: skip


def _write_stack(path: Path, raw: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump({"config": {"gpufleet:site": raw}}, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture
def vm_site(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """Bridge, repository server, image, libvirt, the VM node and its BMC: everything but the provisioning host."""
    _need(os.geteuid() == 0, "needs root (bridges, libvirt, DHCP port 67)")
    _need(not vm.missing_tools(), f"missing host packages: {' '.join(vm.missing_tools())} (./scripts/setup.sh --test)")
    for tool in ("dnsmasq", "ssh", "dpkg-scanpackages", "gpg"):
        _need(shutil.which(tool) is not None, f"{tool} is not installed (./scripts/setup.sh --test)")
    _need(subprocess.run(["/usr/bin/python3", "-c", "import libvirt"], capture_output=True).returncode == 0,
          "Debian's python3-libvirt is not installed (./scripts/setup.sh --test)")
    vm.sushy_exe()
    admin = tmp_path / "admin"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(admin)], check=True)
    (tmp_path / "ssh_config").write_text(f"Host *\n  IdentityFile {admin}\n  IdentitiesOnly yes\n")
    (tmp_path / "bmc-password").write_text("lab\n")
    srv, keyring = _node_repo(tmp_path)
    work = tmp_path / "vm"
    work.mkdir()
    with _bridge():
        ports = {"repo": vm.free_port(BRIDGE_ADDR), "http": vm.free_port(BRIDGE_ADDR)}
        raw = _site_raw(tmp_path, driver=FIRST_DRIVER, repo_port=ports["repo"], http_port=ports["http"],
                        bmc_url="http://127.0.0.1:1", keyring=keyring)
        image = _image(raw, tmp_path)
        server = _serve(srv, ports["repo"])
        try:
            with vm.libvirt(work), vm.nodes(work, [NODE]) as consoles, vm.bmc(work, [NODE]) as url:
                raw["nodes"][0]["bmc"]["endpoint"] = url
                yield {"raw": raw, "image": image, "console": consoles[NODE.name], "tmp": tmp_path}
        finally:
            server.shutdown()
            server.server_close()


def test_blank_vm_node_to_validated_then_rebuilt_the_same_then_rebooted_for_a_driver(
    vm_site: dict[str, Any],
) -> None:
    tmp: Path = vm_site["tmp"]
    raw: dict[str, Any] = vm_site["raw"]
    stack_file = _write_stack(tmp / "Pulumi.vmlab.yaml", raw)
    site = load_site(path=stack_file)
    node = site.nodes[0]
    plan = plan_site(site).node(NODE.name)
    ref = StackRef(None, stack_file)
    records = image_records(vm_site["image"])
    store = HostKeyStore(tmp / "keys-store")
    known = tmp / "known_hosts"

    # The segment's provisioning host, as roles/provisioning sets it up (this machine): HTTP root, server, DHCP.
    http_root = tmp / "http"
    for rel in (f"images/{IMAGE}.img", "deploy/vmlinuz", "deploy/initrd.img"):
        (http_root / rel).parent.mkdir(parents=True, exist_ok=True)
        os.link(vm_site["image"] / rel, http_root / rel)
    svc = render_site(site, tftp_root=str(tmp), lease_file=str(tmp / "leases"), images=records)[0]
    converge_scripts(tmp, http_root, svc.http_files)
    procs = [subprocess.Popen(
        [sys.executable, str(ROOT / "infra/provision/httpd.py"), "--root", str(http_root), "--bind",
         str(svc.address), "--port", str(svc.http_port)],
        stdout=subprocess.DEVNULL, stderr=(tmp / "httpd.log").open("wb"))]  # fmt: skip
    (tmp / "dnsmasq.conf").write_text(svc.dnsmasq_conf)
    procs.append(_dnsmasq(tmp / "dnsmasq.conf", tmp / "dnsmasq.log"))
    try:
        assert _wait(lambda: (tmp / "dnsmasq.log").exists() and "static leases only" in
                     (tmp / "dnsmasq.log").read_text(), 15)

        def on_provisioning_host(argv: list[str], *, host: str, stdin: bytes,
                                 timeout: float) -> subprocess.CompletedProcess[bytes]:
            """arm_install's SSH transport, stand-in: its remote command, run here on the HTTP root."""
            words = shlex.split(argv[-1])
            assert words[:4] == ["python3", HTTPD_PATH, "--root", HTTP_ROOT], words
            return subprocess.run([sys.executable, str(ROOT / "infra/provision/httpd.py"), "--root",
                                   str(http_root), *words[4:]], input=stdin, capture_output=True,
                                  timeout=timeout, check=False)

        def rebuilt() -> RebuildReport:
            report = rebuild(site, plan, ref, record_dir=tmp / "fingerprints", host_key=store.public_path(NODE.name),
                             power_timeout=120, progress=lambda m: print(m, flush=True),
                             arm=lambda: arm_install(site, node, store, run=on_provisioning_host))
            print(json.dumps(report.as_dict(), indent=1)[:6000])
            return report

        def run(cmd: str) -> str:
            res = ssh(site, node, cmd, timeout=60)
            assert res.returncode == 0, res.stderr
            return res.stdout.strip()

        # 1. Blank → validated: the first install is a rebuild with no baseline.
        store.get(NODE.name)  # the key the node will have, made now (a real site's store is made at enrolment)
        first = rebuilt()
        assert first.ok and first.failed_step == "" and first.baseline == "none", first.message
        assert [s["step"] for s in first.steps] == ["preflight", "fingerprint-before", "bmc-reimage", "converge",
                                                   "validate", "fingerprint-after"]
        assert first.drift == [], [d.as_dict() for d in first.drift]
        console = vm_site["console"].read_text(errors="replace")
        assert f"written bytes verified: sha256 {records[IMAGE].sha256}" in console
        assert len(json.loads(run("cat /etc/gpufleet-lab/gpus.json"))["gpus"]) == 2  # declared at boot, from the image
        assert not run("ls /sys/firmware/efi 2>/dev/null || true")  # the stack's boot_mode: bios

        # 2. Rebuild of the running node: identical, same key, known_hosts untouched, the disk rewritten.
        run("touch /root/written-after-install")
        known_before = known.read_bytes()
        second = rebuilt()
        assert second.ok and second.baseline == "live" and second.identical is True, second.message
        assert second.differences == [] and known.read_bytes() == known_before
        assert run("ls /root/written-after-install 2>/dev/null || echo gone") == "gone"

        # 3. A driver change: converge reboots the node under the reboot policy; it comes back and validates.
        boot_before = run("cat /proc/sys/kernel/random/boot_id")
        raw2 = copy.deepcopy(raw)
        raw2["profiles"]["vm"]["driver"]["version"] = SECOND_DRIVER
        raw2["profiles"]["vm"]["fabric_manager"]["version"] = SECOND_DRIVER
        _write_stack(stack_file, raw2)
        t0 = time.monotonic()
        conv = gpufleet(["converge", *ref.argv(), "--node", NODE.name, "--json"], timeout=3600)
        converge_s = time.monotonic() - t0
        assert conv.ok, conv.output
        assert run("cat /proc/sys/kernel/random/boot_id") != boot_before
        val = gpufleet(["validate-node", *ref.argv(), "--node", NODE.name, "--json"], timeout=600)
        assert val.ok, val.output
        assert SECOND_DRIVER in run("nvidia-smi --query-gpu=driver_version --format=csv,noheader")
        print(json.dumps({"blank_to_validated_s": round(first.seconds, 1), "rebuild_s": round(second.seconds, 1),
                          "driver_change_converge_with_reboot_s": round(converge_s, 1),
                          "steps_first": first.steps, "steps_rebuild": second.steps}))
    finally:
        for p in reversed(procs):
            _stop(p)
