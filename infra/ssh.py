"""The one SSH client of gpufleet: settings, argv, run with a timeout, and the wait loop.

Every connection to a node or a mirror goes through `argv`, which always ends
`… [-l USER] -- HOST [COMMAND]`: the user is the *argument* of `-l` and `--` ends ssh's options, so
neither a hostile user (`-oProxyCommand=…`) nor a hostile host can ever be read as an option.

The remote command is ONE string. OpenSSH joins every word after the host with spaces and hands the
result to the remote login shell, so separate argv items would give a false sense of quoting; callers
build the string from fixed text plus `shell_command(...)`, which quotes each word for a POSIX shell.

Host keys are pinned (`StrictHostKeyChecking=yes`, the stack's known_hosts, `BatchMode=yes`): a node
that presents a different or unknown key is refused, and `wait` reports that at once instead of
polling until its timeout (a wrong key never heals by waiting).
"""

from __future__ import annotations

import shlex
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from infra.model.site import Site

CONNECT_TIMEOUT_S = 10
# What OpenSSH prints when the pinned key does not match or is missing (with StrictHostKeyChecking=yes).
_HOSTKEY_MARKERS = ("REMOTE HOST IDENTIFICATION HAS CHANGED", "Host key verification failed")


@dataclass(frozen=True)
class SshSettings:
    """How the controller reaches nodes and mirrors (from the stack's `controller` section)."""

    ssh_config: str | None
    known_hosts: str | None

    @classmethod
    def of(cls, site: Site) -> SshSettings:
        """The settings of a site's controller section."""
        return cls(site.controller.ssh_config, site.controller.known_hosts)

    def args(self, connect_timeout: int = CONNECT_TIMEOUT_S) -> list[str]:
        """OpenSSH options every connection gets: the stack's config and pinned host keys only."""
        out = []
        if self.ssh_config:
            out += ["-F", self.ssh_config]
        if self.known_hosts:
            out += ["-o", f"UserKnownHostsFile={self.known_hosts}"]
        # Never trust a host key on first use: rebuilt nodes are re-pinned by the BMC/lab code.
        out += ["-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={connect_timeout}"]
        return out


def shell_command(*words: str) -> str:
    """One remote command line with every word quoted for the remote POSIX shell."""
    return shlex.join(words)


def argv(
    settings: SshSettings,
    host: str,
    command: str | None = None,
    *,
    user: str | None = None,
    connect_timeout: int = CONNECT_TIMEOUT_S,
) -> list[str]:
    """`ssh [options] [-l USER] -- HOST [COMMAND]`.

    Args:
        settings: Config file and pinned known_hosts.
        host: Address or ssh_config host alias.
        command: One remote command string (see `shell_command`); None for none.
        user: Login user; None leaves it to the ssh config (e.g. a mirror's `User`).
        connect_timeout: Seconds for the TCP + key exchange.

    """
    out = ["ssh", *settings.args(connect_timeout), "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3"]
    if user is not None:
        out += ["-l", user]
    out += ["--", host]
    if command is not None:
        out.append(command)
    return out


class SshError(Exception):
    """SSH itself failed; `kind` is `hostkey` (pinned key refused), `unreachable` or `timeout`."""

    def __init__(self, host: str, kind: str, detail: str) -> None:
        self.host = host
        self.kind = kind
        self.detail = detail
        super().__init__(f"{host}: {detail}")


def _last_line(stderr: bytes) -> str:
    lines = stderr.decode(errors="replace").strip().splitlines()
    return lines[-1].strip() if lines else ""


def run(
    command: Sequence[str], *, host: str, stdin: bytes | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[bytes]:
    """Run an argv from `argv` (or a test's stand-in) and return the finished process.

    Exit 255 is ssh's own failure and raises; any other exit code is the remote command's, returned.

    Raises:
        SshError: kind `timeout`, `hostkey` or `unreachable` (also when `ssh` is not installed).

    """
    try:
        p = subprocess.run(list(command), input=stdin, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise SshError(host, "timeout", f"ssh did not finish in {timeout:.0f} s") from None
    except FileNotFoundError:
        raise SshError(host, "unreachable", "the `ssh` client is not installed (apt install openssh-client)") from None
    if p.returncode == 255:
        text = p.stderr.decode(errors="replace")
        kind = "hostkey" if any(m in text for m in _HOSTKEY_MARKERS) else "unreachable"
        raise SshError(host, kind, _last_line(p.stderr) or "ssh failed (exit 255)")
    return p


def wait(
    settings: SshSettings,
    host: str,
    *,
    user: str | None,
    timeout: float,
    interval: float = 1.0,
    attempt_timeout: float = 15,
) -> float:
    """Poll until `true` runs over SSH with the pinned host key; returns the seconds waited.

    Raises:
        SshError: kind `hostkey` at once when the node presents a key that is not the pinned one;
            kind `timeout` (naming the last error) when SSH did not answer within `timeout`.

    """
    start = time.monotonic()
    last = "no attempt finished"
    while True:
        left = timeout - (time.monotonic() - start)
        try:
            p = run(argv(settings, host, "true", user=user), host=host, timeout=max(1.0, min(attempt_timeout, left)))
            if p.returncode == 0:
                return time.monotonic() - start
            last = _last_line(p.stderr) or f"`true` exited {p.returncode}"
        except SshError as exc:
            if exc.kind == "hostkey":
                raise
            last = exc.detail
        if time.monotonic() - start + interval >= timeout:
            raise SshError(host, "timeout", f"no SSH after {timeout:.0f} s (last error: {last})")
        time.sleep(interval)
