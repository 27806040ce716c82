"""The one SSH client (infra/ssh.py): hostile users and hosts never become options; host-key failures end at once."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
from pathlib import Path

import pytest

from infra import ssh
from infra.bundle.remote import SshMirror
from infra.dr.remote import ssh_argv
from infra.model.load import load_site
from infra.ssh import SshError, SshSettings
from tests.unit.injection import attempts, force


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(tmp_path: Path, port: int) -> SshSettings:
    cfg = tmp_path / "ssh_config"
    cfg.write_text(f"Host *\n  Port {port}\n", encoding="utf-8")
    known = tmp_path / "known_hosts"
    known.write_text("", encoding="utf-8")
    return SshSettings(str(cfg), str(known))


def test_argv_puts_user_after_l_and_host_after_double_dash() -> None:
    a = ssh.argv(SshSettings(None, None), "198.18.1.11", "true", user="-oProxyCommand=x")
    i = a.index("--")
    assert a[i - 2 : i] == ["-l", "-oProxyCommand=x"]
    assert a[i + 1 :] == ["198.18.1.11", "true"]
    # Nothing user-supplied sits before `--` except as the argument of -l.
    assert "-oProxyCommand=x" not in a[: i - 1]


def test_shell_command_quotes_every_word() -> None:
    assert ssh.shell_command("sh", "-c", "echo $(id)", "a b") == "sh -c 'echo $(id)' 'a b'"


def test_every_caller_builds_argv_through_the_one_client(tmp_path: Path) -> None:
    """wait-ssh/DR use ssh.argv with the node's user; the mirror publisher too (-l root without a config)."""
    site = load_site("lab")
    node = site.nodes[0]
    a = ssh_argv(site, node, "true")
    assert a[a.index("--") - 2 : a.index("--")] == ["-l", node.ssh_user]
    assert a[a.index("--") + 1] == str(node.address)
    mirror = site.mirrors[0]
    no_config = SshMirror(mirror, None, None)._ssh()
    assert no_config[-4:] == ["-l", "root", "--", str(mirror.address)]
    with_config = SshMirror(mirror, "/etc/ssh/cfg", None)._ssh()
    assert with_config[-2:] == ["--", mirror.name] and "-l" not in with_config


@pytest.mark.parametrize("field", ["nodes[0].ssh_user"])
def test_hostile_user_forced_past_validation_runs_nothing(tmp_path: Path, field: str) -> None:
    """Every option-injection/shell value of ssh_user, run through the real ssh binary: no canary."""
    settings = _config(tmp_path, _closed_port())
    hostile = [a for a in attempts(tmp_path) if a.path == field]
    assert any(a.value.startswith("-o") for a in hostile)
    for a in hostile:
        site = force(load_site("lab"), a.path, a.value)
        node = site.nodes[0]
        argv = ssh.argv(settings, "127.0.0.1", "true", user=node.ssh_user, connect_timeout=2)
        assert argv[argv.index("--") - 2] == "-l"
        with pytest.raises(SshError) as err:
            ssh.run(argv, host="127.0.0.1", timeout=20)
        assert err.value.kind == "unreachable"
        assert not a.canary.exists(), f"{a.value!r} ran code"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("canary")]


def test_control_old_user_at_host_form_runs_the_proxy_command(tmp_path: Path) -> None:
    """The attack is real: the pre-fix argv (`f"{user}@{host}"`, no `--`) lets ssh run the ProxyCommand."""
    settings = _config(tmp_path, _closed_port())
    canary = tmp_path / "old-form"
    user = f"-oProxyCommand=touch {canary}"
    old = ["ssh", *settings.args(2), f"{user}@127.0.0.1", "true"]
    ssh_proc = subprocess.run(old, capture_output=True, timeout=20, check=False)
    assert ssh_proc.returncode != 0
    # ssh took everything after `=` as the ProxyCommand: `touch <canary>@127.0.0.1`.
    assert Path(f"{canary}@127.0.0.1").exists()


def _stub_ssh(tmp_path: Path, stderr: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An `ssh` on PATH that prints `stderr`, exits 255 and counts its calls."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    calls = tmp_path / "calls"
    stub = bindir / "ssh"
    stub.write_text(f"#!/bin/sh\necho x >> {calls}\nprintf '%s\\n' '{stderr}' >&2\nexit 255\n", encoding="utf-8")
    stub.chmod(stub.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return calls


def test_wait_stops_at_once_on_a_host_key_mismatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # OpenSSH 9.2 sshconnect.c prints this (after the "REMOTE HOST IDENTIFICATION HAS CHANGED" banner).
    calls = _stub_ssh(tmp_path, "Host key verification failed.", monkeypatch)
    with pytest.raises(SshError) as err:
        ssh.wait(SshSettings(None, None), "198.18.1.11", user="root", timeout=600, interval=0.01)
    assert err.value.kind == "hostkey"
    assert "Host key verification failed" in str(err.value)
    assert len(calls.read_text().splitlines()) == 1


def test_wait_keeps_polling_an_unreachable_host_then_names_the_last_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _stub_ssh(tmp_path, "ssh: connect to host 198.18.1.11 port 22: Connection refused", monkeypatch)
    with pytest.raises(SshError) as err:
        ssh.wait(SshSettings(None, None), "198.18.1.11", user="root", timeout=0.5, interval=0.05)
    assert err.value.kind == "timeout"
    assert "Connection refused" in str(err.value)
    assert len(calls.read_text().splitlines()) > 1


def test_wait_ssh_command_reports_a_hostile_user_without_running_it(tmp_path: Path) -> None:
    """`gpufleet wait-ssh`'s library path (ansible.cli.wait_ssh) with a forced hostile user: no canary."""
    from infra.ansible.converge import wait_ssh
    from infra.plan.node import plan_site

    a = next(a for a in attempts(tmp_path) if a.value.startswith("-oProxyCommand"))
    site = force(load_site("lab"), a.path, a.value)
    settings = _config(tmp_path, _closed_port())
    site = site.model_copy(
        update={"controller": site.controller.model_copy(update={"ssh_config": settings.ssh_config})}
    )
    site = force(site, "nodes[0].address", "127.0.0.1")
    ok, _, err = wait_ssh(site, plan_site(site).node(site.nodes[0].hostname), 1.5)
    assert not ok and err
    assert not a.canary.exists()


def test_ansible_ssh_args_keep_each_option_one_word(tmp_path: Path) -> None:
    """Ansible and Mitogen shlex-split ANSIBLE_SSH_ARGS: a path with a space must stay one argument."""
    import shlex

    from infra.ansible.settings import Tuning, runner_env

    settings = SshSettings("/etc/gpufleet/ssh config", "/var/lib/gpufleet/known hosts")
    for tuning in Tuning:
        env, _ = runner_env(
            tuning, hosts=1, ssh=settings, work_dir=tmp_path, control_dir=tmp_path, fact_cache=None
        )
        words = shlex.split(env["ANSIBLE_SSH_ARGS"])
        assert words[: len(settings.args())] == settings.args()
        assert "/etc/gpufleet/ssh config" in words


def test_dr_and_mirror_paths_run_no_hostile_option(tmp_path: Path) -> None:
    """The DR probe's ssh and the mirror publisher, with a hostile user/host forced in: real ssh, no canary."""
    from infra.bundle.remote import RemoteError as MirrorError
    from infra.dr.remote import RemoteError
    from infra.dr.remote import ssh as dr_ssh

    settings = _config(tmp_path, _closed_port())
    canary = tmp_path / "canary-dr"
    site = load_site("lab")
    site = site.model_copy(
        update={"controller": site.controller.model_copy(update={"ssh_config": settings.ssh_config,
                                                                  "known_hosts": settings.known_hosts})}
    )
    site = force(site, "nodes[0].ssh_user", f"-oProxyCommand=touch {canary}")
    site = force(site, "nodes[0].address", "127.0.0.1")
    with pytest.raises(RemoteError) as err:
        dr_ssh(site, site.nodes[0], "true", timeout=20)
    assert err.value.kind == "unreachable"
    mirror_canary = tmp_path / "canary-mirror"
    mirror = site.mirrors[0].model_copy(update={"name": f"-oProxyCommand=touch {mirror_canary}"})
    with pytest.raises(MirrorError):
        SshMirror(mirror, settings.ssh_config, settings.known_hosts).run("true")
    assert not canary.exists() and not mirror_canary.exists()
    assert not list(tmp_path.glob("canary-*"))
