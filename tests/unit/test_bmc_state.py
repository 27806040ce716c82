"""`gpufleet state backup|list|restore` with a fake `pulumi` on PATH (the real CLI cannot be installed here).

The documents follow Pulumi's checkpoint types (github.com/pulumi/pulumi @ 1b59498, sdk/go/common/apitype/core.go:
UntypedDeployment {version, deployment}, DeploymentV3 {manifest, secrets_providers, resources}, ResourceV3 {urn,
type, custom, inputs, outputs, additionalSecretOutputs}, SecretsProvidersV1 {type, state}, SecretV1; the secret
signature from sdk/go/common/resource/sig/sig.go: Key 4dabf181…, Secret 1b470612…; URN form
urn:pulumi:<stack>::<project>::<type>::<name> from sdk/go/common/resource/urn.go).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from infra.cli import main
from infra.dr import state

SIG = state.SECRET_SIG
CANARY = "canary-state-5512"

# A stand-in for `pulumi`: records its arguments, prints a deployment (with a secret as ciphertext, or as
# plaintext when FAKE_PULUMI_PLAINTEXT is set — what `--show-secrets` would do).
FAKE = """#!/usr/bin/env python3
import json, os, sys
with open(os.environ["FAKE_PULUMI_LOG"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
if sys.argv[1:3] == ["stack", "import"] and not os.environ.get("FAKE_PULUMI_IMPORT_FAIL"):
    sys.exit(0)
if os.environ.get("FAKE_PULUMI_FAIL"):
    sys.stderr.write("error: could not reach backend\\n")
    sys.exit(255)
if os.environ.get("FAKE_PULUMI_IMPORT_FAIL") and sys.argv[1:3] == ["stack", "import"]:
    sys.exit(3)
secret = {"SIG_PLACEHOLDER": "1b47061264138c4ac30d75fd1eb44270"}
if os.environ.get("FAKE_PULUMI_PLAINTEXT"):
    secret["plaintext"] = json.dumps(os.environ.get("FAKE_PULUMI_VALUE", "x"))
else:
    secret["ciphertext"] = "v1:AAAAencrypted"
print(json.dumps({"version": 3, "deployment": {"manifest": {}, "secrets_providers": {"type": "passphrase",
    "state": {"salt": "v1:c2FsdA==:v1:AAAA"}}, "resources": [
    {"urn": "urn:pulumi:lab::gpufleet::pulumi:pulumi:Stack::gpufleet-lab", "type": "pulumi:pulumi:Stack"},
    {"urn": "urn:pulumi:lab::gpufleet::command:remote:Command::lab-gpu01-converge", "type": "command:remote:Command",
     "inputs": {"environment": {"GPUFLEET_SECRET_BMC": secret}}}]}}))
""".replace("SIG_PLACEHOLDER", SIG)


@pytest.fixture
def fake_pulumi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    exe = bindir / "pulumi"
    exe.write_text(FAKE)
    exe.chmod(0o755)
    log = tmp_path / "pulumi.log"
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_PULUMI_LOG", str(log))
    return log


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def test_backup_writes_private_file_without_plaintext(fake_pulumi: Path, tmp_path: Path) -> None:
    """A backup is the export, mode 0600 in a 0700 folder, taken with --show-secrets=false."""
    b = state.backup("lab", tmp_path / "bk")
    assert json.loads(fake_pulumi.read_text().splitlines()[0]) == [
        "stack",
        "export",
        "--stack",
        "lab",
        "--show-secrets=false",
    ]
    assert b.resources == 2 and b.path.name.startswith("lab-") and b.path.suffix == ".json"
    assert stat.S_IMODE(b.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(b.path.parent.stat().st_mode) == 0o700
    assert "plaintext" not in b.path.read_text()


def test_rotation_keeps_the_newest(fake_pulumi: Path, tmp_path: Path) -> None:
    """With --keep 2, the third backup removes the oldest one."""
    t = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
    paths = [state.backup("lab", tmp_path, keep=2, now=t + timedelta(hours=i)).path for i in range(3)]
    assert state.list_backups(tmp_path, "lab") == paths[1:]
    assert not paths[0].exists()


def test_plaintext_secret_export_is_refused(fake_pulumi: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An export carrying plaintext secrets is never written."""
    monkeypatch.setenv("FAKE_PULUMI_PLAINTEXT", "1")
    with pytest.raises(state.StateError, match="plaintext secret"):
        state.backup("lab", tmp_path)
    assert not list(tmp_path.rglob("*.json"))


def test_secret_value_given_to_us_never_lands_in_a_backup(
    fake_pulumi: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A GPUFLEET_SECRET_* value found anywhere in the export stops the backup (canary)."""
    monkeypatch.setenv("GPUFLEET_SECRET_BMC", CANARY)
    monkeypatch.setenv("FAKE_PULUMI_PLAINTEXT", "1")
    monkeypatch.setenv("FAKE_PULUMI_VALUE", CANARY)
    # Pretend the signature check missed it: only the canary check stands between it and the disk.
    monkeypatch.setattr(state, "plaintext_secrets", lambda _d: [])
    with pytest.raises(state.StateError, match="GPUFLEET_SECRET_BMC"):
        state.backup("lab", tmp_path)
    assert not any(CANARY in p.read_text() for p in tmp_path.rglob("*") if p.is_file() and p.suffix == ".json")


def test_cli_backup_exit_codes(fake_pulumi: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CLI: 0 with the file listed; 1 when the backend fails; 5 when pulumi is missing."""
    code, out, _ = run_cli("state", "backup", "--stack", "lab", "--dir", str(tmp_path), "--json")
    assert code == 0 and Path(json.loads(out)["path"]).is_file()
    monkeypatch.setenv("FAKE_PULUMI_FAIL", "1")
    code, _, err = run_cli("state", "backup", "--stack", "lab", "--dir", str(tmp_path))
    assert code == 1 and "could not reach backend" in err
    code, _, err = run_cli("state", "backup", "--stack", "lab", "--dir", str(tmp_path), "--pulumi", "no-such-pulumi")
    assert code == 5 and "not on PATH" in err
    code, out, _ = run_cli("state", "list", "--stack", "lab", "--dir", str(tmp_path), "--json")
    assert len(json.loads(out)["backups"]) == 1


def test_restore_checks_file_and_calls_import(fake_pulumi: Path, tmp_path: Path) -> None:
    """Restore refuses a non-export file and imports a real one with `pulumi stack import --file`."""
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    code, _, err = run_cli("state", "restore", "--stack", "lab", "--file", str(bad), "--yes", "--dir", str(tmp_path))
    assert code == 2 and "no `deployment`" in err
    good = state.backup("lab", tmp_path).path
    code, _, _ = run_cli("state", "restore", "--stack", "lab", "--file", str(good), "--yes", "--dir", str(tmp_path))
    assert code == 0
    assert json.loads(fake_pulumi.read_text().splitlines()[-1]) == [
        "stack",
        "import",
        "--stack",
        "lab",
        "--file",
        str(good),
    ]
    code, _, _ = run_cli("state", "restore", "--stack", "lab", "--file", str(good), "--dir", str(tmp_path))
    assert code == 4  # no terminal, no --yes


# ------------------------------------------------------------------------------ restore: what is refused

def _doc(*resources: dict[str, object], version: object = 3, providers: bool = True) -> dict[str, object]:
    dep: dict[str, object] = {"manifest": {"time": "2026-11-23T12:00:00Z", "magic": "x", "version": "v3.200.0"},
                              "resources": list(resources)}
    if providers:
        dep["secrets_providers"] = {"type": "passphrase", "state": {"salt": "v1:c2FsdA==:v1:AAAA"}}
    return {"version": version, "deployment": dep}


STACK_RES = {"urn": "urn:pulumi:lab::gpufleet::pulumi:pulumi:Stack::gpufleet-lab", "type": "pulumi:pulumi:Stack",
             "custom": False}
PROVIDER = {"urn": "urn:pulumi:lab::gpufleet::pulumi:providers:command::default", "type": "pulumi:providers:command",
            "custom": True, "id": "0b7b"}


def _node(name: str = "lab-gpu01-converge", stack: str = "lab", project: str = "gpufleet",
          **extra: object) -> dict[str, object]:
    return {"urn": f"urn:pulumi:{stack}::{project}::gpufleet:site:Node$command:local:Command::{name}",
            "type": "command:local:Command", "custom": True, "id": name, **extra}


CIPHER = {SIG: "1b47061264138c4ac30d75fd1eb44270", "ciphertext": "v1:Zm9v:YmFy"}
REFUSED = {
    "empty deployment": ({"deployment": {}}, "empty"),
    "no resources": (_doc(), "empty"),
    "only stack and provider": (_doc(STACK_RES, PROVIDER), "only the stack and its providers"),
    "other stack": (_doc(STACK_RES, _node(stack="prod")), "another stack or project"),
    "other project": (_doc(STACK_RES, _node(project="otherproj")), "another stack or project"),
    "not a urn": (_doc(STACK_RES, {**_node(), "urn": "lab-gpu01"}), "not a Pulumi URN"),
    "plaintext secret": (_doc(STACK_RES, _node(inputs={"environment": {"GPUFLEET_SECRET_BMC": {
        SIG: "1b47061264138c4ac30d75fd1eb44270", "plaintext": '"hunter2"'}}})), "not encrypted"),
    "plain GPUFLEET_SECRET_ value": (_doc(STACK_RES, _node(inputs={"environment": {"GPUFLEET_SECRET_BMC": "hunter2"}})),
                                     "not encrypted"),
    "plain additionalSecretOutputs": (_doc(STACK_RES, _node(outputs={"stdout": "token=abc"},
                                                            additionalSecretOutputs=["stdout"])), "not encrypted"),
    "secret without ciphertext": (_doc(STACK_RES, _node(outputs={"x": {SIG: "1b47061264138c4ac30d75fd1eb44270"}})),
                                  "not encrypted"),
    "ciphertext without secrets provider": (_doc(STACK_RES, _node(outputs={"x": CIPHER}), providers=False),
                                            "no `secrets_providers`"),
    "version 2": (_doc(STACK_RES, _node(), version=2), "version"),
    "resources not a list": ({"version": 3, "deployment": {"resources": {"a": 1}}}, "not a list"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_restore_refuses_unsafe_states_before_running_pulumi(fake_pulumi: Path, tmp_path: Path, case: str) -> None:
    """Empty states, other stacks' URNs, plaintext secrets …: exit 2 naming why; pulumi is never called."""
    doc, why = REFUSED[case]
    f = tmp_path / "lab-20261123T120000Z.json"
    f.write_text(json.dumps(doc))
    code, _, err = run_cli("state", "restore", "--stack", "lab", "--file", str(f), "--yes", "--dir", str(tmp_path))
    assert code == 2 and why in err and err.count("\n") == 1, err
    assert not fake_pulumi.exists()  # neither export nor import ran


def test_restore_saves_the_current_state_first(fake_pulumi: Path, tmp_path: Path) -> None:
    """The state being replaced is exported (pre-restore file) before `stack import` runs."""
    f = tmp_path / "in.json"
    f.write_text(json.dumps(_doc(STACK_RES, PROVIDER, _node(outputs={"stdout": CIPHER},
                                                           additionalSecretOutputs=["stdout"]))))
    code, out, _ = run_cli("state", "restore", "--stack", "lab", "--file", str(f), "--yes", "--dir",
                           str(tmp_path / "bk"), "--json")
    assert code == 0
    calls = [json.loads(line)[:2] for line in fake_pulumi.read_text().splitlines()]
    assert calls == [["stack", "export"], ["stack", "import"]]
    saved = Path(json.loads(out)["previous_state"])
    assert saved.name.endswith(".pre-restore.json") and json.loads(saved.read_text())["deployment"]["resources"]


def test_restore_aborts_when_the_current_state_cannot_be_saved(fake_pulumi: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """No backup of the state being replaced, no import (exit 1)."""
    f = tmp_path / "in.json"
    f.write_text(json.dumps(_doc(STACK_RES, _node())))
    monkeypatch.setenv("FAKE_PULUMI_FAIL", "1")
    code, _, err = run_cli("state", "restore", "--stack", "lab", "--file", str(f), "--yes", "--dir", str(tmp_path))
    assert code == 1 and "nothing was imported" in err
    assert [json.loads(line)[:2] for line in fake_pulumi.read_text().splitlines()] == [["stack", "export"]]


def test_restore_confirmation_shows_stack_resources_and_age(fake_pulumi: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """The question names the stack, the resource count and the backup's age (unknown when from the future)."""
    now = datetime.now(UTC)
    old = tmp_path / f"lab-{(now - timedelta(hours=3, minutes=5)).strftime('%Y%m%dT%H%M%SZ')}.json"
    future = tmp_path / "lab-20991231T000000Z.json"
    for f in (old, future):
        f.write_text(json.dumps(_doc(STACK_RES, PROVIDER, _node())))
    code, _, err = run_cli("state", "restore", "--stack", "lab", "--file", str(old), "--dir", str(tmp_path))
    assert code == 4 and "stack lab: 3 resources" in err and "backup age 3 h 5 min" in err
    code, _, err = run_cli("state", "restore", "--stack", "lab", "--file", str(future), "--dir", str(tmp_path))
    assert code == 4 and "backup age unknown" in err
    assert not fake_pulumi.exists()


def test_backup_keep_zero_is_bad_input(fake_pulumi: Path, tmp_path: Path) -> None:
    """`state backup --keep 0` exits 2 with a one-line message (JSON under --json); nothing is exported."""
    code, _, err = run_cli("state", "backup", "--stack", "lab", "--dir", str(tmp_path), "--keep", "0")
    assert code == 2 and "--keep 0" in err and err.count("\n") == 1
    code, out, _ = run_cli("state", "backup", "--stack", "lab", "--dir", str(tmp_path), "--keep", "0", "--json")
    assert code == 2 and json.loads(out)["ok"] is False
    assert not fake_pulumi.exists()


def test_rotation_never_deletes_the_backup_just_written(fake_pulumi: Path, tmp_path: Path) -> None:
    """Backups named in the future are not "newest": rotation keeps the new one and leaves them alone."""
    d = state.backup_dir(tmp_path, "lab")
    d.mkdir(parents=True)
    future = [d / "lab-20991231T000000Z.json", d / "lab-20990101T000000Z.json"]
    for f in future:
        f.write_text("{}")
    t = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
    paths = [state.backup("lab", tmp_path, keep=1, now=t + timedelta(hours=i)) for i in range(3)]
    assert all(p.path.exists() is (i == 2) for i, p in enumerate(paths))  # only the newest known one is kept
    assert all(f.exists() for f in future) and set(paths[-1].unknown_age) == set(future)
    assert state.list_backups(tmp_path, "lab", now=t + timedelta(hours=3))[0] == paths[-1].path


def test_backup_in_the_same_second_never_replaces_another(fake_pulumi: Path, tmp_path: Path) -> None:
    """Two backups taken within one second get two files; --keep 2 keeps both."""
    t = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
    a, b = (state.backup("lab", tmp_path, keep=2, now=t).path for _ in range(2))
    assert a != b and a.exists() and b.exists()


def test_future_mtime_without_a_name_time_is_unknown_age(tmp_path: Path) -> None:
    """A file whose name holds no time falls back to its mtime; a future mtime is an unknown age."""
    f = tmp_path / "lab-manual.json"
    f.write_text("{}")
    future = (datetime.now(UTC) + timedelta(days=400)).timestamp()
    os.utime(f, (future, future))
    assert state.backup_time(f) is None


# ------------------------------------------------------------------ property tests: the restore checks are total

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=20)
    | st.sampled_from([SIG, "1b47061264138c4ac30d75fd1eb44270", "GPUFLEET_SECRET_X", "urn:pulumi:lab::gpufleet::a::b",
                       "urn:pulumi:prod::gpufleet::a::b", "plaintext", "ciphertext", "resources", "deployment"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["urn", "type", "inputs", "outputs", "plaintext", "ciphertext", SIG, "resources",
                         "additionalSecretOutputs", "GPUFLEET_SECRET_X", "version", "deployment",
                         "secrets_providers"]) | st.text(max_size=6), inner, max_size=4),
    max_leaves=15)


@st.composite
def state_docs(draw: st.DrawFn) -> object:
    """A valid export with random edits, or any JSON value."""
    if draw(st.booleans()):
        return draw(_VALUES)
    # A deep copy: edits must never reach the module's shared resources (hypothesis replays draws).
    doc = json.loads(json.dumps(_doc(STACK_RES, PROVIDER, _node(inputs={"environment": {"GPUFLEET_SECRET_BMC": CIPHER}},
                                                                outputs={"stdout": CIPHER},
                                                                additionalSecretOutputs=["stdout"]))))
    for _ in range(draw(st.integers(0, 3))):
        node: object = doc
        for _depth in range(draw(st.integers(0, 5))):
            if isinstance(node, dict) and node:
                key = draw(st.sampled_from(sorted(node, key=str)))
                if draw(st.booleans()) or not isinstance(node[key], dict | list):
                    node[key] = draw(_VALUES)
                    break
                node = node[key]
            elif isinstance(node, list) and node:
                node = node[draw(st.integers(0, len(node) - 1))]
            else:
                break
    return doc


@pytest.mark.slow
@settings(max_examples=1500, deadline=None)
@given(state_docs())
def test_property_restore_checks_accept_or_refuse_cleanly(doc: object) -> None:
    """Generated state documents end in accept (facts) or a clean refusal (StateError, exit 2) — nothing else."""
    try:
        facts = state.check_state(doc, "lab", "gpufleet")
    except state.StateError as exc:
        assert exc.invalid and str(exc) and "\n" not in str(exc)
        return
    # Accepted: what the rules promise holds.
    assert isinstance(doc, dict)
    resources = doc["deployment"]["resources"]
    assert facts.resources == len(resources) > 0 and facts.managed >= 1
    assert all(state.urn_parts(r["urn"])[:2] == ("lab", "gpufleet") for r in resources)  # type: ignore[index]
    assert state.plaintext_secrets(doc) == []


@pytest.mark.parametrize(
    "value",
    [
        {SIG: True, "plaintext": None},  # found by the property test: a secret-shaped value, wrong signature
        {SIG: "1b47061264138c4ac30d75fd1eb44270", "plaintext": "hunter2"},
        {SIG: "other", "ciphertext": ""},
    ],
)
def test_secret_shaped_values_are_one_rule(value: dict[str, object]) -> None:
    """A value carrying the secret signature key is judged as a secret by every check: refused, not passed."""
    doc = _doc(STACK_RES, PROVIDER, _node(outputs={"stdout": value}))
    with pytest.raises(state.StateError):
        state.check_state(doc, "lab", "gpufleet")
