"""The SSH publisher: a mirror host reached with the stack's `controller.ssh_config`.

Every remote step is one `ssh` call running a short, fixed script (nothing user-supplied is put in
a command string); files travel as one tar stream; images go controller → registry with skopeo.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from infra import ssh
from infra.bundle.build import image_tag
from infra.bundle.publish import index_covers, merge_packages, release_text
from infra.model.site import Mirror, Site
from infra.ssh import SshSettings

MIRROR_ROOT = "/srv/gpufleet"  # the `mirror` role's `mirror_root` default; the lab bind-mounts the same path
SSH_TIMEOUT_S = 900

# Hashes are cached on the mirror by (size, mtime_ns): a no-op import of a large mirror must not
# re-read every model file. A file rewritten in place changes its mtime, so the cache cannot go stale.
_LIST = r'''
import hashlib, json, os, sys
root = sys.argv[1]
cache_path = os.path.join(root, ".gpufleet-hashes.json")
try:
    with open(cache_path) as fh:
        cache = json.load(fh)
except (OSError, ValueError):
    cache = {}
out, new_cache = {}, {}
for area in ("apt", "files"):
    base = os.path.join(root, area)
    for d, _, fs in os.walk(base):
        for f in fs:
            p = os.path.join(d, f)
            rel = os.path.relpath(p, root)
            if area == "apt" and not f.endswith(".deb"):
                continue
            st = os.stat(p)
            hit = cache.get(rel)
            if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
                digest = hit[2]
            else:
                h = hashlib.sha256()
                with open(p, "rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 22), b""):
                        h.update(chunk)
                digest = h.hexdigest()
            new_cache[rel] = [st.st_size, st.st_mtime_ns, digest]
            out[rel] = [st.st_size, digest]
if new_cache != cache and os.path.isdir(root):
    tmp = cache_path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(new_cache, fh)
    os.replace(tmp, cache_path)
json.dump(out, sys.stdout)
'''

_HAS_IMAGE = r'''
import sys, urllib.request
port, repo, digest = sys.argv[1:4]
accept = ("application/vnd.oci.image.manifest.v1+json, "
          "application/vnd.docker.distribution.manifest.v2+json")
req = urllib.request.Request(f"http://127.0.0.1:{port}/v2/{repo}/manifests/{digest}", method="HEAD",
                             headers={"Accept": accept})
try:
    urllib.request.urlopen(req, timeout=10)
    print("yes")
except Exception:
    print("no")
'''

_APT_STATE = r'''
import json, os, sys
apt = os.path.join(sys.argv[1], "apt")
def read(name):
    try:
        with open(os.path.join(apt, name), encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""
debs = sorted(f for f in os.listdir(apt) if f.endswith(".deb")) if os.path.isdir(apt) else []
json.dump({"packages": read("Packages"), "release": read("Release").split("\nMD5Sum:")[0],
           "signed": bool(read("InRelease")), "debs": debs}, sys.stdout)
'''

_CATALOG = r'''
import json, sys, urllib.request
port = sys.argv[1]
def get(path):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        return json.load(r)
out = {}
try:
    for repo in get("/v2/_catalog").get("repositories") or []:
        out[repo] = get(f"/v2/{repo}/tags/list").get("tags") or []
    json.dump({"ok": True, "repos": out}, sys.stdout)
except Exception as exc:
    json.dump({"ok": False, "error": str(exc), "repos": out}, sys.stdout)
'''


# Receive a tar on stdin into a staging dir next to the served tree, then rename file by file
# (same file system: each file appears whole). On any failure the staging dir is removed.
_RECEIVE = r'''set -eu
root="$1"
mkdir -p "$root/.incoming"
stage=$(mktemp -d "$root/.incoming/import.XXXXXX")
trap 'rm -rf "$stage"' EXIT
tar -C "$stage" --no-same-owner -xf -
cd "$stage"
find . -type f -exec sh -c 'for f; do mkdir -p "$0/${f%/*}"; chmod 0644 "$f"; mv -f "$f" "$0/$f"; done' "$root" {} +
chmod -R a+rX "$root/apt" "$root/files" 2>/dev/null || true
'''


class _HashingReader:
    """A file wrapper that hashes what tarfile reads from it."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self._h = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._h.update(data)
        return data

    def hexdigest(self) -> str:
        return self._h.hexdigest()


class RemoteError(Exception):
    """An SSH step on the mirror failed."""


@dataclass
class SshMirror:
    """A mirror host over SSH (StrictHostKeyChecking via the stack's ssh_config/known_hosts)."""

    mirror: Mirror
    ssh_config: str | None
    known_hosts: str | None = None
    root: str = MIRROR_ROOT

    @classmethod
    def for_site(cls, site: Site, mirror_name: str, root: str = MIRROR_ROOT) -> SshMirror:
        """The named mirror of a site; KeyError listing known mirrors otherwise."""
        for m in site.mirrors:
            if m.name == mirror_name:
                return cls(m, site.controller.ssh_config, site.controller.known_hosts, root)
        raise KeyError(f"no mirror {mirror_name!r} in site {site.name!r}; known: "
                       + (", ".join(m.name for m in site.mirrors) or "none"))

    def _ssh(self) -> list[str]:
        """`ssh … [-l root] -- HOST` (infra.ssh.argv); the remote command string is appended by the caller."""
        # Lab and real ssh configs name hosts by mirror name (user from the config); else root@address.
        settings = SshSettings(self.ssh_config, self.known_hosts)
        if self.ssh_config:
            return ssh.argv(settings, self.mirror.name)
        return ssh.argv(settings, str(self.mirror.address), user="root")

    def run(self, script: str, *args: str, stdin: bytes | None = None, python: bool = False) -> bytes:
        """Run a fixed shell (or python3) script on the mirror with quoted arguments."""
        if python:
            remote = "python3 -c " + ssh.shell_command(script, *args)
        else:
            remote = "sh -c " + ssh.shell_command(script, "sh", *args)
        try:
            proc = ssh.run([*self._ssh(), remote], host=self.mirror.name, stdin=stdin, timeout=SSH_TIMEOUT_S)
        except ssh.SshError as exc:
            raise RemoteError(f"{self.mirror.name}: remote step failed ({exc.kind}): {exc.detail}") from None
        if proc.returncode != 0:
            raise RemoteError(f"{self.mirror.name}: remote step failed (exit {proc.returncode}): "
                              f"{proc.stderr.decode(errors='replace').strip()[-800:]}")
        return proc.stdout

    # ---------------------------------------------------------------- Publisher

    def list_files(self) -> dict[str, tuple[int, str]]:
        """What the mirror's apt/ and files/ hold."""
        data = json.loads(self.run(_LIST, self.root, python=True) or b"{}")
        return {k: (int(v[0]), str(v[1])) for k, v in data.items()}

    def put_files(self, root: Path, rels: list[str], expected: dict[str, str]) -> None:
        """Stream the files as one tar into a staging dir on the mirror, then rename each into place.

        Each file is hashed again while it streams and must still match the verified manifest (a
        bundle changed between verify and upload aborts the stream); the mirror only moves files into
        the served tree after the whole stream arrived, so an abort leaves nothing half-published.
        """
        with tempfile.TemporaryFile() as err:
            proc = subprocess.Popen([*self._ssh(), "sh -c " + ssh.shell_command(_RECEIVE, "sh", self.root)],
                                    stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err)
            assert proc.stdin is not None
            try:
                with tarfile.open(fileobj=proc.stdin, mode="w|") as tar:
                    for rel in rels:
                        info = tar.gettarinfo(str(root / rel), arcname=rel)
                        info.uid = info.gid = 0
                        info.uname = info.gname = "root"
                        info.mode = 0o644
                        with (root / rel).open("rb") as f:
                            reader = _HashingReader(f)
                            tar.addfile(info, reader)
                        if reader.hexdigest() != expected[rel]:
                            raise RemoteError(f"{rel}: changed since it was verified; upload aborted, "
                                              "nothing published")
            except BaseException:
                proc.kill()
                proc.wait()
                raise
            proc.stdin.close()
            rc = proc.wait(timeout=SSH_TIMEOUT_S)
            if rc != 0:
                err.seek(0)
                raise RemoteError(f"{self.mirror.name}: upload failed (exit {rc}): "
                                  f"{err.read().decode(errors='replace').strip()[-800:]}")

    def reindex_apt(self, debs: dict[str, str], scan: Callable[[], bytes],
                    sign: Callable[[bytes], tuple[bytes, bytes]]) -> bool:
        """Merge the bundle's stanzas with the mirror's index; re-sign only when the index changed."""
        state = json.loads(self.run(_APT_STATE, self.root, python=True))
        current = state["packages"].encode()
        if state["signed"] and index_covers(current, set(state["debs"]), debs):
            return False  # nothing to add or drop: skip the scan (minutes on a large bundle)
        packages = merge_packages(current, set(state["debs"]), scan())
        if packages == current and state["signed"]:
            return False
        gz = gzip.compress(packages, mtime=0)
        fields = dict(line.split(": ", 1) for line in state["release"].splitlines() if ": " in line)
        release = release_text({"Packages": packages, "Packages.gz": gz}, fields)
        inrelease, detached = sign(release)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for name, data in (("Packages", packages), ("Packages.gz", gz), ("Release", release),
                               ("InRelease", inrelease), ("Release.gpg", detached)):
                info = tarfile.TarInfo(f"apt/{name}")
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
        self.run('tar -C "$1" --no-same-owner -xf -', self.root, stdin=buf.getvalue())
        return True

    def has_image(self, repo: str, digest: str) -> bool:
        """The registry (asked on the mirror itself) serves `repo@digest`."""
        out = self.run(_HAS_IMAGE, str(self.mirror.registry_port), repo, digest, python=True)
        return out.strip() == b"yes"

    def put_image(self, layout: Path, repo: str, digest: str) -> None:
        """Skopeo copy oci:… docker://mirror:port/repo:<digest-tag>, digests preserved."""
        dest = f"docker://{self.mirror.address}:{self.mirror.registry_port}/{repo}:{image_tag(digest)}"
        proc = subprocess.run(["skopeo", "copy", "--preserve-digests", "--dest-tls-verify=false", "--quiet",
                               f"oci:{layout}:{image_tag(digest)}", dest],
                              capture_output=True, timeout=1800, check=False)
        if proc.returncode != 0:
            raise RemoteError(f"skopeo copy {repo}@{digest} → {dest} failed: "
                              f"{proc.stderr.decode(errors='replace').strip()}")

    def catalog(self) -> dict[str, object]:
        """Registry repositories and tags, asked on the mirror."""
        result: dict[str, object] = json.loads(self.run(_CATALOG, str(self.mirror.registry_port), python=True))
        return result

    def packages_index(self) -> bytes:
        """The mirror's current apt Packages file (empty if none)."""
        return self.run('cat "$1/apt/Packages" 2>/dev/null; true', self.root)
