"""The example stacks carry a working passphrase secrets provider: `pulumi preview` of them can decrypt.

The values were made with tests/pulumi/pulumi_passphrase.py (Pulumi's algorithm, from its Go source); this
test decrypts them the same documented way with the documented example passphrase.
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from cryptography.exceptions import InvalidTag

from infra.model.load import stack_path
from tests.pulumi.conftest import ROOT
from tests.pulumi.pulumi_passphrase import EXAMPLE_PASSPHRASE, decrypt, key_from_state

EXAMPLES = ("example-prod", "example-airgap")


def _stack(name: str) -> dict[str, Any]:
    return dict(yaml.safe_load(stack_path(name, ROOT).read_text()))


def _config_refs(value: Any) -> set[str]:
    """Every `config:` SecretRef key in the site (`{config: bmcPassword}` → gpufleet:bmcPassword)."""
    if isinstance(value, dict):
        own = {f"gpufleet:{value['config']}"} if set(value) == {"config"} else set()
        return own.union(*(_config_refs(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(_config_refs(v) for v in value))
    return set()


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_secrets_decrypt_with_the_documented_passphrase(name: str) -> None:
    """encryptionsalt checks the passphrase; every secret the site refers to is a decryptable `secure:` value."""
    stack = _stack(name)
    key = key_from_state(EXAMPLE_PASSPHRASE, stack["encryptionsalt"])
    refs = _config_refs(stack["config"]["gpufleet:site"])
    assert refs == {"gpufleet:bmcPassword"}
    for ref in refs:
        assert decrypt(key, stack["config"][ref]["secure"]) == f"example-bmc-password-{name}"


def test_a_wrong_passphrase_is_refused() -> None:
    """The check value in encryptionsalt fails to open under another passphrase (as `pulumi` refuses it)."""
    with pytest.raises(InvalidTag):
        key_from_state("not-the-passphrase", _stack("example-prod")["encryptionsalt"])


# Pulumi's own test vector: pkg/secrets/passphrase/manager_test.go (pulumi/pulumi 1b5949891b3c), a state made
# by the real secrets manager with passphrase "password" (its tests also check "password123" is refused).
PULUMI_STATE = "v1:fozI5u6B030=:v1:F+6ZduKKd8G0/V7L:PGMFeIzwobWRKmEAzUdaQHqC5mMRIQ=="


def test_the_reimplementation_opens_pulumis_own_test_vector() -> None:
    """Against data the real Pulumi produced: the right passphrase opens it, its wrong one does not."""
    key_from_state("password", PULUMI_STATE)
    with pytest.raises(InvalidTag):
        key_from_state("password123", PULUMI_STATE)
