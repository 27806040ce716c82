"""Pulumi's passphrase secrets manager, re-implemented from its Go source to make and check the examples' secrets.

Source (pulumi/pulumi at 1b5949891b3c, Aug 2026):
- pkg/secrets/passphrase/manager.go: `NewPassphraseSecretsManager` draws an 8-byte salt and stores
  `encryptionsalt: v1:<base64 salt>:<EncryptValue("pulumi")>`; `symmetricCrypterFromPhraseAndState`
  checks a passphrase by decrypting that value back to "pulumi".
- sdk/go/common/resource/config/crypt.go: `NewSymmetricCrypterFromPassphrase` derives the key with
  PBKDF2-HMAC-SHA256, 1,000,000 iterations, 32 bytes; `EncryptValue` is AES-256-GCM with a random
  12-byte nonce, written `v1:<base64 nonce>:<base64 ciphertext+tag>` (no additional data).

`python -m tests.pulumi.pulumi_passphrase STACK-FILE PASSPHRASE KEY=VALUE ...` writes a new
`encryptionsalt` and the `secure:` values into a stack file, as `pulumi config set --secret` would.
"""

from __future__ import annotations

import base64
import hashlib
import os
import sys
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

ITERATIONS = 1_000_000
CHECK_PLAINTEXT = "pulumi"
# The passphrase of the example stacks (documented in docs/pulumi.md): they are examples, their
# `secure:` values are example passwords. Real stacks get their own passphrase (or a KMS provider).
EXAMPLE_PASSPHRASE = "gpufleet-example-passphrase"


def key_for(passphrase: str, salt: bytes) -> bytes:
    """`NewSymmetricCrypterFromPassphrase`: PBKDF2-HMAC-SHA256, 1,000,000 iterations, 32-byte key."""
    return hashlib.pbkdf2_hmac("sha256", passphrase.encode(), salt, ITERATIONS, 32)


def encrypt(key: bytes, plaintext: str) -> str:
    """`symmetricCrypter.EncryptValue`: `v1:<b64 nonce>:<b64 AES-256-GCM ciphertext and tag>`."""
    nonce = os.urandom(12)
    sealed = AESGCM(key).encrypt(nonce, plaintext.encode(), None)
    return f"v1:{base64.b64encode(nonce).decode()}:{base64.b64encode(sealed).decode()}"


def decrypt(key: bytes, value: str) -> str:
    """`symmetricCrypter.DecryptValue` (raises on a wrong key or a malformed value)."""
    version, nonce, sealed = value.split(":")
    if version != "v1":
        raise ValueError(f"unknown secure value version {version!r}")
    return AESGCM(key).decrypt(base64.b64decode(nonce), base64.b64decode(sealed), None).decode()


def new_salt_state(passphrase: str) -> tuple[str, bytes]:
    """`NewPassphraseSecretsManager`: (the `encryptionsalt` value, the derived key)."""
    salt = os.urandom(8)
    key = key_for(passphrase, salt)
    return f"v1:{base64.b64encode(salt).decode()}:{encrypt(key, CHECK_PLAINTEXT)}", key


def key_from_state(passphrase: str, state: str) -> bytes:
    """`symmetricCrypterFromPhraseAndState`: the key, after checking the passphrase against the state."""
    version, salt, rest = state.split(":", 2)
    if version != "v1":
        raise ValueError("unknown state version")
    key = key_for(passphrase, base64.b64decode(salt))
    if decrypt(key, rest) != CHECK_PLAINTEXT:
        raise ValueError("incorrect passphrase")
    return key


def _write(stack_file: Path, passphrase: str, values: dict[str, str]) -> None:
    # Text edits, not a YAML round trip: keep the file's comments and layout.
    state, key = new_salt_state(passphrase)
    lines = [ln for ln in stack_file.read_text().splitlines() if not ln.startswith("encryptionsalt:")]
    for name, value in values.items():
        marker = f"  {name}:"
        i = lines.index(marker)
        if not lines[i + 1].lstrip().startswith("secure:"):
            raise SystemExit(f"{stack_file}: {name} is not followed by a `secure:` line")
        lines[i + 1] = f"    secure: {encrypt(key, value)}"
    at = lines.index("config:")  # where `pulumi` puts it: before `config:`
    stack_file.write_text("\n".join([*lines[:at], f"encryptionsalt: {state}", *lines[at:]]) + "\n")


if __name__ == "__main__":
    path, phrase, *pairs = sys.argv[1:]
    _write(Path(path), phrase, dict(p.split("=", 1) for p in pairs))
