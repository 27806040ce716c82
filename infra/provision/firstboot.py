"""First-boot data of a network-installed node, and the store of the nodes' own SSH host keys.

The deploy ramdisk unpacks a node's first-boot tarball over its freshly written root file system:
hostname, hosts, a systemd-networkd file for the PXE interface (by MAC), the site's admin keys for root,
and the node's **own** ed25519 host key. The key comes from gpufleet's host key store on the controller
(`HostKeyStore`): generated once per node, kept, and pinned in `controller.known_hosts` from the store's
public half — so a node answers with the same key after every rebuild and no known_hosts edit is needed.

The tarball holds a private key: it is written 0600 on the provisioning host, served only while the node
is being installed, and deleted by the service when the node reports "done" (infra/provision/httpd.py).
"""

from __future__ import annotations

import gzip
import io
import re
import subprocess
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Network
from pathlib import Path

from infra import ssh as ssh_client
from infra.model.site import Node, Segment, Site
from infra.provision.render import HTTP_ROOT, HTTPD_PATH, provisioning_address, script_name

_HOST = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
#: Fixed mtime of every member (2025-01-01): the same inputs give the same tarball.
_MTIME = 1735689600
#: The controller's host key store unless `--keys` names another (one directory per node, 0700).
DEFAULT_KEY_STORE = Path("/var/lib/gpufleet/provision/keys")


class KeyStoreError(Exception):
    """The key store cannot give a key (ssh-keygen missing or failing, unreadable store)."""


@dataclass(frozen=True)
class HostKey:
    """A node's SSH host key pair."""

    private: bytes
    public: str
    """One line: `ssh-ed25519 AAAA… comment`."""


class HostKeyStore:
    """Per-node ed25519 host keys in a directory on the controller (`<dir>/<host>/ssh_host_ed25519_key`)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, host: str) -> Path:
        if not _HOST.fullmatch(host):
            raise KeyStoreError(f"host name {host!r} cannot name a key in the store")
        return self.root / host / "ssh_host_ed25519_key"

    def public_path(self, host: str) -> Path:
        """The `.pub` file of the node's key (exists once `get` ran)."""
        return self._path(host).with_suffix(".pub")

    def get(self, host: str) -> HostKey:
        """The node's key; generated (ssh-keygen) the first time it is asked for, then always the same."""
        key = self._path(host)
        if not key.is_file():
            key.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            try:
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"root@{host}", "-f", str(key)],
                               check=True, capture_output=True, timeout=30)
            except (OSError, subprocess.SubprocessError) as exc:
                raise KeyStoreError(f"cannot generate the host key of {host}: {exc}") from None
        key.chmod(0o600)
        return HostKey(key.read_bytes(), key.with_suffix(".pub").read_text(encoding="utf-8").strip())


def networkd_file(node: Node, segment: Segment) -> str:
    """systemd-networkd configuration of the node's PXE interface, matched by its MAC."""
    net = IPv4Network(segment.cidr)
    lines = ["# gpufleet: written at install time from the stack.", "[Match]", f"MACAddress={node.macs[0]}", "",
             "[Network]", f"Address={node.address}/{net.prefixlen}"]
    if segment.gateway is not None:
        lines.append(f"Gateway={segment.gateway}")
    lines += [f"DNS={d}" for d in segment.dns]
    if segment.mtu != 1500:
        lines += ["", "[Link]", f"MTUBytes={segment.mtu}"]
    return "\n".join(lines) + "\n"


def firstboot_tar(site: Site, node: Node, key: HostKey) -> bytes:
    """The node's first-boot tarball (gzip), deterministic for the same inputs."""
    segment = site.segments_by_name[node.segment]
    files: list[tuple[str, int, bytes]] = [
        ("etc/hostname", 0o644, f"{node.hostname}\n".encode()),
        ("etc/hosts", 0o644, f"127.0.0.1 localhost\n{node.address} {node.hostname}\n".encode()),
        ("etc/systemd/network/10-gpufleet.network", 0o644, networkd_file(node, segment).encode()),
        ("root/.ssh/authorized_keys", 0o600, "".join(f"{k}\n" for k in site.admin_keys).encode()),
        ("etc/ssh/ssh_host_ed25519_key", 0o600, key.private),
        ("etc/ssh/ssh_host_ed25519_key.pub", 0o644, (key.public + "\n").encode()),
    ]
    dirs = sorted({str(p) for name, _, _ in files for p in Path(name).parents if str(p) != "."})
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for d in dirs:
            ti = tarfile.TarInfo(d)
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o700 if d in ("root", "root/.ssh") else 0o755, _MTIME
            tar.addfile(ti)
        for name, mode, data in files:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), mode, _MTIME
            tar.addfile(ti, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), mtime=0)


class ArmError(Exception):
    """A node's network install could not be armed on its provisioning host (nothing on the node was touched)."""


def arm_install(
    site: Site,
    node: Node,
    store: HostKeyStore,
    *,
    run: Callable[..., subprocess.CompletedProcess[bytes]] = ssh_client.run,
    timeout: float = 60,
) -> str:
    """Arm the node's install on its segment's provisioning host; return the public host key it will have.

    Over SSH with the stack's pinned keys: `python3 provision_httpd.py --root … --arm <mac>` with the node's
    first-boot tarball on stdin (infra/provision/httpd.py, installed by roles/provisioning). This is what a
    reimage or rebuild does first; nothing else ever points a node's script at the install.

    Raises:
        ArmError: the node has no image or no provisioning service, the key store failed, SSH failed, or
            the provisioning host refused (no install script for the MAC: the role has not run since the
            node was added).

    """
    segment = site.segments_by_name[node.segment]
    if node.image is None or segment.provisioning is None:
        raise ArmError(f"{node.hostname} has no `image` (or its segment no `provisioning`): not network-installed")
    prov = segment.provisioning
    try:
        key = store.get(node.hostname)
    except KeyStoreError as exc:
        raise ArmError(str(exc)) from None
    mac = script_name(node.macs[0]).removesuffix(".ipxe")
    words = ["python3", HTTPD_PATH, "--root", HTTP_ROOT, "--arm", mac]
    # A node as provisioning host logs in as its ssh_user; a mirror or dedicated host as its ssh config says.
    host_node = next((n for n in site.nodes if n.hostname == prov.host), None)
    user = host_node.ssh_user if host_node is not None else None
    if user not in (None, "root"):
        words = ["sudo", "-n", *words]
    argv = ssh_client.argv(ssh_client.SshSettings.of(site), str(provisioning_address(site, segment)),
                           ssh_client.shell_command(*words), user=user)
    try:
        p = run(argv, host=prov.host, stdin=firstboot_tar(site, node, key), timeout=timeout)
    except ssh_client.SshError as exc:
        raise ArmError(f"{node.hostname}: cannot reach provisioning host {prov.host}: {exc.detail}") from None
    if p.returncode != 0:
        detail = p.stderr.decode(errors="replace").strip().splitlines()
        raise ArmError(f"{node.hostname}: provisioning host {prov.host} refused to arm the install "
                       f"(exit {p.returncode}): {detail[-1] if detail else 'no message'}")
    return key.public
