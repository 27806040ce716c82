#!/usr/bin/python3
"""Finish interrupted dpkg transactions the way apt would: only while holding dpkg's frontend lock.

`dpkg --configure -a` run bare takes /var/lib/dpkg/lock-frontend and fails at once when another apt or
dpkg run holds it — in issue 21 it hit a still-running earlier converge and failed it. Here we wait for
the frontend lock (fcntl, as apt and dpkg take it; up to TIMEOUT seconds, as the apt tasks' lock_timeout),
then for dpkg's own lock, look again (the other run may have finished the job), and only then run
`dpkg --configure -a` with DPKG_FRONTEND_LOCKED=1, as apt does. Prints FINISHED when it configured
something, NOTHING when nothing was left; exits 1 naming the holder when the lock stayed held.

Usage: dpkg_recover.py TIMEOUT [ADMINDIR]
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time


def holder(path: str) -> str:
    """Who holds a POSIX lock on `path` (from /proc/locks), for the message."""
    try:
        st = os.stat(path)
        with open("/proc/locks", encoding="utf-8") as f:
            for line in f:
                parts = line.split()
                dev_ino = parts[5] if len(parts) > 5 else ""
                if parts[1] == "POSIX" and dev_ino.rsplit(":", 1)[-1] == str(st.st_ino):
                    pid = parts[4]
                    try:
                        with open(f"/proc/{pid}/comm", encoding="utf-8") as c:
                            return f"pid {pid} ({c.read().strip()})"
                    except OSError:
                        return f"pid {pid}"
    except (OSError, IndexError):
        pass
    return "another process"


def take(path: str, deadline: float) -> int | None:
    """Open `path` and hold a write lock on it, waiting until `deadline`; None when it stayed held."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
    while True:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except OSError:
            if time.monotonic() >= deadline:
                os.close(fd)
                return None
            time.sleep(1)


def main(argv: list[str]) -> int:
    """Wait for the locks, look again, finish what is left."""
    timeout = float(argv[1])
    admin = argv[2] if len(argv) > 2 else "/var/lib/dpkg"
    deadline = time.monotonic() + timeout
    frontend = os.path.join(admin, "lock-frontend")
    if take(frontend, deadline) is None:
        print(f"dpkg frontend lock {frontend} still held by {holder(frontend)} after {timeout:.0f}s", file=sys.stderr)
        return 1
    # Anyone else wanting dpkg's own lock takes the frontend lock first (which we hold): wait for a run
    # that holds it still, then let it go for dpkg to take.
    lock = os.path.join(admin, "lock")
    fd = take(lock, deadline)
    if fd is None:
        print(f"dpkg lock {lock} still held by {holder(lock)} after {timeout:.0f}s", file=sys.stderr)
        return 1
    os.close(fd)
    dpkg = ["dpkg", f"--admindir={admin}"]
    audit = subprocess.run([*dpkg, "--audit"], capture_output=True, text=True, check=False)
    if not audit.stdout.strip():
        print("NOTHING")
        return 0
    env = {**os.environ, "DPKG_FRONTEND_LOCKED": "1", "DEBIAN_FRONTEND": "noninteractive"}
    done = subprocess.run([*dpkg, "--configure", "-a"], env=env, check=False)
    if done.returncode:
        return done.returncode
    print("FINISHED")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
