"""Detached OpenPGP signatures with gpg in a throwaway home, so the user's keyrings are never touched.

Signing takes an armored secret key file (`--signing-key`, env GPUFLEET_BUNDLE_SIGNING_KEY);
verifying takes a keyring of trusted public keys (`--keyring`, env GPUFLEET_BUNDLE_KEYRING) and
uses `gpgv`, which trusts exactly that keyring and nothing else.
"""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
from pathlib import Path

GPG_TIMEOUT_S = 120
SIGNING_KEY_ENV = "GPUFLEET_BUNDLE_SIGNING_KEY"
KEYRING_ENV = "GPUFLEET_BUNDLE_KEYRING"


class SigningError(Exception):
    """A signature could not be made or does not verify."""


def _gpg(home: Path, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run(["gpg", "--homedir", str(home), "--batch", "--no-tty", "--quiet", *args],
                              input=stdin, capture_output=True, timeout=GPG_TIMEOUT_S, check=False)
    except FileNotFoundError:
        raise SigningError("gpg not found: install the `gnupg` package") from None
    except subprocess.TimeoutExpired:
        raise SigningError(f"gpg {' '.join(args[:2])} timed out") from None


def stop_agent(home: Path) -> None:
    """Stop the gpg-agent that gpg started for `home` (gpg leaves it running after it exits)."""
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True, timeout=30,
                       check=False)


def sign_detached(data: Path, secret_key: Path, out: Path) -> str:
    """Write an armored detached signature of `data` to `out`; returns the signing key's fingerprint."""
    with tempfile.TemporaryDirectory(prefix="gpufleet-gpg-") as home:
        h = Path(home)
        h.chmod(0o700)
        try:
            imp = _gpg(h, "--import", str(secret_key))
            if imp.returncode != 0:
                raise SigningError(f"cannot import signing key {secret_key}: {imp.stderr.decode(errors='replace')}")
            fpr = _secret_fingerprint(h)
            res = _gpg(h, "--yes", "--armor", "--local-user", fpr, "--output", str(out), "--detach-sign", str(data))
            if res.returncode != 0:
                raise SigningError(f"signing {data.name} failed: {res.stderr.decode(errors='replace')}")
            return fpr
        finally:
            stop_agent(h)


def _secret_fingerprint(home: Path) -> str:
    res = _gpg(home, "--with-colons", "--list-secret-keys")
    for line in res.stdout.decode().splitlines():
        if line.startswith("fpr:"):
            return line.split(":")[9]
    raise SigningError("the signing key file holds no secret key (export it with `gpg --export-secret-keys`)")


def verify_detached(data: Path, signature: Path, keyring: Path) -> str | None:
    """None when `signature` is a good signature of `data` by a key in `keyring`, else the reason."""
    if not signature.is_file():
        return f"{signature.name}: missing (an unsigned bundle is never trusted)"
    if not keyring.is_file():
        return f"keyring {keyring} not found"
    with tempfile.TemporaryDirectory(prefix="gpufleet-gpgv-") as home:
        # gpgv wants a binary keyring; dearmor an armored one into the throwaway home first.
        ring = Path(home) / "trusted.gpg"
        raw = keyring.read_bytes()
        if raw.lstrip().startswith(b"-----BEGIN PGP"):
            res = _gpg(Path(home), "--dearmor", "--output", str(ring), stdin=raw)
            if res.returncode != 0:
                return f"keyring {keyring}: cannot read it ({res.stderr.decode(errors='replace').strip()})"
        else:
            ring.write_bytes(raw)
        try:
            proc = subprocess.run(["gpgv", "--keyring", str(ring), str(signature), str(data)],
                                  capture_output=True, timeout=GPG_TIMEOUT_S, check=False)
        except FileNotFoundError:
            return "gpgv not found: install the `gpgv` package"
        except subprocess.TimeoutExpired:
            return "gpgv timed out"
    if proc.returncode != 0:
        detail = proc.stderr.decode(errors="replace").strip().splitlines()
        return f"{signature.name}: bad signature of {data.name} for keyring {keyring} ({detail[-1] if detail else ''})"
    return None


def generate_key(home: Path, uid: str, secret_out: Path, public_out: Path) -> str:
    """Make a new passphrase-less signing key (lab, tests); writes the secret and public key files."""
    home.mkdir(parents=True, exist_ok=True)
    home.chmod(0o700)
    try:
        res = _gpg(home, "--passphrase", "", "--quick-generate-key", uid, "ed25519", "sign", "never")
        if res.returncode != 0:
            raise SigningError(f"key generation failed: {res.stderr.decode(errors='replace')}")
        fpr = _secret_fingerprint(home)
        secret = _gpg(home, "--armor", "--export-secret-keys", fpr)
        public = _gpg(home, "--armor", "--export", fpr)
    finally:
        stop_agent(home)
    secret_out.write_bytes(secret.stdout)
    secret_out.chmod(0o600)
    public_out.write_bytes(public.stdout)
    return fpr
