"""The README's first command on a fresh Debian 12: no `sudo` there, so quickstart must not need it."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "scripts" / "quickstart.sh"

pytestmark = pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) not installed")


def _as_nobody(path: str) -> subprocess.CompletedProcess[str]:
    """Run quickstart as uid/gid 65534 with only `path` on PATH (it exits before any setup step)."""
    return subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "env", f"PATH={path}", "bash", str(QUICKSTART)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_readme_runs_quickstart_without_sudo() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "./scripts/quickstart.sh" in readme
    assert "sudo ./scripts/quickstart.sh" not in readme


def test_non_root_without_sudo_exits_5_saying_run_as_root() -> None:
    p = _as_nobody("/usr/bin:/bin") if shutil.which("sudo", path="/usr/bin:/bin") is None else None
    if p is None:
        pytest.skip("sudo is installed here; the no-sudo case needs a machine without it")
    assert p.returncode == 5
    assert "run it as root" in p.stderr


def test_non_root_with_sudo_re_runs_itself_through_sudo() -> None:
    stub_dir = Path(tempfile.mkdtemp(prefix="gpf-sudo-"))
    try:
        stub_dir.chmod(0o755)
        (stub_dir / "sudo").write_text('#!/bin/sh\necho "sudo $*"\nexit 0\n', encoding="utf-8")
        (stub_dir / "sudo").chmod(0o755)
        p = _as_nobody(f"{stub_dir}:/usr/bin:/bin")
    finally:
        shutil.rmtree(stub_dir)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f"sudo -- {QUICKSTART}"
