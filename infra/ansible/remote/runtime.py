"""The execution runtime on an execution host: fetch, install and check the locked release.

What a release holds is `infra.plan.execruntime`: the exact wheels of ansible-core, ansible-runner, Mitogen and
their dependencies that `uv.lock` pins for the execution host's platform (CPython 3.11, manylinux x86_64),
plus the job supervisor `gpufleet-worker` (`worker.py`). The stack's lock (`gpufleet lock`) records each file
with its sha256, the bundle carries them to an air-gapped segment and its mirror serves them under
`/files/gpufleet-exec/`. `install` runs the stdlib installer (`install.py`) on the execution host, which
fetches the files from the segment's mirror, checks every one against the lock's size and sha256, and unpacks
them into `<runtime_dir>/releases/<id>/` (`id`: a digest of the files' names and hashes). The controller sends
only that small installer and the lock's list; the runtime's bytes come from the mirror.

Explicit fallback, for a connected segment without a mirror only: `stream=True` sends the same files (fetched
on the controller by `fetch`, checked against the same sha256) as a tar stream over the SSH connection.

The roles are part of the release: the collection tar (`execruntime.collection_bytes`, a digest of the
checkout's roles, plugins and playbooks) is one of its locked files, unpacked into `<release>/collections/`,
and jobs run from there (`job.py`). The release id covers it, so roles the lock does not record are refused
before any job starts (`commands/exechost.py`), and a job never carries a roles tree.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath
from typing import Any

from infra import ssh
from infra.ansible.remote import install as installer
from infra.model.site import Site
from infra.plan.execruntime import MIRROR_DIR, RuntimeFile, RuntimeSpec, own_file_bytes, spec
from infra.ssh import SshSettings

WORKER = "gpufleet-worker"
REMOTE_PYTHON = installer.REMOTE_PYTHON
EXIT_PLATFORM = installer.EXIT_PLATFORM
EXIT_MISMATCH = installer.EXIT_MISMATCH
_PROJECT = Path(__file__).resolve().parents[3]
_SOURCE = Path(installer.__file__).read_text(encoding="utf-8")


class RuntimeInstallError(Exception):
    """The runtime could not be fetched or installed (the message says why and what to do)."""


def release_dir(runtime_dir: str, runtime_id: str | None = None) -> str:
    """`<runtime_dir>/releases/<id>` on the execution host (the controller's `uv.lock` release by default)."""
    return str(PurePosixPath(runtime_dir) / "releases" / (runtime_id or spec().runtime_id))


def mirror_base(site: Site, segment: str) -> str | None:
    """`http://<mirror>:<port>/files/gpufleet-exec/` of the segment's mirror, or None without one."""
    seg = site.segment(segment)
    mirror = site.mirror(seg.mirror) if seg is not None and seg.mirror else None
    if mirror is None:
        return None
    host = str(mirror.address)
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{mirror.http_port}/{MIRROR_DIR}/"


def _sha(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return path.stat().st_size, h.hexdigest()


def fetch(out_dir: Path, release: RuntimeSpec, stores: tuple[Path, ...] = ()) -> Path:
    """Put every file of `release` into `out_dir` (kept when already there with the right bytes); returns it.

    Looked for in `stores` (trees in the mirror layout, e.g. a bundle or an `--artifacts` dir), then at the
    file's locked source (the registry URL `uv.lock` names; the checkout for the supervisor and roles). Every file is
    checked against its sha256 and size.

    Raises:
        RuntimeInstallError: a file is unreachable or has other bytes.

    """
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in release.files:
        dest = out_dir / f.filename
        if dest.is_file() and _sha(dest) == (f.size, f.sha256):
            continue
        tmp = dest.with_name(dest.name + ".part")
        local = [s / f.path for s in stores if (s / f.path).is_file()]
        try:
            own = None if local else own_file_bytes(f, _PROJECT)
            if local:
                shutil.copyfile(local[0], tmp)
            elif own is not None:  # the supervisor or the roles: made from this checkout
                tmp.write_bytes(own)
            elif f.source.startswith(("https://", "http://")):
                with urllib.request.urlopen(f.source, timeout=60) as resp, tmp.open("wb") as out:
                    shutil.copyfileobj(resp, out)
            else:
                raise RuntimeInstallError(f"{f.filename}: no copy in {', '.join(map(str, stores)) or 'no store'}")
        except (urllib.error.URLError, OSError) as exc:
            tmp.unlink(missing_ok=True)
            raise RuntimeInstallError(f"{f.filename}: cannot fetch {f.source}: {exc}") from None
        if _sha(tmp) != (f.size, f.sha256):
            got = _sha(tmp)
            tmp.unlink()
            raise RuntimeInstallError(f"{f.filename}: sha256 {got[1]}, the lock says {f.sha256}")
        tmp.replace(dest)
    return out_dir


def install_spec(runtime_dir: str, release: RuntimeSpec, base: str | None) -> dict[str, Any]:
    """What the installer on the execution host gets: the release as locked, where it goes, where it comes from."""
    return {
        "release": release_dir(runtime_dir, release.runtime_id),
        "jobs": str(PurePosixPath(runtime_dir) / "jobs"),
        "base": base,
        "runtime": release.as_dict(),
    }


def install_command(runtime_dir: str, release: RuntimeSpec, base: str | None) -> str:
    """The remote shell command: the stdlib installer under the host's python3, every word quoted."""
    payload = json.dumps(install_spec(runtime_dir, release, base), sort_keys=True)
    return ssh.shell_command(REMOTE_PYTHON, "-c", _SOURCE, payload)


def stream(files_dir: Path, release: RuntimeSpec) -> bytes:
    """The release's files as an uncompressed tar (the fallback's stdin; wheels are compressed already)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for f in release.files:
            tar.add(files_dir / f.filename, arcname=f.filename)
    return buf.getvalue()


def install(
    settings: SshSettings,
    host: str,
    *,
    user: str,
    runtime_dir: str,
    release: RuntimeSpec,
    base: str | None,
    files_dir: Path | None = None,
) -> str:
    """Install `release` on an execution host; returns the release directory.

    With `base` (the segment mirror's URL) the host fetches every file from its mirror; without, the files in
    `files_dir` are streamed over the connection (the connected-segment fallback). Either way the host checks
    each file's sha256 against `release` before unpacking anything.

    Raises:
        RuntimeInstallError: wrong Python/glibc on the host, a file missing or with other bytes, unpack failed.
        infra.ssh.SshError: SSH itself failed (pinned key refused, unreachable, timeout).

    """
    if base is None and files_dir is None:
        raise RuntimeInstallError(f"{host}: neither a mirror to fetch from nor files to stream")
    data = b"" if base is not None else stream(files_dir or Path(), release)
    p = ssh.run(
        ssh.argv(settings, host, install_command(runtime_dir, release, base), user=user),
        host=host,
        stdin=data,
        timeout=600,
    )
    err = p.stderr.decode(errors="replace").strip()
    if p.returncode == EXIT_PLATFORM:
        raise RuntimeInstallError(
            f"{host}: {err}; install Python {release.python} as {REMOTE_PYTHON} there or run this segment with "
            "`execution: {host: local}`"
        )
    if p.returncode != 0:
        raise RuntimeInstallError(f"{host}: installing runtime {release.runtime_id} failed: {err[-500:]}")
    return release_dir(runtime_dir, release.runtime_id)


def read_installed(settings: SshSettings, host: str, *, user: str, runtime_dir: str, runtime_id: str) -> Any:
    """The `runtime.json` of release `runtime_id` on the host (None when that release is not installed)."""
    marker = f"{release_dir(runtime_dir, runtime_id)}/runtime.json"
    p = ssh.run(
        ssh.argv(settings, host, f"cat {ssh.shell_command(marker)} 2>/dev/null || true", user=user),
        host=host,
        timeout=60,
    )
    try:
        return json.loads(p.stdout) if p.stdout.strip() else None
    except ValueError:
        return {"unreadable": p.stdout[:200].decode(errors="replace")}


def mismatch(installed: Any, release: RuntimeSpec) -> str | None:
    """Why an installed release's record is not `release` (None when it is exactly that release)."""
    if installed is None:
        return f"runtime {release.runtime_id} is not installed"
    if installed != release.as_dict():
        return f"release {release.runtime_id} there does not record the lock's files and sha256s"
    return None


__all__ = [
    "EXIT_MISMATCH",
    "EXIT_PLATFORM",
    "RuntimeFile",
    "RuntimeInstallError",
    "RuntimeSpec",
    "fetch",
    "install",
    "install_command",
    "mirror_base",
    "mismatch",
    "read_installed",
    "release_dir",
    "spec",
]
