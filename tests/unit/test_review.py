"""`gpufleet review`: preview digests (tests/fixtures/preview) → per-node change review."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from infra.cli import main
from infra.model.load import load_site
from infra.plan.node import plan_site
from infra.review.digest import UNKNOWN, DigestError, parse
from infra.review.report import Review, markdown, review

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "preview"


def _review(fixture: str, stack: str = "lab") -> Review:
    return review(parse((FIXTURES / fixture).read_text()), plan_site(load_site(stack)), stack)


def _node(r: Review, host: str) -> Any:
    return next(n for n in r.nodes if n.hostname == host)


def test_create_lists_every_new_node_and_warns_about_reimage() -> None:
    """A first `pulumi up` adds every node with its versions and warns that creation PXE-reinstalls."""
    r = _review("lab-create.json")
    assert [n.action for n in r.nodes] == ["added"] * 4
    gpu01 = {c.key: c.new for c in _node(r, "lab-gpu01").changes}
    assert gpu01["driver"] == "570.133.20 (open)" and gpu01["gpus"] == "2x L4"
    assert sum("PXE-reinstalls" in w for w in r.warnings) == 4
    assert r.summary.startswith("4 added") and "29 to create" in r.summary


def test_driver_update_shows_old_and_new_versions_and_reboots() -> None:
    """A driver bump re-converges every node, names old → new, and warns about serving-node reboots."""
    r = _review("lab-driver-update.json")
    gpu02 = _node(r, "lab-gpu02")
    assert gpu02.action == "re-converged" and gpu02.reboot == "reboot"
    changes = {c.key: (c.old, c.new) for c in gpu02.changes}
    assert changes["driver"] == ("570.133.20 (open)", "580.95.05 (open)")
    assert changes["fabric_manager"] == ("570.133.20", "580.95.05")
    assert gpu02.steps == {"bmc": "same", "wait-ssh": "same", "converge": "replace", "validate": "replace"}
    serving = [w for w in r.warnings if "while serving" in w]
    assert len(serving) == 2 and any("lab-gpu01" in w and "tiny-connected" in w for w in serving)
    assert "4 reboot(s)" in r.summary


def test_policy_never_reports_the_pending_reboot() -> None:
    """Under reboot policy `never` a driver change is flagged as needing a reboot nobody will do."""
    r = _review("example-airgap-driver-update.json", "example-airgap")
    assert {n.reboot for n in r.nodes} == {"reboot required, not performed (policy never)"}
    assert sum("policy `never`" in w for w in r.warnings) == 2
    assert r.diagnostics == [{"severity": "warning", "message": "gpufleet: reboot policy is `never`"}]
    assert "0 reboot(s)" in r.summary


def test_bmc_input_update_is_not_a_rebuild() -> None:
    """Changing only the BMC step's command (adopt mode) is an update that powers on, no warning."""
    r = _review("lab-adopt-update.json")
    assert {n.action for n in r.nodes} == {"updated"}
    assert all(n.reboot == "" for n in r.nodes)
    assert r.warnings == []
    assert "no reinstall" in _node(r, "lab-gpu03").changes[0].new


def test_replace_of_the_bmc_step_is_a_rebuild_of_a_serving_node() -> None:
    """`--replace <node>-bmc` shows as a rebuild with everything downstream re-run, flagged as risky."""
    r = _review("lab-rebuild.json")
    gpu03 = _node(r, "lab-gpu03")
    assert gpu03.action == "rebuilt" and set(gpu03.steps.values()) == {"replace"}
    assert [n.action for n in r.nodes if n.hostname != "lab-gpu03"] == ["unchanged"] * 3
    assert len(r.warnings) == 1 and "REBUILT" in r.warnings[0] and "tiny-airgap" in r.warnings[0]


def test_removed_node_is_flagged() -> None:
    """Deleting a node's resources is reported as removal; Pulumi forgets it without touching it."""
    r = _review("lab-remove-node.json")
    assert _node(r, "lab-gpu04").action == "removed"
    assert any("lab-gpu04" in w and "forgets" in w for w in r.warnings)
    assert r.change_summary["delete"] == 5


def test_new_lock_reimports_the_mirror_and_reconverges() -> None:
    """A new lock file warns about air-gapped sources and re-converges nodes on content hash alone."""
    r = _review("lab-lock-update.json")
    assert any("air-gapped segment **airgap**" in w and "lock none →" in w for w in r.warnings)
    assert {c.key for n in r.nodes for c in n.changes} == {"content"}
    assert {n.action for n in r.nodes} == {"re-converged"}


def test_markdown_has_summary_warnings_and_node_table() -> None:
    """The Markdown carries the summary line, the warnings and one table row per changed node."""
    md = markdown(_review("lab-driver-update.json"))
    assert md.startswith("## gpufleet change review — stack `lab`")
    assert "**Summary:** 4 re-converged" in md
    assert "| lab-gpu01 | connected | re-converged | reboot | driver: 570.133.20 (open) → 580.95.05 (open) |" in md
    assert md.count("reboots for driver") == 4


def _step(op: str, name: str, old: dict[str, Any] | None, new: dict[str, Any] | None) -> dict[str, Any]:
    urn = ("urn:pulumi:lab::gpufleet::gpufleet:site:Site$gpufleet:segment:Segment$gpufleet:node:GpuNode$"
           f"command:local:Command::{name}")
    step: dict[str, Any] = {"op": op, "urn": urn}
    if old is not None:
        step["oldState"] = {"type": "command:local:Command", "inputs": old}
    if new is not None:
        step["newState"] = {"type": "command:local:Command", "inputs": new}
    return step


def test_replacement_step_pair_counts_as_replace_and_unknowns_read_well() -> None:
    """create-replacement/delete-replaced merge into one replace; unknown values print as known-after-apply."""
    old = {"triggers": [{"driver": "570.133.20 (open)", "content_hash": "a"}, "x"]}
    new = {"triggers": [{"driver": UNKNOWN, "content_hash": "b"}, UNKNOWN]}
    text = json.dumps({"steps": [
        _step("create-replacement", "lab-gpu01-converge", old, new),
        _step("delete-replaced", "lab-gpu01-converge", old, None),
    ], "changeSummary": {"replace": 1}})
    digest = parse(text)
    assert [s.op for s in digest.steps] == ["replace"]
    r = review(digest, None, "lab")
    assert r.nodes[0].changes[0].new == "(known after apply)"


def test_secret_inputs_never_reach_the_review() -> None:
    """Even if a preview carried a plaintext environment value, the review never prints inputs it does not know."""
    leak = "canary-review-secret"
    bmc_old = {"create": "x", "environment": {"GPUFLEET_SECRET_BMCPASSWORD": leak}, "triggers": [{"os": "a"}]}
    bmc_new = {"create": "y", "environment": {"GPUFLEET_SECRET_BMCPASSWORD": leak}, "triggers": [{"os": "b"}]}
    digest = parse(json.dumps({"steps": [_step("replace", "lab-gpu01-bmc", bmc_old, bmc_new)],
                               "changeSummary": {"replace": 1}}))
    r = review(digest, None, "lab")
    assert r.nodes[0].action == "rebuilt"
    assert leak not in markdown(r) and leak not in json.dumps(r.as_dict())


@pytest.mark.parametrize("text", ["not json", "[]", '{"foo": 1}', '{"steps": [{"op": "create"}]}'])
def test_non_digest_input_is_rejected(text: str) -> None:
    """Anything that is not `pulumi preview --json` output is refused with a reason."""
    with pytest.raises(DigestError):
        parse(text)


def test_cli_reads_stdin_and_writes_json(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`gpufleet review --preview - --json` reads stdin and prints the review as JSON, exit 0."""
    monkeypatch.setattr("sys.stdin", io.StringIO((FIXTURES / "lab-rebuild.json").read_text()))
    assert main(["review", "--stack", "lab", "--preview", "-", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [n["hostname"] for n in data["nodes"] if n["action"] == "rebuilt"] == ["lab-gpu03"]


def test_cli_rejects_bad_input_with_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A file that is not a preview digest (or is missing) exits 2 and says why."""
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert main(["review", "--stack", "lab", "--preview", str(bad)]) == 2
    assert "not `pulumi preview --json` output" in capsys.readouterr().err
    assert main(["review", "--stack", "lab", "--preview", str(tmp_path / "missing.json")]) == 2


def test_cli_writes_markdown_to_a_file(tmp_path: Path) -> None:
    """`--out FILE` writes the Markdown review there."""
    out = tmp_path / "review.md"
    assert main(["review", "--stack", "lab", "--preview", str(FIXTURES / "lab-driver-update.json"),
                 "--out", str(out)]) == 0
    assert out.read_text().startswith("## gpufleet change review")
