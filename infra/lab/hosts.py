"""Lab hosts: an overlay clone of a base rootfs booted with systemd-nspawn, pinned SSH host key.

Each host lives in /var/lib/gpufleet/lab/hosts/<name>/ (upper, work, root). The lab writes the
host's identity (hostname, address, SSH host key, controller key, simulated GPU declaration) into
the overlay before boot, so the host key is known — and pinned — before the host ever answers.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from infra.lab import network
from infra.lab.config import FabricLink, HostKind, LabHost, LabSpec, Paths
from infra.lab.sh import LabCommandError, run
from infra.plan.nodestate import CAPABILITIES_FACT_FILE

MARKER = "gpufleet-lab-host"  # $0 of each host's supervisor: finds our processes, guards against PID reuse
SRV_MOUNT = "/srv/gpufleet"

# Restart nspawn when the container reboots (exit 133), like systemd-nspawn@.service does; forward
# SIGTERM so `lab down` and BMC power-off shut the container down cleanly.
#
# FABRIC_LINKS ("veth:bridge …"): nspawn creates a node's extra (fabric) veths but cannot bridge them, so
# the supervisor enslaves each to its fabric bridge as soon as it appears, at every (re)start.
_SUPERVISOR = r"""
echo $$ > "$PIDFILE"
trap 'kill -TERM "$child" 2>/dev/null; wait "$child"; exit 0' TERM INT
attach() {
  local link ifc br n
  for link in $FABRIC_LINKS; do
    ifc=${link%%:*} br=${link#*:}
    for n in $(seq 200); do
      [ -e "/sys/class/net/$ifc" ] && { ip link set dev "$ifc" master "$br" up; break; }
      kill -0 "$child" 2>/dev/null || return 0
      sleep 0.05
    done
  done
}
while :; do
  "$@" & child=$!
  attach
  wait "$child"; rc=$?
  [ "$rc" = 133 ] || exit "$rc"
  echo "gpufleet lab: container rebooted, starting it again"
done
"""


def host_dir(paths: Paths, name: str) -> Path:
    """/var/lib/gpufleet/lab/hosts/<name>."""
    return paths.hosts_dir / name


def root_of(paths: Paths, name: str) -> Path:
    """The mounted root filesystem of a host (as seen from the lab host)."""
    return host_dir(paths, name) / "root"


def is_mounted(path: Path) -> bool:
    """Is `path` a mount point (from /proc/self/mountinfo)."""
    target = str(path)
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return any(line.split()[4] == target for line in f)


def lab_mounts(paths: Paths) -> list[Path]:
    """Every mount point under the lab's hosts directory (deepest first, for unmounting)."""
    prefix = str(paths.hosts_dir) + "/"
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        points = [line.split()[4] for line in f]
    return sorted((Path(p) for p in points if p.startswith(prefix)), key=lambda p: -len(str(p)))


def mount_overlay(paths: Paths, name: str, lower: Path) -> Path:
    """Mount the host's overlay (idempotent); writes go to its upper layer."""
    d = host_dir(paths, name)
    root = d / "root"
    if is_mounted(root):
        return root
    for sub in ("upper", "work", "root"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    run(["mount", "-t", "overlay", "overlay", "-o",
         f"lowerdir={lower},upperdir={d / 'upper'},workdir={d / 'work'}", root], timeout=30)
    return root


def unmount(path: Path) -> None:
    """Unmount if mounted (lazy as a fallback, so down never hangs on a busy mount)."""
    if not is_mounted(path):
        return
    if run(["umount", path], timeout=30, check=False).returncode != 0:
        run(["umount", "-l", path], timeout=30)


def drop_disk(paths: Paths, name: str) -> None:
    """Forget a host's writes (its upper layer): the next boot starts from the base image."""
    d = host_dir(paths, name)
    unmount(d / "root")
    for sub in ("upper", "work"):
        shutil.rmtree(d / sub, ignore_errors=True)


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)


def _ids(root: Path, user: str) -> tuple[int, int] | None:
    for line in (root / "etc/passwd").read_text(encoding="utf-8").splitlines():
        parts = line.split(":")
        if parts[0] == user:
            return int(parts[2]), int(parts[3])
    return None


def new_host_key(root: Path, name: str) -> str:
    """Generate a fresh ed25519 host key inside the host; return its public key line."""
    key = root / "etc/ssh/ssh_host_ed25519_key"
    for p in root.glob("etc/ssh/ssh_host_*"):
        p.unlink()
    key.parent.mkdir(parents=True, exist_ok=True)
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"root@{name}", "-f", key], timeout=30)
    return public_host_key(root)


def public_host_key(root: Path) -> str:
    """`ssh-ed25519 AAAA…` of a host (its source of truth is its own disk, read from the lab host)."""
    parts = (root / "etc/ssh/ssh_host_ed25519_key.pub").read_text(encoding="utf-8").split()
    return f"{parts[0]} {parts[1]}"


# What an nspawn host cannot do, declared the way any node declares it (docs/roles.md "Node capabilities"):
# an Ansible local fact the roles read. The plan and the roles never ask whether they run in the lab.
CAPABILITIES_FACT = CAPABILITIES_FACT_FILE.lstrip("/")
CAPABILITIES = {
    "reboot": False,  # a container on the lab host's kernel: a reboot restarts it, it loads no driver
    "kernel_modules": False,  # no /lib/modules for the lab host's kernel, no CAP_SYS_MODULE
    "sysctl": False,  # /proc/sys is read-only inside nspawn
    "time_sync": False,  # the host clock is shared; chronyd lacks CAP_SYS_TIME
    "network_apply": False,  # the lab sets each host's address (10-gpufleet-lab.network below)
    "container_cgroups": False,  # no delegated cgroup tree for podman's containers
    "overlay_storage": False,  # no fuse device; overlay on the host's overlay fails
    "kernel_keyring": False,  # nspawn's seccomp filter blocks keyctl
}
# The lab mirror's registry speaks plain HTTP (real mirrors serve TLS): the lab trusts it on its own hosts,
# in a podman drop-in beside the one the container_runtime role manages.
LAB_REGISTRY_DROPIN = "etc/containers/registries.conf.d/40-gpufleet-lab-mirror.conf"


def lab_registry_dropin(spec: LabSpec, host: LabHost) -> str | None:
    """registries.conf drop-in that lets podman pull from the host's segment mirror over HTTP (None: no mirror)."""
    segment = spec.site.segment(host.segment)
    mirror = spec.site.mirror(segment.mirror) if segment else None
    if mirror is None:
        return None
    return (
        "# gpufleet lab: the lab mirror's registry is plain HTTP.\n"
        f'[[registry]]\nlocation = "{mirror.address}:{mirror.registry_port}"\ninsecure = true\n'
    )


def write_identity(spec: LabSpec, host: LabHost, root: Path, controller_pub: str) -> str:
    """Hostname, hosts, network, controller key, GPU declaration, fresh host key; returns the host key."""
    _write(root / "etc/hostname", host.name + "\n")
    peers = [h for h in spec.hosts if h.segment == host.segment]
    _write(root / "etc/hosts", "127.0.0.1\tlocalhost\n" + "".join(
        f"{h.address.ip}\t{h.name}\n" for h in peers) + "::1\tlocalhost ip6-localhost ip6-loopback\n")
    net = ["[Match]", "Name=host0", "", "[Network]", f"Address={host.address}", "LinkLocalAddressing=no",
           "IPv6AcceptRA=no"]
    if host.gateway:
        net.append(f"Gateway={host.gateway}")
    for dest, via in network.host_routes(spec, host.name):  # a federation flow's end (infra/lab/network.py)
        net += ["", "[Route]", f"Destination={dest}/32", f"Gateway={via}"]
    _write(root / "etc/systemd/network/10-gpufleet-lab.network",
           "# gpufleet lab: static address from the lab stack.\n" + "\n".join(net) + "\n")
    for link in host.fabric:
        _write(root / f"etc/systemd/network/11-gpufleet-lab-{link.netdev}.network",
               "# gpufleet lab: fabric port address from the lab stack (the lab plays the NIC and its cabling).\n"
               + "\n".join(fabric_network(link)) + "\n")
    auth = controller_pub.strip() + "\n"
    _write(root / "root/.ssh/authorized_keys", auth, 0o600)
    (root / "root/.ssh").chmod(0o700)
    ids = _ids(root, "lab")
    if ids:
        _write(root / "home/lab/.ssh/authorized_keys", auth, 0o600)
        for p in (root / "home/lab/.ssh", root / "home/lab/.ssh/authorized_keys"):
            os.chown(p, *ids)
        (root / "home/lab/.ssh").chmod(0o700)
    facts = {"name": host.name, "kind": host.kind.value, "segment": host.segment, "address": str(host.address),
             "stack": spec.stack, "simulated": True}
    _write(root / "etc/gpufleet-lab/host.json", json.dumps(facts, indent=2, sort_keys=True) + "\n")
    _write(root / CAPABILITIES_FACT, json.dumps(CAPABILITIES, indent=2, sort_keys=True) + "\n")
    dropin = lab_registry_dropin(spec, host)
    if dropin is not None:
        _write(root / LAB_REGISTRY_DROPIN, dropin)
    if host.kind is HostKind.NODE and host.gpus is not None:
        _write(root / "etc/gpufleet-lab/gpus.json", json.dumps(host.gpus, indent=2, sort_keys=True) + "\n")
    return new_host_key(root, host.name)


def fabric_network(link: FabricLink) -> list[str]:
    """systemd-networkd lines of a fabric port: its address, no gateway (the fabric routes nowhere)."""
    return ["[Match]", f"Name={link.netdev}", "", "[Network]", f"Address={link.address}", "LinkLocalAddressing=no",
            "IPv6AcceptRA=no"]


def _pidfile(paths: Paths, name: str) -> Path:
    return host_dir(paths, name) / "supervisor.pid"


def nspawn_argv(spec: LabSpec, host: LabHost, root: Path, paths: Paths) -> list[str]:
    """The systemd-nspawn command line of a host (flags from the lab notes: no system bus here)."""
    argv = ["systemd-nspawn", "-q", "-D", str(root), "-M", host.name, "--register=no", "--keep-unit", "-b",
            f"--network-bridge={spec.bridge(host.segment).name}", "--resolv-conf=off", "--timezone=off",
            "--console=passive", "--link-journal=no"]
    if host.serves:
        argv.append(f"--bind={paths.srv_dir / host.name}:{SRV_MOUNT}")
    argv += [f"--network-veth-extra={link.host_if}:{link.netdev}" for link in host.fabric]
    return argv


def _wait_veth_gone(name: str, timeout: float = 15.0) -> None:
    """Wait for the host-side veth of a container that just stopped to go away.

    The kernel tears a dead container's network namespace down asynchronously; a new nspawn for
    the same machine name fails ("File exists") if it asks for the veth before that is done.
    """
    _wait_link_gone(f"vb-{name}", timeout)


def _wait_link_gone(ifname: str, timeout: float = 15.0) -> None:
    """Wait for a host-side veth of a stopped container to go away (delete it after `timeout`)."""
    veth = Path("/sys/class/net") / ifname
    if len(veth.name) > 15:  # nspawn shortens long names with a hash; nothing to wait for by name
        return
    deadline = time.monotonic() + timeout
    while veth.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    if veth.exists():
        run(["ip", "link", "delete", veth.name], timeout=10, check=False)


def start(spec: LabSpec, host: LabHost, paths: Paths) -> int:
    """Boot a host under its supervisor (detached from us); returns the supervisor PID."""
    d = host_dir(paths, host.name)
    pidfile = _pidfile(paths, host.name)
    pidfile.unlink(missing_ok=True)
    _wait_veth_gone(host.name)
    for link in host.fabric:
        _wait_link_gone(link.host_if)
    argv = nspawn_argv(spec, host, d / "root", paths)
    log = open(d / "console.log", "ab")  # noqa: SIM115 - handed to the child, closed below
    try:
        # setsid -f: the supervisor is re-parented away from us, so a short-lived CLI or the BMC
        # notifier can start hosts without owning (or having to reap) them.
        subprocess.run(["setsid", "-f", "bash", "-c", _SUPERVISOR, MARKER, *argv], stdin=subprocess.DEVNULL,
                       stdout=log, stderr=log, timeout=10, check=True,
                       env={**os.environ, "PIDFILE": str(pidfile),
                            "FABRIC_LINKS": " ".join(f"{x.host_if}:{x.bridge}" for x in host.fabric)})
    finally:
        log.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if pidfile.exists() and pidfile.read_text().strip():
            return int(pidfile.read_text())
        time.sleep(0.05)
    raise LabCommandError(f"{host.name}: supervisor did not start (see {d / 'console.log'})")


def alive(pid: int | None) -> bool:
    """Is `pid` one of our host supervisors (not a recycled PID)."""
    if not pid:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return MARKER.encode() in cmdline


def supervisor_pids(paths: Paths) -> dict[str, int]:
    """Running host supervisors of this lab, by host name (finds leftovers without a state file).

    Only supervisors whose root is under this lab's hosts directory: a second lab is left alone.
    """
    out: dict[str, int] = {}
    prefix = (str(paths.hosts_dir) + "/").encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if len(args) > 3 and args[0].endswith(b"bash") and args[3] == MARKER.encode() and \
                any(a.startswith(prefix) for a in args):
            name = args[args.index(b"-M") + 1].decode() if b"-M" in args else proc.name
            out[name] = int(proc.name)
    return out


def stop_many(pids: Iterable[int], timeout: float = 10.0) -> None:
    """SIGTERM every supervisor at once (clean container shutdown), SIGKILL what is left after `timeout`."""
    pending = [p for p in pids if alive(p)]
    for p in pending:
        os.kill(p, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        time.sleep(0.05)
        pending = [p for p in pending if alive(p)]
    for p in pending:
        _kill_tree(p)


def _kill_tree(pid: int) -> None:
    children = run(["pgrep", "-P", str(pid)], timeout=5, check=False).stdout.split()
    for c in children:
        _kill_tree(int(c))
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def ssh_base(spec: LabSpec, connect_timeout: int = 2) -> list[str]:
    """Ssh with the lab's config: pinned known_hosts, StrictHostKeyChecking=yes, controller key."""
    return ["ssh", "-F", str(spec.ssh_config), "-o", f"ConnectTimeout={connect_timeout}"]


def poll_ssh(spec: LabSpec, names: list[str], timeout: float = 60.0) -> tuple[dict[str, float], list[str]]:
    """Poll SSH (every 0.1 s, all hosts at once) until each answers or `timeout`; (seconds per host, silent)."""
    t0 = time.monotonic()
    pending = {n: None for n in names}
    ready: dict[str, float] = {}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    while pending and time.monotonic() - t0 < timeout:
        for n in list(pending):
            p = procs.get(n)
            if p is None:
                procs[n] = subprocess.Popen([*ssh_base(spec, 1), n, "true"], stdin=subprocess.DEVNULL,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            elif p.poll() is not None:
                if p.returncode == 0:
                    ready[n] = time.monotonic() - t0
                    del pending[n]
                del procs[n]
        time.sleep(0.1)
    for p in procs.values():
        p.kill()
        p.wait()
    return ready, list(pending)


def wait_ssh(spec: LabSpec, names: list[str], timeout: float = 60.0) -> dict[str, float]:
    """Like poll_ssh, but a host that stays silent is an error."""
    ready, pending = poll_ssh(spec, names, timeout)
    if pending:
        raise LabCommandError(f"SSH did not answer within {timeout:.0f}s: {', '.join(pending)}")
    return ready


def console_tail(paths: Paths, name: str, lines: int = 25) -> str:
    """The last lines of a host's console log (nspawn and the container's boot messages)."""
    log = host_dir(paths, name) / "console.log"
    if not log.exists():
        return "(no console log)"
    text = log.read_bytes()[-16384:].decode("utf-8", "replace")
    return "\n".join(text.splitlines()[-lines:])


def ssh_config_text(spec: LabSpec, key: Path) -> str:
    """OpenSSH client config for every lab host (the stack's `controller.ssh_config`)."""
    out = ["# Written by `gpufleet lab up`: lab hosts, pinned host keys (StrictHostKeyChecking yes).", ""]
    # VM nodes too: they accept the same key (the stack's admin_keys, installed by their first-boot data), and
    # their host keys are pinned by the rebuild that installs them, in the same known_hosts.
    names = [(h.name, h.address.ip) for h in spec.hosts] + [(v.name, v.address.ip) for v in spec.vms]
    for name, ip in names:
        out += [f"Host {name} {ip}", f"  HostName {ip}", "  User root",
                f"  IdentityFile {key}", "  IdentitiesOnly yes", f"  UserKnownHostsFile {spec.known_hosts}",
                "  StrictHostKeyChecking yes", "  HostKeyAlgorithms ssh-ed25519", "  BatchMode yes",
                "  LogLevel ERROR", ""]
    return "\n".join(out)


def known_hosts_line(host: LabHost, pubkey: str) -> str:
    """`name,address ssh-ed25519 AAAA…`."""
    return f"{host.name},{host.address.ip} {pubkey}\n"


def atomic_write(path: Path, text: str, mode: int = 0o644) -> None:
    """Write a file so readers see the old or the new content, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def write_known_hosts(spec: LabSpec, keys: dict[str, str]) -> None:
    """Write known_hosts with every lab host's real key (read from its own disk, never scanned)."""
    atomic_write(spec.known_hosts, "".join(known_hosts_line(spec.host(n), k) for n, k in sorted(keys.items())))


def repin(spec: LabSpec, name: str, pubkey: str) -> None:
    """Replace one host's pinned key in known_hosts, keeping the others."""
    lines = spec.known_hosts.read_text(encoding="utf-8").splitlines(keepends=True) if spec.known_hosts.exists() else []
    host = spec.host(name)
    names = {host.name, str(host.address.ip)}
    kept = [ln for ln in lines if not names & set(ln.split(" ", 1)[0].split(","))]
    atomic_write(spec.known_hosts, "".join(kept) + known_hosts_line(host, pubkey))
