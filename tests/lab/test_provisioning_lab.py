"""Each segment's provisioning service on the lab, converged by `gpufleet provision converge`.

What the lab stack (stacks/Pulumi.lab.yaml) declares: the connected segment is provisioned from the node
lab-gpu01, the air-gapped one from its mirror lab-mirror (which installs dnsmasq-base and ipxe from the
repository it serves itself), Debian 12's `dnsmasq-base` and `ipxe` at exact versions. The lab nodes name no
OS image, so nothing is fetched into `images/`; the VM tests (test_vm_node_lab.py) boot through the same role.
What runs here is real: Debian's dnsmasq as a systemd unit with the rendered configuration (checked by
`dnsmasq --test` before it is written), the iPXE builds in the TFTP root, infra/provision/httpd.py serving the
scripts on the segment address. `gpufleet drift` reads both hosts with the same play in check mode: clean after
the converge, a hand edit and a stopped dnsmasq named per host, clean again after `provision converge`.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from infra.bundle.lock import Lock, lock_path
from infra.lab.session import Lab
from infra.model.load import parse_site, read_stack_config, stack_path
from infra.provision import service
from tests.lab.labtools import gpufleet_cli, lab_ssh, recap, reseed_mirror_unless

pytestmark = pytest.mark.lab

HOSTS = ("lab-gpu01", "lab-mirror")
CONF = "/etc/gpufleet/provisioning/dnsmasq.conf"  # roles/provisioning/vars/main.yml `_provisioning_conf`


@pytest.fixture(scope="module")
def provisioned(lab: Lab) -> Iterator[dict[str, Any]]:
    """lab-gpu01 converged (its apt sources are the base role's), then check mode, converge, converge again.

    Afterwards both services are stopped: later tests of the session share the segment bridges, and a DHCP server
    they did not start must not answer there.
    """
    reseed_mirror_unless("dnsmasq-base")  # a bundle imported earlier replaced the lab's seed
    node = gpufleet_cli("converge", "--stack", "lab", "--node", "lab-gpu01", "--json", timeout=1500)
    assert node.returncode == 0, node.stdout[-3000:] + node.stderr[-3000:]
    runs = {}
    for name, extra in (("check", ["--check"]), ("first", []), ("second", [])):
        p = gpufleet_cli("provision", "converge", "--stack", "lab", "--json", *extra)
        assert p.stdout.strip().startswith("{"), p.stdout[-2000:] + p.stderr[-3000:]
        runs[name] = json.loads(p.stdout)
        runs[name]["rc"] = p.returncode
    yield runs
    for host in HOSTS:
        lab_ssh(lab, host, "systemctl disable --now gpufleet-provision-dhcp gpufleet-provision-http")


def test_check_mode_converge_and_second_converge_changes_nothing(provisioned: dict[str, Any]) -> None:
    assert provisioned["check"]["rc"] == 0, provisioned["check"]
    assert provisioned["first"]["rc"] == 0, provisioned["first"]
    assert all(ok and changed > 0 for ok, changed in recap(provisioned["first"]).values()), provisioned["first"]
    assert recap(provisioned["second"]) == {h: (True, 0) for h in HOSTS}, provisioned["second"]


def test_dnsmasq_runs_with_the_rendered_config_and_http_serves_boot_ipxe(
        lab: Lab, provisioned: dict[str, Any]) -> None:
    site = parse_site(read_stack_config(stack_path("lab"))["gpufleet:site"])
    lock_file = lock_path("lab")
    lock = Lock.from_json(lock_file.read_text()) if lock_file.is_file() else None
    for host in service.provisioning_hosts(site):
        want = service.host_vars(site, host, lock)
        active = lab_ssh(lab, host.name, "systemctl is-active gpufleet-provision-dhcp gpufleet-provision-http")
        assert active.stdout.split() == ["active", "active"], (host.name, active.stdout, active.stderr)
        assert lab_ssh(lab, host.name, f"cat {CONF}").stdout == want["provisioning_dnsmasq_conf"]
        # dnsmasq itself holds the DHCP and TFTP ports, on this host only.
        ports = lab_ssh(lab, host.name, "ss -Hlunp").stdout
        assert any(":67 " in line and "dnsmasq" in line for line in ports.splitlines()), ports
        assert any(":69 " in line and "dnsmasq" in line for line in ports.splitlines()), ports
        tftp = lab_ssh(lab, host.name, "ls /srv/gpufleet/provision/tftp").stdout.split()
        assert sorted(tftp) == ["ipxe.efi", "undionly.kpxe"]
        url = f"http://{want['provisioning_address']}:{want['provisioning_http_port']}/boot.ipxe"
        with urllib.request.urlopen(url, timeout=10) as r:
            assert r.read().decode() == want["provisioning_http_files"]["boot.ipxe"]
        installed = lab_ssh(lab, host.name, "dpkg-query -W -f '${Package}=${Version}\\n' dnsmasq-base ipxe").stdout
        assert sorted(installed.split()) == sorted(f"{p['name']}={p['version']}" for p in want["provisioning_packages"])


def _drift() -> tuple[int, dict[str, dict[str, Any]]]:
    """`gpufleet drift --only provisioning --json` of the lab: exit code, and each provisioning host's report."""
    r = gpufleet_cli("drift", "--stack", "lab", "--only", "provisioning", "--json", timeout=600)
    assert r.stdout.strip().startswith("{"), r.stdout[-2000:] + r.stderr[-3000:]
    data = json.loads(r.stdout)
    assert "edited by hand" not in r.stdout  # paths and task names, never a file's content
    return r.returncode, {h["hostname"]: h for h in data["provisioning"]}


def test_drift_sees_a_hand_edit_and_a_stopped_dnsmasq_until_provision_converge_restores_them(
        lab: Lab, provisioned: dict[str, Any]) -> None:
    """After converge both hosts are clean; a hand-edited dnsmasq.conf on the mirror and a stopped dnsmasq on the
    node are drift (exit 3, each host named with what would change); `provision converge` puts both back."""
    code, hosts = _drift()
    assert code == 0, hosts
    assert {h: (r["status"], r["check"]) for h, r in hosts.items()} == {h: ("clean", "ran") for h in HOSTS}

    edit = lab_ssh(lab, "lab-mirror", f"echo '# edited by hand' >> {CONF}")
    stop = lab_ssh(lab, "lab-gpu01", "systemctl stop gpufleet-provision-dhcp")
    assert edit.returncode == 0 and stop.returncode == 0, (edit.stderr, stop.stderr)
    code, hosts = _drift()
    assert code == 3, hosts
    assert {h: r["status"] for h, r in hosts.items()} == {h: "drift" for h in HOSTS}, hosts
    edited = {(i["kind"], i["item"]) for i in hosts["lab-mirror"]["items"]}
    assert ("file", CONF) in edited and ("task", "provisioning : Write the dnsmasq configuration") in edited, edited
    stopped = {(i["kind"], i["item"]) for i in hosts["lab-gpu01"]["items"]}
    assert ("task", "provisioning : Enable the provisioning services") in stopped, stopped
    assert not any(kind == "file" for kind, _ in stopped), stopped  # the node's files are as converged

    fix = gpufleet_cli("provision", "converge", "--stack", "lab", "--json")
    assert fix.returncode == 0, fix.stdout[-2000:] + fix.stderr[-3000:]
    assert all(ok and changed > 0 for ok, changed in recap(json.loads(fix.stdout)).values()), fix.stdout[-2000:]
    code, hosts = _drift()
    assert code == 0 and all(r["status"] == "clean" for r in hosts.values()), hosts
    active = lab_ssh(lab, "lab-gpu01", "systemctl is-active gpufleet-provision-dhcp")
    assert active.stdout.strip() == "active", active.stdout + active.stderr
    assert "# edited by hand" not in lab_ssh(lab, "lab-mirror", f"cat {CONF}").stdout
