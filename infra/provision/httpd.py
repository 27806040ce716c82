"""The provisioning HTTP server: static files of the HTTP root, plus the deploy ramdisk's "done" report.

Standard library only, so the provisioning host runs it with its own `python3` (no gpufleet install there):
`python3 httpd.py --root DIR --bind ADDR --port N`.

`POST /done/<mac>` (MAC as `hexhyp`, `52-54-00-12-34-56`) is what the deploy ramdisk sends once the image is
written, checked and the bootloader installed. The server then copies `ipxe/local/<mac>.ipxe` (rendered by
gpufleet: boot from disk) over `ipxe/<mac>.ipxe`, so the node's next network boot goes to its disk, and
deletes `firstboot/<mac>.tar.gz` (it holds the node's private host key). Both are plain renames inside the
root, atomic on one file system. Any other POST, or a MAC without a local script, gets 404.

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

_DONE = re.compile(r"^/done/([0-9a-f]{2}(?:-[0-9a-f]{2}){5})$")


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
    p.add_argument("--bind", required=True)
    p.add_argument("--port", type=int, required=True)
    a = p.parse_args(argv)
    handler = functools.partial(Handler, directory=str(a.root))
    server = ThreadingHTTPServer((a.bind, a.port), handler)
    sys.stderr.write(f"serving {a.root} on {a.bind}:{server.server_address[1]}\n")
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
