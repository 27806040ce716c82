#!/usr/bin/python
"""Take the node's converge lock for the rest of the run: no two runs act on one node at once (issue 21)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
module: run_lock
short_description: Hold the node's converge lock while the controller's connection lives
description:
  - Takes an exclusive flock on I(path) (waiting up to I(wait) seconds), records who holds it, and leaves a
    small detached process holding it. That process ends, and the lock with it, when the nearest ancestor
    process named in I(tie_to) ends (by default the sshd session of the controller's connection, so a run
    whose controller died frees the node as soon as its connection closes), or after I(lease) seconds.
  - When the lock is held, fails naming the holder. Never reports a change. In check mode only reports.
options:
  path: {type: path, default: /run/gpufleet/converge.lock, description: Lock file (on tmpfs, gone at reboot).}
  holder: {type: dict, default: {}, description: Who takes the lock (controller, pid, started, command).}
  wait: {type: int, default: 0, description: Seconds to wait for a held lock before failing.}
  lease: {type: int, default: 14400, description: Seconds after which the lock is released in any case.}
  tie_to:
    type: list
    elements: str
    default: [sshd, sshd-session]
    description: Process names (comm) of the ancestor whose end releases the lock.
  tie_pid: {type: int, default: 0, description: Tie to this process instead of an ancestor (tests; 0 = ancestor).}
author: gpufleet
"""


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and ')': fields after its last ')' are fixed (state is [0]).
    return text.rsplit(")", 1)[1].split()


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return ""


def tie_ancestor(names: list[str]) -> tuple[int, str] | None:
    """The nearest ancestor whose comm is one of `names`, with its start time (guards against PID reuse)."""
    pid = os.getpid()
    while pid > 1:
        fields = _stat(pid)
        if fields is None:
            return None
        pid = int(fields[1])
        if pid > 1 and _comm(pid) in names:
            start = _stat(pid)
            return (pid, start[19]) if start else None
    return None


def _alive(tie: tuple[int, str] | None) -> bool:
    if tie is None:
        return True
    fields = _stat(tie[0])
    return fields is not None and fields[19] == tie[1] and fields[0] != "Z"


def _read_holder(fd: int) -> str:
    try:
        data = json.loads(os.pread(fd, 65536, 0).decode("utf-8", "replace") or "{}")
    except ValueError:
        data = {}
    if not isinstance(data, dict) or not data:
        return "a run that has not recorded itself yet"
    return (
        f"pid {data.get('pid', '?')} on {data.get('controller', '?')} started {data.get('started', '?')} "
        f"({data.get('command', '?')}), holding it since {data.get('since', '?')}"
    )


def _hold(fd: int, tie: tuple[int, str] | None, lease: int) -> None:
    """Detach twice (no parent to wait for us, no terminal) and keep `fd` until `tie` ends or the lease ends."""
    child = os.fork()
    if child:
        os.waitpid(child, 0)
        return
    # Child: only system calls from here (the parent may be a threaded Mitogen context); never return.
    try:
        os.setsid()
        if os.fork():
            os._exit(0)
        # Keep no fd of the connection open (sshd would wait for it), only the lock.
        os.dup2(fd, 3)
        os.closerange(0, 3)
        os.closerange(4, 65536)
        null = os.open(os.devnull, os.O_RDWR)
        for target in (0, 1, 2):
            os.dup2(null, target)
        deadline = time.monotonic() + lease
        while time.monotonic() < deadline and _alive(tie):
            time.sleep(1)
    finally:
        os._exit(0)


def main() -> None:
    """Take (or in check mode look at) the node's converge lock."""
    module = AnsibleModule(
        argument_spec={
            "path": {"type": "path", "default": "/run/gpufleet/converge.lock"},
            "holder": {"type": "dict", "default": {}},
            "wait": {"type": "int", "default": 0},
            "lease": {"type": "int", "default": 14400},
            "tie_to": {"type": "list", "elements": "str", "default": ["sshd", "sshd-session"]},
            "tie_pid": {"type": "int", "default": 0},
        },
        supports_check_mode=True,
    )
    p = module.params
    path = p["path"]
    if module.check_mode and not os.path.exists(path):
        module.exit_json(changed=False, held=False)
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    deadline = time.monotonic() + max(0, p["wait"])
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if module.check_mode:
                module.warn(f"{path} is held by {_read_holder(fd)}: another run acts on this node")
                module.exit_json(changed=False, held=True)
            if time.monotonic() >= deadline:
                module.fail_json(
                    msg=f"node lock {path} is held by {_read_holder(fd)}: another run acts on this node; "
                    f"let it finish, or re-run with --wait-lock SECONDS to wait for it",
                    held=True,
                )
            time.sleep(1)
    if module.check_mode:
        module.exit_json(changed=False, held=False)
    if p["tie_pid"]:
        fields = _stat(p["tie_pid"])
        if fields is None:
            module.fail_json(msg=f"tie_pid {p['tie_pid']} is not a running process")
        tie: tuple[int, str] | None = (p["tie_pid"], fields[19])
    else:
        tie = tie_ancestor(p["tie_to"])
    record = {
        **{k: str(v) for k, v in p["holder"].items()},
        "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tie_pid": tie[0] if tie else None,
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record, sort_keys=True).encode(), 0)
    _hold(fd, tie, p["lease"])
    # Our copy goes; the detached holder's keeps the lock (flock belongs to the open file, not the fd).
    with contextlib.suppress(OSError):
        os.close(fd)
    module.exit_json(changed=False, held=False, tie_pid=record["tie_pid"])


if __name__ == "__main__":
    main()
