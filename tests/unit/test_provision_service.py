"""roles/provisioning's variables derived from the stack and its lock, and `gpufleet provision converge`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.ansible.runner import HostResult, RunResult
from infra.bundle.declared import Kind, declared
from infra.bundle.lock import OS_IMAGE_KIND, Artifact, Lock, OsImage, check
from infra.cli import main
from infra.commands import hostplay
from infra.commands import provision as cmd
from infra.model.load import SiteError, parse_site
from infra.provision import service
from infra.provision.service import ProvisioningInputError
from tests.unit.factories import make_site

IMAGE = "debian-12-node"
SHA = {"disk": "11" * 32, "kernel": "22" * 32, "initrd": "33" * 32, "manifest": "44" * 32}
# Debian 12's versions (`apt-cache policy dnsmasq-base ipxe` on bookworm, 2026-12).
DNSMASQ = "2.90-4~deb12u2"
IPXE = "1.0.0+git-20190125.36a4c85-5.1"


def _raw(**prov: Any) -> dict[str, Any]:
    site = make_site()
    versions = {"dnsmasq_version": DNSMASQ, "ipxe_version": IPXE}
    site["segments"][0]["provisioning"] = {"host": "pxe01", "address": "10.0.0.5", **versions}
    site["segments"][1]["provisioning"] = {"host": "mirror01", **versions, **prov}
    for n in site["nodes"]:
        n["image"] = IMAGE
    return site


def _lock(sha: dict[str, str] = SHA, segments: tuple[str, ...] = ("compute", "iso")) -> Lock:
    files = [(IMAGE, "images/debian-12-node.img", "disk"), (f"{IMAGE}.json", "images/debian-12-node.json", "manifest"),
             (f"{IMAGE}:deploy-kernel", "deploy/vmlinuz", "kernel"),
             (f"{IMAGE}:deploy-initrd", "deploy/initrd.img", "initrd")]
    arts = [Artifact(OS_IMAGE_KIND, name, "epoch-1", f"files/provision/{rel}", 7, sha[k], f"/build/{rel}", segments)
            for name, rel, k in files]
    return Lock("test", [], arts, os_images=[OsImage(IMAGE, sha["disk"], 4096, 1, ("systemd=252",), segments)])


def _host(site: Any, segment: str) -> service.ProvisioningHost:
    return next(h for h in service.provisioning_hosts(site) if h.segment == segment)


def test_an_airgapped_segment_serves_from_its_own_mirror() -> None:
    raw = _raw()
    site = parse_site(raw)
    host = _host(site, "iso")
    assert (host.name, str(host.address), host.user, host.is_mirror) == ("mirror01", "10.0.1.10", "root", True)
    v = service.host_vars(site, host, _lock())
    assert v["provisioning_packages"] == [{"name": "dnsmasq-base", "version": DNSMASQ},
                                          {"name": "ipxe", "version": IPXE}]
    # The mirror installs from the repository it serves itself, signed with the stack's keyring for it.
    assert v["provisioning_apt_sources"] == [{"name": "mirror01", "uris": "http://10.0.1.10/apt", "suites": "/",
                                              "components": [], "keyring": raw["mirrors"][0]["keyring"]}]
    assert v["provisioning_address"] == "10.0.1.10"
    assert v["provisioning_http_port"] == 8081
    # Images and deploy files from the mirror's file store, where `bundle import` put the lock's files.
    assert v["provisioning_files"] == [
        {"path": "deploy/initrd.img", "url": "http://10.0.1.10/files/provision/deploy/initrd.img",
         "sha256": SHA["initrd"]},
        {"path": "deploy/vmlinuz", "url": "http://10.0.1.10/files/provision/deploy/vmlinuz", "sha256": SHA["kernel"]},
        {"path": f"images/{IMAGE}.img", "url": f"http://10.0.1.10/files/provision/images/{IMAGE}.img",
         "sha256": SHA["disk"]},
    ]
    # The deploy command line carries the lock's image sha256 and size (what the ramdisk checks the disk with).
    script = v["provisioning_http_files"]["ipxe/02-00-00-00-01-11.ipxe"]
    assert f"gpufleet.image_sha256={SHA['disk']}" in script and "gpufleet.image_size=4096" in script
    assert "listen-address=10.0.1.10" in v["provisioning_dnsmasq_conf"]
    assert "dhcp-host=02:00:00:00:01:11,10.0.1.11,gpu02" in v["provisioning_dnsmasq_conf"]
    assert "02:00:00:00:00:11" not in v["provisioning_dnsmasq_conf"]  # the other segment's node


def test_a_mirror_on_another_port_is_named_with_it() -> None:
    raw = _raw()
    raw["mirrors"][0]["http_port"] = 8080
    v = service.host_vars(parse_site(raw), _host(parse_site(raw), "iso"), _lock())
    assert {f["url"].split("/files/")[0] for f in v["provisioning_files"]} == {"http://10.0.1.10:8080"}
    assert v["provisioning_apt_sources"][0]["uris"] == "http://10.0.1.10:8080/apt"


def test_a_connected_segment_without_a_mirror_fetches_from_files_url() -> None:
    raw = _raw()
    raw["segments"][0]["provisioning"]["files_url"] = "http://files.example.internal:8000/gpufleet/files"
    site = parse_site(raw)
    host = _host(site, "compute")
    assert (host.name, str(host.address), host.is_mirror) == ("pxe01", "10.0.0.5", False)
    v = service.host_vars(site, host, _lock())
    assert v["provisioning_apt_sources"] == []  # not a mirror: the host's own sources
    assert [f["url"] for f in v["provisioning_files"]] == [
        "http://files.example.internal:8000/gpufleet/files/provision/deploy/initrd.img",
        "http://files.example.internal:8000/gpufleet/files/provision/deploy/vmlinuz",
        f"http://files.example.internal:8000/gpufleet/files/provision/images/{IMAGE}.img"]


def test_a_node_as_provisioning_host_is_reached_as_its_ssh_user() -> None:
    raw = _raw()
    raw["segments"][0]["provisioning"] = {"host": "gpu01", "dnsmasq_version": DNSMASQ, "ipxe_version": IPXE}
    raw["nodes"][0]["ssh_user"] = "ops"
    raw["nodes"][0].pop("image")
    site = parse_site(raw)
    inv = service.inventory(site, None, [_host(site, "compute")])
    entry = inv["all"]["children"]["gpufleet_provisioning"]["hosts"]["gpu01"]
    assert (entry["ansible_host"], entry["ansible_user"], entry["ansible_become"]) == ("10.0.0.11", "ops", True)
    assert entry["provisioning_files"] == []  # no node of the segment names an image: nothing to fetch


@pytest.mark.parametrize(("change", "segment", "words"), [
    (lambda r: r["segments"][1]["provisioning"].pop("ipxe_version"), "iso",
     ["segments[1].provisioning.ipxe_version", "unset", "gpufleet lock"]),
    (lambda r: r["segments"][0]["provisioning"].pop("dnsmasq_version"), "compute",
     ["segments[0].provisioning.dnsmasq_version", "unset"]),
    # A connected segment with images, no mirror and no files_url: nowhere to fetch them from.
    (lambda r: None, "compute", ["segments[0].provisioning.files_url", "no mirror", IMAGE]),
    (lambda r: r["segments"][1]["provisioning"].update(files_url="http://10.0.1.10/files/"), "iso",
     ["segments[1].provisioning.files_url", "air-gapped", "remove files_url"]),
])
def test_missing_or_misplaced_inputs_are_named_with_their_stack_path(change: Any, segment: str,
                                                                     words: list[str]) -> None:
    raw = _raw()
    change(raw)
    site = parse_site(raw)
    with pytest.raises(ProvisioningInputError) as exc:
        service.host_vars(site, _host(site, segment), _lock())
    for w in words:
        assert w in str(exc.value)
    assert "\n" not in str(exc.value)


def test_an_image_missing_from_the_lock_or_without_a_hash_is_refused() -> None:
    site = parse_site(_raw())
    with pytest.raises(ProvisioningInputError, match=f"no os-image file '{IMAGE}'.*gpufleet image build"):
        service.host_vars(site, _host(site, "iso"), None, "stacks/x.lock.json")
    lock = _lock()
    lock.artifacts = [a for a in lock.artifacts if a.name != f"{IMAGE}:deploy-initrd"]
    with pytest.raises(ProvisioningInputError, match="deploy-initrd"):
        service.host_vars(site, _host(site, "iso"), lock)
    bad = _lock({**SHA, "kernel": "ZZ" * 32})
    with pytest.raises(ProvisioningInputError, match="no sha256"):
        service.host_vars(site, _host(site, "iso"), bad)


def test_two_images_with_different_deploy_files_in_one_segment_are_refused() -> None:
    raw = _raw()
    raw["nodes"][1]["image"] = "other"
    raw["nodes"].append({**raw["nodes"][1], "hostname": "gpu03", "address": "10.0.1.12", "macs": ["02:00:00:00:01:12"],
                         "image": IMAGE, "bmc": {**raw["nodes"][1]["bmc"], "endpoint": "https://bmc-gpu03.example"}})
    site = parse_site(raw)
    lock = _lock()
    other = _lock({**SHA, "kernel": "55" * 32})
    lock.artifacts += [Artifact(**{**a.__dict__, "name": a.name.replace(IMAGE, "other"),
                                   "path": a.path.replace(IMAGE, "other")}) for a in other.artifacts]
    with pytest.raises(ProvisioningInputError, match=r"different deploy files.*deploy/vmlinuz"):
        service.host_vars(site, _host(site, "iso"), lock)


@pytest.mark.parametrize(("field", "value"), [
    ("dnsmasq_version", "2.90-4; rm -rf /"),
    ("ipxe_version", "1.0\nenable-tftp"),
    ("files_url", "http://x/files\ndhcp-range=0.0.0.0"),
    ("files_url", "file:///etc/shadow"),
])
def test_hostile_values_are_refused_by_the_model_and_the_cli(field: str, value: str, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    raw = _raw()
    raw["segments"][0]["provisioning"][field] = value
    with pytest.raises(SiteError):
        parse_site(raw)
    stack = tmp_path / "Pulumi.t.yaml"
    stack.write_text(yaml.safe_dump({"config": {"gpufleet:site": raw}}))
    assert main(["provision", "converge", "--stack-file", str(stack)]) == 2
    assert f"segments[0].provisioning.{field}" in capsys.readouterr().err


def test_the_lock_declares_the_pinned_packages_and_check_notices_them() -> None:
    site = parse_site(_raw())
    debs = {(d.name, d.version, d.segments) for d in declared(site) if d.kind is Kind.DEB}
    assert ("dnsmasq-base", DNSMASQ, ("compute", "iso")) in debs
    assert ("ipxe", IPXE, ("compute", "iso")) in debs
    # A lock made before the versions were pinned: `lock --check` names what is missing.
    raw = _raw()
    for seg in raw["segments"]:
        seg["provisioning"] = {k: v for k, v in seg["provisioning"].items() if not k.endswith("_version")}
    old = Lock("test", [], [])
    from infra.bundle.lock import decl_dict
    old.declared = [decl_dict(d) for d in declared(parse_site(raw))]
    problems = check(old, site)
    assert f"deb dnsmasq-base {DNSMASQ}: in the stack, not in the lock" in problems
    assert f"deb ipxe {IPXE}: in the stack, not in the lock" in problems


def test_the_derived_variables_pass_the_roles_argument_spec() -> None:
    """Ansible's own validator against roles/provisioning/meta/argument_specs.yml, as converge runs it."""
    raw = _raw()
    raw["segments"][0]["provisioning"]["files_url"] = "http://files.example.internal/files/"
    site = parse_site(raw)
    inv = service.inventory(site, _lock(), service.provisioning_hosts(site))
    assert sorted(inv["all"]["children"]["gpufleet_provisioning"]["hosts"]) == ["mirror01", "pxe01"]
    assert cmd.check_role_arguments(inv) == []
    hosts = inv["all"]["children"]["gpufleet_provisioning"]["hosts"]
    hosts["pxe01"]["provisioning_files"] = [{"path": "images/x.img"}]  # the check can fail
    assert any("provisioning_files" in p for p in cmd.check_role_arguments(inv))


def test_the_digest_follows_what_is_served() -> None:
    site = parse_site(_raw())
    seg = site.segments[1]
    same = service.served_digest(site, seg, _lock(), "roles1")
    assert same == service.served_digest(parse_site(_raw()), seg, _lock(), "roles1")
    assert same != service.served_digest(site, seg, _lock({**SHA, "disk": "66" * 32}), "roles1")  # new image bytes
    assert same != service.served_digest(site, seg, _lock(), "roles2")  # the role changed
    raw = _raw()
    raw["segments"][1]["provisioning"]["ipxe_version"] = "1.21.1+git-20220113.fbbdc3926-0ubuntu1"
    changed = parse_site(raw)
    assert same != service.served_digest(changed, changed.segments[1], _lock(), "roles1")
    # Another segment's image build does not re-run this segment's service.
    lock = _lock()
    lock.artifacts.append(Artifact(OS_IMAGE_KIND, "spare", "epoch-1", "files/provision/images/spare.img", 1, "77" * 32,
                                   "/b", ("compute",)))
    assert same == service.served_digest(site, seg, lock, "roles1")


# ------------------------------------------------------------------------------------------------ the CLI

def _stack(tmp_path: Path, raw: dict[str, Any], lock: Lock | None = None) -> Path:
    stack = tmp_path / "Pulumi.t.yaml"
    stack.write_text(yaml.safe_dump({"config": {"gpufleet:site": raw}}))
    if lock is not None:
        (tmp_path / "Pulumi.t.lock.json").write_text(lock.to_json())
    return stack


@pytest.fixture
def runs(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Stands in for ansible-runner: records each run; every host succeeds unless named in `fail`."""
    calls: list[dict[str, Any]] = []

    def run(playbook: str, inventory: dict[str, Any], hosts: list[str], **kw: Any) -> RunResult:
        calls.append({"playbook": playbook, "inventory": inventory, "hosts": list(hosts), **kw})
        results = {h: HostResult(h, ok=3, failed=int(h in calls[0].get("fail", ()))) for h in hosts}
        return RunResult(playbook, kw["check"], "successful", 0, 0.1, results, "/tmp/x")

    monkeypatch.setattr(hostplay, "run_playbook", run)
    return calls


def test_converge_runs_the_playbook_over_the_selected_provisioning_hosts(
        tmp_path: Path, runs: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]) -> None:
    raw = _raw()
    raw["segments"][0]["provisioning"]["files_url"] = "http://files.example.internal/files/"
    stack = _stack(tmp_path, raw, _lock())
    assert main(["provision", "converge", "--stack-file", str(stack), "--segment", "iso", "--check", "--json"]) == 0
    (call,) = runs
    assert (call["playbook"], call["hosts"], call["check"]) == ("provisioning.yml", ["mirror01"], True)
    assert list(call["inventory"]["all"]["children"]["gpufleet_provisioning"]["hosts"]) == ["mirror01"]
    assert json.loads(capsys.readouterr().out)["hosts"]["mirror01"]["succeeded"] is True
    assert main(["provision", "converge", "--stack-file", str(stack)]) == 0
    assert runs[1]["hosts"] == ["pxe01", "mirror01"] and runs[1]["check"] is False


def test_converge_exits_1_when_a_host_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = _raw()
    raw["segments"][0]["provisioning"]["files_url"] = "http://files.example.internal/files/"
    monkeypatch.setattr(hostplay, "run_playbook", lambda pb, inv, hosts, **kw: RunResult(
        pb, False, "failed", 2, 0.1, {h: HostResult(h, failed=int(h == "pxe01")) for h in hosts}, "/tmp/x"))
    assert main(["provision", "converge", "--stack-file", str(_stack(tmp_path, raw, _lock()))]) == 1


@pytest.mark.parametrize(("args", "raw_change", "lock", "words"), [
    (["--segment", "nope"], None, True, "--segment nope: no such segment with `provisioning`"),
    ([], lambda r: r["segments"][1]["provisioning"].pop("dnsmasq_version"), True,
     "segments[1].provisioning.dnsmasq_version: unset"),
    (["--segment", "iso"], None, False, "no os-image file"),
    ([], lambda r: [s.pop("provisioning") for s in r["segments"]] and [n.pop("image") for n in r["nodes"]], True,
     "no segment declares `provisioning`"),
])
def test_bad_input_exits_2_with_one_line_before_any_host_is_touched(
        args: list[str], raw_change: Any, lock: bool, words: str, tmp_path: Path, runs: list[dict[str, Any]],
        capsys: pytest.CaptureFixture[str]) -> None:
    raw = _raw()
    raw["segments"][0]["provisioning"]["files_url"] = "http://files.example.internal/files/"
    if raw_change:
        raw_change(raw)
    stack = _stack(tmp_path, raw, _lock() if lock else None)
    assert main(["provision", "converge", "--stack-file", str(stack), *args]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1
    assert runs == []


def test_an_unreadable_lock_exits_2(tmp_path: Path, runs: list[dict[str, Any]],
                                    capsys: pytest.CaptureFixture[str]) -> None:
    stack = _stack(tmp_path, _raw())
    (tmp_path / "Pulumi.t.lock.json").write_text("{not json")
    assert main(["provision", "converge", "--stack-file", str(stack)]) == 2
    assert "not a readable lock" in capsys.readouterr().err
    assert runs == []


def test_a_mirror_that_is_also_a_prometheus_host_gets_one_apt_source_for_its_own_repository() -> None:
    """Both roles write the mirror's own source to the same files with the same text: apt refuses one repository
    listed twice with different Signed-By ("Conflicting values set for option Signed-By")."""
    root = Path(__file__).resolve().parents[2] / "roles"

    def dests(role: str) -> set[str]:
        tasks = yaml.safe_load((root / role / "tasks" / "main.yml").read_text())
        block = next(t["block"] for t in tasks if t.get("name") == "Install the mirror's own apt source")
        return {next(v for m, v in t.items() if m.startswith("ansible.builtin."))["dest"]
                .replace(f"{role}_apt_keyring_dir", "DIR") for t in block[1:]}

    assert dests("provisioning") == dests("monitoring_server")
    prov = (root / "provisioning" / "templates" / "provisioning-source.sources.j2").read_text()
    mon = (root / "monitoring_server" / "templates" / "server-source.sources.j2").read_text()
    assert (prov.replace("provisioning_apt_keyring_dir", "DIR")
            == mon.replace("monitoring_server_apt_keyring_dir", "DIR"))
