"""`gpufleet lab up|status|down` and the node power operations the BMC notifier performs.

`up` is idempotent: with everything up it only re-checks health. Every step has a timeout.
`down` leaves nothing running: processes, mounts, bridges, the nft table, nspawn propagate dirs.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infra import procs
from infra.inference.publish import publish_llamacpp_files
from infra.inference.tinymodel import MODEL_NAME
from infra.inference.wheel import LLAMA_CPP_PYTHON_VERSION, wheel_cached
from infra.lab import bmc, hosts, network, registry, repo, rootfs, standins, vm
from infra.lab import state as lab_state
from infra.lab.config import LabHost, LabSpec, Paths, spec_digest
from infra.lab.sh import APT_LOCK_TIMEOUT_S, APT_LOCK_WAIT, LabCommandError, apt_update, run
from infra.model.site import Engine

log = logging.getLogger("gpufleet.lab")

# Host packages the lab needs, by the command that proves each is there.
HOST_PACKAGES = {
    "debootstrap": "debootstrap",
    "systemd-nspawn": "systemd-container",
    "nft": "nftables",
    "dpkg-scanpackages": "dpkg-dev",
    "gpg": "gnupg",
    "zstd": "zstd",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "ip": "iproute2",
}
PROPAGATE_DIR = Path("/run/systemd/nspawn/propagate")


class LabUnavailable(Exception):
    """A prerequisite is missing (not root, no nspawn, …): exit 5."""


@dataclass
class Timings:
    """Seconds per step of `lab up`, for the report and the benchmark harness."""

    steps: dict[str, float] = field(default_factory=dict)
    _t: float = field(default_factory=time.monotonic)

    def mark(self, step: str) -> None:
        """Record the time since the previous mark under `step`."""
        now = time.monotonic()
        self.steps[step] = round(now - self._t, 2)
        self._t = now


def check_prerequisites(install: bool = True) -> None:
    """Root, and the host packages (installed with apt-get when missing)."""
    if os.geteuid() != 0:
        raise LabUnavailable("the lab needs root (nspawn hosts, bridges, nftables)")
    missing = sorted({pkg for cmd, pkg in HOST_PACKAGES.items() if shutil.which(cmd) is None})
    if missing and install:
        log.info("installing host packages: %s", " ".join(missing))
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        try:
            apt_update(env)
            run(["apt-get", *APT_LOCK_WAIT, "install", "-y", "-q", "--no-install-recommends", *missing],
                timeout=900 + APT_LOCK_TIMEOUT_S, env=env)
        except LabCommandError as exc:
            raise LabUnavailable(f"cannot install host packages {' '.join(missing)}: {exc}") from exc
        missing = sorted({pkg for cmd, pkg in HOST_PACKAGES.items() if shutil.which(cmd) is None})
    if missing:
        raise LabUnavailable(f"missing host packages: {' '.join(missing)}")
    if not Path("/sys/module/overlay").exists():
        run(["modprobe", "overlay"], timeout=30, check=False)


def controller_key(paths: Paths) -> str:
    """The lab controller's public key (made the first time): root on every lab host, and VM nodes, accept it."""
    key = paths.ssh_key
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "gpufleet-lab-controller", "-f", key], timeout=30)
    return key.with_suffix(".pub").read_text().strip()


def _flavour(h: LabHost) -> str:
    return "server" if h.serves else "node"


def _seed_all(spec: LabSpec, paths: Paths, debs_dir: Path, standins_dir: Path) -> None:
    """Fill every serving host's repository (stand-ins + seed Debian packages, signed per host)."""
    debs = sorted([*debs_dir.glob("*.deb"), *standins_dir.glob("*.deb")])
    for h in spec.hosts:
        if h.serves:
            repo.seed_repo(h.name, paths.srv_dir / h.name, debs, paths.gnupg_dir / h.name, spec.keyrings[h.name],
                           paths.files_dir, scan_cache=paths.cache / "scan")


def _publish_inference_files(spec: LabSpec, paths: Paths) -> bool:
    """Put the llama.cpp wheelhouse and the tiny model into the drop-in directory (published on both stores).

    Only when the stack serves the lab's tiny model natively (the lab stack does): `converge` then works
    right after `up`, as the quickstart runs it.
    """
    if not any(s.engine is Engine.LLAMACPP and s.wheel and s.model.name == MODEL_NAME for s in spec.site.services):
        return False
    if not wheel_cached():
        log.info("building llama-cpp-python %s for CPU from the PyPI sdist — first run only, ~10 min",
                 LLAMA_CPP_PYTHON_VERSION)
    publish_llamacpp_files(paths.files_dir)
    return True


def host_running(st: dict[str, Any], name: str) -> bool:
    """Is the host's supervisor (and so its container) running."""
    return hosts.alive(st.get("hosts", {}).get(name, {}).get("pid"))


def _ssh_ok(spec: LabSpec, names: list[str]) -> dict[str, bool]:
    def probe(n: str) -> bool:
        return run([*hosts.ssh_base(spec, 2), n, "true"], timeout=10, check=False).returncode == 0

    with ThreadPoolExecutor(max_workers=8) as pool:
        return dict(zip(names, pool.map(probe, names), strict=True))


def up(spec: LabSpec, paths: Paths, stack_file: Path) -> dict[str, Any]:
    """Bring the lab up (or re-check a running one); returns the status."""
    t = Timings()
    check_prerequisites()
    t.mark("prerequisites")
    with lab_state.locked(paths):
        st = lab_state.load(paths)
        if st and st.get("stack") != spec.stack:
            raise LabUnavailable(f"a lab for stack {st.get('stack')!r} is up; run `gpufleet lab down` first")
        if st and st.get("digest") != spec_digest(spec):
            raise LabUnavailable("the running lab was built from a different stack file; `gpufleet lab down` first")
        seed = rootfs.seed_package_specs(spec)
        key, bases = rootfs.ensure_rootfs(paths, seed)
        t.mark("base rootfs")
        standins_dir = standins.ensure_standins(paths.standins_dir)
        if _publish_inference_files(spec, paths):
            t.mark("inference files")
        _seed_all(spec, paths, rootfs.seed_debs_path(paths, key), standins_dir)
        t.mark("repositories")
        st = st or {"stack": spec.stack, "digest": spec_digest(spec), "hosts": {}, "bmc": {}}
        st["rootfs_key"] = key
        st["bridges"] = [b.name for b in spec.bridges]
        st["nft_table"] = network.table_name(spec.stack)
        lab_state.save(paths, st)  # before creating anything, so `down` finds what a failed `up` left
        for b in spec.bridges:
            network.ensure_bridge(b)
        network.apply_ruleset(spec.bridges, st["nft_table"], network.lab_flows(spec))
        t.mark("network")
        controller_pub = controller_key(paths)
        keys: dict[str, str] = {}
        to_start: list[LabHost] = []
        # A node powered off through its BMC stays off while the BMC runs (someone's test or rebuild
        # is using it); if the BMC is restarted it reports every node On again, so all start.
        bmc_up = _bmc_alive(st)
        kept_off: list[str] = []
        for h in spec.hosts:
            entry = st["hosts"].get(h.name)
            root = hosts.root_of(paths, h.name)
            if entry and hosts.alive(entry.get("pid")):
                keys[h.name] = hosts.public_host_key(root)
                continue
            if entry and entry.get("bmc_off") and bmc_up and hosts.is_mounted(root):
                keys[h.name] = hosts.public_host_key(root)
                kept_off.append(h.name)
                continue
            lower = bases[_flavour(h)]
            if entry and entry.get("lower") != str(lower):
                hosts.drop_disk(paths, h.name)  # the base changed: start this host afresh
                entry = None
            fresh = not (hosts.host_dir(paths, h.name) / "upper" / "etc/ssh/ssh_host_ed25519_key").exists()
            hosts.mount_overlay(paths, h.name, lower)
            if h.serves:
                (paths.srv_dir / h.name).mkdir(parents=True, exist_ok=True)  # nspawn binds it as /srv/gpufleet
            if fresh:
                keys[h.name] = hosts.write_identity(spec, h, root, controller_pub)
            else:
                keys[h.name] = hosts.public_host_key(root)
            st["hosts"][h.name] = {"kind": h.kind.value, "segment": h.segment, "address": str(h.address.ip),
                                   "lower": str(lower), "root": str(root), "pid": None, "bmc_off": False}
            to_start.append(h)
        key_path = paths.ssh_key
        hosts.atomic_write(spec.ssh_config, hosts.ssh_config_text(spec, key_path))
        hosts.write_known_hosts(spec, keys)
        t.mark("host disks")
        for h in to_start:
            st["hosts"][h.name]["pid"] = hosts.start(spec, h, paths)
        lab_state.save(paths, st)
        t.mark("boot")
        _wait_booted(spec, paths, st, [h.name for h in spec.hosts if h.name not in kept_off])
        t.mark("ssh ready")
        _wait_services(spec)
        for h in spec.hosts:
            if h.serves:
                registry.seed_registry(f"{h.address.ip}:5000", paths.cache / "registry")
        t.mark("services ready")
        pids = st.get("bmc") or {}
        if not _bmc_alive(st):
            bmc.stop(pids)
            st["bmc"] = bmc.start(spec, paths, stack_file)
        st["bmc"]["url"] = bmc.redfish_url(spec)
        st["stack_file"] = str(stack_file)
        lab_state.save(paths, st)
        t.mark("bmc")
        if spec.vms:
            _vms_up(spec, paths, st)
            t.mark("vm nodes")
    result = status(spec, paths)
    result["timings"] = t.steps
    return result


def _vms_up(spec: LabSpec, paths: Paths, st: dict[str, Any]) -> None:
    """Start libvirtd + virtlogd, the VM nodes' domains (blank disks, powered off) and their libvirt BMC; idempotent.

    Each process is recorded in the state before the next starts, so `down` finds whatever a failed `up` left.
    A running pair of daemons, a defined domain (and its disk) and a running BMC are kept.
    """
    missing = vm.missing_tools()
    if missing:
        raise LabUnavailable(f"VM nodes need host packages: {' '.join(missing)} (./scripts/setup.sh --test)")
    assert spec.vm_bmc is not None  # lab_spec sets it with the VM nodes
    work = paths.vm_dir
    work.mkdir(parents=True, exist_ok=True)
    entry: dict[str, Any] = st.setdefault("vm", {})
    entry.update({"work": str(work), "pool": vm.pool_name(spec.stack), "domains": [v.name for v in spec.vms]})
    lab_state.save(paths, st)
    if not vm.libvirt_alive(entry):
        vm.stop_libvirt(entry)  # one of the two died: start both afresh
        entry.update(vm.start_libvirt(work))
        lab_state.save(paths, st)
    nodes = [vm.VmNode.of(v) for v in spec.vms]
    vm.define(work, nodes, entry["pool"])
    if not vm.bmc_alive(entry.get("bmc_pid")):
        password = bmc.ensure_password(paths)
        # The nspawn nodes' BMC wrote the users' htpasswd (every node's bmc.username, the same password file).
        entry["bmc_pid"] = vm.start_bmc(work, nodes, str(spec.vm_bmc.address), spec.vm_bmc.port,
                                        paths.bmc_dir / "htpasswd", ("admin", password))
    entry["bmc_url"] = f"http://{spec.vm_bmc.address}:{spec.vm_bmc.port}"
    lab_state.save(paths, st)


def _vms_down(st: dict[str, Any]) -> list[str]:
    """Stop the VM BMC, undefine the domains (their disks are removed with the VM directory), stop the daemons.

    Also kills QEMU processes of the lab's disks that a dead libvirtd left behind. Returns the domain names.
    """
    entry = st.get("vm") or {}
    if not entry:
        return []
    vm.stop_bmc(entry.get("bmc_pid"))
    names = list(entry.get("domains", []))
    if vm.libvirt_alive(entry):
        vm.undefine(names, entry.get("pool", ""))
    vm.stop_libvirt(entry)
    work = Path(entry.get("work", "")) if entry.get("work") else None
    if work is not None:
        strays = vm.qemu_pids(work)
        procs.terminate(strays, lambda p: procs.cmdline_contains(p, "qemu-system"), grace_s=10)
        shutil.rmtree(work, ignore_errors=True)
    return names


def _wait_booted(spec: LabSpec, paths: Paths, st: dict[str, Any], names: list[str]) -> None:
    """Until every host answers SSH; a host that does not within 60 s is booted once more.

    A container's first boot can fail for reasons outside it (seen once in a few hundred boots on a
    loaded machine: one host of six never answered). A second boot of the same disk is what an
    operator would try; if that fails too, the error carries the host's console log.
    """
    _, silent = hosts.poll_ssh(spec, names, timeout=60)
    if not silent:
        return
    for n in silent:
        log.warning("%s: no SSH after 60 s (supervisor %s); booting it again. Console:\n%s", n,
                    "running" if hosts.alive(st["hosts"][n].get("pid")) else "gone", hosts.console_tail(paths, n))
        hosts.stop_many([p for p in [st["hosts"][n].get("pid")] if p])
        st["hosts"][n]["pid"] = hosts.start(spec, spec.host(n), paths)
    lab_state.save(paths, st)
    _, silent = hosts.poll_ssh(spec, silent, timeout=90)
    if silent:
        detail = "\n".join(f"--- {n} console (last lines):\n{hosts.console_tail(paths, n)}" for n in silent)
        raise LabCommandError(f"SSH did not answer after two boots: {', '.join(silent)}\n{detail}")


def _bmc_alive(st: dict[str, Any]) -> bool:
    pids = st.get("bmc") or {}
    return bmc.pid_alive(pids.get("emulator_pid"), "sushy-emulator") and \
        bmc.pid_alive(pids.get("notifier_pid"), "infra.lab.notifier")


def _wait_services(spec: LabSpec, timeout: float = 60.0) -> None:
    """Until every serving host answers on HTTP (apt repo) and the registry port."""
    servers = [h for h in spec.hosts if h.serves]
    script = ("import urllib.request,sys\n"
              "for u in sys.argv[1:]:\n"
              "    urllib.request.urlopen(u, timeout=2).read()\n")
    deadline = time.monotonic() + timeout
    pending = {h.name for h in servers}
    while pending and time.monotonic() < deadline:
        for n in sorted(pending):
            urls = ["http://127.0.0.1/apt/InRelease", "http://127.0.0.1:5000/v2/"]
            r = run([*hosts.ssh_base(spec), n, "python3", "-c", f"'{script}'", *urls], timeout=15, check=False)
            if r.returncode == 0:
                pending.discard(n)
        if pending:
            time.sleep(0.3)
    if pending:
        raise LabCommandError(f"services (nginx, docker-registry) not answering on: {', '.join(sorted(pending))}")


def status(spec: LabSpec, paths: Paths) -> dict[str, Any]:
    """What runs: hosts (address, segment, kind, running, SSH), bridges, nft table, BMC."""
    st = lab_state.load(paths) or {}
    running = [h.name for h in spec.hosts if host_running(st, h.name)]
    ssh = _ssh_ok(spec, running) if running and spec.known_hosts.exists() else {}
    b = st.get("bmc") or {}
    return {
        "up": bool(st),
        "stack": spec.stack,
        # The stack file changed since `up`: hosts/addresses may differ; `down` then `up` to follow it.
        "stack_changed": bool(st) and st.get("digest") != spec_digest(spec),
        "hosts": [{"name": h.name, "kind": h.kind.value, "segment": h.segment, "address": str(h.address.ip),
                   "running": h.name in running, "ssh": ssh.get(h.name, False),
                   "bmc_off": bool(st.get("hosts", {}).get(h.name, {}).get("bmc_off")) and h.name not in running,
                   "gpus": f"{len(h.gpus['gpus'])}x {h.gpus['model']} (simulated)" if h.gpus else ""}
                  for h in spec.hosts],
        "bridges": [{"name": b_.name, "segment": b_.segment, "address": str(b_.address), "airgapped": b_.airgapped,
                     "present": network.bridge_exists(b_.name)} for b_ in spec.bridges],
        "nft_table": network.table_exists(network.table_name(spec.stack)),
        "ip_forward": network.ip_forward(),
        "bmc": {"url": bmc.redfish_url(spec),
                "running": bmc.pid_alive(b.get("emulator_pid"), "sushy-emulator")
                and bmc.pid_alive(b.get("notifier_pid"), "infra.lab.notifier"),
                "password_file": str(paths.bmc_password)},
        **({"vms": _vm_status(spec, st)} if spec.vms else {}),
        "ssh_config": str(spec.ssh_config),
        "known_hosts": str(spec.known_hosts),
        "keyrings": {k: str(v) for k, v in spec.keyrings.items()},
    }


def _vm_status(spec: LabSpec, st: dict[str, Any]) -> dict[str, Any]:
    """VM nodes: libvirt running, each domain's state, the VM BMC."""
    entry = st.get("vm") or {}
    libvirt_up = vm.libvirt_alive(entry)
    return {
        "libvirt": libvirt_up,
        "bmc": {"url": f"http://{spec.vm_bmc.address}:{spec.vm_bmc.port}" if spec.vm_bmc else "",
                "running": vm.bmc_alive(entry.get("bmc_pid"))},
        "nodes": [{"name": v.name, "segment": v.segment, "address": str(v.address.ip), "mac": v.mac,
                   "domain": vm.domain_state(v.name) if libvirt_up else "no libvirtd"} for v in spec.vms],
    }


def publish_image(spec: LabSpec, paths: Paths, out: Path, name: str) -> list[Path]:
    """Put a `gpufleet image build` output on every serving host's file store, where the lock's URLs point.

    `files/provision/{images/<name>.img,.json, deploy/vmlinuz, deploy/initrd.img}` under the host's /srv/gpufleet
    (the mirror's file store; the outside world's is a connected segment's `provisioning.files_url`). Hard links
    when on one file system (the image is ~700 MiB), else copies. Returns the published paths.
    """
    rels = [f"images/{name}.img", f"images/{name}.json", "deploy/vmlinuz", "deploy/initrd.img"]
    done = []
    for h in spec.hosts:
        if not h.serves:
            continue
        for rel in rels:
            src, dst = out / rel, paths.srv_dir / h.name / "files" / "provision" / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            done.append(dst)
            if dst.exists() and dst.samefile(src):
                continue  # already this build (rename(2) of two links to one file would do nothing, leaving tmp)
            tmp = dst.with_name(f".{dst.name}.tmp")
            tmp.unlink(missing_ok=True)
            try:
                os.link(src, tmp)
            except OSError:
                shutil.copyfile(src, tmp)
            tmp.chmod(0o644)
            os.replace(tmp, dst)  # a provisioning host fetching now sees the old file or the new one
    return done


def down(paths: Paths) -> dict[str, Any]:
    """Stop everything the lab started and remove every trace but the caches and signing keys."""
    t0 = time.monotonic()
    with lab_state.locked(paths):
        st = lab_state.load(paths) or {}
        vms = _vms_down(st)
        bmc.stop(st.get("bmc") or {})
        _stop_strays_bmc(paths)
        pids = {n: e.get("pid") for n, e in st.get("hosts", {}).items() if e.get("pid")}
        pids.update(hosts.supervisor_pids(paths))  # leftovers of a crashed `up` too
        hosts.stop_many([p for p in pids.values() if p])
        for m in hosts.lab_mounts(paths):
            hosts.unmount(m)
        names = set(st.get("hosts", {})) | set(pids)
        for n in names:
            shutil.rmtree(PROPAGATE_DIR / n, ignore_errors=True)
        shutil.rmtree(paths.hosts_dir, ignore_errors=True)
        for home in paths.gnupg_dir.glob("*"):
            repo.stop_agent(home)
        default = network.NFT_TABLE if paths.state == Paths().state else None
        table = st.get("nft_table", default)
        if table:
            network.delete_table(table)
        for name in st.get("bridges", []):
            network.delete_bridge(name)
        lab_state.clear(paths)
    result: dict[str, Any] = {"down": True, "seconds": round(time.monotonic() - t0, 2), "hosts_stopped": sorted(names)}
    if vms:
        result["vms_removed"] = sorted(vms)
    return result


def _stop_strays_bmc(paths: Paths) -> None:
    """Emulator/notifier of this lab without a state entry (crashed `up`); other labs' are left alone."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        ours_notifier = b"infra.lab.notifier" in cmd and f"\0{paths.state}\0".encode() in cmd + b"\0"
        ours_emulator = b"sushy-emulator" in cmd and f"{paths.bmc_dir}/".encode() in cmd
        if ours_notifier or ours_emulator:
            bmc.stop({"emulator_pid": int(proc.name), "notifier_pid": int(proc.name)})


# ---- node power operations (the BMC notifier's actions; the BMC/DR engineer's rebuild goes through Redfish)

def power_off(spec: LabSpec, paths: Paths, name: str) -> bool:
    """Stop a node's container (its disk stays). Returns True if it was running."""
    with lab_state.locked(paths):
        st = lab_state.load(paths) or {}
        entry = st.get("hosts", {}).get(name)
        if not entry or not hosts.alive(entry.get("pid")):
            return False
        hosts.stop_many([entry["pid"]])
        entry["pid"] = None
        entry["bmc_off"] = True
        lab_state.save(paths, st)
        return True


def power_on(spec: LabSpec, paths: Paths, name: str, *, reimage: bool = False) -> bool:
    """Start a node's container; with `reimage`, from the base image (a PXE reinstall). True if it started."""
    with lab_state.locked(paths):
        st = lab_state.load(paths) or {}
        entry = st.get("hosts", {}).get(name)
        if not entry or hosts.alive(entry.get("pid")):
            return False
        h = spec.host(name)
        root = hosts.root_of(paths, name)
        if reimage:
            hosts.drop_disk(paths, name)
        hosts.mount_overlay(paths, name, Path(entry["lower"]))
        if reimage:
            pub = hosts.write_identity(spec, h, root, paths.ssh_key.with_suffix(".pub").read_text())
            hosts.repin(spec, name, pub)
        entry["pid"] = hosts.start(spec, h, paths)
        entry["bmc_off"] = False
        lab_state.save(paths, st)
        return True


def repin_host_key(spec: LabSpec, name: str, paths: Paths | None = None) -> str:
    """Pin a lab host's current SSH host key in the controller's known_hosts; returns the key.

    The key is read from the host's own disk on the lab host (never scanned over the network), so
    the BMC/DR engineer's rebuild can call this after a reimage without trusting the wire.
    """
    paths = paths or Paths.from_env()
    pub = hosts.public_host_key(hosts.root_of(paths, name))
    hosts.repin(spec, name, pub)
    return pub
