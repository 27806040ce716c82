"""The provisioning HTTP server: static files of the HTTP root, plus the deploy ramdisk's "done" report.

Standard library only, so the provisioning host runs it with its own `python3` (no gpufleet install there):
`python3 httpd.py --root DIR --bind ADDR --port N`.

`POST /done/<mac>` (MAC as `hexhyp`, `52-54-00-12-34-56`) is what the deploy ramdisk sends once the image is
written, checked and the bootloader installed. The server then copies `ipxe/local/<mac>.ipxe` (rendered by
gpufleet: boot from disk) over `ipxe/<mac>.ipxe`, so the node's next network boot goes to its disk, and
deletes `firstboot/<mac>.tar.gz` (it holds the node's private host key). Both are plain renames inside the
root, atomic on one file system. Any other POST, or a MAC without a local script, gets 404.

Arming (`arm`, `python3 httpd.py --root DIR --arm MAC < firstboot.tar.gz`, run over SSH by the controller's
reimage/rebuild) is the only thing that points a node's script at the install: it copies
`ipxe/install/<mac>.ipxe` (rendered by gpufleet; placed by roles/provisioning) over `ipxe/<mac>.ipxe` and
writes the node's first-boot data (mode 0600). A converge of the provisioning role never does that: it
writes the install and local scripts beside the live one, and creates the live one (as "boot from disk")
only when it is missing. There is no HTTP way to arm: anyone on the segment could otherwise start an
install and fetch a node's private host key.
A body `status=failed&reason=…` is the ramdisk reporting that it stopped (no disk matches the hint, the
written bytes do not match the lock, …): the server logs the reason and writes it to `failed/<mac>.txt`,
switches nothing and keeps the first-boot data, so the node's next network boot runs the install again.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import sys
import urllib.parse
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_MAC = r"[0-9a-f]{2}(?:-[0-9a-f]{2}){5}"
_DONE = re.compile(rf"^/done/({_MAC})$")
#: Largest first-boot tarball `arm` accepts (they are a few KiB: keys, hostname, network file).
MAX_FIRSTBOOT = 1 << 20


class ArmError(Exception):
    """The node cannot be armed (bad MAC, no install script for it, oversized first-boot data)."""


def _replace(path: Path, data: bytes, mode: int) -> None:
    """Write `data` to `path` atomically with `mode` (a temporary file in the same directory, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def arm(root: Path, mac: str, firstboot: bytes) -> None:
    """Point the node's live script at its install script and place its first-boot data.

    The first-boot data is written before the script is switched: a node that PXE-boots in between
    finds either its old script or a complete install with its data, never an install without it.
    """
    if not re.fullmatch(_MAC, mac):
        raise ArmError(f"{mac!r} is not a MAC in hexhyp form (52-54-00-12-34-56)")
    install = root / "ipxe" / "install" / f"{mac}.ipxe"
    if not install.is_file():
        raise ArmError(f"no install script {install}: the provisioning role has not placed one for this MAC")
    if len(firstboot) > MAX_FIRSTBOOT:
        raise ArmError(f"first-boot data of {len(firstboot)} bytes is larger than {MAX_FIRSTBOOT}")
    if firstboot:
        (root / "firstboot").mkdir(mode=0o700, exist_ok=True)
        _replace(root / "firstboot" / f"{mac}.tar.gz", firstboot, 0o600)
    _replace(root / "ipxe" / f"{mac}.ipxe", install.read_bytes(), 0o644)


def mark_done(root: Path, mac: str) -> bool:
    """Switch a node's script to boot from disk and drop its first-boot data; False if it has no local script."""
    if not re.fullmatch(r"[0-9a-f]{2}(?:-[0-9a-f]{2}){5}", mac):
        return False
    local = root / "ipxe" / "local" / f"{mac}.ipxe"
    if not local.is_file():
        return False
    tmp = root / "ipxe" / f".{mac}.ipxe.tmp"
    tmp.write_bytes(local.read_bytes())
    os.replace(tmp, root / "ipxe" / f"{mac}.ipxe")
    (root / "firstboot" / f"{mac}.tar.gz").unlink(missing_ok=True)
    return True


def mark_failed(root: Path, mac: str, reason: str) -> bool:
    """Record a failed deploy (reason cut to 400 printable characters); False for a MAC without a script."""
    if not re.fullmatch(r"[0-9a-f]{2}(?:-[0-9a-f]{2}){5}", mac):
        return False
    if not (root / "ipxe" / "local" / f"{mac}.ipxe").is_file():
        return False
    text = "".join(c if c.isprintable() else " " for c in reason)[:400]
    (root / "failed").mkdir(exist_ok=True)
    (root / "failed" / f"{mac}.txt").write_text(text + "\n", encoding="utf-8")
    return True


class Handler(SimpleHTTPRequestHandler):
    """Static files from the root; POST /done/<mac>."""

    def do_POST(self) -> None:
        """The deploy ramdisk's report."""
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(min(length, 4096)).decode("ascii", "replace")
        m = _DONE.fullmatch(self.path)
        form = urllib.parse.parse_qs(body)
        if m is not None and form.get("status") == ["failed"]:
            reason = (form.get("reason") or ["?"])[0]
            if not mark_failed(Path(self.directory), m.group(1), reason):
                self.send_error(404)
                return
            self.log_message("deploy FAILED: %s: %s", m.group(1), reason[:400])
            self.send_response(202)
            self.end_headers()
            return
        if m is None or not mark_done(Path(self.directory), m.group(1)):
            self.send_error(404)
            return
        self.log_message("deploy done: %s (%s)", m.group(1), body.strip()[:100])
        self.send_response(204)
        self.end_headers()


def main(argv: list[str] | None = None) -> int:
    """Serve until killed."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, required=True)
    p.add_argument("--bind")
    p.add_argument("--port", type=int)
    p.add_argument("--arm", metavar="MAC", help="arm the node's install (first-boot data on stdin) and exit")
    a = p.parse_args(argv)
    if a.arm is not None:
        try:
            arm(a.root, a.arm, sys.stdin.buffer.read(MAX_FIRSTBOOT + 1))
        except (ArmError, OSError) as exc:
            sys.stderr.write(f"error: {exc}\n")
            return 1
        sys.stderr.write(f"armed {a.arm}\n")
        return 0
    if a.bind is None or a.port is None:
        p.error("--bind and --port are required to serve")
    handler = functools.partial(Handler, directory=str(a.root))
    server = ThreadingHTTPServer((a.bind, a.port), handler)
    sys.stderr.write(f"serving {a.root} on {a.bind}:{server.server_address[1]}\n")
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
