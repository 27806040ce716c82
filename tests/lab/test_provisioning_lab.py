"""Each segment's provisioning service on the lab, converged by `gpufleet provision converge`.

What the lab stack (stacks/Pulumi.lab.yaml) declares: the connected segment is provisioned from the node
lab-gpu01, the air-gapped one from its mirror lab-mirror (which installs dnsmasq-base and ipxe from the
repository it serves itself), Debian 12's `dnsmasq-base` and `ipxe` at exact versions. The lab nodes name no
OS image, so nothing is fetched into `images/`; the VM tests (test_vm_node_lab.py) boot through the same role.
What runs here is real: Debian's dnsmasq as a systemd unit with the rendered configuration (checked by
`dnsmasq --test` before it is written), the iPXE builds in the TFTP root, infra/provision/httpd.py serving the
scripts on the segment address.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from infra.bundle.lock import Lock, lock_path
from infra.lab import repo, rootfs, standins
from infra.lab.config import Paths, lab_spec
from infra.lab.session import Lab
from infra.model.load import parse_site, project_dir, read_stack_config, stack_path
from infra.provision import service

pytestmark = pytest.mark.lab

HOSTS = ("lab-gpu01", "lab-mirror")
CONF = "/etc/gpufleet/provisioning/dnsmasq.conf"  # roles/provisioning/vars/main.yml `_provisioning_conf`


def _gpufleet(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "infra.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=project_dir(), check=False)


def _ssh(lab: Lab, host: str, command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ssh", "-F", str(lab.spec.ssh_config), host, command], capture_output=True, text=True,
                          timeout=60, check=False)


def _recap(run: dict[str, Any]) -> dict[str, tuple[bool, int]]:
    return {h: (r["succeeded"], len(r["changed_tasks"])) for h, r in run["hosts"].items()}


def _mirror_carries_the_packages() -> None:
    """The air-gapped mirror serves dnsmasq-base: the lab's seed, unless a bundle (which carries them) replaced it."""
    with urllib.request.urlopen("http://198.18.2.10/apt/Packages", timeout=10) as r:
        if b"\nPackage: dnsmasq-base\n" in b"\n" + r.read():
            return
    spec, paths = lab_spec("lab"), Paths.from_env()
    key = rootfs.rootfs_key(rootfs.seed_package_specs(spec))
    debs = sorted([*rootfs.seed_debs_path(paths, key).glob("*.deb"),
                   *standins.ensure_standins(paths.standins_dir).glob("*.deb")])
    srv = paths.srv_dir / "lab-mirror"
    (srv / "apt" / ".gpufleet-seed").unlink(missing_ok=True)
    repo.seed_repo("lab-mirror", srv, debs, paths.gnupg_dir / "lab-mirror", spec.keyrings["lab-mirror"],
                   paths.files_dir, scan_cache=paths.cache / "scan")


@pytest.fixture(scope="module")
def provisioned(lab: Lab) -> Iterator[dict[str, Any]]:
    """lab-gpu01 converged (its apt sources are the base role's), then check mode, converge, converge again.

    Afterwards both services are stopped: later tests of the session share the segment bridges, and a DHCP server
    they did not start must not answer there.
    """
    _mirror_carries_the_packages()
    node = _gpufleet("converge", "--stack", "lab", "--node", "lab-gpu01", "--json", timeout=1500)
    assert node.returncode == 0, node.stdout[-3000:] + node.stderr[-3000:]
    runs = {}
    for name, extra in (("check", ["--check"]), ("first", []), ("second", [])):
        p = _gpufleet("provision", "converge", "--stack", "lab", "--json", *extra)
        assert p.stdout.strip().startswith("{"), p.stdout[-2000:] + p.stderr[-3000:]
        runs[name] = json.loads(p.stdout)
        runs[name]["rc"] = p.returncode
    yield runs
    for host in HOSTS:
        _ssh(lab, host, "systemctl disable --now gpufleet-provision-dhcp gpufleet-provision-http")


def test_check_mode_converge_and_second_converge_changes_nothing(provisioned: dict[str, Any]) -> None:
    assert provisioned["check"]["rc"] == 0, provisioned["check"]
    assert provisioned["first"]["rc"] == 0, provisioned["first"]
    assert all(ok and changed > 0 for ok, changed in _recap(provisioned["first"]).values()), provisioned["first"]
    assert _recap(provisioned["second"]) == {h: (True, 0) for h in HOSTS}, provisioned["second"]


def test_dnsmasq_runs_with_the_rendered_config_and_http_serves_boot_ipxe(
        lab: Lab, provisioned: dict[str, Any]) -> None:
    site = parse_site(read_stack_config(stack_path("lab"))["gpufleet:site"])
    lock_file = lock_path("lab")
    lock = Lock.from_json(lock_file.read_text()) if lock_file.is_file() else None
    for host in service.provisioning_hosts(site):
        want = service.host_vars(site, host, lock)
        active = _ssh(lab, host.name, "systemctl is-active gpufleet-provision-dhcp gpufleet-provision-http")
        assert active.stdout.split() == ["active", "active"], (host.name, active.stdout, active.stderr)
        assert _ssh(lab, host.name, f"cat {CONF}").stdout == want["provisioning_dnsmasq_conf"]
        # dnsmasq itself holds the DHCP and TFTP ports, on this host only.
        ports = _ssh(lab, host.name, "ss -Hlunp").stdout
        assert any(":67 " in line and "dnsmasq" in line for line in ports.splitlines()), ports
        assert any(":69 " in line and "dnsmasq" in line for line in ports.splitlines()), ports
        tftp = _ssh(lab, host.name, "ls /srv/gpufleet/provision/tftp").stdout.split()
        assert sorted(tftp) == ["ipxe.efi", "undionly.kpxe"]
        url = f"http://{want['provisioning_address']}:{want['provisioning_http_port']}/boot.ipxe"
        with urllib.request.urlopen(url, timeout=10) as r:
            assert r.read().decode() == want["provisioning_http_files"]["boot.ipxe"]
        installed = _ssh(lab, host.name, "dpkg-query -W -f '${Package}=${Version}\\n' dnsmasq-base ipxe").stdout
        assert sorted(installed.split()) == sorted(f"{p['name']}={p['version']}" for p in want["provisioning_packages"])
