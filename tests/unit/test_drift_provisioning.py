"""`gpufleet drift` on the segments' provisioning hosts: the provisioning play's check mode, read per host.

The play is replaced by a fake that feeds ansible-runner events into the product's own collector
(`infra.ansible.runner._Collector`, `fold_result`), so what is tested is the whole path from an event to the
report and the exit code. The event shapes are ansible-runner's: recorded with ansible-core 2.19.14 and
ansible-runner 2.4.3 (this project's uv.lock) from `ansible-playbook --check --diff` of an
`ansible.builtin.copy` task, once plain and once with a loop (`runner_on_ok`, its `res` with `invocation`
left out); a loop's `res` carries no diff of its own, each item's result under `results` does.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.ansible.rollout import RolloutResult
from infra.ansible.runner import RunResult, _Collector, fold_result
from infra.bundle.lock import OS_IMAGE_KIND, Artifact, Lock, OsImage
from infra.cli import main
from infra.commands import converge as converge_cmd
from infra.commands import drift as drift_cmd
from infra.dr import provdrift
from infra.dr.drift import NodeDrift
from infra.dr.provdrift import provisioning_drift
from infra.model.load import parse_site
from infra.plan.nodestate import DriftItem
from infra.provision import service
from tests.unit.factories import make_site

# Debian 12's versions (`apt-cache policy dnsmasq-base ipxe` on bookworm, 2026-12).
VERSIONS = {"dnsmasq_version": "2.90-4~deb12u2", "ipxe_version": "1.0.0+git-20190125.36a4c85-5.1"}
CONF = "/etc/gpufleet/provisioning/dnsmasq.conf"  # roles/provisioning/vars/main.yml `_provisioning_conf`
HTTP = "/srv/gpufleet/provision/http"  # roles/provisioning/defaults/main.yml `provisioning_http_root`
WRITE_CONF = "Write the dnsmasq configuration"
SCRIPTS = "Write the boot, install and local scripts"
ENABLE = "Enable the provisioning services"
# What a hand edit put into a file: it must never reach the report (a file beside the scripts may hold keys).
SECRET = "-----BEGIN OPENSSH PRIVATE KEY----- b3BlbnNzaC1rZXktdjEAAAAABG5vbmU"


def _raw(image: bool = False) -> dict[str, Any]:
    raw = make_site()
    raw["segments"][0]["provisioning"] = {"host": "pxe01", "address": "10.0.0.5", **VERSIONS}
    raw["segments"][1]["provisioning"] = {"host": "mirror01", **VERSIONS}
    for n in raw["nodes"]:
        n.pop("image", None)
    if image:
        raw["nodes"][0]["image"] = "debian-12-node"
        raw["segments"][0]["provisioning"]["files_url"] = "http://files.example.internal/files/"
    return raw


def _copy(path: str, before: str, after: str) -> dict[str, Any]:
    """One changed copy's result as ansible-runner reports it under --check --diff (recorded, see above)."""
    return {"diff": [{"before_header": path, "before": before, "after_header": path, "after": after}],
            "changed": True, "_ansible_no_log": False}


def _event(kind: str, host: str, task: str, res: dict[str, Any]) -> dict[str, Any]:
    return {"event": kind, "event_data": {"host": host, "task": task, "role": "provisioning", "res": res}}


def _fake_play(script: dict[str, list[tuple[str, str, dict[str, Any]]]], calls: list[dict[str, Any]]) -> Any:
    """A play runner: for each host its (event kind, task, res) in order, folded by the product's collector."""

    def run(playbook: str, inventory: dict[str, Any], hosts: list[str], **kw: Any) -> RunResult:
        calls.append({"playbook": playbook, "inventory": inventory, "hosts": list(hosts), **kw})
        c = _Collector(hosts, None)
        stats: dict[str, dict[str, int]] = {k: {} for k in ("ok", "changed", "failures", "dark", "skipped")}
        for host in hosts:
            for kind, task, res in script.get(host, []):
                c(_event(kind, host, task, res))
                key = {"runner_on_ok": "changed" if res.get("changed") else "ok", "runner_on_failed": "failures",
                       "runner_on_unreachable": "dark"}[kind]
                stats[key][host] = stats[key].get(host, 0) + 1
        c({"event": "playbook_on_stats", "event_data": stats})
        rc = 4 if stats["dark"] else 2 if stats["failures"] else 0
        return fold_result(playbook, kw["check"], "successful" if rc == 0 else "failed", rc, time.monotonic(), c,
                           c.stats, Path("/nonexistent"), None)

    return run


EDITED = {
    "pxe01": [
        ("runner_on_ok", "Check the HTTP file names", {"changed": False}),
        ("runner_on_ok", WRITE_CONF, _copy(CONF, f"# edited by hand\n{SECRET}\n", "port=0\n")),
        # A loop task: each item's diff is in its own result (an edited script, an untouched one).
        ("runner_on_ok", SCRIPTS, {"results": [
            {**_copy(f"{HTTP}/boot.ipxe", f"#!ipxe\n{SECRET}\n", "#!ipxe\n"), "item": "boot.ipxe",
             "ansible_loop_var": "item"},
            {"changed": False, "item": "ipxe/local/02-00-00-00-00-11.ipxe", "ansible_loop_var": "item"},
        ], "changed": True, "msg": "All items completed"}),
        # dnsmasq stopped: the unit would be started (a changed result without a diff).
        ("runner_on_ok", ENABLE, {"results": [{"changed": True, "item": "gpufleet-provision-dhcp",
                                               "ansible_loop_var": "item"}],
                                  "changed": True, "msg": "All items completed"}),
    ],
    "mirror01": [("runner_on_ok", WRITE_CONF, {"changed": False}), ("runner_on_ok", ENABLE, {"changed": False})],
}


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every run of the provisioning play, with the EDITED script unless a test sets another."""
    recorded: list[dict[str, Any]] = []
    monkeypatch.setattr(provdrift, "run_playbook", _fake_play(EDITED, recorded))
    return recorded


# ------------------------------------------------------------------------------------------ the derivation

def test_each_host_is_read_from_the_provisioning_play_in_check_mode_with_the_converges_variables(
        calls: list[dict[str, Any]]) -> None:
    site = parse_site(_raw())
    hosts = service.provisioning_hosts(site)
    reports = {r.hostname: r for r in provisioning_drift(site, hosts, None)}
    (call,) = calls
    # One run over both hosts, check mode, with exactly what `provision converge` would hand the role.
    assert (call["playbook"], call["hosts"], call["check"]) == ("provisioning.yml", ["pxe01", "mirror01"], True)
    assert call["inventory"] == service.inventory(site, None, hosts)
    edited = reports["pxe01"]
    assert (edited.status, edited.segment, edited.check) == ("drift", "compute", "ran")
    assert {(i.kind, i.item) for i in edited.items} == {
        ("file", CONF), ("file", f"{HTTP}/boot.ipxe"),
        ("task", f"provisioning : {WRITE_CONF}"), ("task", f"provisioning : {SCRIPTS}"),
        ("task", f"provisioning : {ENABLE}"),
    }
    assert all(i.source == "check" for i in edited.items)
    assert (reports["mirror01"].status, reports["mirror01"].items) == ("clean", [])


def test_a_modules_own_results_list_does_not_hide_its_diff() -> None:
    """Only a loop's item results (marked `ansible_loop_var`) replace the task's own diff: a module may return a
    `results` list of its own (ansible.builtin.dnf returns strings there)."""
    c = _Collector(["h"], None)
    c(_event("runner_on_ok", "h", "Own results", {**_copy("/etc/own", "a\n", "b\n"), "results": ["Installed: x"]}))
    assert c.hosts["h"].files_changed == ["/etc/own"]


def test_an_unreachable_or_failed_host_is_not_clean_and_the_others_are_still_read(
        monkeypatch: pytest.MonkeyPatch) -> None:
    script = {
        "pxe01": [("runner_on_unreachable", "Gathering Facts",
                   {"msg": "Failed to connect to the host via ssh: Connection refused", "unreachable": True})],
        "mirror01": [("runner_on_failed", "Install pinned dnsmasq and iPXE", {"msg": "E: Version '2.90' not found"})],
    }
    monkeypatch.setattr(provdrift, "run_playbook", _fake_play(script, []))
    site = parse_site(_raw())
    down, failed = provisioning_drift(site, service.provisioning_hosts(site), None)
    assert (down.status, down.reachable) == ("unreachable", False) and "Connection refused" in down.error
    assert failed.status == "check-failed" and "Version '2.90' not found" in failed.check
    assert not down.drifted and not failed.drifted


def test_bad_input_for_one_segment_fails_that_host_only(calls: list[dict[str, Any]]) -> None:
    """An image the lock does not hold: its host is check-failed with the message, the other host is read."""
    site = parse_site(_raw(image=True))
    reports = {r.hostname: r for r in provisioning_drift(site, service.provisioning_hosts(site), None)}
    assert reports["pxe01"].status == "check-failed" and "no os-image file 'debian-12-node'" in reports["pxe01"].check
    assert calls[0]["hosts"] == ["mirror01"] and reports["mirror01"].status == "clean"


def test_no_check_runs_nothing_and_reports_not_checked(calls: list[dict[str, Any]]) -> None:
    site = parse_site(_raw())
    reports = provisioning_drift(site, service.provisioning_hosts(site), None, check=False)
    assert calls == [] and [(r.hostname, r.status) for r in reports] == [("pxe01", "not checked"),
                                                                          ("mirror01", "not checked")]


# -------------------------------------------------------------------------------------------------- the CLI

def _stack(tmp_path: Path, raw: dict[str, Any], lock: Lock | None = None) -> str:
    stack = tmp_path / "Pulumi.t.yaml"
    stack.write_text(yaml.safe_dump({"config": {"gpufleet:site": raw}}))
    if lock is not None:
        (tmp_path / "Pulumi.t.lock.json").write_text(lock.to_json())
    return str(stack)


def _nodes(monkeypatch: pytest.MonkeyPatch, drifted: frozenset[str] = frozenset()) -> list[list[str]]:
    """Node drift stands in (it has its own tests): clean nodes, `drifted` ones with one file item."""
    asked: list[list[str]] = []

    def fake(site: Any, plans: list[Any], **kw: Any) -> list[NodeDrift]:
        asked.append([p.hostname for p in plans])
        return [NodeDrift(p.hostname, check="ran", items=[DriftItem("file", "/etc/x", "a", "b")]
                          if p.hostname in drifted else []) for p in plans]

    monkeypatch.setattr(drift_cmd, "drift", fake)
    return asked


def test_json_names_the_drifted_host_its_segment_and_file_and_exits_3(
        tmp_path: Path, calls: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    _nodes(monkeypatch)
    assert main(["drift", "--stack-file", _stack(tmp_path, _raw()), "--json"]) == 3
    data = json.loads(capsys.readouterr().out)
    assert data["drifted"] == 0 and data["provisioning_drifted"] == 1
    hosts = {h["hostname"]: h for h in data["provisioning"]}
    assert set(hosts) == {"pxe01", "mirror01"}
    pxe = hosts["pxe01"]
    assert {k: pxe[k] for k in ("segment", "status", "reachable", "drifted", "check")} == {
        "segment": "compute", "status": "drift", "reachable": True, "drifted": True, "check": "ran"}
    assert {"kind": "file", "item": CONF, "want": "as converged from the stack", "have": "differs",
            "source": "check"} in pxe["items"]
    assert hosts["mirror01"]["status"] == "clean" and hosts["mirror01"]["items"] == []


def test_people_see_host_segment_files_and_tasks_but_never_file_contents(
        tmp_path: Path, calls: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    _nodes(monkeypatch)
    stack = _stack(tmp_path, _raw())
    assert main(["drift", "--stack-file", stack]) == 3
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert any(line.split()[:3] == ["pxe01", "compute", "file"] and CONF in line for line in lines), text
    assert any(line.startswith("pxe01") and f"provisioning : {ENABLE}" in line for line in lines), text
    assert "1 of 2 provisioning host(s) drifted, 0 not read" in text
    assert main(["drift", "--stack-file", stack, "--json"]) == 3
    as_json = capsys.readouterr().out
    for out in (text, as_json):
        assert "PRIVATE KEY" not in out and "edited by hand" not in out and "port=0" not in out


def test_node_reads_nodes_only_unless_its_provisioning_host_is_asked_for_and_only_narrows(
        tmp_path: Path, calls: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    asked = _nodes(monkeypatch)
    stack = _stack(tmp_path, _raw())
    # `--node` is the DR runbook's "is this node as planned": no provisioning host is read (pxe01 would drift).
    assert main(["drift", "--stack-file", stack, "--node", "gpu02", "--json"]) == 0
    assert asked[-1] == ["gpu02"] and calls == []
    assert json.loads(capsys.readouterr().out)["provisioning"] == []
    # Asked for: gpu02 is on the air-gapped segment, its provisioning host is the mirror, which is clean.
    assert main(["drift", "--stack-file", stack, "--node", "gpu02", "--only", "provisioning", "--json"]) == 0
    assert calls[-1]["hosts"] == ["mirror01"]
    out = json.loads(capsys.readouterr().out)
    assert [h["hostname"] for h in out["provisioning"]] == ["mirror01"] and out["nodes"] == []
    runs = len(calls)
    assert main(["drift", "--stack-file", stack, "--only", "nodes", "--json"]) == 0
    assert len(calls) == runs and json.loads(capsys.readouterr().out)["provisioning"] == []
    assert main(["drift", "--stack-file", stack, "--only", "provisioning", "--json"]) == 3
    assert asked[-1] == [] and calls[-1]["hosts"] == ["pxe01", "mirror01"]
    assert json.loads(capsys.readouterr().out)["nodes"] == []


def test_exit_codes_combine_nodes_and_provisioning_hosts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    clean: dict[str, list[tuple[str, str, dict[str, Any]]]] = {"pxe01": [], "mirror01": []}
    down = {**clean, "mirror01": [("runner_on_unreachable", "Gathering Facts", {"msg": "No route to host"})]}
    stack = _stack(tmp_path, _raw())
    cases = [(clean, frozenset(), 0), (clean, frozenset({"gpu01"}), 3), (down, frozenset(), 1),
             (down, frozenset({"gpu01"}), 3), (EDITED, frozenset(), 3)]
    for script, drifted, code in cases:
        monkeypatch.setattr(provdrift, "run_playbook", _fake_play(script, []))
        _nodes(monkeypatch, drifted)
        assert main(["drift", "--stack-file", stack, "--json"]) == code, (script, drifted)
    capsys.readouterr()


def test_no_check_reads_no_lock_and_runs_no_play(
        tmp_path: Path, calls: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    _nodes(monkeypatch)
    stack = _stack(tmp_path, _raw())
    (tmp_path / "Pulumi.t.lock.json").write_text("{not json")
    assert main(["drift", "--stack-file", stack, "--no-check"]) == 0
    rows = [line.split()[:4] for line in capsys.readouterr().out.splitlines()]
    assert calls == []
    assert ["pxe01", "compute", "not", "checked"] in rows and ["mirror01", "iso", "not", "checked"] in rows


def test_an_unreadable_lock_exits_2_before_anything_is_read(
        tmp_path: Path, calls: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    asked = _nodes(monkeypatch)
    stack = _stack(tmp_path, _raw())
    (tmp_path / "Pulumi.t.lock.json").write_text("{not json")
    assert main(["drift", "--stack-file", stack]) == 2
    err = capsys.readouterr().err
    assert "not a readable lock" in err and len(err.strip().splitlines()) == 1
    assert asked == [] and calls == []


def test_the_locked_image_reaches_the_play_so_a_served_image_with_other_bytes_is_seen(
        tmp_path: Path, calls: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The lock's sha256 of each served file is in the play's variables (get_url checks the file against it)."""
    _nodes(monkeypatch)
    sha = "ab" * 32
    files = [("debian-12-node", "images/debian-12-node.img"), ("debian-12-node:deploy-kernel", "deploy/vmlinuz"),
             ("debian-12-node:deploy-initrd", "deploy/initrd.img")]
    lock = Lock("t", [], [Artifact(OS_IMAGE_KIND, n, "epoch-1", f"files/provision/{rel}", 7, sha, f"/b/{rel}",
                                   ("compute",)) for n, rel in files],
                os_images=[OsImage("debian-12-node", sha, 4096, 1, ("systemd=252",), ("compute",))])
    assert main(["drift", "--stack-file", _stack(tmp_path, _raw(image=True), lock), "--json"]) == 3
    served = calls[0]["inventory"]["all"]["children"]["gpufleet_provisioning"]["hosts"]["pxe01"]["provisioning_files"]
    assert {f["path"]: f["sha256"] for f in served} == {rel: sha for _, rel in files}
    capsys.readouterr()


# ------------------------------------------------------------------ converge of a node that is a provisioning host

def test_converge_of_a_provisioning_host_node_names_the_command_for_its_service(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    raw = _raw()
    raw["segments"][0]["provisioning"] = {"host": "gpu01", **VERSIONS}  # a node serves its own segment
    stack = _stack(tmp_path, raw)
    ran: list[list[str]] = []
    monkeypatch.setattr(converge_cmd, "converge",
                        lambda plan, nodes, **kw: ran.append([n.hostname for n in nodes]) or RolloutResult([], [], {}))
    note = ("note: gpu01 is segment compute's provisioning host; its provisioning service (dnsmasq, iPXE, HTTP) "
            "is converged by `gpufleet provision converge --segment compute`")
    assert main(["converge", "--stack-file", stack, "--node", "gpu01", "--execution", "local"]) == 0
    assert capsys.readouterr().err.splitlines() == [note]
    # Another node, or JSON for a program: no note.
    assert main(["converge", "--stack-file", stack, "--node", "gpu02", "--execution", "local"]) == 0
    assert capsys.readouterr().err == ""
    assert main(["converge", "--stack-file", stack, "--node", "gpu01", "--execution", "local", "--json"]) == 0
    assert capsys.readouterr().err == ""
    assert ran == [["gpu01"], ["gpu02"], ["gpu01"]]
