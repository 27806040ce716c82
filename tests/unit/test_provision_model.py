"""Provisioning in the site model: each mistake is reported with its config path and a fix."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.cli import main
from infra.model.load import SiteError, parse_site
from tests.unit.factories import make_node, make_site

Mutation = Callable[[dict[str, Any]], None]


def _site() -> dict[str, Any]:
    site = make_site()
    site["segments"][0]["provisioning"] = {"host": "pxe01", "address": "10.0.0.5"}
    site["segments"][1]["provisioning"] = {"host": "mirror01"}
    return site


def _prov(seg: int, **fields: Any) -> Mutation:
    return lambda s: s["segments"][seg]["provisioning"].update(fields)


def _node(i: int, **fields: Any) -> Mutation:
    return lambda s: s["nodes"][i].update(fields)


CASES: list[tuple[str, Mutation, str, str]] = [
    # (case id, mutation, expected config path, a word the message must contain)
    ("airgap-from-outside", _prov(1, host="gpu01"), "segments[1].provisioning.host", "segment 'compute'"),
    ("connected-from-other-segment", _prov(0, host="mirror01", address=None), "segments[0].provisioning.host", "iso"),
    ("dedicated-without-address", _prov(0, address=None), "segments[0].provisioning.host", "no address"),
    ("dedicated-outside-cidr", _prov(0, address="10.0.1.5"), "segments[0].provisioning.address", "outside"),
    ("dedicated-on-gateway", _prov(0, address="10.0.0.1"), "segments[0].provisioning.address", "gateway"),
    ("dedicated-on-node-address", _prov(0, address="10.0.0.11"), "segments[0].provisioning.address", "gpu01"),
    ("node-host-with-address", _prov(0, host="gpu01"), "segments[0].provisioning.address", "remove"),
    ("port-of-mirror", _prov(1, http_port=80), "segments[1].provisioning.http_port", "mirror"),
    (
        "port-of-service",
        _prov(0, host="gpu01", address=None, http_port=8000),
        "segments[0].provisioning.http_port",
        "llama-8b",
    ),
    ("bad-mode", _prov(0, mode="pool"), "segments[0].provisioning.mode", "dhcp"),
    ("bad-host-grammar", _prov(0, host="PXE_01"), "segments[0].provisioning.host", "hostname"),
    ("bad-boot-mode", _node(0, boot_mode="legacy"), "nodes[0].boot_mode", "uefi"),
    ("two-disk-hints", _node(0, root_disk={"serial": "ABC", "size_gb": 960}), "nodes[0].root_disk", "exactly one"),
    ("no-disk-hint", _node(0, root_disk={}), "nodes[0].root_disk", "exactly one"),
    ("disk-path-not-dev", _node(0, root_disk={"path": "/tmp/disk"}), "nodes[0].root_disk.path", "disk device path"),
    (
        "disk-path-injection",
        _node(0, root_disk={"path": "/dev/sda quiet"}),
        "nodes[0].root_disk.path",
        "disk device path",
    ),
    ("disk-serial-blank", _node(0, root_disk={"serial": "S5 GX"}), "nodes[0].root_disk.serial", "disk serial number"),
    ("disk-size-zero", _node(0, root_disk={"size_gb": 0}), "nodes[0].root_disk.size_gb", "greater"),
    ("image-grammar", _node(0, image="Ubuntu 22.04"), "nodes[0].image", "os image name"),
    (
        "image-without-service",
        lambda s: (s["segments"][0].pop("provisioning"), s["nodes"][0].update(image="ubuntu-22.04-gpu")),
        "nodes[0].image",
        "no provisioning",
    ),
    (
        "duplicate-pxe-mac",
        lambda s: s["nodes"].append(make_node("gpu03", "10.0.0.13", mac="02:00:00:00:01:11")),
        "nodes[2].macs[0]",
        "already used",
    ),
]


@pytest.mark.parametrize(("mutate", "path", "word"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_invalid_provisioning_is_named_with_its_path(mutate: Mutation, path: str, word: str) -> None:
    site = _site()
    mutate(site)
    with pytest.raises(SiteError) as exc:
        parse_site(site)
    problems = {p.path: p for p in exc.value.problems}
    assert path in problems, [str(p) for p in exc.value.problems]
    assert word.lower() in (problems[path].message + problems[path].fix).lower(), str(problems[path])
    assert problems[path].fix


def test_valid_provisioning_and_node_hints_parse() -> None:
    site = _site()
    site["segments"][0]["provisioning"]["mode"] = "proxy"
    site["nodes"][0] |= {"boot_mode": "bios", "image": "ubuntu-22.04-gpu", "root_disk": {"size_gb": 960}}
    site["nodes"][1] |= {"root_disk": {"path": "/dev/nvme0n1"}}
    parsed = parse_site(site)
    assert parsed.segments[0].provisioning is not None
    assert parsed.segments[0].provisioning.mode.value == "proxy"
    assert parsed.nodes[0].root_disk is not None and parsed.nodes[0].root_disk.size_gb == 960


def test_bad_provisioning_exits_2_with_one_line_per_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site = _site()
    site["segments"][1]["provisioning"]["host"] = "gpu01"
    stack = tmp_path / "Pulumi.x.yaml"
    stack.write_text(yaml.safe_dump({"config": {"gpufleet:site": site}}))
    assert main(["provision", "render", "--stack-file", str(stack), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "segments[1].provisioning.host" in err
    assert "Traceback" not in err
