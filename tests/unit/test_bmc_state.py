"""`gpufleet state backup|list|restore` with a fake `pulumi` on PATH (the real CLI cannot be installed here)."""

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
if sys.argv[1:3] == ["stack", "import"]:
    sys.exit(0)
if os.environ.get("FAKE_PULUMI_FAIL"):
    sys.stderr.write("error: could not reach backend\\n")
    sys.exit(255)
secret = {"SIG_PLACEHOLDER": "1b47061264138c4ac30d75fd1eb44270"}
if os.environ.get("FAKE_PULUMI_PLAINTEXT"):
    secret["plaintext"] = json.dumps(os.environ.get("FAKE_PULUMI_VALUE", "x"))
else:
    secret["ciphertext"] = "v1:AAAAencrypted"
print(json.dumps({"version": 3, "deployment": {"manifest": {}, "resources": [
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
    code, _, err = run_cli("state", "restore", "--stack", "lab", "--file", str(bad), "--yes")
    assert code == 1 and "no `deployment`" in err
    good = state.backup("lab", tmp_path).path
    code, _, _ = run_cli("state", "restore", "--stack", "lab", "--file", str(good), "--yes")
    assert code == 0
    assert json.loads(fake_pulumi.read_text().splitlines()[-1]) == [
        "stack",
        "import",
        "--stack",
        "lab",
        "--file",
        str(good),
    ]
    code, _, _ = run_cli("state", "restore", "--stack", "lab", "--file", str(good))
    assert code == 4  # no terminal, no --yes
