"""Lab repo seeding: a signed flat repo apt can verify, republished safely, another publisher's repo left alone."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from infra.lab.repo import seed_repo
from infra.lab.standins import build_deb, standin_packages

pytestmark = pytest.mark.skipif(any(shutil.which(t) is None for t in ("gpg", "gpgv", "dpkg-scanpackages")),
                                reason="needs gpg, gpgv and dpkg-dev")


@pytest.fixture(scope="module")
def debs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two stand-in packages built once."""
    out = tmp_path_factory.mktemp("debs")
    pkgs = [p for p in standin_packages() if p.name == "libnvidia-container1"]
    return [build_deb(p, out, out / "work") for p in pkgs]


def seed(tmp_path: Path, debs: list[Path]) -> bool:
    return seed_repo("lab-test", tmp_path / "srv", debs, tmp_path / "gnupg", tmp_path / "keys" / "test.gpg",
                     scan_cache=tmp_path / "scan")


def test_seeded_repo_is_signed_and_lists_every_version(tmp_path: Path, debs: list[Path]) -> None:
    """InRelease verifies against the exported keyring; Packages lists both versions; a second seed is a no-op."""
    assert seed(tmp_path, debs) is True
    apt = tmp_path / "srv" / "apt"
    ok = subprocess.run(["gpgv", "--keyring", str(tmp_path / "keys" / "test.gpg"), str(apt / "InRelease")],
                        capture_output=True, text=True, check=False)
    assert ok.returncode == 0, ok.stderr
    versions = [ln.split(": ")[1] for ln in (apt / "Packages").read_text().splitlines() if ln.startswith("Version")]
    assert sorted(versions) == ["1.17.8-1", "1.18.0-1"]
    assert seed(tmp_path, debs) is False


def test_reseed_drops_unwanted_packages_and_reindexes(tmp_path: Path, debs: list[Path]) -> None:
    """Seeding with fewer packages removes the others from the directory and from the index."""
    seed(tmp_path, debs)
    assert seed(tmp_path, debs[:1]) is True
    apt = tmp_path / "srv" / "apt"
    assert sorted(p.name for p in apt.glob("*.deb")) == [debs[0].name]
    assert (apt / "Packages").read_text().count("Package: ") == 1
    assert not list(apt.glob(".*.tmp"))


def test_repo_republished_by_another_tool_is_left_alone(tmp_path: Path, debs: list[Path]) -> None:
    """After another publisher (the bundle import) re-signed the repo, lab seeding does not overwrite it."""
    seed(tmp_path, debs)
    apt = tmp_path / "srv" / "apt"
    (apt / "InRelease").write_text("signed by the bundle import\n")
    assert seed(tmp_path, debs[:1]) is False
    assert (apt / "InRelease").read_text() == "signed by the bundle import\n"
    assert len(list(apt.glob("*.deb"))) == 2
