"""The SSH publisher: a mirror host reached with the stack's `controller.ssh_config`.

Every remote step is one `ssh` call running a short, fixed script (nothing user-supplied is put in
a command string); files travel as one tar stream; images go controller → registry with skopeo.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from infra import ssh
from infra.bundle.build import image_tag
from infra.bundle.hashing import open_regular
from infra.bundle.publish import ImportRecord, MirrorState
from infra.model.site import Mirror, Site
from infra.ssh import SshSettings

MIRROR_ROOT = "/srv/gpufleet"  # the `mirror` role's `mirror_root` default; the lab bind-mounts the same path
SSH_TIMEOUT_S = 900

# What the mirror serves, in one read-only call: hashes of apt/*.deb and files/** (through the
# `apt`/`files` symlinks of the tree layout, or the folders of a legacy mirror), the apt index state,
# the import record of the served tree and which tree that is.
# Hashes are cached on the mirror by (size, mtime_ns, inode): a no-op import of a large mirror must not
# re-read every model file. Staged files are new inodes written now, so the cache cannot go stale.
_STATE = r'''
import hashlib, json, os, stat, sys
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
            st = os.lstat(p)
            if not stat.S_ISREG(st.st_mode):
                continue
            key = [st.st_size, st.st_mtime_ns, st.st_ino]
            hit = cache.get(rel) if isinstance(cache, dict) else None
            if isinstance(hit, list) and len(hit) == 4 and hit[:3] == key:
                digest = hit[3]
            else:
                h = hashlib.sha256()
                with open(p, "rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 22), b""):
                        h.update(chunk)
                digest = h.hexdigest()
            new_cache[rel] = key + [digest]
            out[rel] = [st.st_size, digest]
if new_cache != cache and os.path.isdir(root):
    tmp = cache_path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(new_cache, fh)
    os.replace(tmp, cache_path)
apt = os.path.join(root, "apt")
def read(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None
cur = os.path.join(root, ".gpufleet", "current")
base = os.readlink(cur) if os.path.islink(cur) else ""
debs = sorted(f for f in os.listdir(apt) if f.endswith(".deb")) if os.path.isdir(apt) else []
json.dump({"files": out, "packages": read(os.path.join(apt, "Packages")) or "",
           "release": (read(os.path.join(apt, "Release")) or "").split("\nMD5Sum:")[0],
           "signed": bool(read(os.path.join(apt, "InRelease"))), "debs": debs,
           "record": read(os.path.join(cur, "import.json")) if base else None, "base": base}, sys.stdout)
'''

# A new tree next to the served one: every served file hard-linked (no copy, same inode), then the
# tar on stdin (new files, index, import record) written as new files and renamed over the links, so
# no byte of the served tree is ever written. Prints the tree's name; removes it on any failure.
_STAGE = r'''
import os, shutil, stat, sys, tarfile, tempfile
root = sys.argv[1]
trees = os.path.join(root, ".gpufleet", "trees")
os.makedirs(trees, mode=0o755, exist_ok=True)
stage = tempfile.mkdtemp(prefix="stage-", dir=trees)
os.chmod(stage, 0o755)
ok = False
try:
    for area in ("apt", "files"):
        src, dst = os.path.join(root, area), os.path.join(stage, area)
        os.mkdir(dst, 0o755)
        if not os.path.isdir(src):
            continue
        for d, dirs, fs in os.walk(src):
            rel = os.path.relpath(d, src)
            target = dst if rel == "." else os.path.join(dst, rel)
            for x in dirs:
                os.mkdir(os.path.join(target, x), 0o755)
            for f in fs:
                p = os.path.join(d, f)
                if not stat.S_ISREG(os.lstat(p).st_mode):
                    continue
                try:
                    os.link(p, os.path.join(target, f))
                except OSError:
                    shutil.copy2(p, os.path.join(target, f))
    complete = False
    with tarfile.open(fileobj=sys.stdin.buffer, mode="r|") as tar:
        for m in tar:
            if m.name == ".gpufleet-end":
                complete = True
                continue
            parts = m.name.split("/")
            if (not m.isreg() or m.name.startswith("/") or any(x in ("", ".", "..") for x in parts)
                    or not (parts[0] in ("apt", "files") and len(parts) > 1 or m.name == "import.json")):
                raise SystemExit("refusing tar member %r" % m.name)
            dest = os.path.join(stage, m.name)
            os.makedirs(os.path.dirname(dest), mode=0o755, exist_ok=True)
            tmp = dest + ".gpufleet-part"
            with tar.extractfile(m) as fin, open(tmp, "xb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 22)
                fout.flush()
                os.fsync(fout.fileno())  # on disk before the switch can serve it
            os.chmod(tmp, 0o644)
            os.replace(tmp, dest)
    if not complete:
        raise SystemExit("the upload stream ended early; nothing staged")
    print(os.path.basename(stage))
    ok = True
finally:
    if not ok:
        shutil.rmtree(stage, ignore_errors=True)
'''

# Serve a staged tree: `.gpufleet/current` is replaced by a symlink to it with one rename(2). A mirror
# still in the old layout (apt/ and files/ real folders) is first moved to the tree layout without
# changing a served byte: its folders are hard-linked into a tree, `current` points there, and each
# folder is swapped for its symlink with renameat2(RENAME_EXCHANGE) (two renames where the kernel
# lacks it). Then older trees are removed and the import record appended to imports.log.
_SWITCH = r'''
import ctypes, fcntl, json, os, re, shutil, stat, sys, tempfile
root, stage, base = sys.argv[1:4]
if not re.fullmatch(r"stage-[A-Za-z0-9_]+", stage):
    raise SystemExit("bad stage name %r" % stage)
g = os.path.join(root, ".gpufleet")
trees = os.path.join(g, "trees")
cur = os.path.join(g, "current")
lock = open(os.path.join(g, "lock"), "a")
fcntl.flock(lock, fcntl.LOCK_EX)
now = os.readlink(cur) if os.path.islink(cur) else ""
if now != base:
    raise SystemExit("the served tree changed since this import read it (another import?); nothing switched")
if not os.path.isdir(os.path.join(trees, stage)):
    raise SystemExit("staged tree %s is gone; nothing switched" % stage)

def point(link, target):
    tmp = link + ".gpufleet-new"
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(target, tmp)
    os.replace(tmp, link)

def exchange(a, b):
    f = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if f is None:
        return False
    return f(-100, a.encode(), -100, b.encode(), 2) == 0  # AT_FDCWD, RENAME_EXCHANGE

legacy = [a for a in ("apt", "files") if not os.path.islink(os.path.join(root, a))]
if legacy:
    zero = tempfile.mkdtemp(prefix="stage-migrate", dir=trees)
    os.chmod(zero, 0o755)
    for area in ("apt", "files"):
        src, dst = os.path.join(root, area), os.path.join(zero, area)
        if os.path.isdir(src) and not os.path.islink(src):
            for d, dirs, fs in os.walk(src):
                rel = os.path.relpath(d, src)
                t = dst if rel == "." else os.path.join(dst, rel)
                os.makedirs(t, 0o755, exist_ok=True)
                for f in fs:
                    p = os.path.join(d, f)
                    if stat.S_ISREG(os.lstat(p).st_mode):
                        os.link(p, os.path.join(t, f))
        os.makedirs(dst, 0o755, exist_ok=True)
    if not now:
        point(cur, "trees/" + os.path.basename(zero))
    for area in legacy:
        path, link = os.path.join(root, area), os.path.join(root, "." + area + ".gpufleet-link")
        if os.path.lexists(link):
            os.unlink(link)
        os.symlink(".gpufleet/current/" + area, link)
        if not os.path.lexists(path):
            os.replace(link, path)
        elif exchange(link, path):
            shutil.rmtree(link)
        else:
            old = os.path.join(root, "." + area + ".gpufleet-old")
            os.rename(path, old)
            os.replace(link, path)
            shutil.rmtree(old)
point(cur, "trees/" + stage)
fd = os.open(g, os.O_RDONLY)
os.fsync(fd)  # the switch itself survives a power cut
os.close(fd)
for t in os.listdir(trees):
    if t != stage:
        shutil.rmtree(os.path.join(trees, t), ignore_errors=True)
try:
    with open(os.path.join(trees, stage, "import.json")) as f:
        rec = f.read().strip()
    with open(os.path.join(g, "imports.log"), "a") as f:
        f.write(rec + "\n")
except OSError:
    pass
'''

_DISCARD = r'''
import os, re, shutil, sys
root, stage = sys.argv[1:3]
cur = os.path.join(root, ".gpufleet", "current")
if re.fullmatch(r"stage-[A-Za-z0-9_]+", stage) and not (os.path.islink(cur) and os.readlink(cur) == "trees/" + stage):
    shutil.rmtree(os.path.join(root, ".gpufleet", "trees", stage), ignore_errors=True)
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

    def state(self) -> MirrorState:
        """What the mirror serves now, read in one SSH call (writes only the hash cache)."""
        try:
            data = json.loads(self.run(_STATE, self.root, python=True) or b"{}")
        except ValueError:
            raise RemoteError(f"{self.mirror.name}: unreadable answer to the state query") from None
        st = MirrorState(files={k: (int(v[0]), str(v[1])) for k, v in data.get("files", {}).items()},
                         packages=str(data.get("packages") or "").encode(),
                         release_fields=dict(line.split(": ", 1) for line in str(data.get("release") or "").splitlines()
                                             if ": " in line),
                         signed=bool(data.get("signed")), debs=set(data.get("debs") or []),
                         base=str(data.get("base") or ""))
        if data.get("record") is not None:
            try:
                st.record = ImportRecord.parse(str(data["record"]))
            except (ValueError, TypeError) as exc:
                st.record_problem = str(exc)[:200]
        return st

    def list_files(self) -> dict[str, tuple[int, str]]:
        """What the mirror's apt/ and files/ hold."""
        return self.state().files

    def stage(self, root: Path, rels: list[str], expected: dict[str, str], generated: dict[str, bytes],
              base: str) -> str:
        """Stream the files as one tar into a new tree next to the served one; returns the tree's name.

        Each file is hashed again while it streams and must still match the verified manifest (a
        bundle changed between verify and upload aborts the stream, and the mirror removes the tree).
        """
        with tempfile.TemporaryFile() as err:
            proc = subprocess.Popen([*self._ssh(), ssh.shell_command("python3", "-c", _STAGE, self.root)],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
            assert proc.stdin is not None and proc.stdout is not None
            try:
                with tarfile.open(fileobj=proc.stdin, mode="w|") as tar:
                    for rel in rels:
                        with os.fdopen(open_regular(root / rel), "rb") as f:
                            info = tar.gettarinfo(arcname=rel, fileobj=f)
                            info.uid = info.gid = 0
                            info.uname = info.gname = "root"
                            info.mode = 0o644
                            reader = _HashingReader(f)
                            tar.addfile(info, reader)
                        if reader.hexdigest() != expected[rel]:
                            raise RemoteError(f"{rel}: changed since it was verified; upload aborted, "
                                              "nothing published")
                    # The end marker: a stream cut at a member boundary must not look complete.
                    for name, data in [*sorted(generated.items()), (".gpufleet-end", b"")]:
                        info = tarfile.TarInfo(name)
                        info.size, info.mode = len(data), 0o644
                        tar.addfile(info, io.BytesIO(data))
                proc.stdin.close()
            except BaseException:
                # End the stream without the marker: the mirror removes its half-made tree itself.
                with contextlib.suppress(OSError):
                    proc.stdin.close()
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                raise
            out = proc.stdout.read()
            rc = proc.wait(timeout=SSH_TIMEOUT_S)
            if rc != 0:
                err.seek(0)
                raise RemoteError(f"{self.mirror.name}: staging failed (exit {rc}): "
                                  f"{err.read().decode(errors='replace').strip()[-800:]}")
        lines = out.decode(errors="replace").strip().splitlines()
        return lines[-1] if lines else ""

    def switch(self, stage: str, base: str) -> None:
        """Serve the staged tree (one rename on the mirror)."""
        self.run(_SWITCH, self.root, stage, base, python=True)

    def discard(self, stage: str) -> None:
        """Remove a staged tree (best effort: a leftover is removed by the next switch)."""
        with contextlib.suppress(RemoteError):
            self.run(_DISCARD, self.root, stage, python=True)

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
