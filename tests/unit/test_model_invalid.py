"""A corpus of invalid sites: each is rejected with the config path of the mistake and a fix."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from infra.bench.sitegen import generate_site
from infra.cli import main
from infra.model.load import SiteError, parse_site
from infra.model.ports import DCGM_EXPORTER_PORT
from infra.model.rules import check
from infra.model.site import Site
from infra.plan.node import plan_site
from infra.plan.rolevars import host_vars
from tests.unit.factories import DIGEST, make_node, make_profile, make_service, make_site

Mutation = Callable[[dict[str, Any]], Any]
_H100x4 = {"model": "H100", "count": 4, "nvswitch": True}
_L4x1 = {"model": "L4", "count": 1}


def _set(path: str, value: Any) -> Mutation:
    """Mutation setting a dotted path (list indexes as numbers)."""

    def apply(site: dict[str, Any]) -> None:
        keys: list[Any] = [int(k) if k.isdigit() else k for k in path.split(".")]
        target: Any = site
        for k in keys[:-1]:
            target = target[k]
        target[keys[-1]] = value

    return apply


def _append(key: str, item: Any) -> Mutation:
    return lambda site: site[key].append(item)


CASES: list[tuple[str, Mutation, str, str]] = [
    # (case id, mutation, expected config path, a word the message must contain)
    (
        "duplicate-hostname",
        _append("nodes", make_node("gpu01", "10.0.0.12", mac="02:00:00:00:00:12")),
        "nodes[2].hostname",
        "already used",
    ),
    (
        "duplicate-address",
        _append("nodes", make_node("gpu03", "10.0.0.11", mac="02:00:00:00:00:13")),
        "nodes[2].address",
        "already used",
    ),
    (
        "duplicate-mac",
        _append("nodes", make_node("gpu03", "10.0.0.13", mac="02:00:00:00:00:11")),
        "nodes[2].macs[0]",
        "MAC",
    ),
    ("duplicate-vlan", _set("segments.1.vlan", 10), "segments[1].vlan", "VLAN"),
    ("address-outside-cidr", _set("nodes.0.address", "10.9.9.9"), "nodes[0].address", "outside"),
    ("address-is-gateway", _set("nodes.0.address", "10.0.0.1"), "nodes[0].address", "gateway"),
    ("gateway-outside-cidr", _set("segments.0.gateway", "10.5.0.1"), "segments[0].gateway", "outside"),
    ("overlapping-cidr", _set("segments.1.cidr", "10.0.0.128/25"), "segments[1].cidr", "overlaps"),
    ("unknown-segment", _set("nodes.0.segment", "nowhere"), "nodes[0].segment", "unknown segment"),
    ("unknown-mirror", _set("segments.1.mirror", "ghost"), "segments[1].mirror", "unknown mirror"),
    ("unknown-profile", _set("nodes.0.profile", "ghost"), "nodes[0].profile", "unknown profile"),
    ("unknown-default-profile", _set("default_profile", "ghost"), "default_profile", "unknown profile"),
    ("unknown-gpu", _set("nodes.0.gpu.model", "RTX-9090"), "nodes[0].gpu.model", "unknown GPU"),
    (
        "nvswitch-on-pcie-gpu",
        _set("nodes.0.gpu", {"model": "L4", "count": 1, "nvswitch": True}),
        "nodes[0].gpu.nvswitch",
        "NVSwitch",
    ),
    ("airgap-without-mirror", _set("segments.1.mirror", None), "segments[1].mirror", "no mirror"),
    ("airgap-mirror-elsewhere", _set("mirrors.0.segment", "compute"), "segments[1].mirror", "on segment"),
    (
        "airgap-egress-beyond-mirror",
        _set("segments.1.egress_allow", ["0.0.0.0/0"]),
        "segments[1].egress_allow[0]",
        "only",
    ),
    (
        "airgap-upstream-sources",
        _set(
            "segments.1.sources",
            [{"name": "deb", "url": "http://deb.debian.org/debian", "suite": "bookworm", "keyring": "/k.gpg"}],
        ),
        "segments[1].sources",
        "upstream",
    ),
    (
        "airgap-node-extra-source",
        _set("nodes.1.extra_sources", ["https://download.example.com/x.deb"]),
        "nodes[1].extra_sources[0]",
        "outside mirror",
    ),
    # An hf:// source is fine on an air-gapped segment (locked, bundled, served by the mirror); the hub's
    # own web address is not: the node would have to reach it.
    (
        "airgap-service-hub-url",
        lambda s: s["services"][0].update(
            nodes=["gpu02"],
            model={**s["services"][0]["model"],
                   "source": "https://huggingface.co/meta-llama/Llama-3.1-8B/resolve/main/model.safetensors"},
        ),
        "services[0].model.source",
        "outside mirror",
    ),
    (
        "airgap-service-image",
        lambda s: s["services"][0].update(
            nodes=["gpu02"], model={**s["services"][0]["model"], "source": "http://10.0.1.10/files/m/"}
        ),
        "services[0].image",
        "outside mirror",
    ),
    (
        "nvswitch-without-fabric-manager",
        _set("profiles.hgx.fabric_manager", {"enabled": False}),
        "profiles.hgx.fabric_manager.enabled",
        "NVSwitch",
    ),
    (
        "fabric-manager-version-mismatch",
        _set("profiles.hgx.fabric_manager.version", "570.124.06"),
        "profiles.hgx.fabric_manager.version",
        "differs",
    ),
    (
        "fabric-manager-unpinned",
        _set("profiles.hgx.fabric_manager.version", None),
        "profiles.hgx.fabric_manager.version",
        "not pinned",
    ),
    (
        "cuda-needs-newer-driver",
        _set("profiles.hgx.cuda.version", "13.0.2"),
        "profiles.hgx.cuda.version",
        "needs driver",
    ),
    ("driver-off-branch", _set("profiles.hgx.driver.branch", "580"), "profiles.hgx.driver.version", "branch"),
    (
        "unpinned-driver",
        _set("profiles.hgx.driver.version", "latest"),
        "profiles.hgx.driver.version",
        "not an exact version",
    ),
    (
        "unpinned-toolkit-range",
        _set("profiles.hgx.container_toolkit.version", ">=1.17"),
        "profiles.hgx.container_toolkit.version",
        "not an exact version",
    ),
    ("dcgm-unpinned", _set("profiles.hgx.dcgm.version", None), "profiles.hgx.dcgm.version", "not pinned"),
    (
        "image-without-digest",
        _set("services.0.image", "docker.io/vllm/vllm-openai:latest"),
        "services[0].image",
        "digest",
    ),
    ("container-engine-without-image", _set("services.0.image", None), "services[0].image", "needs an image"),
    ("tp-not-dividing-heads", _set("services.0.tensor_parallel", 3), "services[0].tensor_parallel", "attention heads"),
    (
        "tp-not-dividing-kv-heads",
        lambda s: s["services"][0].update(
            tensor_parallel=4,
            model={
                **s["services"][0]["model"],
                "name": "custom",
                "parameters": 1e9,
                "layers": 16,
                "heads": 24,
                "kv_heads": 6,
                "head_dim": 64,
                "vocab": 32000,
            },
        ),
        "services[0].tensor_parallel",
        "key/value heads",
    ),
    (
        "tp-exceeds-gpus",
        lambda s: (
            s["nodes"][0].update(gpu={"model": "H100", "count": 2, "nvswitch": True})
            or s["services"][0].update(tensor_parallel=4)
        ),
        "services[0].tensor_parallel",
        "exceeds",
    ),
    (
        "model-does-not-fit",
        lambda s: s["services"][0].update(model={**s["services"][0]["model"], "name": "llama-3.1-70b"}),
        "services[0].model",
        "does not fit",
    ),
    (
        "model-unknown-architecture",
        lambda s: s["services"][0].update(model={**s["services"][0]["model"], "name": "mystery-13b"}),
        "services[0].model",
        "not in the catalogue",
    ),
    ("service-unknown-node", _set("services.0.nodes", ["gpu99"]), "services[0].nodes[0]", "unknown node"),
    (
        "service-on-node-without-inference-role",
        _set("nodes.0.roles", ["monitoring"]),
        "services[0].nodes[0]",
        "inference role",
    ),
    ("service-port-conflict", _append("services", make_service(name="second")), "services[1].port", "already used"),
    (
        "llamacpp-native-without-wheel",
        lambda s: s["services"][0].update(engine="llamacpp", image=None),
        "services[0].wheel",
        "wheel",
    ),
    ("secret-in-plaintext", _set("nodes.0.bmc.password", "hunter2"), "nodes[0].bmc.password", "SecretRef"),
    (
        "secret-ref-two-sources",
        _set("nodes.0.bmc.password", {"env": "A", "file": "/x"}),
        "nodes[0].bmc.password",
        "exactly one",
    ),
    ("unknown-key", _set("segments.0.vlna", 5), "segments[0].vlna", "Extra inputs"),
    ("bad-mac", _set("nodes.0.macs", ["not-a-mac"]), "nodes[0].macs[0]", "MAC"),
    ("vlan-out-of-range", _set("segments.0.vlan", 5000), "segments[0].vlan", "4094"),
    (
        "utilization-above-one",
        _set("services.0.gpu_memory_utilization", 1.5),
        "services[0].gpu_memory_utilization",
        "1",
    ),
    ("unknown-engine", _set("services.0.engine", "ollama"), "services[0].engine", "vllm"),
    ("unsupported-os", _set("nodes.0.os", "centos-7"), "nodes[0].os", "rhel-9"),
    # Every node a rule concerns: a second node of the same GPU model with fewer GPUs.
    (
        "tp-exceeds-gpus-of-second-same-model-node",
        lambda s: (
            s["nodes"].append(make_node("gpu03", "10.0.0.13", mac="02:00:00:00:00:13", gpu=_H100x4))
            or s["services"][0].update(tensor_parallel=8, nodes=["gpu01", "gpu03"])
        ),
        "services[0].tensor_parallel",
        "gpu03",
    ),
    # Identities that touch hardware or the network.
    (
        "bmc-system-driven-twice",
        lambda s: [n["bmc"].update(endpoint="https://10.0.9.1", system_id="1") for n in s["nodes"]],
        "nodes[1].bmc.system_id",
        "already driven by nodes[0]",
    ),
    (
        "bmc-shared-without-system-id",
        lambda s: [n["bmc"].update(endpoint="https://10.0.9.1") for n in s["nodes"]],
        "nodes[1].bmc.system_id",
        "system id",
    ),
    (
        "bmc-endpoint-is-host-address",
        _set("nodes.0.bmc.endpoint", "https://10.0.1.11"),
        "nodes[0].bmc.endpoint",
        "not a BMC",
    ),
    (
        "egress-probe-inside-segment",
        _set("segments.1.egress_probe", "10.0.1.99"),
        "segments[1].egress_probe",
        "outside",
    ),
    ("egress-probe-is-mirror", _set("segments.1.egress_probe", "10.0.1.10"), "segments[1].egress_probe", "mirror"),
    ("service-port-is-ssh", _set("services.0.port", 22), "services[0].port", "ssh"),
    (
        "service-port-is-dcgm-exporter",
        lambda s: (
            s["profiles"]["hgx"].update(monitoring={"dcgm_exporter_image": f"nvcr.io/nvidia/dcgm-exporter@{DIGEST}"})
            or s["services"][0].update(port=9400)
        ),
        "services[0].port",
        "DCGM exporter",
    ),
    ("mirror-ports-equal", _set("mirrors.0.registry_port", 80), "mirrors[0].registry_port", "http_port"),
    (
        "service-node-listed-twice",
        _set("services.0.nodes", ["gpu01", "gpu01"]),
        "services[0].nodes[1]",
        "already listed",
    ),
    # Limits engines enforce at start-up.
    (
        "context-over-model-max",
        _set("services.0.model.context_length", 131073),
        "services[0].model.context_length",
        "131072",
    ),
    (
        "context-over-explicit-max",
        lambda s: s["services"][0]["model"].update(max_context=4096),
        "services[0].model.context_length",
        "4096",
    ),
    (
        "b200-on-proprietary-modules",
        lambda s: (
            s["profiles"]["hgx"]["driver"].update(open_modules=False)
            or s["nodes"][0].update(gpu={"model": "B200", "count": 8, "nvswitch": True})
            or s["nodes"][1].update(gpu={"model": "B200", "count": 8, "nvswitch": True})
        ),
        "profiles.hgx.driver.open_modules",
        "open kernel modules",
    ),
    (
        "b200-node-on-shared-proprietary-profile",
        lambda s: (
            s["profiles"]["hgx"]["driver"].update(open_modules=False)
            or s["nodes"][1].update(gpu={"model": "B200", "count": 8, "nvswitch": True})
        ),
        "nodes[1].profile",
        "shared with gpu01",
    ),
    (
        "nvswitch-node-on-profile-shared-with-pcie",
        lambda s: (
            s["profiles"]["hgx"].update(fabric_manager={"enabled": False})
            or s["nodes"].append(make_node("gpu03", "10.0.0.13", mac="02:00:00:00:00:13", gpu=_L4x1))
        ),
        "nodes[0].profile",
        "shared with gpu03",
    ),
]


@pytest.mark.parametrize(("case", "mutate", "path", "word"), CASES, ids=[c[0] for c in CASES])
def test_invalid_site_rejected_with_path(case: str, mutate: Mutation, path: str, word: str) -> None:
    """The mistake is reported at its config path, with a message and a fix."""
    raw = make_site()
    parse_site(raw)  # the base is valid: only the mutation breaks it
    mutate(raw)
    with pytest.raises(SiteError) as exc:
        parse_site(raw)
    matching = [p for p in exc.value.problems if p.path == path]
    assert matching, f"no problem at {path}; got {[str(p) for p in exc.value.problems]}"
    assert any(word.lower() in (p.message + p.fix).lower() for p in matching), [str(p) for p in matching]
    assert all(p.fix for p in matching)


def test_corpus_covers_enough_rules() -> None:
    """The issue asks for at least 30 invalid configs, one per rule."""
    assert len(CASES) >= 30
    assert len({c[2] for c in CASES}) >= 30


def test_all_problems_reported_at_once() -> None:
    """Several independent mistakes are all reported in one run, not just the first."""
    raw = make_site()
    _set("segments.1.vlan", 10)(raw)
    _set("nodes.0.address", "10.9.9.9")(raw)
    _set("profiles.hgx.fabric_manager.version", "570.124.06")(raw)
    with pytest.raises(SiteError) as exc:
        parse_site(raw)
    paths = {p.path for p in exc.value.problems}
    assert {"segments[1].vlan", "nodes[0].address", "profiles.hgx.fabric_manager.version"} <= paths


def test_does_not_fit_message_says_by_how_much_and_what_fits() -> None:
    """A model that does not fit says the shortfall and the changes that would make it fit."""
    raw = make_site()
    raw["services"][0]["model"]["name"] = "llama-3.1-70b"
    with pytest.raises(SiteError) as exc:
        parse_site(raw)
    msg = next(p.message for p in exc.value.problems if p.path == "services[0].model")
    assert "GiB" in msg and "tensor_parallel" in msg and "would fit with" in msg


def test_validate_cli_exits_2_listing_problems(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """`gpufleet validate` on a broken stack file exits 2 and prints every problem with its path."""
    import yaml

    raw = make_site()
    _set("segments.1.vlan", 10)(raw)
    _set("nodes.0.segment", "nowhere")(raw)
    f = tmp_path / "Pulumi.broken.yaml"
    f.write_text(yaml.safe_dump({"config": {"gpufleet:site": raw}}))
    assert main(["validate", "--stack-file", str(f)]) == 2
    err = capsys.readouterr().err
    assert "segments[1].vlan" in err and "nodes[0].segment" in err and "Fix:" in err


def _problems(raw: dict[str, Any]) -> list[Any]:
    try:
        parse_site(raw)
    except SiteError as exc:
        return exc.problems
    return []


def test_one_bmc_with_distinct_system_ids_is_fine() -> None:
    """The lab's layout: one BMC endpoint driving several systems, each node naming its own."""
    raw = make_site()
    for i, n in enumerate(raw["nodes"]):
        n["bmc"].update(endpoint="https://10.0.9.1", system_id=f"sys{i}")
    assert _problems(raw) == []


def test_same_bmc_despite_default_port_and_case() -> None:
    """`https://BMC:443` and `https://bmc` are the same BMC: a shared system is still caught."""
    raw = make_site()
    raw["nodes"][0]["bmc"].update(endpoint="https://BMC-A.example:443", system_id="1")
    raw["nodes"][1]["bmc"].update(endpoint="https://bmc-a.example", system_id="1")
    assert [p.path for p in _problems(raw)] == ["nodes[1].bmc.system_id"]


def test_exporter_port_is_free_without_monitoring() -> None:
    """Ports the monitoring role uses are reserved only on nodes that run it."""
    raw = make_site()
    raw["profiles"]["hgx"]["monitoring"] = {"dcgm_exporter_image": f"nvcr.io/nvidia/dcgm-exporter@{DIGEST}"}
    raw["services"][0]["port"] = 9400
    assert [p.path for p in _problems(raw)] == ["services[0].port"]
    raw["nodes"][0]["roles"] = ["inference"]
    assert _problems(raw) == []


def test_validator_keeps_services_off_the_port_the_monitoring_role_gets() -> None:
    """The DCGM exporter port handed to the role (plan → role vars) is the port the validator reserves."""
    raw = make_site()
    raw["profiles"]["hgx"]["monitoring"] = {"dcgm_exporter_image": f"nvcr.io/nvidia/dcgm-exporter@{DIGEST}"}
    site = parse_site(raw)
    plan = plan_site(site).node("gpu01")
    role_port = host_vars(plan, site)["monitoring_dcgm_exporter_port"]
    assert role_port == DCGM_EXPORTER_PORT
    raw["services"][0]["port"] = role_port
    assert [p.path for p in _problems(raw)] == ["services[0].port"]


def test_suggestions_never_ask_for_more_gpus_than_a_node_has() -> None:
    """A model that needs more GPUs than its nodes have gets no tensor_parallel beyond them."""
    raw = make_site()
    raw["nodes"][0]["gpu"] = {"model": "L40S", "count": 2}
    raw["profiles"]["hgx"]["fabric_manager"] = {"enabled": True, "version": "570.133.20"}
    raw["services"][0]["model"].update(name="llama-3.1-70b", context_length=4096)
    problems = [p for p in _problems(raw) if p.path == "services[0].model"]
    assert problems
    for p in problems:
        for s in p.suggestions:
            for e in s.edits:
                if e.path.endswith("tensor_parallel"):
                    assert e.value <= 2, s
        assert "(4 GPUs)" not in p.message and "(8 GPUs)" not in p.message


def test_shared_profile_is_not_edited_by_a_suggestion() -> None:
    """An NVSwitch node on a profile shared with PCIe nodes is moved, the shared profile is left alone."""
    raw = make_site()
    raw["profiles"]["hgx"]["fabric_manager"] = {"enabled": False}
    raw["nodes"].append(make_node("gpu03", "10.0.0.13", mac="02:00:00:00:00:13", gpu=_L4x1))
    problems = [p for p in _problems(raw) if p.suggestions]
    assert problems
    for p in problems:
        for s in p.suggestions:
            assert not any(e.path.startswith("profiles.hgx.") or e.path == "profiles.hgx" for e in s.edits), s


def test_an_existing_matching_profile_is_suggested_before_a_new_one() -> None:
    """When a profile equal to the shared one plus fabric manager exists, the node is pointed at it."""
    raw = make_site()
    raw["profiles"]["pcie"] = make_profile(fabric_manager={"enabled": False})
    raw["nodes"][0]["profile"] = "pcie"
    raw["nodes"].append(make_node("gpu03", "10.0.0.13", mac="02:00:00:00:00:13", gpu=_L4x1, profile="pcie"))
    (p,) = [p for p in _problems(raw) if p.path == "nodes[0].profile"]
    assert [(e.path, e.value) for s in p.suggestions for e in s.edits] == [("nodes[0].profile", "hgx")]


def test_problem_json_carries_suggestions() -> None:
    """`--json` consumers get machine-applicable edits next to the human fix."""
    raw = make_site()
    raw["segments"][1]["vlan"] = 10
    (p,) = _problems(raw)
    d = p.as_dict()
    assert d["path"] == "segments[1].vlan" and d["fix"]
    (edit,) = d["suggestions"][0]["edits"]
    assert edit["path"] == "segments[1].vlan" and edit["value"] != 10


def test_every_node_checked_at_scale() -> None:
    """A 1,000-node site with one short node at the end: the rule still reaches it."""
    raw = generate_site(1000, served_nodes=1000)
    raw["services"][0]["tensor_parallel"] = 8
    raw["nodes"][-1]["gpu"]["count"] = 4
    site = Site.model_validate(raw)
    problems = check(site)
    assert [p.path for p in problems] == ["services[0].tensor_parallel"]
    assert raw["nodes"][-1]["hostname"] in problems[0].message
