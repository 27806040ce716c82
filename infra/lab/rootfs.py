"""Base root filesystems of lab hosts: debootstrap once, cache as tar.zst keyed by the package lists.

Two flavours share one debootstrap: `node` (what a freshly installed GPU node looks like) and
`server` (node + nginx + docker-registry, for the mirror and the outside-world host). The same
build downloads the seed packages (Debian packages the roles install, with their dependency
closure relative to the node base) so that no lab host ever needs deb.debian.org.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

from infra.lab.config import LabSpec, Paths
from infra.lab.sh import run
from infra.lab.standins import STANDIN_NAMES
from infra.model.site import OperatingSystem
from infra.observe.server import server_packages
from infra.plan.packages import packages_for, provisioning_packages

log = logging.getLogger("gpufleet.lab")

RECIPE_VERSION = 3  # bump when the build steps below change in a way the package lists do not show
SUITE = "bookworm"
DEBIAN_URL = "http://deb.debian.org/debian"
DEBIAN_SECURITY_URL = "http://deb.debian.org/debian-security"

# What every lab host has, like a minimal server install (sshd, python3 + python3-apt for Ansible).
BASE_PACKAGES = (
    "systemd", "systemd-sysv", "dbus", "openssh-server", "python3", "python3-apt", "sudo", "iproute2",
    "netbase", "ca-certificates", "iputils-ping", "procps", "less",
)
# Serving hosts (mirror, outside world): static files over HTTP and a container registry.
SERVER_PACKAGES = ("nginx-light", "docker-registry")
# Debian packages the roles install besides the pinned profile packages (one place; keep it short).
ROLE_BASE_PACKAGES = (
    "nftables", "chrony", "curl", "python3-venv", "python3-pip", "crun", "conmon", "gnupg", "jq",
    "fuse-overlayfs", "slirp4netns", "uidmap", "catatonit",
)


def seed_package_specs(spec: LabSpec) -> list[str]:
    """Debian package specs (`name` or `name=version`) every lab repo carries, stand-ins excluded."""
    wanted: dict[str, str | None] = {n: None for n in ROLE_BASE_PACKAGES}
    for profile in spec.site.profiles.values():
        # Every optional component a profile pins (a fabric node's RDMA stack too): any node may need it.
        for p in packages_for(profile, OperatingSystem.DEBIAN_12, fabric_manager=True, rdma=True, subnet_manager=True):
            if p.name not in STANDIN_NAMES:
                wanted[p.name] = p.version
    for server in server_packages(spec.site):  # each segment's Prometheus host installs them from its repository
        wanted[server["name"]] = server["version"]
    for seg in spec.site.segments:  # each provisioning host installs dnsmasq-base, ipxe from its repository
        for p in provisioning_packages(seg):
            wanted[p.name] = p.version
    return sorted(f"{n}={v}" if v else n for n, v in wanted.items())


def rootfs_key(seed: list[str]) -> str:
    """Cache key of the base root filesystems and seed downloads: changes when any list changes."""
    data = [RECIPE_VERSION, SUITE, DEBIAN_URL, list(BASE_PACKAGES), list(SERVER_PACKAGES), seed]
    return hashlib.sha256(json.dumps(data).encode()).hexdigest()[:12]


def _tarball(paths: Paths, flavour: str, key: str) -> Path:
    return paths.cache / f"rootfs-{flavour}-{key}.tar.zst"


def rootfs_path(paths: Paths, flavour: str, key: str) -> Path:
    """Unpacked base of a flavour (lower layer of every host's overlay)."""
    return paths.rootfs_dir / f"{flavour}-{key}"


def seed_debs_path(paths: Paths, key: str) -> Path:
    """Directory of the downloaded seed .debs for a key."""
    return paths.debs_dir / key


def ensure_rootfs(paths: Paths, seed: list[str]) -> tuple[str, dict[str, Path]]:
    """Unpacked node/server bases for the current lists: reuse, unpack the cache, or build (slow, once)."""
    key = rootfs_key(seed)
    out = {f: rootfs_path(paths, f, key) for f in ("node", "server")}
    if all((p / ".gpufleet-complete").exists() for p in out.values()) and \
            (seed_debs_path(paths, key) / ".complete").exists():
        return key, out
    cached = all(_tarball(paths, f, key).exists() for f in out)
    if not cached or not (seed_debs_path(paths, key) / ".complete").exists():
        _build(paths, key, seed)
    for flavour, dest in out.items():
        if (dest / ".gpufleet-complete").exists():
            continue
        t0 = time.monotonic()
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        run(["tar", "--zstd", "-xpf", _tarball(paths, flavour, key), "--numeric-owner", "--xattrs",
             "--xattrs-include=*", "-C", tmp], timeout=300)
        (tmp / ".gpufleet-complete").write_text(key + "\n")
        tmp.rename(dest)
        log.info("unpacked %s base in %.1fs", flavour, time.monotonic() - t0)
    return key, out


def _nspawn_run(root: Path, script: str, timeout: float) -> None:
    """Run a shell script inside a root filesystem (not booted; host network for Debian's registry)."""
    run(["systemd-nspawn", "-q", "-D", root, "--register=no", "--keep-unit", "--resolv-conf=copy-host",
         "--timezone=off", "-E", "DEBIAN_FRONTEND=noninteractive", "--", "/bin/sh", "-ec", script], timeout=timeout)


_COMMON_SETUP = r"""
rm -f /etc/ssh/ssh_host_*
mkdir -p /etc/ssh/sshd_config.d
cat > /etc/ssh/sshd_config.d/gpufleet-lab.conf <<'CFG'
HostKey /etc/ssh/ssh_host_ed25519_key
PasswordAuthentication no
PermitRootLogin prohibit-password
UseDNS no
CFG
cat > /etc/systemd/system/gpufleet-lab-hostkeys.service <<'UNIT'
[Unit]
Description=Generate SSH host keys missing on this host (clones must not share keys)
Before=ssh.service
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key
[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A
[Install]
WantedBy=multi-user.target
UNIT
systemctl enable gpufleet-lab-hostkeys.service systemd-networkd.service ssh.service
systemctl mask console-getty.service getty@tty1.service systemd-networkd-wait-online.service
rm -f /etc/hostname
: > /etc/machine-id
id lab >/dev/null 2>&1 || useradd -m -s /bin/bash -G sudo lab
echo 'lab ALL=(ALL) NOPASSWD:ALL' > /etc/sudoers.d/lab && chmod 0440 /etc/sudoers.d/lab
"""

_SERVER_SETUP = r"""
apt-get install -y -q --no-install-recommends {packages}
mkdir -p /etc/docker/registry
cat > /etc/docker/registry/config.yml <<'CFG'
# gpufleet lab registry: no auth (lab only), storage on the bind-mounted /srv/gpufleet.
version: 0.1
log:
  level: info
storage:
  filesystem:
    rootdirectory: /srv/gpufleet/registry
  delete:
    enabled: true
http:
  addr: :5000
CFG
mkdir -p /etc/systemd/system/docker-registry.service.d
cat > /etc/systemd/system/docker-registry.service.d/gpufleet-lab.conf <<'CFG'
[Service]
ExecStartPre=+/bin/mkdir -p /srv/gpufleet/registry
ExecStartPre=+/bin/chown -R docker-registry: /srv/gpufleet/registry
CFG
cat > /etc/nginx/sites-available/default <<'CFG'
# gpufleet lab file server: /apt/ (flat apt repo), /files/ (models, wheels) from /srv/gpufleet.
server {{
    listen 80 default_server;
    root /srv/gpufleet;
    autoindex on;
    location / {{ try_files $uri $uri/ =404; }}
}}
CFG
systemctl enable nginx docker-registry
"""


def _build(paths: Paths, key: str, seed: list[str]) -> None:
    """Debootstrap the node base, download the seed closure, derive the server base, tar both."""
    build = paths.rootfs_dir / f"build-{key}"
    shutil.rmtree(build, ignore_errors=True)
    node, server = build / "node", build / "server"
    node.mkdir(parents=True)
    t0 = time.monotonic()
    log.info("debootstrap %s (minbase + %d packages) — first run only, ~2 min", SUITE, len(BASE_PACKAGES))
    run(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", SUITE, node, DEBIAN_URL],
        timeout=1200)
    sources = (f"deb {DEBIAN_URL} {SUITE} main\ndeb {DEBIAN_URL} {SUITE}-updates main\n"
               f"deb {DEBIAN_SECURITY_URL} {SUITE}-security main\n")
    (node / "etc/apt/sources.list").write_text(sources)
    _nspawn_run(node, "apt-get update -q && apt-get -y -q dist-upgrade", timeout=900)
    _nspawn_run(node, _COMMON_SETUP, timeout=120)
    log.info("downloading seed packages: %s", " ".join(seed))
    _nspawn_run(node, "mkdir -p /var/cache/gpufleet-seed/partial && apt-get install -y -q --download-only "
                "-o Dir::Cache::archives=/var/cache/gpufleet-seed " + " ".join(seed), timeout=1200)
    debs = seed_debs_path(paths, key)
    shutil.rmtree(debs, ignore_errors=True)
    debs.mkdir(parents=True)
    for f in (node / "var/cache/gpufleet-seed").glob("*.deb"):
        shutil.move(f, debs / f.name)
    shutil.rmtree(node / "var/cache/gpufleet-seed")
    run(["cp", "-a", node, server], timeout=300)
    _nspawn_run(server, _SERVER_SETUP.format(packages=" ".join(SERVER_PACKAGES)), timeout=900)
    for root in (node, server):
        _nspawn_run(root, "apt-get clean && rm -rf /var/lib/apt/lists/* && rm -f /etc/apt/sources.list", timeout=120)
        (root / "etc/apt/sources.list").write_text(
            "# gpufleet lab: no Debian sources — packages come from the segment's mirror or lab-upstream.\n")
    paths.cache.mkdir(parents=True, exist_ok=True)
    for flavour, root in (("node", node), ("server", server)):
        tmp = _tarball(paths, flavour, key).with_suffix(".tmp")
        run(["tar", "--zstd", "-cpf", tmp, "--numeric-owner", "--xattrs", "--xattrs-include=*", "-C", root, "."],
            timeout=600)
        tmp.rename(_tarball(paths, flavour, key))
    (debs / ".complete").write_text(" ".join(seed) + "\n")
    shutil.rmtree(build, ignore_errors=True)
    log.info("base root filesystems built and cached in %.0fs", time.monotonic() - t0)
