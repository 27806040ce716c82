"""Segment-local execution without a lab: the real transmit → worker → process protocol over a local pipe.

The carrier is `sh -c` instead of ssh (the one thing replaced); everything else is real: the locked runtime's
wheels (uv.lock) installed by the execution host's installer, `gpufleet-worker` supervising
`ansible-runner worker` from that runtime under /usr/bin/python3, ansible-playbook on a local connection.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from infra import procs
from infra import ssh as ssh_module
from infra.ansible.remote import job, runtime, worker
from infra.ansible.settings import Tuning
from infra.model.load import project_dir
from infra.ssh import SshSettings

SYSTEM_PY = Path("/usr/bin/python3")
needs_same_python = pytest.mark.skipif(
    not SYSTEM_PY.exists()
    or subprocess.run(
        [str(SYSTEM_PY), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], capture_output=True, text=True
    ).stdout.strip()
    != runtime.spec().python,
    reason="the execution runtime runs under /usr/bin/python3 of the controller's minor version",
)


def test_known_hosts_for_keeps_only_the_jobs_nodes_plain_and_hashed(tmp_path: Path) -> None:
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"
    plain = f"198.18.2.11 {key}\nlab-gpu03,198.18.2.12 {key}\n[198.18.2.13]:2222 {key}\n198.18.1.11 {key}\n"
    path = tmp_path / "kh"
    path.write_text(f"198.18.2.20 {key}\n10.9.9.9 {key}\n")
    # OpenSSH's own hashing (`ssh-keygen -H`), so the |1|salt|hash form is the real one.
    subprocess.run(["ssh-keygen", "-H", "-f", str(path)], check=True, capture_output=True)
    hashed = path.read_text()
    assert "198.18.2.20" not in hashed and hashed.startswith("|1|")
    wanted = ["198.18.2.11", "lab-gpu03", "198.18.2.13", "198.18.2.20"]
    out = job.known_hosts_for(plain + hashed + "# comment\n\n", wanted)
    lines = out.splitlines()
    assert lines[:3] == plain.splitlines()[:3]
    assert len(lines) == 4 and lines[3].startswith("|1|")  # the hashed 198.18.2.20, not 10.9.9.9
    assert "198.18.1.11" not in out
    assert job.known_hosts_for(plain, ["10.0.0.1"]) == ""


def test_supervisor_stops_the_job_at_its_time_limit_and_removes_the_job_dir(tmp_path: Path) -> None:
    job_dir = tmp_path / "jobs" / "j1"
    job_dir.mkdir(parents=True)
    (job_dir / "secrets.json").write_text("{}")
    # A stand-in `ansible-runner` whose child (like ansible-playbook in its own session) names the job dir.
    fake = tmp_path / "runner"
    sleeper = f"{sys.executable} -c 'import time; time.sleep(300)' {job_dir}"
    fake.write_text(f"#!/bin/sh\nsetsid {sleeper} &\nexec {sleeper}\n")
    fake.chmod(0o755)
    start = time.monotonic()
    r, w = os.pipe()  # the controller's end stays open: only the time limit ends this job
    try:
        rc = worker.supervise(str(fake), str(job_dir), timeout_s=1, stdin_fd=r)
    finally:
        os.close(w)
        os.close(r)
    assert rc == 124
    assert not job_dir.exists()
    assert worker._mentioning(str(job_dir).encode()) == []
    assert time.monotonic() - start < 60  # bounded: not the stand-in's 300 s


def test_supervisor_stops_what_a_dead_worker_left_running(tmp_path: Path) -> None:
    job_dir = tmp_path / "jobs" / "j2"
    job_dir.mkdir(parents=True)
    # The worker dies at once (as on a closed connection), its ansible-playbook stand-in lives on in its own session.
    fake = tmp_path / "runner"
    fake.write_text(f"#!/bin/sh\nsetsid {sys.executable} -c 'import time; time.sleep(300)' {job_dir} &\nexit 3\n")
    fake.chmod(0o755)
    r, w = os.pipe()
    try:
        assert worker.supervise(str(fake), str(job_dir), timeout_s=600, stdin_fd=r) == 3
    finally:
        os.close(w)
        os.close(r)
    assert worker._mentioning(str(job_dir).encode()) == []
    assert not job_dir.exists()


def test_install_refuses_another_python_and_installs_nothing(tmp_path: Path) -> None:
    release = runtime.RuntimeSpec("2.7", "0.0", runtime.spec().files)
    p = subprocess.run(
        ["sh", "-c", runtime.install_command(str(tmp_path / "rt"), release, "http://127.0.0.1:9/")],
        capture_output=True,
        check=False,
    )
    assert p.returncode == runtime.EXIT_PLATFORM
    assert b"needs 2.7" in p.stderr
    assert not (tmp_path / "rt" / "releases").exists()


# The runtime's wheels, fetched once from the registry URLs uv.lock names and checked against their sha256.
WHEELS = Path.home() / ".cache" / "gpufleet" / "exec-runtime"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The locked runtime installed by the installer (the streamed form) into a temp dir, as on an execution host."""
    work = tmp_path_factory.mktemp("exec-runtime")
    release = runtime.spec()
    files = runtime.fetch(WHEELS, release)
    root = work / "rt"
    for want in ("installed", "kept"):  # the second install finds the release and keeps it
        p = subprocess.run(
            ["sh", "-c", runtime.install_command(str(root), release, None)],
            input=runtime.stream(files, release),
            capture_output=True,
            check=True,
        )
        assert p.stdout.decode().strip() == want
    rel = Path(runtime.release_dir(str(root)))
    assert (rel / "bin" / runtime.WORKER).is_file() and (rel / "bin" / "ansible-playbook").is_file()
    return root


def _local_carrier(monkeypatch: pytest.MonkeyPatch) -> None:
    """Replace only ssh: the remote command runs under `sh -c` on this machine."""

    def argv(settings: SshSettings, host: str, command: str | None = None, **_: Any) -> list[str]:
        assert command is not None
        return ["sh", "-c", command]

    monkeypatch.setattr(ssh_module, "argv", argv)


PLAY = """
- name: Remote job test
  hosts: gpufleet_nodes
  gather_facts: false
  tasks:
    - name: Use the secret
      ansible.builtin.command: "echo {{ test_secret }}"
      changed_when: true
    - name: Where am I
      ansible.builtin.command: python3 -c "import sys; print(sys.executable)"
      changed_when: false
      register: where
    - name: Copy the controller's keyring as a role does (copy src from the controller)
      ansible.builtin.copy:
        src: "{{ base_apt_sources[0].keyring }}"
        dest: "{{ out_dir }}/{{ inventory_hostname }}.gpg"
        mode: "0644"
    - name: The roles are the installed release's locked collection
      ansible.builtin.stat:
        path: "{{ lookup('ansible.builtin.env', 'ANSIBLE_ROLES_PATH') }}/{{ some_role }}/tasks/main.yml"
      register: locked_role
      failed_when: >-
        not locked_role.stat.exists
        or not lookup('ansible.builtin.env', 'ANSIBLE_ROLES_PATH').startswith(release_dir + '/collections/')
    - name: The job carries no roles of its own
      ansible.builtin.stat:
        path: "{{ playbook_dir }}/collections"
      register: carried
      failed_when: carried.stat.exists
    - name: Fail on purpose
      ansible.builtin.fail:
        msg: boom
      when: inventory_hostname == 'n2'
"""


@needs_same_python
def test_a_job_runs_through_transmit_worker_process_and_folds_per_host(
    installed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _local_carrier(monkeypatch)
    monkeypatch.setenv("GPUFLEET_RUNS_DIR", str(tmp_path / "runs"))
    playbook = tmp_path / "play.yml"
    playbook.write_text(PLAY)
    keyring = tmp_path / "controller-keys" / "upstream.gpg"
    keyring.parent.mkdir()
    keyring.write_bytes(b"KEYRING-BYTES")
    out_dir = tmp_path / "node-out"
    out_dir.mkdir()
    local = {
        "ansible_connection": "local",
        "ansible_python_interpreter": "/usr/bin/python3",
        "base_apt_sources": [{"name": "upstream", "keyring": str(keyring)}],
        "out_dir": str(out_dir),
        "release_dir": runtime.release_dir(str(installed)),
        "some_role": sorted(p.name for p in (project_dir() / "roles").iterdir() if (p / "tasks").is_dir())[0],
    }
    inventory = {"all": {"children": {"gpufleet_nodes": {"hosts": {"n1": dict(local), "n2": dict(local)}}}}}
    target = job.ExecHost("seg", "exec01", "127.0.0.1", "root", str(installed))
    secret = "s3cret-value-xyz"
    result = job.run_playbook_remote(
        str(playbook),
        inventory,
        ["n1", "n2"],
        target=target,
        ssh_settings=SshSettings(None, None),
        tuning=Tuning.TUNED,  # Mitogen's strategy from the runtime, as a converge runs
        secrets={"test_secret": secret},
        label="t",
    )
    assert result.hosts["n1"].succeeded and result.hosts["n1"].changed == 2  # the echo and the copy
    assert not result.hosts["n2"].succeeded
    assert result.hosts["n2"].failures[0]["msg"] == "boom"
    assert result.rc != 0
    # The controller's keyring travelled in the job: the inventory sent names the job's copy, not the original.
    assert (out_dir / "n1.gpg").read_bytes() == b"KEYRING-BYTES"
    sent = (Path(result.run_dir) / "pdd" / "inventory" / "hosts.json").read_text()
    assert str(keyring) not in sent and f"{installed}/jobs/j" in sent
    # Nothing of the job stays on the execution host; the secret is nowhere in what came back.
    assert list((installed / "jobs").iterdir()) == []
    for f in Path(result.run_dir).rglob("*"):
        if f.is_file():
            assert secret.encode() not in f.read_bytes(), f
    # The events came from the worker's run: ansible-playbook ran from the installed runtime.
    events = list((Path(result.run_dir) / "pdd" / "artifacts" / "artifacts" / "job_events").glob("*.json"))
    assert events
    command = (Path(result.run_dir) / "pdd" / "artifacts" / "artifacts" / "command").read_text()
    assert str(installed) in command and sys.executable not in command


def test_a_job_names_the_fix_when_the_runtime_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _local_carrier(monkeypatch)
    monkeypatch.setenv("GPUFLEET_RUNS_DIR", str(tmp_path / "runs"))
    inventory = {"all": {"children": {"gpufleet_nodes": {"hosts": {"n1": {"ansible_connection": "local"}}}}}}
    target = job.ExecHost("iso", "mirror01", "127.0.0.1", "root", str(tmp_path / "nothing-here"))
    result = job.run_playbook_remote("node.yml", inventory, ["n1"], target=target, ssh_settings=SshSettings(None, None))
    assert not result.succeeded
    msg = result.hosts["n1"].failures[0]["msg"]
    assert "gpufleet exec-host install --segment iso" in msg, msg
    assert os.environ.get("GPUFLEET_RUNS_DIR") == str(tmp_path / "runs")


DRIVER = """
import sys
from pathlib import Path
from infra import ssh
from infra.ansible.remote import job
from infra.ssh import SshSettings

# The carrier keeps a shell between the controller and the supervisor, as sshd stays between them over SSH:
# the supervisor is not re-parented when the controller dies, only its input ends.
ssh.argv = lambda settings, host, command=None, **_: ["sh", "-c", "(" + command + "); true"]
inventory = {"all": {"children": {"gpufleet_nodes": {"hosts": {"n1": {
    "ansible_connection": "local", "ansible_python_interpreter": "/usr/bin/python3"}}}}}}
target = job.ExecHost("seg", "exec01", "127.0.0.1", "root", sys.argv[1])
job.run_playbook_remote(sys.argv[2], inventory, ["n1"], target=target, ssh_settings=SshSettings(None, None))
"""


@needs_same_python
def test_sigkill_of_the_controller_stops_the_job_on_the_execution_host(installed: Path, tmp_path: Path) -> None:
    marker = f"gpufleet-test-{os.getpid()}-{time.monotonic_ns()}"
    playbook = tmp_path / "long.yml"
    playbook.write_text(
        "- name: Long\n  hosts: gpufleet_nodes\n  gather_facts: false\n  tasks:\n"
        "    - name: Sleep\n"
        f"      ansible.builtin.command: /usr/bin/python3 -c 'import time; time.sleep(300)' {marker}\n"
    )
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "GPUFLEET_RUNS_DIR": str(tmp_path / "runs")}
    jobs = f"{installed}/jobs/"
    proc = subprocess.Popen([sys.executable, str(driver), str(installed), str(playbook)], env=env)
    try:
        deadline = time.monotonic() + 120
        while not [p for p in worker._mentioning(jobs.encode()) if procs.cmdline_contains(p, "ansible-playbook")]:
            assert time.monotonic() < deadline, "the job never started"
            assert proc.poll() is None, "the controller ended early"
            time.sleep(0.5)
        time.sleep(2)
        proc.kill()  # SIGKILL: no handler, no cleanup on the controller's side
        killed = time.monotonic()
        proc.wait()
        while worker._mentioning(jobs.encode()) and time.monotonic() - killed < 60:
            time.sleep(0.2)
        assert worker._mentioning(jobs.encode()) == []
        assert time.monotonic() - killed < 20  # one poll + the grace, with room for a loaded machine
        assert list((installed / "jobs").iterdir()) == []
    finally:
        worker.stop_job(marker, grace_s=1)  # the "node's" own task is not the execution host's business
        worker.stop_job(jobs, grace_s=1)
