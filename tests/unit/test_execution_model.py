"""Segment execution hosts in the site model: each mistake is reported with its config path and a fix."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.ansible.remote.job import exec_host
from infra.cli import main
from infra.model.load import SiteError, parse_site
from tests.unit.factories import make_site

Mutation = Callable[[dict[str, Any]], None]


def _site() -> dict[str, Any]:
    site = make_site()
    site["segments"][0]["execution"] = {"host": "exec01", "address": "10.0.0.5"}
    site["segments"][1]["execution"] = {"host": "mirror01"}
    return site


def _ex(seg: int, **fields: Any) -> Mutation:
    return lambda s: s["segments"][seg]["execution"].update(fields)


CASES: list[tuple[str, Mutation, str, str]] = [
    # (case id, mutation, expected config path, a word the message or fix must contain)
    ("airgap-from-outside", _ex(1, host="gpu01"), "segments[1].execution.host", "segment 'compute'"),
    ("connected-from-other-segment", _ex(0, host="mirror01", address=None), "segments[0].execution.host", "iso"),
    ("dedicated-without-address", _ex(0, address=None), "segments[0].execution.host", "no address"),
    ("dedicated-outside-cidr", _ex(0, address="10.0.1.5"), "segments[0].execution.address", "outside"),
    ("dedicated-on-gateway", _ex(0, address="10.0.0.1"), "segments[0].execution.address", "gateway"),
    ("dedicated-on-node-address", _ex(0, address="10.0.0.11"), "segments[0].execution.address", "gpu01"),
    ("node-host-with-address", _ex(0, host="gpu01"), "segments[0].execution.address", "remove"),
    ("local-with-address", _ex(0, host="local"), "segments[0].execution.address", "local"),
    ("bad-host-grammar", _ex(0, host="exec 01;reboot"), "segments[0].execution.host", "hostname"),
    ("bad-user", _ex(1, user="-oProxyCommand=x"), "segments[1].execution.user", "posix user"),
    ("relative-runtime-dir", _ex(1, runtime_dir="opt/x"), "segments[1].execution.runtime_dir", "absolute"),
    ("unknown-field", _ex(1, hop="x"), "segments[1].execution.hop", "extra"),
]


@pytest.mark.parametrize(("mutate", "path", "word"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_invalid_execution_host_is_named_with_its_path(mutate: Mutation, path: str, word: str) -> None:
    site = _site()
    mutate(site)
    with pytest.raises(SiteError) as exc:
        parse_site(site)
    problems = {p.path: p for p in exc.value.problems}
    assert path in problems, [str(p) for p in exc.value.problems]
    assert word.lower() in (problems[path].message + problems[path].fix).lower(), str(problems[path])
    assert problems[path].fix


def test_execution_defaults_to_the_controller() -> None:
    site = parse_site(make_site())
    assert all(s.execution.local for s in site.segments)
    assert exec_host(site, "compute") is None and exec_host(site, "iso") is None


def test_execution_host_address_comes_from_the_mirror_node_or_the_stack() -> None:
    raw = _site()
    raw["segments"][1]["execution"]["user"] = "gpufleet"
    site = parse_site(raw)
    iso = exec_host(site, "iso")
    assert iso is not None and (iso.name, iso.address, iso.user) == ("mirror01", "10.0.1.10", "gpufleet")
    compute = exec_host(site, "compute")
    assert compute is not None and (compute.name, compute.address) == ("exec01", "10.0.0.5")
    raw["segments"][0]["execution"] = {"host": "gpu01"}
    node = exec_host(parse_site(raw), "compute")
    assert node is not None and node.address == "10.0.0.11"
    assert iso.release.startswith("/opt/gpufleet-exec/releases/")


def test_bad_execution_host_exits_2_with_its_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site = _site()
    site["segments"][1]["execution"]["host"] = "gpu01"
    stack = tmp_path / "Pulumi.x.yaml"
    stack.write_text(yaml.safe_dump({"config": {"gpufleet:site": site}}))
    assert main(["converge", "--stack-file", str(stack)]) == 2
    err = capsys.readouterr().err
    assert "segments[1].execution.host" in err
    assert "Traceback" not in err
