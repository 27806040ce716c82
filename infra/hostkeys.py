"""Re-pinning a rebuilt node's SSH host key from an out-of-band source — never trust-on-first-use.

A reimage gives the node new host keys. Accepting whatever key answers first would let anyone on
the management network impersonate the node. So the new key must come from somewhere the network
cannot forge:

- real sites: `--host-key FILE` — the public key the installer was given (pre-generated and served with
  the autoinstall/kickstart), its key drop, or the key read on the BMC's serial console by a person;
- the lab: its own source (`infra.lab.hostkeys`), which reads the key straight from the host's rootfs on
  this machine (the lab's out-of-band channel). Product code never imports the lab: the CLI layer
  registers the lab's source here (`register_lab_source`) for a lab stack when the lab package is installed.
"""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from infra.model.site import Node, Site

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


class HostKeySource(Protocol):
    """Where a rebuilt node's new host key comes from."""

    def describe(self) -> str:
        """For reports."""
        ...

    def check(self, site: Site, node: Node) -> None:
        """Raise `HostKeyError` if this source cannot work (checked before the rebuild touches anything)."""
        ...

    def pin(self, site: Site, node: Node) -> str:
        """Pin the node's new key in the stack's known_hosts; return its SHA256 fingerprint."""
        ...

    @property
    def refreshable(self) -> bool:
        """True when re-reading the key may give a newer one (a mismatch is then a race, not an attack)."""
        ...


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


def _entries(known_hosts: Path, name: str) -> list[str]:
    """The known_hosts lines that match `name` (hashed ones included, as ssh-keygen -F finds them)."""
    res = subprocess.run(
        ["ssh-keygen", "-F", name, "-f", str(known_hosts)], capture_output=True, text=True, check=False, timeout=30
    )
    return [line.strip() for line in res.stdout.splitlines() if line.strip() and not line.startswith("#")]


def pin_key(known_hosts: Path, node: Node, key_type: str, blob: str) -> str:
    """Replace every known_hosts entry of the node (by hostname and address) with the given key.

    When the node's only entry already is exactly that key (a rebuild that kept the node's key), the file is
    not touched at all: operators and CI diff known_hosts, and a rewrite would reorder it for nothing.
    """
    known_hosts.parent.mkdir(parents=True, exist_ok=True)
    want = f"{node.hostname},{node.address} {key_type} {blob}"
    if known_hosts.exists() and all(
        _entries(known_hosts, name) == [want] for name in (node.hostname, str(node.address))
    ):
        return key_fingerprint(blob)
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
    lines.append(want)
    tmp = known_hosts.with_name(known_hosts.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.chmod(tmp, 0o644)
    os.replace(tmp, known_hosts)
    return key_fingerprint(blob)


class FromFile:
    """A public key given by the operator (`--host-key FILE`)."""

    refreshable = False  # a mismatch with an operator-given key is an alarm, not a race

    def __init__(self, path: Path) -> None:
        self.path = path

    def describe(self) -> str:
        """For reports."""
        return f"file {self.path}"

    def check(self, site: Site, node: Node) -> None:
        """The file must hold a key and the stack must name a known_hosts file (HostKeyError otherwise)."""
        if not site.controller.known_hosts:
            raise HostKeyError("the stack has no `controller.known_hosts`; gpufleet pins host keys there")
        try:
            parse_public_key(self.path.read_text(encoding="utf-8"))
        except (OSError, HostKeyError) as exc:
            raise HostKeyError(f"--host-key {self.path}: {exc}") from None

    def pin(self, site: Site, node: Node) -> str:
        """Pin the given key."""
        key_type, blob = parse_public_key(self.path.read_text(encoding="utf-8"))
        return pin_key(Path(str(site.controller.known_hosts)), node, key_type, blob)


# The lab's host-key source factory, registered by the CLI layer (`infra.lab.hostkeys.register`).
_lab_source: Callable[[str | None, Path | None], HostKeySource] | None = None


def register_lab_source(factory: Callable[[str | None, Path | None], HostKeySource]) -> None:
    """Install the lab's source factory (called by the CLI layer; product code never imports the lab)."""
    global _lab_source
    _lab_source = factory


def registered_source(stack: str | None, stack_file: Path | None) -> HostKeySource | None:
    """The out-of-band source the CLI layer registered for this run (the lab's, for a lab stack), or None."""
    return _lab_source(stack, stack_file) if _lab_source is not None else None
