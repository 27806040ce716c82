"""SSH host keys as data: parse a public key, its fingerprint, and pin it in a known_hosts file.

Used by `gpufleet bmc reimage --host-key` and by `rebuild` (through infra.dr.hostkeys): one place for the
key grammar and the pinning, below both in the layers (it imports only the model).
"""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
from pathlib import Path

from infra.model.site import Node

_KEY_TYPES = (
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
)


class HostKeyError(Exception):
    """The new host key could not be obtained or pinned."""


def parse_public_key(text: str) -> tuple[str, str]:
    """(key type, base64 blob) from a `.pub` line or a known_hosts line."""
    for line in text.splitlines():
        parts = line.strip().split()
        for i, token in enumerate(parts):
            if token in _KEY_TYPES and i + 1 < len(parts):
                blob = parts[i + 1]
                try:
                    base64.b64decode(blob, validate=True)
                except ValueError:
                    continue
                return token, blob
    raise HostKeyError("no SSH public key found (expected e.g. `ssh-ed25519 AAAA…`)")


def key_fingerprint(blob: str) -> str:
    """OpenSSH-style `SHA256:…` fingerprint of a base64 key blob."""
    digest = hashlib.sha256(base64.b64decode(blob)).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def pin_key(known_hosts: Path, node: Node, key_type: str, blob: str) -> str:
    """Replace every known_hosts entry of the node (by hostname and address) with the given key."""
    known_hosts.parent.mkdir(parents=True, exist_ok=True)
    if known_hosts.exists():
        for name in (node.hostname, str(node.address)):
            # ssh-keygen -R also removes hashed entries, which a text filter could not match.
            subprocess.run(
                ["ssh-keygen", "-R", name, "-f", str(known_hosts)], capture_output=True, check=False, timeout=30
            )
        old = Path(str(known_hosts) + ".old")
        if old.exists():
            old.unlink()  # ssh-keygen's backup still holds the old key; it must not linger as a trust source
    lines = known_hosts.read_text(encoding="utf-8").splitlines() if known_hosts.exists() else []
    lines.append(f"{node.hostname},{node.address} {key_type} {blob}")
    tmp = known_hosts.with_name(known_hosts.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.chmod(tmp, 0o644)
    os.replace(tmp, known_hosts)
    return key_fingerprint(blob)
