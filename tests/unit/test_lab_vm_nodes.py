"""VM nodes of a lab stack (`gpufleet:lab.vm_nodes`): what lab_spec derives from the site, and what it refuses."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pytest
import yaml

from infra.lab import bmc, hosts, vm
from infra.lab import lab as lab_mod
from infra.lab.config import LAB_KEY, LabConfigError, Paths, bridge_name, lab_spec, spec_digest, vm_uuid
from infra.lab.network import render_ruleset
from infra.model.load import load_site, stack_path
from tests.unit.test_lab_config import make_lab_stack

TEMPLATE = Path(__file__).resolve().parents[1] / "lab" / "data" / "Pulumi.labvm.yaml"
VM_STACK: dict[str, Any] = yaml.safe_load(TEMPLATE.read_text(encoding="utf-8"))


def make_stack(tmp_path: Path, change: Callable[[dict[str, Any], dict[str, Any]], None] | None = None) -> Path:
    """A copy of the VM lab stack, changed by `change(site, lab)`, written to tmp_path."""
    return make_lab_stack(tmp_path, change, stack=VM_STACK, name="labvm")


def node(site: dict[str, Any], name: str) -> dict[str, Any]:
    return next(n for n in site["nodes"] if n["hostname"] == name)


def refused(tmp_path: Path, change: Callable[[dict[str, Any], dict[str, Any]], None]) -> list[str]:
    with pytest.raises(LabConfigError) as exc:
        lab_spec("labvm", make_stack(tmp_path, change))
    return [f"{p.path}: {p.message} | {p.fix}" for p in exc.value.problems]


def test_vm_nodes_are_derived_from_their_site_nodes_and_are_not_nspawn_hosts() -> None:
    spec = lab_spec("labvm", TEMPLATE)
    site = VM_STACK["config"]["gpufleet:site"]
    listed = VM_STACK["config"][LAB_KEY]["vm_nodes"]
    assert [v.name for v in spec.vms] == [e["name"] for e in listed]
    for v, entry in zip(spec.vms, listed, strict=True):
        n = node(site, v.name)
        assert v.segment == n["segment"] and v.bridge == bridge_name(n["segment"])
        assert v.mac == n["macs"][0].lower() and str(v.address.ip) == n["address"]
        assert v.disk_serial == n["root_disk"]["serial"]  # the stack's own hint picks the VM's disk
        assert v.memory_mib == entry["memory_mib"]
        assert spec.bridge(v.segment).address.network == v.address.network
    assert not {v.name for v in spec.vms} & {h.name for h in spec.hosts}
    assert {h.name for h in spec.nodes} == {n["hostname"] for n in site["nodes"]} - {e["name"] for e in listed}
    lab = VM_STACK["config"][LAB_KEY]
    assert spec.vm_bmc is not None and spec.vm_bmc.port == lab["vm_bmc_listen"]["port"] != spec.bmc.port


def test_the_vm_lab_uses_its_own_bridges_addresses_and_ports_beside_the_main_lab() -> None:
    vm_spec, main = lab_spec("labvm", TEMPLATE), lab_spec("lab", stack_path("lab"))
    assert not {b.name for b in vm_spec.bridges} & {b.name for b in main.bridges}
    assert all(not a.address.network.overlaps(b.address.network) for a in vm_spec.bridges for b in main.bridges)
    assert not {h.name for h in vm_spec.hosts} & {h.name for h in main.hosts}
    assert vm_spec.vm_bmc is not None
    used = {main.bmc.port, main.bmc.port + 1}
    assert not {vm_spec.bmc.port, vm_spec.bmc.port + 1, vm_spec.vm_bmc.port} & used
    assert vm_spec.ssh_config != main.ssh_config and vm_spec.known_hosts != main.known_hosts


def test_a_vm_node_bmc_is_the_libvirt_bmc_with_the_domain_uuid() -> None:
    spec = lab_spec("labvm", TEMPLATE)
    site = load_site(path=TEMPLATE)
    for v in spec.vms:
        n = site.nodes_by_name[v.name]
        assert n.bmc is not None and n.bmc.system_id == vm.VmNode.of(v).uuid == vm_uuid(v.name)
        assert n.bmc.endpoint == f"http://{spec.vm_bmc.address}:{spec.vm_bmc.port}" if spec.vm_bmc else False


def test_the_fake_bmc_leaves_vm_nodes_to_the_libvirt_one(tmp_path: Path) -> None:
    spec = lab_spec("labvm", TEMPLATE)
    conf = bmc.render_config(spec, Paths(state=tmp_path))
    names = set(re.findall(r"'name': '([^']+)'", conf))
    assert names == {h.name for h in spec.nodes}
    sushy = vm.sushy_config([vm.VmNode.of(v) for v in spec.vms], "127.0.0.1", 8012, tmp_path / "htpasswd")
    assert all(vm_uuid(v.name) in sushy for v in spec.vms)
    assert f"SUSHY_EMULATOR_AUTH_FILE = {str(tmp_path / 'htpasswd')!r}" in sushy


def test_ssh_config_reaches_vm_nodes_with_the_lab_key_and_pinned_known_hosts(tmp_path: Path) -> None:
    spec = lab_spec("labvm", TEMPLATE)
    text = hosts.ssh_config_text(spec, tmp_path / "id")
    for v in spec.vms:
        block = text.split(f"Host {v.name} {v.address.ip}\n", 1)[1].split("\n\n", 1)[0]
        assert f"IdentityFile {tmp_path / 'id'}" in block and f"UserKnownHostsFile {spec.known_hosts}" in block
        assert "StrictHostKeyChecking yes" in block


def test_vm_domains_sit_on_the_lab_segment_bridges_which_the_firewall_covers(tmp_path: Path) -> None:
    spec = lab_spec("labvm", TEMPLATE)
    ruleset = render_ruleset(spec.bridges, "gpufleet_labvm")
    for v in spec.vms:
        dom = ElementTree.fromstring(vm.VmNode.of(v).domain_xml(tmp_path / "d.raw", tmp_path / "c.log"))
        nic = dom.find("devices/interface")
        assert nic is not None and nic.get("type") == "bridge"
        assert nic.find("source").get("bridge") == v.bridge and nic.find("mac").get("address") == v.mac  # type: ignore[union-attr]
        assert dom.findtext("devices/disk/serial") == v.disk_serial
        assert dom.findtext("memory") == str(v.memory_mib) and dom.findtext("uuid") == vm_uuid(v.name)
        assert f'iifname "{v.bridge}" oifname "{v.bridge}" accept' in ruleset


def test_digest_follows_vm_nodes(tmp_path: Path) -> None:
    before = spec_digest(lab_spec("labvm", TEMPLATE))

    def more_memory(site: dict[str, Any], lab: dict[str, Any]) -> None:
        lab["vm_nodes"][0]["memory_mib"] = 2048

    assert spec_digest(lab_spec("labvm", make_stack(tmp_path, more_memory))) != before


def _set(name: str, **changes: Any) -> Callable[[dict[str, Any], dict[str, Any]], None]:
    def change(site: dict[str, Any], lab: dict[str, Any]) -> None:
        n = node(site, name)
        for key, value in changes.items():
            if value is None:
                n.pop(key, None)
            else:
                n[key] = value

    return change


@pytest.mark.parametrize(("change", "where", "fix"), [
    (_set("labvm-vm01", image=None), "nodes[1].image", "give it an image"),
    (_set("labvm-vm01", boot_mode="uefi"), "nodes[1].boot_mode", "boot_mode: bios"),
    (_set("labvm-vm01", root_disk={"size_gb": 4}), "nodes[1].root_disk", "serial"),
    (_set("labvm-vm01", root_disk={"serial": "A" * 21}), "nodes[1].root_disk", "at most 20"),
    (_set("labvm-vm02", bmc={"endpoint": "http://127.0.0.1:8010", "system_id": vm_uuid("labvm-vm02"),
                             "username": "admin", "password": {"file": "/nonexistent"}}),
     "nodes[2].bmc", "http://127.0.0.1:8012"),
    (_set("labvm-vm02", bmc={"endpoint": "http://127.0.0.1:8012", "system_id": "labvm-vm02",
                             "username": "admin", "password": {"file": "/nonexistent"}}),
     "nodes[2].bmc", vm_uuid("labvm-vm02")),
])  # fmt: skip
def test_a_node_that_cannot_be_a_vm_node_is_refused_with_its_path_and_fix(
    tmp_path: Path, change: Callable[[dict[str, Any], dict[str, Any]], None], where: str, fix: str
) -> None:
    problems = refused(tmp_path, change)
    assert len(problems) == 1, problems
    assert problems[0].startswith(where) and fix in problems[0], problems


def _lab(**changes: Any) -> Callable[[dict[str, Any], dict[str, Any]], None]:
    def change(site: dict[str, Any], lab: dict[str, Any]) -> None:
        for key, value in changes.items():
            lab[key] = value

    return change


def _entry(i: int, **changes: Any) -> Callable[[dict[str, Any], dict[str, Any]], None]:
    def change(site: dict[str, Any], lab: dict[str, Any]) -> None:
        lab["vm_nodes"][i].update(changes)

    return change


@pytest.mark.parametrize(("change", "where"), [
    (_lab(vm_nodes=[]), f"{LAB_KEY}.vm_nodes"),
    (_lab(vm_nodes={"name": "labvm-vm01"}), f"{LAB_KEY}.vm_nodes"),
    (_lab(vm_nodes=[{"name": "labvm-vm01"}, {"name": "labvm-vm01"}]), f"{LAB_KEY}.vm_nodes[1].name"),
    (_lab(vm_nodes=[{"name": "nope"}]), f"{LAB_KEY}.vm_nodes[0].name"),
    (_lab(vm_nodes=[{"name": "labvm-vm01", "disk": 4}]), f"{LAB_KEY}.vm_nodes[0]"),
    (_entry(0, memory_mib=64), f"{LAB_KEY}.vm_nodes[0].memory_mib"),
    (_entry(0, memory_mib=True), f"{LAB_KEY}.vm_nodes[0].memory_mib"),
    (_entry(1, disk_gib="4"), f"{LAB_KEY}.vm_nodes[1].disk_gib"),
    (_lab(vm_bmc_listen={"address": "127.0.0.1"}), f"{LAB_KEY}.vm_bmc_listen.port"),
    (_lab(vm_bmc_listen={"address": "127.0.0.1", "port": 8011}), f"{LAB_KEY}.vm_bmc_listen.port"),
    (_lab(vm_bmc_listen={"address": "198.18.40.1", "port": 8012}), f"{LAB_KEY}.vm_bmc_listen.address"),
    (_lab(vm_bmc_listen={"address": "localhost", "port": 8012}), f"{LAB_KEY}.vm_bmc_listen.address"),
    (_lab(vm_bmc_listen={"address": "127.0.0.1'\nimport os", "port": 8012}), f"{LAB_KEY}.vm_bmc_listen.address"),
    (_lab(vm_bmc_listen="127.0.0.1:8012"), f"{LAB_KEY}.vm_bmc_listen.port"),
])  # fmt: skip
def test_a_malformed_vm_nodes_key_is_refused_with_its_path(
    tmp_path: Path, change: Callable[[dict[str, Any], dict[str, Any]], None], where: str
) -> None:
    problems = refused(tmp_path, change)
    assert any(p.startswith(f"{where}:") for p in problems), problems


def test_a_vm_address_used_twice_is_refused(tmp_path: Path) -> None:
    problems = refused(tmp_path, _set("labvm-vm02", address="198.18.41.1"))  # the bridge's (the lab host's)
    assert any("198.18.41.1 is also used by bridge gpfl-vmgap" in p for p in problems), problems


def test_the_main_lab_stack_has_no_vm_nodes() -> None:
    spec = lab_spec("lab", stack_path("lab"))
    assert spec.vms == () and spec.vm_bmc is None


def test_an_image_build_is_published_where_the_lock_urls_point_on_every_serving_host(tmp_path: Path) -> None:
    spec = lab_spec("labvm", TEMPLATE)
    out = tmp_path / "out"
    rels = ["images/img.img", "images/img.json", "deploy/vmlinuz", "deploy/initrd.img"]
    for i, rel in enumerate(rels):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(f"content {i}")
    paths = Paths(state=tmp_path / "state")
    published = lab_mod.publish_image(spec, paths, out, "img")
    servers = [h.name for h in spec.hosts if h.serves]
    assert sorted(servers) == ["labvm-mirror", "labvm-upstream"]
    assert sorted(published) == sorted(paths.srv_dir / s / "files" / "provision" / r for s in servers for r in rels)
    for p in published:
        rel = str(p.relative_to(p.parents[1]))  # …/files/provision/<dir>/<file> → <dir>/<file>
        assert p.read_text() == (out / rel).read_text()
        assert p.stat().st_mode & 0o777 == 0o644
    # A second publication replaces the files (a rebuilt image), leaving no temporary file behind.
    (out / "deploy/vmlinuz").unlink()
    (out / "deploy/vmlinuz").write_text("new kernel")
    lab_mod.publish_image(spec, paths, out, "img")
    for s in servers:
        deploy = paths.srv_dir / s / "files" / "provision" / "deploy"
        assert (deploy / "vmlinuz").read_text() == "new kernel"
        assert sorted(x.name for x in deploy.iterdir()) == ["initrd.img", "vmlinuz"]
