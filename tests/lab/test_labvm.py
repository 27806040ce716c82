"""VM nodes in a lab stack: `gpufleet lab up`, `provision converge` on nspawn hosts, `gpufleet rebuild` (the CLI).

The VM lab (tests/lab/data/Pulumi.labvm.yaml, its own state directory /var/lib/gpufleet/labvm beside the shared
lab) has two segments, each with one blank libvirt/QEMU VM node behind sushy-tools' libvirt BMC:

- `vmconn` (connected): packages from the outside world's signed repository (`sources`); provisioned from the
  nspawn **node** labvm-gpu01, which fetches the image from the outside world's file store (`files_url`);
- `vmgap` (air-gapped): provisioned from its nspawn **mirror** labvm-mirror, which fetches the image from its own
  file store and installs dnsmasq/iPXE from its own repository.

Everything between the stack and the validated node is the product, run as the operator runs it:

1. `gpufleet lab up --stack-file COPY` (the stack copied into a work directory, with the lab controller's public key
   as `admin_keys`: the VM nodes' first-boot data installs it for root) — nspawn hosts, bridges, both BMCs,
   libvirtd and the two domains with blank disks;
2. the image published on the serving hosts' file stores (where the lock's URLs point). The lock is the one
   `gpufleet image build --lock` wrote into a skeleton for the site: its `os_images` entry and `os-image` files are
   all that `validate`, `provision converge` and `rebuild` read from it (`gpufleet lock`, which would resolve the
   rest against the lab's repositories and keep the image, is not run: it is not needed and would cost the hold);
3. `gpufleet converge --node labvm-gpu01` (a node keeps the apt sources `base` manages), then `gpufleet provision
   converge`: roles/provisioning over SSH on labvm-gpu01 and labvm-mirror;
4. `gpufleet rebuild --node <vm> --yes` for both VM nodes at once: arms the install **over SSH on the segment's
   provisioning host**, BMC one-time PXE → SeaBIOS → iPXE → deploy ramdisk (image written and checked against the
   lock's sha256) → disk → SSH with the key store's pinned key → `converge` → `validate-node` → fingerprint;
   From its first DHCP request to validated, every IPv4 packet the air-gapped node sent went to its mirror (its
   provisioning host), the DHCP broadcast, or back to the controller's SSH sessions (nft bridge counters by MAC);
5. a second `gpufleet rebuild` of the installed connected node: fingerprint identical, same host key, known_hosts
   byte-identical, a file written in between is gone;
6. a driver change in the stack (570.133.20 → 570.124.06) and `gpufleet converge`: the VM reboots under the stack's
   `if-required` policy, comes back with a new boot id, and `validate-node` passes with the new driver.

The image (`gpufleet image build` of the product's package set, the lab node base's and `vm.declarations`) is built
before the lab comes up, into that lock skeleton; GPUFLEET_LABVM_IMAGE_DIR names the
directory of an earlier build (`out/` + `images.lock.json`) to reuse it — only when it was built by this checkout's
image code (`source.sha256`: a changed ramdisk or image build is rebuilt, never tested stale), e.g. built outside the
locks:

    .venv/bin/python -c 'from tests.lab.test_labvm import build_image; build_image()'
    GPUFLEET_LABVM_IMAGE_DIR=/var/cache/gpufleet/labvm-image \\
      flock /tmp/gpufleet-lab.lock flock /tmp/gpufleet-vm.lock .venv/bin/pytest -m lab -s tests/lab/test_labvm.py

Under both locks: the lab lock (nspawn hosts, shared caches) and the VM lock (libvirtd's /run/libvirt is global).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.bundle.lock import Lock, lock_path_for
from infra.lab import lab as lab_mod
from infra.lab import vm
from infra.lab.config import STATE_ENV, LabSpec, Paths, lab_spec
from infra.model.load import load_site, project_dir
from infra.provision.image import DEFAULT_PACKAGES
from tests.lab.image_fixtures import REPO, make_repo, need_build_tools
from tests.lab.labtools import installed_packages, lab_debs
from tests.lab.test_vm_node_lab import _counted, need_vm_host

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "tests" / "lab" / "data" / "Pulumi.labvm.yaml"
STATE = Path("/var/lib/gpufleet/labvm")
IMAGE_DIR = Path(os.environ.get("GPUFLEET_LABVM_IMAGE_DIR", "/var/cache/gpufleet/labvm-image"))
IMAGE = "debian-12-vmnode"
CONNECTED, AIRGAPPED = "labvm-vm01", "labvm-vm02"
PROVISIONING_NODE = "labvm-gpu01"
FIRST_DRIVER, SECOND_DRIVER = "570.133.20", "570.124.06"  # both among the lab's stand-ins (infra/lab/standins.py)
NFT_TABLE = "gpf_labvm_count"
STEPS = ["preflight", "fingerprint-before", "bmc-reimage", "converge", "validate", "fingerprint-after"]


def _env() -> dict[str, str]:
    return {**os.environ, STATE_ENV: str(STATE)}


def cli(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    """`gpufleet ARGS` with the VM lab's state directory."""
    return subprocess.run([sys.executable, "-m", "infra.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=project_dir(), env=_env(), check=False)


def build_image(dest: Path = IMAGE_DIR) -> Path:
    """`gpufleet image build` of the VM image into dest/out, recorded in dest/images.lock.json; returns dest.

    The package set is the product's, plus every package of the lab's node base (the lab's seed closure was
    computed against it), plus the clearly labelled declarations package for the stack's VM nodes. Its lock is a
    skeleton for the stack's site holding only the image (what the CLIs the test runs read from a lock).
    """
    need_build_tools()
    # lab_debs unpacks the lab's bases into the state dir it is given: this lab's, never the shared lab's (and the
    # variable is put back, so other lab tests of the session keep theirs).
    before = os.environ.get(STATE_ENV)
    os.environ[STATE_ENV] = str(STATE)
    try:
        _, base = lab_debs()
    finally:
        if before is None:
            del os.environ[STATE_ENV]
        else:
            os.environ[STATE_ENV] = before
    packages = list(dict.fromkeys([*DEFAULT_PACKAGES, *installed_packages(base / "var/lib/dpkg/status")]))
    make_repo(packages)
    merged = dest / "repo"
    shutil.rmtree(merged, ignore_errors=True)
    (merged / "pool").mkdir(parents=True)
    for deb in (REPO / "pool").glob("*.deb"):
        os.link(deb, merged / "pool" / deb.name)
    site = load_site(path=TEMPLATE)
    vm.declarations_deb(site, [CONNECTED, AIRGAPPED], merged / "pool", dest / "decl-work")
    index = subprocess.run(["dpkg-scanpackages", "--multiversion", "pool"], cwd=merged, check=True,
                           capture_output=True, timeout=300).stdout
    (merged / "Packages").write_bytes(index)
    lock = dest / "images.lock.json"
    lock.write_text(Lock(site=site.name, declared=[], artifacts=[]).to_json(), encoding="utf-8")
    shutil.rmtree(dest / "out", ignore_errors=True)
    res = subprocess.run(
        [sys.executable, "-m", "infra.cli", "image", "build", IMAGE, "--repo", f"copy://{merged}", "--out",
         str(dest / "out"), "--packages", ",".join([*packages, vm.DECLARATIONS_PACKAGE]), "--lock", str(lock),
         "--segment", "vmconn", "--segment", "vmgap"],
        capture_output=True, text=True, timeout=1800, cwd=project_dir(), check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    print(res.stdout)  # size and build time: reported, never asserted
    (dest / "source.sha256").write_text(_image_source_key(), encoding="utf-8")
    return dest


def _image_source_key() -> str:
    """sha256 over the code an image build runs (image build, deploy ramdisk, lab declarations, repository)."""
    files = sorted([*(ROOT / "infra" / "provision").glob("*.py"), *(ROOT / "infra" / "provision").glob("*.sh"),
                    ROOT / "infra" / "lab" / "vm.py", ROOT / "tests" / "lab" / "image_fixtures.py", Path(__file__)])
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.relative_to(ROOT).as_posix().encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()


def _image_current(dest: Path) -> bool:
    """An earlier build in dest that the code of this checkout would build again (else it is rebuilt)."""
    key = dest / "source.sha256"
    return ((dest / "images.lock.json").is_file() and (dest / "out").is_dir() and key.is_file()
            and key.read_text(encoding="utf-8") == _image_source_key())


def _stack_copy(work: Path, paths: Paths) -> Path:
    """The VM lab stack in `work`, with the lab controller's key as admin_keys (made per machine)."""
    raw = yaml.safe_load(TEMPLATE.read_text(encoding="utf-8"))
    raw["config"]["gpufleet:site"]["admin_keys"] = [lab_mod.controller_key(paths)]
    stack = work / "Pulumi.labvm.yaml"
    stack.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return stack


@contextlib.contextmanager
def _airgap_counters(spec: LabSpec) -> Iterator[None]:
    """Bridge-level counters of every IPv4 packet the air-gapped VM node sends, by where it goes.

    Allowed: its segment's mirror (also its provisioning host) and the DHCP broadcast; and the controller's SSH
    sessions (replies from port 22 to the lab host's address on the bridge, which is the site's management path).
    Anything else is counted as "elsewhere": the egress the air gap forbids.
    """
    node = next(n for n in spec.site.nodes if n.hostname == AIRGAPPED)
    mac = node.macs[0]
    mirror = next(m for m in spec.site.mirrors if m.segment == node.segment).address
    controller = spec.bridge(node.segment).address.ip
    ok = f"{{ {mirror}, 255.255.255.255 }}"
    rules = (f"table bridge {NFT_TABLE} {{\n  chain pre {{\n"
             "    type filter hook prerouting priority 0; policy accept;\n"
             f'    ether saddr {mac} ip daddr {ok} counter comment "mirror"\n'
             f'    ether saddr {mac} ip daddr {controller} tcp sport 22 counter comment "controller-ssh"\n'
             f'    ether saddr {mac} ip daddr != {{ {mirror}, 255.255.255.255, {controller} }} counter '
             'comment "elsewhere"\n'
             f'    ether saddr {mac} ip daddr {controller} tcp sport != 22 counter comment "controller-not-ssh"\n'
             f'    ether saddr {mac} ip daddr {controller} ip protocol != tcp counter comment "controller-not-tcp"\n'
             "  }\n}\n")
    subprocess.run(["nft", "delete", "table", "bridge", NFT_TABLE], capture_output=True, check=False)
    subprocess.run(["nft", "-f", "-"], input=rules, text=True, check=True, capture_output=True)
    try:
        yield
    finally:
        subprocess.run(["nft", "delete", "table", "bridge", NFT_TABLE], capture_output=True, check=False)


def _write_driver(stack: Path, version: str) -> None:
    """The stack copy with its profile's driver (and fabric manager, which must match it) at `version`."""
    raw = yaml.safe_load(stack.read_text(encoding="utf-8"))
    for profile in raw["config"]["gpufleet:site"]["profiles"].values():
        profile["driver"]["version"] = version
        profile["fabric_manager"]["version"] = version
    stack.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")


def _ok(p: subprocess.CompletedProcess[str], what: str) -> None:
    assert p.returncode == 0, f"{what}: exit {p.returncode}\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"


@pytest.fixture(scope="module")
def labvm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The VM lab up, its lock complete, the image published, both provisioning hosts converged."""
    need_vm_host("ssh", "nft", "dpkg-scanpackages", "gpg", "curl")
    try:
        lab_mod.check_prerequisites(install=True)
    except lab_mod.LabUnavailable as exc:
        pytest.skip(f"lab unavailable: {exc}")
    paths = Paths(state=STATE)
    images = IMAGE_DIR if _image_current(IMAGE_DIR) else None
    t0 = time.monotonic()
    images = images or build_image()
    timings = {"image_build_s": round(time.monotonic() - t0, 1)}
    work = tmp_path_factory.mktemp("labvm")
    stack = _stack_copy(work, paths)
    shutil.copyfile(images / "images.lock.json", lock_path_for(stack))
    spec = lab_spec("labvm", stack)
    _ok(cli("lab", "down", "--json"), "lab down (before)")
    counters = contextlib.ExitStack()
    try:
        t0 = time.monotonic()
        up = cli("lab", "up", "--stack-file", str(stack), "--json", timeout=1200)
        _ok(up, "lab up")
        timings["lab_up_s"] = round(time.monotonic() - t0, 1)
        status = json.loads(up.stdout)
        assert [v["domain"] for v in status["vms"]["nodes"]] == ["shut off", "shut off"], status["vms"]
        assert status["vms"]["bmc"]["running"] and status["vms"]["libvirt"], status["vms"]
        counters.enter_context(_airgap_counters(spec))  # before the blank node's first DHCP request
        lock = Lock.from_json(lock_path_for(stack).read_text(encoding="utf-8"))
        assert [i.name for i in lock.os_images] == [IMAGE]
        lab_mod.publish_image(spec, paths, images / "out", IMAGE)
        t0 = time.monotonic()
        _ok(cli("converge", "--stack-file", str(stack), "--node", PROVISIONING_NODE, "--json"), "converge")
        timings["provisioning_node_converge_s"] = round(time.monotonic() - t0, 1)
        t0 = time.monotonic()
        prov = cli("provision", "converge", "--stack-file", str(stack), "--json")
        _ok(prov, "provision converge")
        timings["provision_converge_s"] = round(time.monotonic() - t0, 1)
        report = json.loads(prov.stdout)
        assert {h: r["succeeded"] for h, r in report["hosts"].items()} == {PROVISIONING_NODE: True,
                                                                            "labvm-mirror": True}, report
        yield {"stack": stack, "work": work, "paths": paths, "spec": spec, "lock": lock, "timings": timings,
               "installed": {}}
    finally:
        counters.close()
        down = cli("lab", "down", "--json")
        print(json.dumps(timings))
        _ok(down, "lab down")


def _rebuild(labvm: dict[str, Any], name: str) -> tuple[dict[str, Any], float]:
    """`gpufleet rebuild --node NAME --yes` (the CLI): its JSON report and wall seconds."""
    t0 = time.monotonic()
    p = cli("rebuild", "--stack-file", str(labvm["stack"]), "--node", name, "--yes", "--json",
            "--keys", str(labvm["work"] / "keys"), "--records", str(labvm["work"] / "records"), timeout=2400)
    seconds = time.monotonic() - t0
    assert p.stdout.strip().startswith("{"), f"{name}: exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    report: dict[str, Any] = json.loads(p.stdout)
    report["rc"] = p.returncode
    print(name, json.dumps({k: v for k, v in report.items() if k != "fingerprint"})[:6000], flush=True)
    return report, seconds


def _ssh(labvm: dict[str, Any], name: str, command: str) -> str:
    p = subprocess.run(["ssh", "-F", str(labvm["spec"].ssh_config), name, command], capture_output=True, text=True,
                       timeout=60, check=False)
    assert p.returncode == 0, (name, command, p.stderr)
    return p.stdout.strip()


def _install(labvm: dict[str, Any], names: list[str]) -> None:
    """The first `gpufleet rebuild` of each blank node not installed yet in this session, all at once."""
    todo = [n for n in names if n not in labvm["installed"]]
    with ThreadPoolExecutor(max_workers=max(1, len(todo))) as pool:
        for name, result in zip(todo, pool.map(lambda n: _rebuild(labvm, n), todo), strict=True):
            labvm["installed"][name] = result


def test_blank_vm_nodes_are_installed_and_validated_by_the_rebuild_cli(labvm: dict[str, Any]) -> None:
    _install(labvm, [CONNECTED, AIRGAPPED])
    sha = labvm["lock"].os_images[0].sha256
    known = labvm["spec"].known_hosts.read_text(encoding="utf-8")
    for name in (CONNECTED, AIRGAPPED):
        report, seconds = labvm["installed"][name]
        assert report["rc"] == 0 and report["ok"] and report["failed_step"] == "", (name, report["message"])
        assert report["baseline"] == "none", report  # a blank node: nothing to compare with
        assert [s["step"] for s in report["steps"]] == STEPS
        assert report["drift"] == []
        console = (labvm["paths"].vm_dir / f"{name}.console.log").read_text(errors="replace")
        assert f"written bytes verified: sha256 {sha}" in console
        # The key the node answers with is the store's, pinned before the install (never read from the wire).
        pub = (labvm["work"] / "keys" / name / "ssh_host_ed25519_key.pub").read_text().split()[1]
        assert pub in known
        assert len(json.loads(_ssh(labvm, name, "cat /etc/gpufleet-lab/gpus.json"))["gpus"]) == 2  # from the image
        print(json.dumps({f"{name}_blank_to_validated_s": round(seconds, 1),
                          "steps": {s["step"]: s["seconds"] for s in report["steps"]}}))
    assert "gpufleet" in _ssh(labvm, AIRGAPPED, "nft list tables")  # the air-gapped node's egress firewall
    # From its first DHCP request to validated, the air-gapped node reached its mirror and nothing else.
    counts = _counted(NFT_TABLE)
    print(json.dumps({"air_gapped_packets": counts}))
    assert counts["mirror"] > 0, counts
    assert counts["elsewhere"] == counts["controller-not-ssh"] == counts["controller-not-tcp"] == 0, counts


def test_rebuild_of_an_installed_vm_node_is_identical(labvm: dict[str, Any]) -> None:
    _install(labvm, [CONNECTED])
    assert labvm["installed"][CONNECTED][0]["ok"], labvm["installed"][CONNECTED][0]["message"]
    _ssh(labvm, CONNECTED, "touch /root/written-after-install")
    known_before = labvm["spec"].known_hosts.read_bytes()
    report, seconds = _rebuild(labvm, CONNECTED)
    assert report["rc"] == 0 and report["ok"], report["message"]
    assert report["baseline"] == "live" and report["identical"] is True and report["differences"] == []
    assert labvm["spec"].known_hosts.read_bytes() == known_before
    assert _ssh(labvm, CONNECTED, "ls /root/written-after-install 2>/dev/null || echo gone") == "gone"
    print(json.dumps({"rebuild_identical_s": round(seconds, 1),
                      "steps": {s["step"]: s["seconds"] for s in report["steps"]}}))


def test_a_driver_change_reboots_the_vm_node_under_the_reboot_policy(labvm: dict[str, Any]) -> None:
    """570.133.20 → 570.124.06 (a downgrade: the pinned packages change, so the driver needs a reboot): the
    nvidia_driver role reboots the VM under the stack's `if-required` policy, it comes back with a new boot id and
    `validate-node` passes with the new driver."""
    _install(labvm, [CONNECTED])
    assert labvm["installed"][CONNECTED][0]["ok"], labvm["installed"][CONNECTED][0]["message"]
    stack: Path = labvm["stack"]
    boot_before = _ssh(labvm, CONNECTED, "cat /proc/sys/kernel/random/boot_id")
    _write_driver(stack, SECOND_DRIVER)
    try:
        t0 = time.monotonic()
        conv = cli("converge", "--stack-file", str(stack), "--node", CONNECTED, "--json", timeout=2400)
        seconds = time.monotonic() - t0
        _ok(conv, "converge (driver change)")
        assert _ssh(labvm, CONNECTED, "cat /proc/sys/kernel/random/boot_id") != boot_before
        _ok(cli("validate-node", "--stack-file", str(stack), "--node", CONNECTED, "--json", timeout=600),
            "validate-node (new driver)")
        assert _ssh(labvm, CONNECTED, "nvidia-smi --query-gpu=driver_version --format=csv,noheader").split() == [
            SECOND_DRIVER, SECOND_DRIVER]
        print(json.dumps({"driver_change_converge_with_reboot_s": round(seconds, 1)}))
    finally:
        _write_driver(stack, FIRST_DRIVER)
