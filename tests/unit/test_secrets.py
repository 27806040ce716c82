"""`resolve_secret`: env, file, and Pulumi config secrets passed as GPUFLEET_SECRET_<KEY>."""

from __future__ import annotations

from pathlib import Path

import pytest

from infra.model.site import SecretRef
from infra.secrets import SecretError, config_env_name, loose_permissions, resolve_secret

CANARY = "canary-9d1f-secret"


def test_env_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    """An env SecretRef reads the named variable."""
    monkeypatch.setenv("BMC_PW", CANARY)
    assert resolve_secret(SecretRef(env="BMC_PW")) == CANARY


def test_config_secret_comes_from_prefixed_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """A config key maps to GPUFLEET_SECRET_<KEY upper, - and . as _> (namespace dropped)."""
    assert config_env_name("bmc.lab-gpu01") == "GPUFLEET_SECRET_BMC_LAB_GPU01"
    assert config_env_name("gpufleet:bmcPassword") == "GPUFLEET_SECRET_BMCPASSWORD"
    monkeypatch.setenv("GPUFLEET_SECRET_BMC_LAB_GPU01", CANARY)
    assert resolve_secret(SecretRef(config="bmc.lab-gpu01")) == CANARY


def test_missing_config_secret_says_how_to_pass_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside Pulumi, a missing config secret names the variable to export."""
    monkeypatch.delenv("GPUFLEET_SECRET_BMC_X", raising=False)
    with pytest.raises(SecretError, match="export GPUFLEET_SECRET_BMC_X"):
        resolve_secret(SecretRef(config="bmc.x"))


def test_file_secret_strips_one_newline(tmp_path: Path) -> None:
    """A file's trailing newline is not part of the secret; inner whitespace is."""
    f = tmp_path / "pw"
    f.write_text(CANARY + " x\n")
    assert resolve_secret(SecretRef(file=str(f))) == CANARY + " x"


@pytest.mark.parametrize("content", [None, "", "\n"])
def test_missing_or_empty_file_is_an_error(tmp_path: Path, content: str | None) -> None:
    """Missing and empty files raise SecretError naming the file."""
    f = tmp_path / "pw"
    if content is not None:
        f.write_text(content)
    with pytest.raises(SecretError, match=str(f)):
        resolve_secret(SecretRef(file=str(f)))


def test_unset_env_is_an_error_without_value(monkeypatch: pytest.MonkeyPatch) -> None:
    """An unset variable raises SecretError naming the variable."""
    monkeypatch.delenv("NOPE_PW", raising=False)
    with pytest.raises(SecretError, match="NOPE_PW"):
        resolve_secret(SecretRef(env="NOPE_PW"))


def test_loose_permissions_detected(tmp_path: Path) -> None:
    """A group/world-readable secret file is flagged; 0600 is not."""
    f = tmp_path / "pw"
    f.write_text(CANARY)
    f.chmod(0o644)
    assert loose_permissions(SecretRef(file=str(f)))
    f.chmod(0o600)
    assert not loose_permissions(SecretRef(file=str(f)))
