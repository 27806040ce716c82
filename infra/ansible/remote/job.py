"""One playbook run on a segment's execution host: transmit | ssh worker | process.

ansible-runner's remote-job protocol (`ansible_runner.streaming`, ansible-runner 2.4; the one AWX/AAP
execution nodes run under Receptor — ansible-runner docs "Remote job execution"): the controller's
`Transmitter` writes the job's keyword arguments and its private data dir (zipped) as a stream of JSON
lines; the execution host's `Worker` unpacks it, runs `ansible-playbook` there and writes every event,
status change and finally the artifacts dir back; the controller's `Processor` reads that stream and calls
the same event handler a local run uses. The carrier here is one SSH connection to the execution host
(`infra.ssh.argv`: pinned host key, the stack's ssh config), so an air-gapped segment is reached through
that one hop: the controller never opens a connection to a node of the segment.

The job carries what is particular to the run: the inventory (every string marked unsafe), the pinned host
keys of the job's nodes, the controller files the variables name (keyrings) and, in a 0600 file inside the
job, the secret variables. The roles and playbooks are the runtime release's locked collection
(`<release>/collections/`, installed from the mirror like the wheels): converge refuses before any job
when the controller's roles are not the locked ones (`commands/exechost.py`), so an execution host runs
exactly the roles the controller planned with. The worker deletes the job dir
before and after the run (`--delete`); `worker.py` stops the job if the connection drops.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import logging
import os
import secrets as pysecrets
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

import ansible_runner

from infra import ssh
from infra.ansible.collection import collection_id
from infra.ansible.inventory import GROUP, ansible_json, write_json
from infra.ansible.remote import runtime
from infra.ansible.remote.install import COLLECTIONS_DIR
from infra.ansible.runner import (
    KEEP_RUNS,
    Progress,
    RunResult,
    _Collector,
    _is_secret_env,
    _leaves,
    _prune,
    finish_run,
    fold_result,
    scrub,
)
from infra.ansible.settings import Tuning, project_root, runner_env
from infra.console import runs_dir
from infra.model.site import Site
from infra.ssh import SshSettings

log = logging.getLogger("gpufleet.ansible.remote")

# The remote command exits with this when the runtime release a job needs is not installed.
EXIT_NO_RUNTIME = 97


@dataclass(frozen=True)
class ExecHost:
    """A segment's execution host as the controller reaches it."""

    segment: str
    name: str
    address: str
    user: str
    runtime_dir: str

    @property
    def release(self) -> str:
        """The runtime release directory jobs run from."""
        return runtime.release_dir(self.runtime_dir)


def exec_host(site: Site, segment: str) -> ExecHost | None:
    """The execution host of `segment`, or None when the segment runs Ansible on the controller."""
    seg = site.segment(segment)
    if seg is None or seg.execution.local:
        return None
    ex = seg.execution
    if ex.address is not None:
        address = str(ex.address)
    elif (node := site.node(ex.host)) is not None:
        address = str(node.address)
    elif (mirror := site.mirror(ex.host)) is not None:
        address = str(mirror.address)
    else:  # validation (rules.execution_hosts) refuses this; never guess an address
        raise ValueError(f"segment {segment!r}: execution host {ex.host!r} has no address")
    return ExecHost(segment, ex.host, address, ex.user, ex.runtime_dir)


def _host_matches(entry: str, names: set[str]) -> bool:
    """True when a known_hosts host field (a plain list or OpenSSH's hashed `|1|salt|hash`) names one of `names`."""
    for pattern in entry.split(","):
        if pattern.startswith("|1|"):
            try:
                _, _, salt, digest = pattern.split("|")
                key = base64.b64decode(salt)
                want = base64.b64decode(digest)
            except ValueError:
                continue
            if any(hmac.compare_digest(hmac.new(key, n.encode(), hashlib.sha1).digest(), want) for n in names):
                return True
        else:
            host = pattern[1:].split("]:", 1)[0] if pattern.startswith("[") else pattern
            if host in names:
                return True
    return False


def known_hosts_for(text: str, names: Sequence[str]) -> str:
    """The lines of a known_hosts file that pin the keys of `names` (addresses or host names), nothing else.

    The execution host gets the pinned keys of its job's nodes only: it checks them as strictly as the
    controller does, and learns nothing about other segments.
    """
    wanted = set(names)
    out = []
    for line in text.splitlines():
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        host_field = fields[1] if fields[0].startswith("@") and len(fields) > 1 else fields[0]
        if _host_matches(host_field, wanted):
            out.append(line)
    return "\n".join(out) + ("\n" if out else "")


# Host variables that name a file on the controller, which a role copies to the node (`copy: src:`): the
# apt keyrings (`base_apt_sources[].keyring`, from the stack's `keyring` fields). A job carries them.
CONTROLLER_FILE_KEYS = frozenset({"keyring"})


def carry_controller_files(value: Any, project: Path, job_dir: str) -> Any:
    """`value` with every controller file it names copied into the job and renamed to its path there.

    The file's name in the job is its content digest, so two sources with one keyring share one copy.
    """
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if k in CONTROLLER_FILE_KEYS and isinstance(v, str) and v.startswith("/") and Path(v).is_file():
                data = Path(v).read_bytes()
                name = hashlib.sha256(data).hexdigest()[:24] + Path(v).suffix
                (project / "files").mkdir(exist_ok=True)
                (project / "files" / name).write_bytes(data)
                out[k] = f"{job_dir}/project/files/{name}"
            else:
                out[k] = carry_controller_files(v, project, job_dir)
        return out
    if isinstance(value, list):
        return [carry_controller_files(v, project, job_dir) for v in value]
    return value


def installed_collection(target: ExecHost) -> PurePosixPath:
    """`<release>/collections/ansible_collections/<namespace>/<name>`: the locked roles on the execution host."""
    namespace, name = collection_id(project_root())
    return PurePosixPath(target.release) / COLLECTIONS_DIR / "ansible_collections" / namespace / name


def remote_env(
    target: ExecHost, job_dir: str, tuning: Tuning, hosts: int, known_hosts: str
) -> tuple[dict[str, str], int]:
    """ansible-playbook's environment on the execution host: the local profile with the host's own paths."""
    release = PurePosixPath(target.release)
    job = PurePosixPath(job_dir)
    env, forks = runner_env(
        tuning,
        hosts=hosts,
        ssh=SshSettings(ssh_config=None, known_hosts=known_hosts),
        work_dir=Path(str(job)),
        control_dir=Path(str(job / "cp")),
        fact_cache=Path(str(PurePosixPath(target.runtime_dir) / "fact-cache")),
    )
    env |= {
        "PATH": f"{release / 'bin'}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "PYTHONPATH": str(release / "site"),
        # The roles are the release's locked collection (installed beside the wheels), never the job's.
        "ANSIBLE_ROLES_PATH": str(installed_collection(target) / "roles"),
        "ANSIBLE_COLLECTIONS_PATH": str(release / COLLECTIONS_DIR),
    }
    if env.get("ANSIBLE_STRATEGY") == "mitogen_free":
        env["ANSIBLE_STRATEGY_PLUGINS"] = str(release / "site" / "ansible_mitogen" / "plugins" / "strategy")
    return env, forks


def worker_command(target: ExecHost, job_dir: str, timeout_s: int) -> str:
    """The one remote shell command of a job (every word quoted): check the runtime, exec the worker."""
    q = ssh.shell_command
    worker = f"{target.release}/bin/{runtime.WORKER}"
    # runtime.json is written last inside a release: with it there, the release is complete.
    return (
        f"test -x {q(worker)} -a -f {q(target.release + '/runtime.json')} || "
        f"{{ echo {q('gpufleet: execution runtime ' + runtime.spec().runtime_id)}"
        f"' is not installed on '{q(target.name)} >&2; exit {EXIT_NO_RUNTIME}; }}; "
        f"exec {q(worker, f'{target.release}/bin/ansible-runner', job_dir, str(timeout_s))}"
    )


def _pump_stderr(stream: IO[bytes], sink: list[bytes]) -> None:
    for line in stream:
        sink.append(line)
        del sink[:-20]


def run_playbook_remote(
    playbook: str,
    inventory: Mapping[str, Any],
    hosts: Sequence[str],
    *,
    target: ExecHost,
    ssh_settings: SshSettings,
    check: bool = False,
    tuning: Tuning = Tuning.TUNED,
    secrets: Mapping[str, Any] | None = None,
    progress: Progress | None = None,
    timeout_s: int = 3600,
    label: str = "run",
    cancel: threading.Event | None = None,
    extravars: Mapping[str, Any] | None = None,
) -> RunResult:
    """Run one playbook of playbooks/ over `hosts` on `target` and return the same typed result as a local run.

    Args:
        playbook: File name under playbooks/ (e.g. `node.yml`), or an absolute path (benchmarks, tests).
        inventory: Inventory of these hosts, as built by `infra.ansible.inventory.build_inventory`.
        hosts: Hosts to run on (the `--limit`).
        target: The segment's execution host.
        ssh_settings: The controller's SSH settings (its config and pinned known_hosts): how it reaches the
            execution host, and the source of the node keys pinned on the execution host.
        check: Run with `--check --diff`.
        tuning: Runner profile, as for a local run (Mitogen from the runtime for `tuned`).
        secrets: Secret variables (a 0600 file inside the job; scrubbed from what comes back).
        progress: Live progress sink, or None.
        timeout_s: Hard limit of the whole job (enforced on the execution host too).
        label: Short word in the run directory's name.
        cancel: Set it to stop the job (the connection is closed; the worker stops the job's processes).
        extravars: Further (not secret) extra variables, as a local run takes them (the node lock's record).

    """
    base = runs_dir()
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    _prune(base, KEEP_RUNS - 1)
    work = Path(tempfile.mkdtemp(prefix=f"run-{time.strftime('%Y%m%dT%H%M%S')}-{label}-{target.segment}-", dir=base))
    pdd = work / "pdd"
    project = pdd / "project"
    (pdd / "inventory").mkdir(parents=True)
    project.mkdir()
    job_dir = str(PurePosixPath(target.runtime_dir) / "jobs" / f"j{pysecrets.token_hex(6)}")
    write_json(pdd / "inventory" / "hosts.json", carry_controller_files(inventory, project, job_dir))
    if Path(playbook).is_absolute():  # a playbook outside the collection (benchmarks, tests) travels in the job
        shutil.copy2(playbook, project / Path(playbook).name)
        playbook = Path(playbook).name
    else:  # one of the collection's: run the locked copy in the installed release
        playbook = str(installed_collection(target) / "playbooks" / playbook)
    entries = inventory["all"]["children"][GROUP]["hosts"]
    names = [n for h in hosts for n in (h, str(entries[h].get("ansible_host", h)))]
    pinned = Path(ssh_settings.known_hosts).read_text(encoding="utf-8") if ssh_settings.known_hosts else ""
    (project / "known_hosts").write_text(known_hosts_for(pinned, names), encoding="utf-8")
    env, forks = remote_env(target, job_dir, tuning, len(hosts), f"{job_dir}/project/known_hosts")
    cmd = ["--limit", ",".join(hosts), "--check", "--diff"] if check else ["--limit", ",".join(hosts), "--diff"]
    all_secrets = [v for k, v in os.environ.items() if _is_secret_env(k)]
    if secrets:
        secret_file = project / "secrets.json"
        fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(ansible_json(secrets))
        # The worker runs ansible-playbook in the job's project dir (ansible-runner's cwd).
        cmd += ["-e", "@secrets.json"]
        all_secrets += _leaves(secrets)
    if extravars:
        # Not secret (the node lock's record of this run): as a local run passes them.
        (project / "extravars.json").write_text(ansible_json(extravars), encoding="utf-8")
        cmd += ["-e", "@extravars.json"]
    collector = _Collector(hosts, progress)
    argv = ssh.argv(ssh_settings, target.address, worker_command(target, job_dir, timeout_s), user=target.user)
    started = time.monotonic()
    stderr: list[bytes] = []
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    errpump = threading.Thread(target=_pump_stderr, args=(proc.stderr, stderr), daemon=True)
    errpump.start()
    done = threading.Event()

    def transmit() -> None:
        stdin = proc.stdin
        assert stdin is not None
        try:
            ansible_runner.run(
                streamer="transmit",
                _output=stdin,
                private_data_dir=str(pdd),
                playbook=playbook,
                inventory=str(pdd / "inventory" / "hosts.json"),
                envvars=env,
                cmdline=" ".join(ssh.shell_command(c) for c in cmd),
                forks=forks,
                suppress_env_files=True,
                quiet=True,
                timeout=timeout_s,
                ident="artifacts",
                cancel_callback=lambda: False,
            )
        except (BrokenPipeError, OSError) as exc:  # the connection failed: the processor reports it
            log.debug("transmit to %s stopped: %s", target.name, exc)
        # stdin stays open until the job is over: end of input tells the execution host's supervisor that
        # the controller is gone (worker.py), and this process dying closes it at once.

    def watch() -> None:
        # Cancel and the time limit end the connection; the worker then stops the job (worker.py).
        while not done.wait(0.5):
            if (cancel is not None and cancel.is_set()) or time.monotonic() - started > timeout_s + 60:
                proc.kill()
                return

    sender = threading.Thread(target=transmit, daemon=True)
    watcher = threading.Thread(target=watch, daemon=True)
    sender.start()
    watcher.start()
    statuses: list[str] = []
    try:
        processor = ansible_runner.run(
            streamer="process",
            _input=proc.stdout,
            private_data_dir=str(pdd),
            event_handler=collector,
            status_handler=lambda data, runner_config: statuses.append(str(data.get("status"))),
            quiet=True,
            ident="artifacts",
            cancel_callback=lambda: False,
        )
        status = str(processor.status)
    finally:
        done.set()
        sender.join(timeout=30)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        with contextlib.suppress(OSError):
            proc.stdin.close()
        errpump.join(timeout=5)
        (project / "secrets.json").unlink(missing_ok=True)
        scrub(work, all_secrets)
    rc_file = pdd / "artifacts" / "artifacts" / "rc"
    rc = int(rc_file.read_text().strip()) if rc_file.is_file() else (0 if status == "successful" else 1)
    stats = collector.stats
    why = ""
    if proc.returncode == EXIT_NO_RUNTIME:
        why = (
            f"the execution runtime is not installed on {target.name}: run "
            f"`gpufleet exec-host install --segment {target.segment}`"
        )
    elif proc.returncode == 255:
        why = f"ssh to execution host {target.name} ({target.address}) failed: {_last(stderr)}"
    elif cancel is not None and cancel.is_set():
        why = "stopped (cancel)"
    elif not stats:
        why = f"execution host {target.name}: status={status} rc={rc} {_last(stderr)}".strip()
    if not stats and rc == 0:
        rc, status = 1, "error"
    # No stats event: the job never ran or died on the execution host; every host without a failure gets `why`.
    no_stats = {"task": f"(execution host {target.name})", "msg": why}
    result = fold_result(PurePosixPath(playbook).name, check, status, rc, started, collector, stats, work, no_stats)
    finish_run(result, work, all_secrets, progress, execution_host=target.name, statuses=statuses)
    return result


def _last(lines: list[bytes]) -> str:
    text = b"".join(lines).decode(errors="replace").strip().splitlines()
    return text[-1] if text else ""
