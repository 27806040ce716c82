"""`gpufleet review`: hand-written preview documents (tests/fixtures/preview, see its README) → change review."""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path
from typing import Any

import pytest

from infra.cli import main
from infra.components.commands import batch_converge, node_commands
from infra.components.node import STEPS
from infra.model.load import load_site
from infra.plan.node import plan_site
from infra.review import digest as digest_mod
from infra.review.digest import SECRET_SIG, SIG_KEY, UNKNOWN, DigestError, parse
from infra.review.report import BMC, CONVERGE, NODE_STEPS, NODE_TYPE, REIMAGE, NodeReview, Review, markdown, review

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "preview"


def _doc(fixture: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / fixture).read_text())
    return data


def _review(doc: str | dict[str, Any], stack: str = "lab") -> Review:
    text = (FIXTURES / doc).read_text() if isinstance(doc, str) else json.dumps(doc)
    return review(parse(text), plan_site(load_site(stack)), stack)


def _node(r: Review, host: str) -> NodeReview:
    return next(n for n in r.nodes if n.hostname == host)


def _step(doc: dict[str, Any], name: str, op: str | None = None) -> dict[str, Any]:
    step: dict[str, Any] = next(s for s in doc["steps"] if s["urn"].endswith(f"::{name}")
                                and (op is None or s["op"] == op))
    return step


def _run(argv: list[str], stdin: str | None, monkeypatch: pytest.MonkeyPatch,
         capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(stdin.encode("utf-8")), encoding="utf-8"))
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


# --- the eight scenarios of issue 19 ------------------------------------------------------

def test_segment_move_is_a_reinstall_shown_as_a_move_not_a_removal() -> None:
    """Deletes and creates of the same host under another segment are one move; its new BMC step reimages."""
    r = _review("segment-move.json")
    assert [n.hostname for n in r.nodes] == ["lab-gpu03"]
    gpu03 = r.nodes[0]
    assert gpu03.action == "moved" and gpu03.segment == "connected → airgap"
    assert "moved from segment connected to airgap" in gpu03.reinstall and "bmc reimage" in gpu03.reinstall
    assert r.reinstalls == [{"host": "lab-gpu03", "reason": gpu03.reinstall}]
    assert "reinstall" in r.attention and "remove" not in r.attention
    assert {(s.resource, s.op) for s in gpu03.steps} >= {("bmc", "create"), ("bmc", "delete")}
    md = markdown(r)
    assert "### ⚠️ reinstalls" in md and "- **lab-gpu03**: **moved from segment" in md
    assert "**moved (reinstall)**" in md
    assert "forgotten" not in md and "removed" not in md


def test_segment_move_without_reimage_on_create_is_a_reconverge() -> None:
    """When the new BMC step only powers on (adopt mode), a move re-converges and is not a reinstall."""
    doc = _doc("segment-move.json")
    bmc = next(s for s in doc["steps"] if s["urn"].endswith("::lab-gpu03-bmc") and s["op"] == "create")
    bmc["newState"]["inputs"]["create"] = ".venv/bin/gpufleet bmc power --stack lab --node lab-gpu03 --state on"
    r = _review(doc)
    gpu03 = _node(r, "lab-gpu03")
    assert gpu03.action == "moved" and gpu03.reinstall == "" and gpu03.reboot == ""
    assert r.reinstalls == [] and r.attention == []
    assert any("moves between segments" in n and "no reinstall" in n for n in r.notes)
    assert "### ⚠️ reinstalls" not in markdown(r)


def test_checkout_moved_says_dir_and_nothing_else() -> None:
    """Every step updated on `dir` only: each row says dir old → new; no lock or reinstall is claimed."""
    r = _review("checkout-moved.json")
    rows = [s for n in r.nodes for s in n.steps] + r.other
    assert len(rows) == 9
    assert all("dir /home/alice/src/gpufleet → /srv/ci/builds/gpufleet" in s.why for s in rows)
    assert any("differs only in `dir`" in n for n in r.notes)
    assert r.reinstalls == [] and r.attention == []
    md = markdown(r)
    assert "lock" not in md and "5b7d" not in md


def test_failed_preview_is_not_a_clean_review(monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """An error diagnostic fails the review (exit 1) with the error; prefix and ANSI colours are gone."""
    r = _review("failed-preview.json")
    assert r.failed and r.complete
    messages = [d["message"] for d in r.diagnostics]
    assert messages[0] == "WARNING lock file stacks/Pulumi.lab.lock.json is older than the stack file"
    assert messages[1].startswith("Program failed with an unhandled exception:")
    md = markdown(r)
    assert "The preview failed" in md and "\x1b" not in md and "error: " not in md
    code, out, err = _run(["review", "--stack", "lab", "--preview", str(FIXTURES / "failed-preview.json")],
                          None, monkeypatch, capsys)
    assert code == 1 and out.startswith("## gpufleet change review")
    assert err.count("\n") == 1 and "KeyError: 'lab-gpu05'" in err


def test_cancelled_preview_without_summary_exits_1(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """No changeSummary means the engine never finished: incomplete, exit 1, never "no nodes affected" + 0."""
    r = _review("cancelled-preview.json")
    assert not r.complete and r.failed
    code, out, err = _run(["review", "--stack", "lab", "--preview", "-", "--json"],
                          (FIXTURES / "cancelled-preview.json").read_text(), monkeypatch, capsys)
    assert code == 1 and json.loads(out)["complete"] is False and "did not finish" in err


def test_empty_preview_output_is_a_failed_preview(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """`pulumi preview --json` that printed nothing failed before the engine ran: exit 1, not 0."""
    code, _, err = _run(["review", "--stack", "lab", "--preview", "-"], "  \n", monkeypatch, capsys)
    assert code == 1 and "empty" in err


def test_provider_upgrade_is_shown_as_such_and_not_as_a_node_warning() -> None:
    """default_1_2_1 deleted + default_1_3_0 created is one plugin upgrade row; no node, no warning."""
    r = _review("provider-upgrade.json")
    assert r.nodes == [] and r.other == [] and r.notes == [] and r.reinstalls == []
    assert [(p.resource, p.op) for p in r.providers] == [("default_1_2_1 → default_1_3_0", "upgrade")]
    assert "plugin upgrade 1.2.1 → 1.3.0" in r.providers[0].why
    md = markdown(r)
    assert "### Providers" in md and "⚠️" not in md


def test_node_removal_without_delete_command_is_forgotten() -> None:
    """A removed node with no delete command: the review says nothing happens to the machine."""
    r = _review("node-removal.json")
    gpu05 = _node(r, "lab-gpu05")
    assert gpu05.action == "removed" and gpu05.removal.startswith("forgotten: no power-off, no wipe")
    assert r.unknown == [] and r.attention == ["remove"]
    assert "forgotten" in markdown(r)


@pytest.mark.parametrize(("command", "says"), [
    (".venv/bin/gpufleet bmc power --stack lab --node lab-gpu05 --state off && "
     ".venv/bin/gpufleet decommission --stack lab --node lab-gpu05 --record", "powered off via its BMC"),
    (".venv/bin/gpufleet decommission --stack lab --node lab-gpu05 --keep-running --record", "keeps running"),
])
def test_node_removal_reads_the_delete_command(command: str, says: str) -> None:
    """With a decommission delete step the review says what it does (power off, or keep running)."""
    doc = _doc("node-removal.json")
    _step(doc, "lab-gpu05-bmc")["oldState"]["inputs"]["delete"] = command
    gpu05 = _node(_review(doc), "lab-gpu05")
    assert gpu05.removal.startswith(says) and "forgotten" not in gpu05.removal


def test_driver_bump_names_the_trigger_keys_and_reboots() -> None:
    """Converge rows say which trigger key changed old → new; driver and fabric manager mean a reboot."""
    r = _review("driver-bump.json")
    gpu01, gpu02 = _node(r, "lab-gpu01"), _node(r, "lab-gpu02")
    assert gpu01.action == gpu02.action == "re-converged"
    assert gpu01.reboot == gpu02.reboot == "reboot"
    assert {c.key: (c.old, c.new) for c in gpu02.changes} == {
        "driver": ("570.133.20 (open)", "580.95.05 (open)"), "fabric_manager": ("570.133.20", "580.95.05")}
    conv = next(s for s in gpu01.steps if s.resource == "converge")
    assert conv.op == "replace" and "driver 570.133.20 (open) → 580.95.05 (open)" in conv.why
    mirror = next(o for o in r.other if o.resource == "airgap-mirror-import")
    assert mirror.why.startswith("lock 5b7d0e9a41c3… → d40e8b17a6c2…")
    assert r.attention == ["reboot"] and r.reinstalls == []


def test_rebuild_lists_the_reinstall_with_its_reason() -> None:
    """`--replace <host>-bmc` (replaceReasons ["id"], detailedDiff null) is a reinstall, said to be requested."""
    r = _review("rebuild.json")
    gpu03 = _node(r, "lab-gpu03")
    assert gpu03.action == "rebuilt" and "`--replace`" in gpu03.reinstall
    assert gpu03.serving == ["tiny-airgap"] and gpu03.reboot == "reboot (reinstall)"
    assert [x["host"] for x in r.reinstalls] == ["lab-gpu03"]
    assert [s.op for s in gpu03.steps] == ["replace"] * 4


def test_secrets_in_diffs_are_never_printed() -> None:
    """"[secret]" stays masked; a secret object's plaintext and environment values never reach the review."""
    doc = _doc("secrets-diff.json")
    canary = "canary-review-secret-7f3a"
    step = _step(doc, "hgx-01-bmc")
    secret = {SIG_KEY: SECRET_SIG, "plaintext": json.dumps(canary)}
    step["newState"]["inputs"]["environment"]["GPUFLEET_SECRET_BMCPASSWORD"] = secret
    step["newState"]["inputs"]["triggers"][0]["os"] = copy.deepcopy(secret)
    step["detailedDiff"]["triggers[0].os"] = {"kind": "update-replace", "inputDiff": False}
    other = _step(doc, "l40s-01-bmc")
    other["newState"]["inputs"]["environment"]["GPUFLEET_SECRET_BMCPASSWORD"] = canary
    r = _review(doc, "example-prod")
    md, js = markdown(r), json.dumps(r.as_dict())
    assert canary not in md and canary not in js
    hgx = _node(r, "hgx-01")
    assert any("os ubuntu-22.04 → [secret]" in s.why for s in hgx.steps)
    assert "environment GPUFLEET\\_SECRET\\_BMCPASSWORD changed (\\[secret\\])" in md


@pytest.mark.parametrize("envelope", [
    {"plaintext": '"canary-damaged-9c1e"'},                      # signature key removed
    {SIG_KEY: "0" * 32, "plaintext": '"canary-damaged-9c1e"'},   # signature changed
    {"ciphertext": "canary-damaged-9c1e"},
])
def test_a_damaged_secret_envelope_is_still_masked(envelope: dict[str, str]) -> None:
    """A secret object whose signature was lost or altered (a hand-edited or truncated preview) stays
    masked: found by the property test, which deleted the signature key of a secret in a trigger."""
    doc = _doc("secrets-diff.json")
    step = _step(doc, "hgx-01-bmc")
    step["newState"]["inputs"]["triggers"][0]["os"] = envelope
    step["detailedDiff"]["triggers[0].os"] = {"kind": "update-replace", "inputDiff": False}
    r = _review(doc, "example-prod")
    assert "canary-damaged" not in markdown(r) and "canary-damaged" not in json.dumps(r.as_dict())
    assert any("os ubuntu-22.04 → [secret]" in s.why for s in _node(r, "hgx-01").steps)


def test_warning_prefix_is_not_doubled() -> None:
    """The engine puts "warning: " inside the message; the review shows it once, as the severity column."""
    r = _review("secrets-diff.json", "example-prod")
    assert r.diagnostics[0]["message"].startswith("Attempting to deploy or update resources")
    assert "warning: warning" not in markdown(r) and "| warning | Attempting" in markdown(r)


def test_hosts_not_in_the_plan_are_not_nodes() -> None:
    """A create for a host the stack does not have is listed as unknown to this stack, not as a node."""
    doc = _doc("driver-bump.json")
    rogue = copy.deepcopy(_step(doc, "lab-gpu01-converge"))
    rogue["op"] = "create"
    rogue["urn"] = rogue["urn"].replace("lab-gpu01-converge", "rogue-01-converge")
    rogue["newState"]["urn"] = rogue["urn"]
    rogue["newState"]["parent"] = rogue["newState"]["parent"].replace("lab-gpu01", "rogue-01")
    del rogue["oldState"]
    doc["steps"].append(rogue)
    r = _review(doc)
    assert "rogue-01" not in [n.hostname for n in r.nodes]
    assert [u["host"] for u in r.unknown] == ["rogue-01"]
    assert "### Unknown to this stack" in markdown(r)


def test_replacement_steps_merge_into_one_replace() -> None:
    """With --show-replacement-steps a URN has create-replacement, replace and delete-replaced: one replace."""
    doc = _doc("rebuild.json")
    bmc = _step(doc, "lab-gpu03-bmc")
    deleted = {"op": "delete-replaced", "urn": bmc["urn"], "oldState": bmc["oldState"], "detailedDiff": None}
    doc["steps"][1:2] = [{**bmc, "op": "create-replacement"}, bmc, deleted]
    d = parse(json.dumps(doc))
    merged = [s for s in d.steps if s.name == "lab-gpu03-bmc"]
    assert len(merged) == 1 and merged[0].op == "replace"
    assert merged[0].ops == ["create-replacement", "replace", "delete-replaced"]


# --- exit codes -----------------------------------------------------------------------------

@pytest.mark.parametrize(("fixture", "fail_on", "code"), [
    ("rebuild.json", "reinstall", 3),
    ("segment-move.json", "reinstall,reboot", 3),
    ("driver-bump.json", "reinstall", 0),
    ("driver-bump.json", "reinstall,reboot", 3),
    ("node-removal.json", "reinstall,reboot", 0),
    ("node-removal.json", "remove", 3),
    ("provider-upgrade.json", "reinstall,reboot,remove", 0),
])
def test_fail_on_demands_an_extra_approval(fixture: str, fail_on: str, code: int, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """`--fail-on` exits 3 exactly when the review contains one of the named kinds of change."""
    got, out, err = _run(["review", "--stack", "lab", "--preview", str(FIXTURES / fixture), "--fail-on", fail_on],
                         None, monkeypatch, capsys)
    assert got == code and out.startswith("## gpufleet change review")
    assert ("extra approval" in err) == (code == 3)


def test_fail_on_rejects_unknown_kinds(capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown --fail-on kind is a usage error (exit 2)."""
    with pytest.raises(SystemExit) as exc:
        main(["review", "--stack", "lab", "--preview", "-", "--fail-on", "reinstall,nuke"])
    assert exc.value.code == 2 and "nuke" in capsys.readouterr().err


def test_cli_reads_stdin_and_writes_json(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`gpufleet review --preview - --json` reads stdin and prints the review as JSON, exit 0."""
    code, out, _ = _run(["review", "--stack", "lab", "--preview", "-", "--json"],
                        (FIXTURES / "driver-bump.json").read_text(), monkeypatch, capsys)
    data = json.loads(out)
    assert code == 0 and [n["hostname"] for n in data["nodes"]] == ["lab-gpu01", "lab-gpu02"]
    assert data["attention"] == ["reboot"] and data["complete"] is True


def test_cli_writes_markdown_to_a_file(tmp_path: Path) -> None:
    """`--out FILE` writes the Markdown review there."""
    out = tmp_path / "review.md"
    assert main(["review", "--stack", "lab", "--preview", str(FIXTURES / "driver-bump.json"), "--out", str(out)]) == 0
    assert out.read_text().startswith("## gpufleet change review")


# --- malformed input: DigestError, exit 2, one line, never a traceback -------------------

def _nested(depth: int) -> Any:
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


_STEP = {"op": "same", "urn": "urn:pulumi:lab::gpufleet::pulumi:pulumi:Stack::gpufleet-lab"}
MALFORMED = {
    "not JSON": "not json",
    "a list": "[]",
    "a string": '"steps"',
    "no known key": '{"foo": 1}',
    "steps not a list": '{"steps": {"op": "same"}}',
    "step not an object": '{"steps": [1]}',
    "urn missing": '{"steps": [{"op": "create"}]}',
    "urn not a string": '{"steps": [{"op": "create", "urn": 7}]}',
    "urn not a URN": '{"steps": [{"op": "create", "urn": "lab-gpu01-bmc"}]}',
    "urn with a bad type": '{"steps": [{"op": "create", "urn": "urn:pulumi:s::p::not a type::n"}]}',
    "op unknown": json.dumps({"steps": [{**_STEP, "op": "explode"}]}),
    "op not a string": json.dumps({"steps": [{**_STEP, "op": ["create"]}]}),
    "oldState a list": json.dumps({"steps": [{**_STEP, "oldState": []}]}),
    "newState inputs a string": json.dumps({"steps": [{**_STEP, "newState": {"inputs": "x"}}]}),
    "state type disagrees with URN": json.dumps({"steps": [{**_STEP, "newState": {"type": "command:local:Command"}}]}),
    "state parent not a URN": json.dumps({"steps": [{**_STEP, "newState": {"parent": "site"}}]}),
    "detailedDiff a list": json.dumps({"steps": [{**_STEP, "detailedDiff": []}]}),
    "detailedDiff bad kind": json.dumps({"steps": [{**_STEP, "detailedDiff": {"dir": {"kind": "boom"}}}]}),
    "diffReasons not strings": json.dumps({"steps": [{**_STEP, "diffReasons": [1]}]}),
    "diagnostics not a list": '{"diagnostics": {"message": "x"}}',
    "diagnostic not an object": '{"diagnostics": ["error: x"]}',
    "diagnostic severity unknown": '{"diagnostics": [{"severity": "fatal", "message": "x"}]}',
    "diagnostic message not a string": '{"diagnostics": [{"severity": "error", "message": 1}]}',
    "changeSummary a list": '{"changeSummary": [1]}',
    "changeSummary negative": '{"changeSummary": {"create": -1}}',
    "changeSummary bool": '{"changeSummary": {"create": true}}',
    "duration a string": '{"steps": [], "duration": "5s"}',
    "deep nesting": '{"steps": [' + "[" * 5000 + "]" * 5000 + "]}",
    "nesting past the limit": json.dumps({"steps": [{**_STEP, "newState": {"inputs": {"a": _nested(70)}}}]}),
    "huge integer": '{"changeSummary": {"create": ' + "9" * 5000 + "}}",
}


@pytest.mark.parametrize("text", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_documents_are_a_digest_error(text: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Each kind of wrong document is a DigestError; the CLI exits 2 with one line on stderr."""
    with pytest.raises(DigestError):
        parse(text)
    bad = tmp_path / "bad.json"
    bad.write_text(text)
    assert main(["review", "--stack", "lab", "--preview", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_not_utf8_huge_and_missing_inputs_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Bytes that are not UTF-8, an input over the size limit, a missing file, a directory: exit 2."""
    with pytest.raises(DigestError, match="not UTF-8"):
        parse(b'{"steps": ["\xff"]}')
    monkeypatch.setattr(digest_mod, "MAX_BYTES", 1000)
    with pytest.raises(DigestError, match="larger than"):
        parse("{" + " " * 1000 + "}")
    assert main(["review", "--stack", "lab", "--preview", str(tmp_path / "missing.json")]) == 2
    assert main(["review", "--stack", "lab", "--preview", str(tmp_path)]) == 2
    assert capsys.readouterr().err.count("\n") == 2


def test_the_program_still_registers_what_the_review_reads() -> None:
    """The review's contract with infra/components: the node type token, step names, the reimage command."""
    source = (Path(__file__).resolve().parents[2] / "infra" / "components" / "node.py").read_text()
    assert f'"{NODE_TYPE}"' in source
    assert {BMC, CONVERGE} <= set(STEPS) and set(NODE_STEPS) <= set(STEPS)
    assert REIMAGE in node_commands("lab", "n", reimage_on_create=True, ssh_timeout_s=600).provision
    assert REIMAGE not in node_commands("lab", "n", reimage_on_create=False, ssh_timeout_s=600).provision


def test_bmc_update_without_update_command_is_a_reinstall() -> None:
    """pulumi-command runs `create` on update when `update` is unset: a reimaging BMC step then reinstalls."""
    doc = _doc("checkout-moved.json")
    del _step(doc, "lab-gpu01-bmc")["newState"]["inputs"]["update"]
    r = _review(doc)
    assert [x["host"] for x in r.reinstalls] == ["lab-gpu01"]
    assert "runs `create`" in _node(r, "lab-gpu01").reinstall and _node(r, "lab-gpu03").reinstall == ""


def test_move_runs_the_old_steps_delete_command_and_says_so() -> None:
    """Without an alias a move deletes the old URNs: a decommission delete command on them runs too."""
    doc = _doc("segment-move.json")
    _step(doc, "lab-gpu03-bmc", "delete")["oldState"]["inputs"]["delete"] = (
        ".venv/bin/gpufleet bmc power --stack lab --node lab-gpu03 --state off")
    gpu03 = _node(_review(doc), "lab-gpu03")
    assert gpu03.action == "moved" and "delete command runs first: powered off via its BMC" in gpu03.removal


def test_new_node_is_added_and_listed_as_an_install() -> None:
    """Creates with no deletes (a node new to the stack): added, and its BMC create reimages — listed."""
    doc = _doc("segment-move.json")
    doc["steps"] = [s for s in doc["steps"] if s["op"] != "delete"]
    r = _review(doc)
    gpu03 = _node(r, "lab-gpu03")
    assert gpu03.action == "added" and gpu03.reinstall.startswith("new node")
    assert gpu03.segment == "airgap" and {c.key for c in gpu03.changes} >= {"driver", "gpus"}
    assert r.attention == ["reinstall", "reboot"]  # a reinstall reboots the machine too


def test_reboot_policy_never_reports_the_pending_reboot() -> None:
    """Under reboot policy `never` a driver change needs a reboot nobody performs; not a `reboot` for --fail-on."""
    doc = _doc("driver-bump.json")
    for name in ("lab-gpu01-converge", "lab-gpu02-converge"):
        _step(doc, name)["newState"]["inputs"]["triggers"][0]["reboot_policy"] = "never"
    r = _review(doc)
    assert {n.reboot for n in r.nodes} == {"reboot needed, not performed (policy never)"}
    assert r.attention == []


def test_a_batch_step_says_which_nodes_made_it_rerun() -> None:
    """driver-bump.json plus the batch step of `connected` (lab-gpu01 and lab-gpu02): its row names the nodes it
    converges and, from which `triggers[i]` is unknown, the node whose own converge step is re-created.

    The step is written like the fixture's steps (tests/fixtures/preview/README.md): a replace whose trigger
    is the id of a step re-created in the same preview shows as `update` to the unknown-value sentinel.
    """
    doc = _doc("driver-bump.json")
    template = _step(doc, "lab-gpu01-converge")
    types = "gpufleet:site:Site$gpufleet:segment:Segment"
    seg = f"urn:pulumi:lab::gpufleet::{types}::connected"
    urn = f"urn:pulumi:lab::gpufleet::{types}$command:local:Command::connected-batch0-converge"
    create = batch_converge("lab", ["lab-gpu01", "lab-gpu02"])
    old_inputs = {"create": create, "dir": "..", "triggers": ["lab-gpu01-converge3f8b2c64", "lab-gpu02-converge9d1e"]}
    new_inputs = {**old_inputs, "triggers": [UNKNOWN, "lab-gpu02-converge9d1e"]}
    batch = {
        "op": "replace", "urn": urn, "provider": template["provider"],
        "oldState": {"urn": urn, "custom": True, "id": "connected-batch0-converge1a2b3c4d",
                     "type": "command:local:Command", "inputs": old_inputs, "parent": seg},
        "newState": {"urn": urn, "custom": True, "type": "command:local:Command", "inputs": new_inputs,
                     "parent": seg},
        "diffReasons": ["triggers"], "replaceReasons": ["triggers"],
        "detailedDiff": {"triggers[0]": {"kind": "update-replace", "inputDiff": True}},
    }
    doc["steps"].append(batch)
    r = _review(doc)
    row = next(o for o in r.other if o.resource == "connected-batch0-converge")
    assert row.why.startswith("one `gpufleet converge` (one Ansible job) over lab-gpu01, lab-gpu02")
    assert "re-runs for lab-gpu01 (its converge step is re-created" in row.why
    assert "lab-gpu02 (its" not in row.why
    # The node rows are what they were without it: the plain-words change stays on the node.
    assert {n.hostname: n.action for n in r.nodes} == {
        n.hostname: n.action for n in _review("driver-bump.json").nodes}
