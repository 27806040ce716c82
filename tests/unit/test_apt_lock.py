"""apt steps wait for another apt process instead of failing at once (fresh Debian 12, issue 16).

apt-get is replaced by a stub on PATH that answers as apt 2.6.1 does when the lists lock is held
(message copied from a run of `apt-get update` against a held /var/lib/apt/lists/lock on Debian 12).
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest

from infra.lab import sh

LOCKED = "E: Could not get lock /var/lib/apt/lists/lock. It is held by process 4242 (apt-get)\n" \
         "E: Unable to lock directory /var/lib/apt/lists/"


def _stub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failures: int, message: str) -> Path:
    calls = tmp_path / "calls"
    stub = tmp_path / "bin" / "apt-get"
    stub.parent.mkdir()
    stub.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {calls}\n'
        f'n=$(wc -l < {calls})\n'
        f'if [ "$n" -le {failures} ]; then printf "%s\\n" "{message}" >&2; exit 100; fi\n'
        "exit 0\n",
        encoding="utf-8",
    )
    stub.chmod(stub.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{stub.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(sh.time, "sleep", lambda s: None)
    return calls


def test_update_retries_while_the_lists_lock_is_held(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _stub(tmp_path, monkeypatch, failures=2, message=LOCKED)
    assert sh.apt_update() is True
    lines = calls.read_text().splitlines()
    assert len(lines) == 3
    assert all("-o DPkg::Lock::Timeout=" in line and line.endswith("update -q") for line in lines)


def test_update_does_not_retry_other_failures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _stub(tmp_path, monkeypatch, failures=5, message="E: The repository is not signed.")
    assert sh.apt_update() is False
    assert len(calls.read_text().splitlines()) == 1


def test_setup_script_passes_the_lock_timeout_to_every_apt_get() -> None:
    text = (Path(__file__).resolve().parents[2] / "scripts" / "setup.sh").read_text(encoding="utf-8")
    calls = [line for line in text.splitlines() if re.search(r"timeout \d+ apt-get", line)]
    assert calls and all('"${lock[@]}"' in line for line in calls), calls
