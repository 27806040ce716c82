"""Redfish BMCs for lab nodes: sushy-tools' emulator (fake driver) wired to the lab's power notifier.

The emulator is a real Redfish implementation not written here; with `external_notifier` it PUTs
each system's state to our notifier (infra.lab.notifier), which powers the nspawn host off/on and
turns a reset after a PXE boot override into a reimage.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import requests

from infra import procs
from infra.lab.config import LabSpec, Paths
from infra.lab.sh import LabCommandError

NOTIFIER_PORT_OFFSET = 1  # notifier listens on bmc_listen.port + 1 (loopback)


def notifier_url(spec: LabSpec) -> str:
    """Where the emulator PUTs state changes."""
    return f"http://{spec.bmc.address}:{spec.bmc.port + NOTIFIER_PORT_OFFSET}/notify"


def redfish_url(spec: LabSpec) -> str:
    """Base URL of the Redfish service."""
    return f"http://{spec.bmc.address}:{spec.bmc.port}"


def system_uuid(spec: LabSpec, name: str) -> str:
    """Stable system UUID per node (same across `lab up` runs)."""
    return str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{name}.{spec.stack}.gpufleet-lab"))


def render_config(spec: LabSpec, paths: Paths) -> str:
    """sushy-emulator config (Python syntax): fake driver, one system per node, auth, notifier."""
    systems = []
    vms = {v.name for v in spec.vms}  # behind the libvirt-driver BMC (infra.lab.vm), not this one
    for n in spec.site.nodes:
        if n.hostname in vms:
            continue
        systems.append({
            "uuid": system_uuid(spec, n.hostname),
            "name": n.bmc.system_id if n.bmc and n.bmc.system_id else n.hostname,
            "power_state": "On",
            "external_notifier": True,
            "nics": [{"mac": mac, "ip": str(n.address)} for mac in n.macs[:1]],
        })
    return "\n".join([
        "# Written by `gpufleet lab up`: Redfish emulator for the lab nodes (sushy-tools, fake driver).",
        f"SUSHY_EMULATOR_LISTEN_IP = {str(spec.bmc.address)!r}",
        f"SUSHY_EMULATOR_LISTEN_PORT = {spec.bmc.port}",
        "SUSHY_EMULATOR_FAKE_DRIVER = True",
        f"SUSHY_EMULATOR_STATE_DIR = {str(paths.bmc_dir / 'state')!r}",
        f"SUSHY_EMULATOR_AUTH_FILE = {str(paths.bmc_dir / 'htpasswd')!r}",
        f"SUSHY_EMULATOR_FAKE_SYSTEMS = {systems!r}",
        f"EXTERNAL_NOTIFICATION_URL = {notifier_url(spec)!r}",
        "",
    ])


def ensure_password(paths: Paths) -> str:
    """The lab BMC password: random, in a 0600 file the stack's SecretRef names (kept across runs)."""
    p = paths.bmc_password
    if not p.exists() or not p.read_text().strip():
        p.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(18) + "\n")
    p.chmod(0o600)
    return p.read_text().strip()


def _sushy_bin() -> Path:
    exe = Path(sys.executable).parent / "sushy-emulator"
    if not exe.exists():
        raise LabCommandError(f"{exe} not found: install the lab extra (./scripts/setup.sh)")
    return exe


def _spawn(argv: list[str], log: Path) -> int:
    with open(log, "ab") as f:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=f, start_new_session=True)
    return proc.pid


def start(spec: LabSpec, paths: Paths, stack_file: Path) -> dict[str, int]:
    """Start the notifier and the emulator (fresh emulator state: every node On)."""
    d = paths.bmc_dir
    shutil.rmtree(d / "state", ignore_errors=True)
    d.mkdir(parents=True, exist_ok=True)
    import bcrypt  # sushy-tools' own dependency (lab extra); imported here so the CLI loads without it

    password = ensure_password(paths)
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=6)).decode()
    users = {n.bmc.username for n in spec.site.nodes if n.bmc} or {"admin"}
    (d / "htpasswd").write_text("".join(f"{u}:{hashed}\n" for u in sorted(users)))
    (d / "htpasswd").chmod(0o600)
    (d / "emulator.conf").write_text(render_config(spec, paths))
    notifier = _spawn([sys.executable, "-m", "infra.lab.notifier", "--stack-file", str(stack_file),
                       "--state-dir", str(paths.state)], d / "notifier.log")
    emulator = _spawn([str(_sushy_bin()), "--config", str(d / "emulator.conf")], d / "emulator.log")
    wait_ready(spec, password)
    return {"emulator_pid": emulator, "notifier_pid": notifier}


def wait_ready(spec: LabSpec, password: str, timeout: float = 20.0) -> None:
    """Until the Redfish service lists the lab's systems and the notifier answers."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            r = requests.get(f"{redfish_url(spec)}/redfish/v1/Systems", auth=("admin", password), timeout=2)
            n = requests.get(notifier_url(spec).replace("/notify", "/health"), timeout=2)
            if r.status_code == 200 and n.status_code == 200:
                return
            last = f"redfish {r.status_code}, notifier {n.status_code}"
        except requests.RequestException as exc:
            last = str(exc)
        time.sleep(0.2)
    raise LabCommandError(f"BMC emulator not ready after {timeout:.0f}s: {last}")


def pid_alive(pid: int | None, needle: str) -> bool:
    """Is `pid` alive and its command line contains `needle` (guards against PID reuse)."""
    return procs.cmdline_contains(pid, needle)


def stop(pids: dict[str, int]) -> None:
    """Stop the emulator and the notifier."""
    # (pid, needle) pairs, not a dict: the stray sweep passes one unknown process as both.
    ours = [(pids.get(key), needle) for key, needle in (("emulator_pid", "sushy-emulator"),
                                                        ("notifier_pid", "infra.lab.notifier"))]
    procs.terminate({p for p, _ in ours if p}, lambda pid: any(p == pid and pid_alive(p, n) for p, n in ours))
