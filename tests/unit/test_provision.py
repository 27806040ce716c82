"""The provisioning service's files: judged by dnsmasq itself, and checked against the stack they come from."""

from __future__ import annotations

import re
import shutil
import subprocess
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.cli import main
from infra.model.load import parse_site
from infra.model.site import Node, Site
from infra.provision.render import HTTP_ROOT, TFTP_ROOT, RenderError, dnsmasq_conf, node_script, render_site
from tests.unit.factories import make_site

ROOT = Path(__file__).resolve().parents[2]
needs_dnsmasq = pytest.mark.skipif(shutil.which("dnsmasq") is None, reason="dnsmasq not installed (apt: dnsmasq-base)")


def _raw_lab() -> dict[str, Any]:
    """The lab stack's site object, read as plain YAML (not through our model)."""
    doc = yaml.safe_load((ROOT / "stacks" / "Pulumi.lab.yaml").read_text())
    return doc["config"]["gpufleet:site"]  # type: ignore[no-any-return]


def _provisioned_site(mode: str = "dhcp") -> dict[str, Any]:
    site = make_site()
    site["segments"][0]["provisioning"] = {"host": "pxe01", "address": "10.0.0.5", "mode": mode}
    site["segments"][1]["provisioning"] = {"host": "mirror01"}
    site["nodes"][0] |= {"image": "ubuntu-22.04-gpu", "root_disk": {"serial": "S5GXNX0T123456"}, "boot_mode": "bios"}
    site["nodes"][1] |= {
        "image": "ubuntu-22.04-gpu",
        "root_disk": {"path": "/dev/disk/by-path/pci-0000:3b:00.0-nvme-1"},
    }
    return site


def _dnsmasq_test(conf: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["dnsmasq", "--test", f"--conf-file={conf}"], capture_output=True, text=True, check=False)


@needs_dnsmasq
@pytest.mark.parametrize("mode", ["dhcp", "proxy"])
def test_every_rendered_config_passes_dnsmasq_test(mode: str, tmp_path: Path) -> None:
    for svc in render_site(parse_site(_provisioned_site(mode))):
        conf = tmp_path / f"{svc.segment}.conf"
        conf.write_text(svc.dnsmasq_conf)
        result = _dnsmasq_test(conf)
        assert result.returncode == 0, result.stdout + result.stderr


@needs_dnsmasq
def test_dnsmasq_test_rejects_a_broken_config(tmp_path: Path) -> None:
    """The check above can fail: a misspelt option is refused by dnsmasq."""
    (svc, _) = render_site(parse_site(_provisioned_site()))
    conf = tmp_path / "broken.conf"
    conf.write_text(svc.dnsmasq_conf.replace("dhcp-ignore=", "dhcp-ignor="))
    assert _dnsmasq_test(conf).returncode != 0


def _lines(conf: str, key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in conf.splitlines() if line.startswith(key + "=")]


def test_lab_reservations_are_the_segments_own_nodes_only() -> None:
    raw = _raw_lab()
    services = {s.segment: s for s in render_site(parse_site(raw))}
    for seg in raw["segments"]:
        expected = {(n["macs"][0], n["address"], n["hostname"]) for n in raw["nodes"] if n["segment"] == seg["name"]}
        got = {tuple(v.split(",")) for v in _lines(services[seg["name"]].dnsmasq_conf, "dhcp-host")}
        assert got == expected


def test_dhcp_mode_has_no_dynamic_pool_and_ignores_unknown_macs() -> None:
    (svc, iso) = render_site(parse_site(_provisioned_site("dhcp")))
    assert _lines(svc.dnsmasq_conf, "dhcp-range") == ["10.0.0.0,static,255.255.255.0,12h"]
    assert _lines(svc.dnsmasq_conf, "dhcp-ignore") == ["tag:!known"]
    assert _lines(svc.dnsmasq_conf, "port") == ["0"]
    assert _lines(svc.dnsmasq_conf, "listen-address") == ["10.0.0.5"]
    assert _lines(svc.dnsmasq_conf, "dhcp-option") == ["option:router,10.0.0.1", "option:dns-server"]
    # The air-gapped segment is served from its mirror's address, with no router to hand out.
    assert _lines(iso.dnsmasq_conf, "listen-address") == ["10.0.1.10"]
    assert "option:router" in _lines(iso.dnsmasq_conf, "dhcp-option")


def test_proxy_mode_gives_no_addresses_only_boot_information() -> None:
    (svc, _) = render_site(parse_site(_provisioned_site("proxy")))
    assert _lines(svc.dnsmasq_conf, "dhcp-range") == ["10.0.0.0,proxy,255.255.255.0"]
    assert _lines(svc.dnsmasq_conf, "dhcp-host") == ["02:00:00:00:00:11,gpu01"]
    assert _lines(svc.dnsmasq_conf, "dhcp-ignore") == ["tag:!known"]
    assert not _lines(svc.dnsmasq_conf, "dhcp-option")
    services = _lines(svc.dnsmasq_conf, "pxe-service")
    assert any(s.startswith("tag:!ipxe,x86PC,") and s.endswith(",undionly.kpxe") for s in services)
    assert any(s.startswith("tag:!ipxe,x86-64_EFI,") and s.endswith(",ipxe.efi") for s in services)
    assert any(s.startswith("tag:ipxe,") and s.endswith(",http://10.0.0.5:8081/boot.ipxe") for s in services)


def test_firmware_gets_the_ipxe_build_for_its_architecture() -> None:
    (svc, _) = render_site(parse_site(_provisioned_site()))
    # RFC 4578 2.1: 7 = EFI BC, 9 = EFI x86-64; everything else (0 = BIOS) gets the UNDI build.
    assert _lines(svc.dnsmasq_conf, "dhcp-match") == [
        "set:efi64,option:client-arch,7",
        "set:efi64,option:client-arch,9",
    ]
    assert set(_lines(svc.dnsmasq_conf, "dhcp-boot")) == {
        "tag:!ipxe,tag:!efi64,undionly.kpxe",
        "tag:!ipxe,tag:efi64,ipxe.efi",
        "tag:ipxe,http://10.0.0.5:8081/boot.ipxe",
    }
    assert svc.tftp_files == ("undionly.kpxe", "ipxe.efi")


def test_node_scripts_are_keyed_by_mac_and_carry_the_nodes_identity() -> None:
    raw = _provisioned_site()
    (svc, iso) = render_site(parse_site(raw))
    assert sorted(svc.http_files) == [
        "boot.ipxe",
        "ipxe/02-00-00-00-00-11.ipxe",
        "ipxe/local/02-00-00-00-00-11.ipxe",
    ]
    script = svc.http_files["ipxe/02-00-00-00-00-11.ipxe"]
    assert script.startswith("#!ipxe\n")
    kernel = next(line for line in script.splitlines() if line.startswith("kernel "))
    args = kernel.split()
    assert args[1] == "http://10.0.0.5:8081/deploy/vmlinuz"
    for want in (
        "gpufleet.node=gpu01",
        f"ip={raw['nodes'][0]['address']}::10.0.0.1:255.255.255.0:gpu01::off",
        "BOOTIF=01-02-00-00-00-00-11",
        "gpufleet.image=ubuntu-22.04-gpu",
        "gpufleet.root_disk=serial:S5GXNX0T123456",
        "gpufleet.boot_mode=bios",
    ):
        assert want in args
    iso_script = iso.http_files["ipxe/02-00-00-00-01-11.ipxe"]
    assert "gpufleet.root_disk=path:/dev/disk/by-path/pci-0000:3b:00.0-nvme-1" in iso_script
    assert "gpufleet.boot_mode=uefi" in iso_script


def test_default_script_chains_by_mac_or_refuses() -> None:
    (svc, _) = render_site(parse_site(_provisioned_site()))
    boot = svc.http_files["boot.ipxe"]
    assert "chain --autofree http://10.0.0.5:8081/ipxe/${netX/mac:hexhyp}.ipxe || goto unknown" in boot
    assert boot.rstrip().endswith("exit 1")


def test_node_without_image_hands_back_to_the_firmware() -> None:
    raw = _raw_lab()
    svc = render_site(parse_site(raw))[0]
    script = svc.http_files[f"ipxe/{raw['nodes'][0]['macs'][0].replace(':', '-')}.ipxe"]
    assert "kernel" not in script
    assert script.rstrip().endswith("exit")


@pytest.mark.parametrize(
    ("field", "value", "in_conf"),
    [
        ("hostname", "gpu01\ndhcp-range=0.0.0.0,255.255.255.255", True),
        ("macs", ["02:00:00:00:00:11\nenable-ra"], True),
        ("image", "img ${net0/ip}", False),
    ],
)
def test_renderer_refuses_values_that_bypassed_the_model(field: str, value: object, in_conf: bool) -> None:
    """Second layer: a node built without validation (model_construct) cannot inject lines or expansions."""
    site = parse_site(_provisioned_site())
    bad = Node.model_construct(**(dict(site.nodes[0]) | {field: value}))
    broken = Site.model_construct(**(dict(site) | {"nodes": [bad]}))
    seg = site.segments[0]
    with pytest.raises(RenderError):
        node_script(bad, seg, "http://10.0.0.5:8081")
    if in_conf:
        with pytest.raises(RenderError):
            dnsmasq_conf(broken, seg, IPv4Address("10.0.0.5"), 8081)


def test_cli_render_writes_each_segments_tree(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["provision", "render", "--stack", "lab", "--out", str(tmp_path)]) == 0
    raw = _raw_lab()
    for seg in raw["segments"]:
        assert (tmp_path / seg["name"] / "dnsmasq.conf").is_file()
        assert (tmp_path / seg["name"] / "http" / "boot.ipxe").is_file()
        for n in raw["nodes"]:
            script = tmp_path / seg["name"] / "http" / "ipxe" / (n["macs"][0].replace(":", "-") + ".ipxe")
            assert script.is_file() == (n["segment"] == seg["name"])
    assert "wrote" in capsys.readouterr().out


def test_cli_render_of_a_stack_without_provisioning_exits_2(tmp_path: Path) -> None:
    stack = tmp_path / "Pulumi.x.yaml"
    stack.write_text(yaml.safe_dump({"config": {"gpufleet:site": make_site()}}))
    assert main(["provision", "render", "--stack-file", str(stack), "--out", str(tmp_path / "out")]) == 2


@needs_dnsmasq
def test_cli_check_runs_dnsmasq_on_the_lab_stack(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["provision", "check", "--stack", "lab"]) == 0
    out = capsys.readouterr().out
    assert re.findall(r"^(\S+): dnsmasq --test ok$", out, re.M) == [s["name"] for s in _raw_lab()["segments"]]


def test_role_accepts_exactly_the_file_names_the_renderer_writes() -> None:
    """roles/provisioning writes only names of the renderer's grammar; the two must agree."""
    role_vars = yaml.safe_load((ROOT / "roles" / "provisioning" / "vars" / "main.yml").read_text())
    pattern = re.compile(role_vars["_provisioning_http_file_pattern"])
    for site in (_raw_lab(), _provisioned_site()):
        for svc in render_site(parse_site(site)):
            assert all(pattern.match(name) for name in svc.http_files), list(svc.http_files)
    for hostile in (
        "../etc/passwd",
        "ipxe/../../x.ipxe",
        "/etc/cron.d/x",
        "ipxe/02-00-00-00-00-11.ipxe/x",
        "boot.ipxe\n",
    ):
        assert not pattern.match(hostile)


def test_role_defaults_are_the_renderers_roots() -> None:
    defaults = yaml.safe_load((ROOT / "roles" / "provisioning" / "defaults" / "main.yml").read_text())
    assert defaults["provisioning_tftp_root"] == TFTP_ROOT
    assert defaults["provisioning_http_root"] == HTTP_ROOT
    (svc, _) = render_site(parse_site(_provisioned_site()))
    assert _lines(svc.dnsmasq_conf, "tftp-root") == [TFTP_ROOT]
