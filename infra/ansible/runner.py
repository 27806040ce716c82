"""The only caller of ansible_runner: one fresh private data dir per run, a typed result, no secrets left.

A run is `ansible-playbook <playbook>` over an inventory built from the plan. Everything the run
needs is passed explicitly (inventory file, environment, command line) with `suppress_env_files`,
so nothing from an earlier run is reused and no secret is written to `env/`. Secrets go into one
0600 vars file that is deleted after the run, and every file left in the data dir is scrubbed of
their values.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from infra import procs
from infra.ansible.collection import link_collections
from infra.ansible.inventory import ansible_json, write_json
from infra.ansible.settings import Tuning, project_root, runner_env
from infra.console import DEFAULT_RUNS_DIR as DEFAULT_RUNS_DIR
from infra.console import RUNS_ENV as RUNS_ENV
from infra.console import runs_dir
from infra.secrets import ENV_PREFIX as SECRET_ENV_PREFIX
from infra.ssh import SshSettings

log = logging.getLogger("gpufleet.ansible")

FORWARD_GRACE_S = 60.0
"""After SIGINT/SIGTERM, how long ansible-playbook may take to stop its workers by itself before it is killed."""
KEEP_RUNS = 20  # older run directories are removed (each holds the scrubbed event log of one run)
MASK = "********"
# Environment variables with secrets besides GPUFLEET_SECRET_* (Pulumi passes these to its commands).
SECRET_ENV_NAMES = frozenset({"PULUMI_CONFIG_PASSPHRASE", "PULUMI_ACCESS_TOKEN"})

# Facts the roles publish with set_fact that the result reports (see the roles' tasks).
_REPORTED_FACTS = (
    "nvidia_driver_reboot_for_change",
    "nvidia_driver_reboot_required",
    "nvidia_driver_reboot_reason",
    "nvidia_driver_stale_packages",
    "gpu_validate_result",
)


@dataclass
class HostResult:
    """What one host did in one run."""

    host: str
    ok: int = 0
    changed: int = 0
    failed: int = 0
    unreachable: bool = False
    skipped: int = 0
    changed_tasks: list[str] = field(default_factory=list)
    failures: list[dict[str, str]] = field(default_factory=list)
    diffs: list[dict[str, Any]] = field(default_factory=list)
    package_changes: dict[str, list[str]] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def succeeded(self) -> bool:
        """No failed task and reachable."""
        return not self.failed and not self.unreachable

    @property
    def files_changed(self) -> list[str]:
        """Paths of files a task changed (or would change in check mode)."""
        return sorted({d["path"] for d in self.diffs if d.get("path")})

    @property
    def reboot_required(self) -> bool:
        """Whether the driver change of this run needs (check mode: would need) a reboot."""
        return bool(self.facts.get("nvidia_driver_reboot_for_change", False))

    @property
    def reboot_pending(self) -> bool:
        """The node waits for a reboot: this run's change or an earlier one since the last boot."""
        return bool(self.facts.get("nvidia_driver_reboot_required", False))

    @property
    def reboot_reason(self) -> str:
        """Why a pending reboot was not performed (the nvidia_driver role says; empty when none is pending)."""
        return str(self.facts.get("nvidia_driver_reboot_reason") or "") if self.reboot_pending else ""

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (diff bodies left out: they can be large; paths are listed)."""
        d = asdict(self)
        d.pop("diffs")
        d["files_changed"] = self.files_changed
        d["reboot_required"] = self.reboot_required
        d["reboot_pending"] = self.reboot_pending
        d["reboot_reason"] = self.reboot_reason
        d["succeeded"] = self.succeeded
        return d


@dataclass
class RunResult:
    """The outcome of one ansible-playbook run."""

    playbook: str
    check: bool
    status: str
    rc: int
    duration_s: float
    hosts: dict[str, HostResult]
    run_dir: str

    @property
    def succeeded(self) -> bool:
        """Every host succeeded and ansible-playbook exited 0."""
        return self.rc == 0 and all(h.succeeded for h in self.hosts.values())

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "playbook": self.playbook,
            "check": self.check,
            "status": self.status,
            "rc": self.rc,
            "duration_s": round(self.duration_s, 2),
            "run_dir": self.run_dir,
            "hosts": {k: v.as_dict() for k, v in sorted(self.hosts.items())},
        }


class Progress:
    """Per-host progress: live lines at a terminal, plain lines elsewhere.

    Away from a terminal (CI logs, pipes) each host prints one line per role it enters, per changed
    task and per failure, so a long run is never silent.
    """

    def __init__(self, hosts: Sequence[str], out: TextIO | None = None) -> None:
        self.out = out or sys.stderr
        self.hosts = list(hosts)
        self.current: dict[str, str] = dict.fromkeys(hosts, "waiting")
        self.counts: dict[str, dict[str, int]] = {h: {"ok": 0, "changed": 0, "failed": 0} for h in hosts}
        self.tty = self.out.isatty()
        self.role: dict[str, str] = {}
        self._drawn = 0
        self._lock = threading.Lock()

    def update(self, host: str, task: str | None = None, outcome: str | None = None) -> None:
        """Record a task start or outcome and redraw."""
        with self._lock:
            if host not in self.current:
                return
            if task is not None:
                self.current[host] = task
            if outcome in ("ok", "changed", "failed"):
                self.counts[host][outcome] += 1
            if self.tty:
                self._draw()
                return
            if task is not None:
                # Task names from roles read `role : Task`; a new role is the heartbeat of a long run.
                role = task.split(" : ", 1)[0] if " : " in task else ""
                if role and role != self.role.get(host):
                    self.role[host] = role
                    self.out.write(f"{host}: {role}\n")
            if outcome == "changed":
                self.out.write(f"{host}: changed: {self.current[host]}\n")
            elif outcome == "failed":
                self.out.write(f"{host}: FAILED {self.current[host]}\n")
            self.out.flush()

    def _draw(self) -> None:
        if self._drawn:
            self.out.write(f"\x1b[{self._drawn}A")
        for h in self.hosts:
            c = self.counts[h]
            line = f"{h:<16} ok={c['ok']:<3} changed={c['changed']:<3} failed={c['failed']:<2} {self.current[h]}"
            self.out.write("\x1b[2K" + line[:150] + "\n")
        self._drawn = len(self.hosts)
        self.out.flush()

    def finish(self, result: RunResult) -> None:
        """One summary line per host."""
        with self._lock:
            for h, r in sorted(result.hosts.items()):
                state = "UNREACHABLE" if r.unreachable else ("FAILED" if r.failed else "ok")
                self.out.write(
                    f"{h}: {state} ok={r.ok} changed={r.changed} failed={r.failed}"
                    f"{' reboot pending: ' + r.reboot_reason if r.reboot_reason else ''}"
                    f"{' reboot required' if r.reboot_required and not r.reboot_reason else ''}\n"
                )
            self.out.flush()


def _prune(base: Path, keep: int) -> None:
    runs = sorted(
        (p for p in base.iterdir() if p.is_dir() and p.name.startswith("run-")), key=lambda p: p.stat().st_mtime
    )
    for old in runs[:-keep] if keep else runs:
        shutil.rmtree(old, ignore_errors=True)


def scrub(root: Path, secrets: Sequence[str]) -> int:
    """Replace every secret value in every file under `root` with a mask; returns files changed."""
    values = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)
    if not values:
        return 0
    changed = 0
    for path in root.rglob("*"):
        if not path.is_file() or path.is_symlink():
            continue
        data = path.read_bytes()
        new = data
        for v in values:
            for form in {v, json.dumps(v)[1:-1]}:
                new = new.replace(form.encode(), MASK.encode())
        if new != data:
            path.write_bytes(new)
            changed += 1
    return changed


def _diff_entries(task: str, res: Mapping[str, Any]) -> list[dict[str, Any]]:
    # A loop task's result has no diff of its own: each item's result, under `results`, carries its diff (Ansible
    # marks an item's result with `ansible_loop_var`; a module's own `results` list is left alone).
    results = res.get("results")
    items = [i for i in results if isinstance(i, dict) and "ansible_loop_var" in i] if isinstance(results, list) else []
    if items:
        return [e for item in items if item.get("changed") for e in _diff_entries(task, item)]
    diffs = res.get("diff")
    items = diffs if isinstance(diffs, list) else [diffs] if isinstance(diffs, dict) else []
    out = []
    for d in items:
        if not isinstance(d, dict) or not d:
            continue
        # before_header is the destination; after_header of template/copy is a temporary source on
        # the controller, so a file that does not exist yet is named by its task instead.
        path = res.get("dest") or d.get("before_header") or res.get("path")
        if not path and d.get("after_header") and not str(d["after_header"]).startswith(str(runs_dir())):
            path = d["after_header"]
        if isinstance(path, str) and path.startswith("/"):
            out.append({"task": task, "path": path, "before": d.get("before"), "after": d.get("after")})
        elif d.get("after") is not None:
            out.append({"task": task, "path": f"(new file) {task}", "before": None, "after": d.get("after")})
    if not out and res.get("changed") and isinstance(res.get("dest"), str):
        out.append({"task": task, "path": res["dest"], "before": None, "after": None})
    return out


class _Collector:
    """Turns runner events into per-host results and progress updates."""

    def __init__(self, hosts: Sequence[str], progress: Progress | None) -> None:
        self.hosts = {h: HostResult(h) for h in hosts}
        self.progress = progress
        self.stats: dict[str, Any] = {}
        # Host → the task it started and has not finished: what a stopped run interrupted.
        self.in_flight: dict[str, str] = {}

    def _host(self, name: str) -> HostResult:
        return self.hosts.setdefault(name, HostResult(name))

    def __call__(self, event: dict[str, Any]) -> bool:
        kind = event.get("event", "")
        data = event.get("event_data") or {}
        if kind == "playbook_on_stats":
            self.stats = {k: data.get(k) or {} for k in ("ok", "changed", "failures", "dark", "skipped")}
            return True
        host = data.get("host")
        task = str(data.get("task") or "")
        role = data.get("role")
        label = f"{role} : {task}" if role else task
        if not host:
            return True
        r = self._host(host)
        res = data.get("res") or {}
        if kind == "runner_on_start":
            self.in_flight[host] = label
            if self.progress:
                self.progress.update(host, task=label)
        elif kind.startswith("runner_on_"):
            self.in_flight.pop(host, None)
        if kind == "runner_on_ok":
            facts = res.get("ansible_facts") or {}
            # Every pinned package set's changes, keyed by the role that pinned it (roles/pinned_packages).
            published = facts.get("pinned_packages_published")
            for role, changes in (published.items() if isinstance(published, dict) else ()):
                if changes:
                    r.package_changes[str(role)] = [str(v) for v in changes]
                else:
                    r.package_changes.pop(str(role), None)
            for key, value in facts.items():
                if key in _REPORTED_FACTS:
                    r.facts[key] = value
            if res.get("changed"):
                r.changed_tasks.append(label)
                r.diffs.extend(_diff_entries(label, res))
            if self.progress:
                self.progress.update(host, outcome="changed" if res.get("changed") else "ok")
        elif kind == "runner_on_failed" and not data.get("ignore_errors"):
            msg = str(res.get("msg") or res.get("stderr") or "")[:2000]
            r.failures.append({"task": label, "msg": msg})
            if self.progress:
                self.progress.update(host, outcome="failed")
        elif kind == "runner_on_unreachable":
            r.unreachable = True
            r.failures.append({"task": label, "msg": str(res.get("msg") or "unreachable")[:2000]})
            if self.progress:
                self.progress.update(host, outcome="failed")
        return True


def run_playbook(
    playbook: str,
    inventory: Mapping[str, Any],
    hosts: Sequence[str],
    *,
    ssh: SshSettings,
    check: bool = False,
    tuning: Tuning = Tuning.TUNED,
    secrets: Mapping[str, Any] | None = None,
    secret_values: Sequence[str] = (),
    progress: Progress | None = None,
    timeout_s: int = 3600,
    label: str = "run",
    extravars: Mapping[str, Any] | None = None,
) -> RunResult:
    """Run one playbook of playbooks/ over `hosts` and return the typed result.

    Every process of the run carries `GPUFLEET_RUN=<id>` in its environment; a watchdog (`procs.Reaper`)
    stops them all if this process dies, even by SIGKILL, and the run's end stops any left over.

    Args:
        playbook: File name under playbooks/ (e.g. `node.yml`), or an absolute path (benchmarks).
        inventory: Inventory as built by `infra.ansible.inventory.build_inventory`.
        hosts: Hosts to run on (the `--limit`).
        ssh: The stack's SSH settings (config file, pinned known_hosts).
        check: Run with `--check --diff` (nothing changes on the nodes).
        tuning: `tuned` (gpufleet's settings) or `defaults` (plain Ansible, for benchmarks).
        secrets: Extra variables that are secret (passed via a 0600 file, deleted after the run).
        secret_values: Further values to scrub from what the run leaves behind.
        progress: Live progress sink, or None for quiet (JSON) runs.
        timeout_s: Hard limit of the whole run.
        label: Short word in the run directory's name.
        extravars: Further (not secret) extra variables, passed as an `-e @file` (the node lock's holder).

    """
    import ansible_runner

    base = runs_dir()
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    _prune(base, KEEP_RUNS - 1)
    work = Path(tempfile.mkdtemp(prefix=f"run-{time.strftime('%Y%m%dT%H%M%S')}-{label}-", dir=base))
    pdd = work / "pdd"
    (pdd / "inventory").mkdir(parents=True)
    (work / "tmp").mkdir()
    inv_path = pdd / "inventory" / "hosts.json"
    # Every string the plan hands Ansible is marked unsafe: nothing from a stack is ever templated.
    write_json(inv_path, inventory)
    # ControlPath sockets must be short (108 bytes); one dir per run so runs never share a master.
    control_dir = Path(tempfile.mkdtemp(prefix="gpf-cp-", dir="/tmp"))
    fact_cache = base / "fact-cache"
    env, forks = runner_env(
        tuning, hosts=len(hosts), ssh=ssh, work_dir=work, control_dir=control_dir, fact_cache=fact_cache
    )
    # The roles call the collection's own modules by FQCN (gpufleet.fleet.gpu_validate).
    env["ANSIBLE_COLLECTIONS_PATH"] = str(link_collections(project_root(), work / "collections"))
    run_id = uuid.uuid4().hex
    env[procs.RUN_ENV] = run_id
    cmd = ["--limit", ",".join(hosts)]
    if check:
        cmd += ["--check", "--diff"]
    else:
        cmd += ["--diff"]
    if extravars:
        vars_file = work / "tmp" / "extravars.json"
        write_json(vars_file, extravars)
        cmd += ["-e", f"@{vars_file}"]
    secret_file: Path | None = None
    all_secrets = [str(v) for v in secret_values]
    if secrets:
        fd, name = tempfile.mkstemp(prefix="secrets-", suffix=".json", dir=work / "tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(ansible_json(secrets))
        secret_file = Path(name)
        os.chmod(secret_file, 0o600)
        cmd += ["-e", f"@{secret_file}"]
        all_secrets += _leaves(secrets)
    # Secrets this process holds in its environment (GPUFLEET_SECRET_*, Pulumi's passphrase) are
    # none of Ansible's business: scrubbed from what the run leaves and kept out of its environment.
    all_secrets += [v for k, v in os.environ.items() if _is_secret_env(k)]
    collector = _Collector(hosts, progress)
    started = time.monotonic()
    reaper = procs.Reaper(run_id)
    stop = _StopOnSignal(run_id)
    try:
        config = ansible_runner.RunnerConfig(
            private_data_dir=str(pdd),
            playbook=str(project_root() / "playbooks" / playbook),
            inventory=str(inv_path),
            envvars=env,
            cmdline=" ".join(_quote(c) for c in cmd),
            forks=forks,
            suppress_env_files=True,
            quiet=True,
            timeout=timeout_s,
            ident="artifacts",
        )
        config.prepare()
        # ansible-runner seeds the child's environment with ours and writes it to artifacts/command.
        config.env = {k: v for k, v in config.env.items() if not _is_secret_env(k)}
        r = ansible_runner.Runner(
            config,
            event_handler=collector,
            # SIGINT/SIGTERM/SIGHUP reach only us (ansible-playbook runs in its own session under a pty):
            # we pass them on and give it FORWARD_GRACE_S to stop its workers; then ansible-runner kills it.
            cancel_callback=stop.requested,
        )
        r.run()
        status, rc = str(r.status), int(r.rc if r.rc is not None else 1)
        stats = r.stats or collector.stats
    finally:
        stop.restore()
        # Ansible's workers run in sessions of their own (WorkerProcess._detach): when a canceled
        # ansible-playbook dies, a worker mid-task lives on, orphaned; the SSH ControlPersist masters
        # outlive every run by design. All carry the run's marker, so none is left running after us.
        # (Info, not a warning: after a normal run that is the connections, every time.)
        if stray := procs.stop_run(run_id):
            log.info("stopped %d leftover process(es) of %s", stray, work)
        reaper.close()
        if secret_file is not None:
            secret_file.unlink(missing_ok=True)
        shutil.rmtree(work / "tmp", ignore_errors=True)
        shutil.rmtree(work / "ansible-home", ignore_errors=True)
        shutil.rmtree(control_dir, ignore_errors=True)
        scrub(work, all_secrets)
    # ansible-playbook died before any host ran (bad playbook, missing binary): fail them all.
    died = {"task": "(ansible-playbook)", "msg": f"status={status} rc={rc}"} if rc != 0 else None
    result = fold_result(playbook, check, status, rc, started, collector, stats, work, died)
    finish_run(result, work, all_secrets, progress)
    if stop.signal is not None:
        mid = ", ".join(f"{h} (in '{t}')" for h, t in sorted(collector.in_flight.items())) or "none"
        raise RunInterrupted(
            f"{playbook} stopped on {stop.signal.name} after {result.duration_s:.0f}s; interrupted mid-task: "
            f"{mid}; the nodes of this batch ({', '.join(hosts)}) may be mid-change and no later batch was "
            f"started. Run the same command again to finish (the roles recover interrupted package runs). "
            f"Events: {work}"
        )
    return result


def fold_result(
    playbook: str,
    check: bool,
    status: str,
    rc: int,
    started: float,
    collector: _Collector,
    stats: Mapping[str, Any],
    work: Path,
    no_stats: Mapping[str, str] | None,
) -> RunResult:
    """The typed result of one run, local or on an execution host, from its events and its final stats.

    `no_stats`: the failure given to every host without one when the run produced no stats event (it died or
    never started); None leaves such hosts as their events showed them.
    """
    for name, h in collector.hosts.items():
        h.ok = int((stats.get("ok") or {}).get(name, 0))
        # A canceled or killed run has no stats event: count what the events showed.
        h.changed = int((stats.get("changed") or {}).get(name, 0)) if stats else len(h.changed_tasks)
        h.failed = max(h.failed, int((stats.get("failures") or {}).get(name, 0)))
        h.skipped = int((stats.get("skipped") or {}).get(name, 0))
        h.unreachable = h.unreachable or bool((stats.get("dark") or {}).get(name, 0))
        if not stats and no_stats is not None and not h.failures:
            h.failed = 1
            h.failures.append(dict(no_stats))
    return RunResult(
        playbook=playbook,
        check=check,
        status=status,
        rc=rc,
        duration_s=time.monotonic() - started,
        hosts=collector.hosts,
        run_dir=str(work),
    )


def finish_run(
    result: RunResult, work: Path, secrets: Sequence[str], progress: Progress | None, **extra: Any
) -> None:
    """Write the run's result.json (with `extra` keys), scrub secrets from the run dir, close the progress line."""
    (work / "result.json").write_text(
        json.dumps({**result.as_dict(), **extra}, indent=1, sort_keys=True, default=str), encoding="utf-8"
    )
    scrub(work, secrets)
    if progress:
        progress.finish(result)


def _is_secret_env(name: str) -> bool:
    """True for environment variables that carry secrets (never passed on to Ansible)."""
    return name.startswith(SECRET_ENV_PREFIX) or name in SECRET_ENV_NAMES


class RunInterrupted(KeyboardInterrupt):
    """A run stopped because gpufleet got SIGINT/SIGTERM/SIGHUP (the message says what to do)."""


class _StopOnSignal:
    """SIGINT/SIGTERM/SIGHUP: passed on to ansible-playbook, then a cancel request once it had its grace time.

    ansible-playbook passes SIGINT/SIGTERM on to its workers and stops (TaskQueueManager._signal_handler);
    it ignores SIGHUP (ansible-runner spawns it so), hence SIGTERM for that. A second signal, or
    `grace_s` without ansible-playbook ending, asks ansible-runner to kill it. Main thread only.
    """

    _SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self, run_id: str, grace_s: float = FORWARD_GRACE_S) -> None:
        self.signal: signal.Signals | None = None
        self.run_id = run_id
        self.grace_s = grace_s
        self._at = 0.0
        self._force = False
        self._old: dict[signal.Signals, Any] = {}
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in self._SIGNALS}

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signal is not None:
            self._force = True
            return
        self.signal = signal.Signals(signum)
        self._at = time.monotonic()
        forward = signal.SIGTERM if signum == signal.SIGHUP else signum
        # ansible-playbook is our child carrying the run's marker (its workers are its children).
        for pid in procs.pids_with_env(procs.RUN_ENV, self.run_id):
            if procs.parent_of(pid) == os.getpid():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, forward)

    def requested(self) -> bool:
        """ansible-runner's cancel_callback: True after a second signal or once the grace time has passed."""
        return self._force or (self.signal is not None and time.monotonic() - self._at > self.grace_s)

    def restore(self) -> None:
        """Put the previous handlers back."""
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}


def _leaves(value: Any) -> list[str]:
    if isinstance(value, Mapping):
        return [s for v in value.values() for s in _leaves(v)]
    if isinstance(value, list | tuple):
        return [s for v in value for s in _leaves(v)]
    return [str(value)] if isinstance(value, str) else []


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


ProgressFactory = Callable[[Sequence[str]], Progress | None]
