"""The execution host's installer of the runtime (stdlib only; runs under the host's /usr/bin/python3).

`gpufleet exec-host install` runs this file's source on the execution host (`python3 -c SOURCE SPEC_JSON`).
SPEC_JSON is the release as the stack's lock has it (`runtime.json`: every file with its sha256 and size),
the release directory, and where the files come from: `base`, the segment mirror's URL
(`http://<mirror>/files/gpufleet-exec/`), or, when `base` is null, a tar stream on stdin (the explicit
fallback of a connected segment without a mirror). Every file is checked against the lock's size and
sha256 before anything of it is unpacked; a mismatch installs nothing. Wheels are unpacked the way an
installer lays them out (PEP 427: the archive root and `*.data/{purelib,platlib}` into `site/`,
console scripts as launchers into `bin/`), the supervisor becomes `bin/gpufleet-worker`, the roles'
collection tar is unpacked into `collections/ansible_collections/<namespace>/<name>/`, and the release
appears by one rename, with `runtime.json` written last inside it, so a release directory that exists
is complete.
"""

from __future__ import annotations

import configparser
import hashlib
import json
import os
import platform
import shutil
import sys
import tarfile
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

EXIT_PLATFORM = 96  # the host's Python / machine / glibc cannot run this release
EXIT_MISMATCH = 95  # a file is missing or has other bytes than the lock says
REMOTE_PYTHON = "/usr/bin/python3"
# The roles' collection file (`infra.plan.execruntime.COLLECTION_NAME`) and where it is unpacked in a release.
COLLECTION_PREFIX = "gpufleet-collection-"
COLLECTIONS_DIR = "collections"


def _fail(code: int, message: str) -> int:
    sys.stderr.write(f"gpufleet exec-host install: {message}\n")
    return code


def _launcher(module: str, attr: str) -> str:
    parts = attr.split(".")
    return (
        f"#!{REMOTE_PYTHON}\n"
        "# gpufleet execution runtime launcher (written by infra/ansible/remote/install.py)\n"
        "import os, sys\n"
        "sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(__file__))), 'site'))\n"
        f"from {module} import {parts[0]} as _entry\n"
        f"sys.exit(_entry{''.join('.' + a for a in parts[1:])}())\n"
    )


def _safe(name: str) -> PurePosixPath | None:
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        return None
    return p


def unpack_wheel(wheel: Path, release: Path) -> None:
    """Lay one wheel out under `release` (site/ and bin/)."""
    site, bindir = release / "site", release / "bin"
    with zipfile.ZipFile(wheel) as z:
        entry_points = ""
        for info in z.infolist():
            rel = _safe(info.filename)
            if rel is None:
                raise ValueError(f"{wheel.name}: unsafe member {info.filename!r}")
            if info.is_dir():
                continue
            parts = rel.parts
            if parts[0].endswith(".data") and len(parts) > 2:
                if parts[1] in ("purelib", "platlib"):
                    dest = site.joinpath(*parts[2:])
                elif parts[1] == "scripts":
                    dest = bindir.joinpath(*parts[2:])
                else:  # headers, data: nothing a job runs
                    continue
            else:
                dest = site.joinpath(*parts)
            if parts[0].endswith(".dist-info") and parts[-1] == "entry_points.txt":
                entry_points = z.read(info).decode("utf-8")
            dest.parent.mkdir(parents=True, exist_ok=True)
            with z.open(info) as src, dest.open("wb") as out:
                shutil.copyfileobj(src, out)
            mode = (info.external_attr >> 16) & 0o777
            os.chmod(dest, 0o755 if (mode & 0o111 or parts[1:2] == ("scripts",)) else 0o644)
    if entry_points:
        cp = configparser.ConfigParser(interpolation=None, delimiters=("=",))
        cp.optionxform = str  # type: ignore[assignment,method-assign]  # script names are case-sensitive
        cp.read_string(entry_points)
        if cp.has_section("console_scripts"):
            bindir.mkdir(parents=True, exist_ok=True)
            for script, target in cp.items("console_scripts"):
                module, _, attr = target.split("[")[0].strip().partition(":")
                path = bindir / script.strip()
                path.write_text(_launcher(module.strip(), attr.strip()), encoding="utf-8")
                path.chmod(0o755)


def unpack_collection(archive: Path, release: Path) -> None:
    """Unpack the roles' collection tar into `release/collections/` (regular files under `ansible_collections/`).

    Raises:
        ValueError: a member is not a regular file or directory, or its path leaves `ansible_collections/`.

    """
    dest = release / COLLECTIONS_DIR
    with tarfile.open(archive, mode="r:") as tar:
        for member in tar:
            rel = _safe(member.name)
            if rel is None or rel.parts[0] != "ansible_collections" or not (member.isfile() or member.isdir()):
                raise ValueError(f"{archive.name}: unsafe member {member.name!r}")
            if member.isdir():
                continue
            path = dest.joinpath(*rel.parts)
            path.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(member)
            if src is None:
                raise ValueError(f"{archive.name}: unreadable member {member.name!r}")
            with path.open("wb") as out:
                shutil.copyfileobj(src, out)
            os.chmod(path, 0o755 if member.mode & 0o111 else 0o644)


def _digest(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return path.stat().st_size, h.hexdigest()


def _glibc() -> tuple[int, int]:
    try:
        text = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError):
        text = ""
    try:
        major, minor = text.split()[-1].split(".")[:2]
        return int(major), int(minor)
    except (IndexError, ValueError):
        return (0, 0)


def install(spec: dict[str, Any], stdin: Any = None) -> int:
    """Install the release `spec` describes; returns the exit code (0 installed or already there)."""
    release = Path(spec["release"])
    runtime = spec["runtime"]
    have = f"{sys.version_info[0]}.{sys.version_info[1]}"
    if have != runtime["python"]:
        return _fail(EXIT_PLATFORM, f"execution host Python is {have}, the runtime needs {runtime['python']}")
    if platform.machine() != spec.get("machine", "x86_64"):
        return _fail(EXIT_PLATFORM, f"execution host is {platform.machine()}, the runtime's wheels are for x86_64")
    need = tuple(int(x) for x in str(runtime["glibc"]).split("."))
    if need > (0, 0) and _glibc() < need:
        return _fail(EXIT_PLATFORM, f"execution host glibc is {'.'.join(map(str, _glibc()))}, the runtime's wheels "
                     f"need {runtime['glibc']}")
    jobs = Path(spec["jobs"])
    jobs.mkdir(parents=True, exist_ok=True)
    jobs.chmod(0o700)
    marker = release / "runtime.json"
    if marker.is_file():
        try:
            if json.loads(marker.read_text(encoding="utf-8")) == runtime:
                if stdin is not None:
                    shutil.copyfileobj(stdin, open(os.devnull, "wb"))  # noqa: SIM115  # drain the stream
                print("kept")
                return 0
        except ValueError:
            pass
        return _fail(EXIT_MISMATCH, f"{release} exists but its runtime.json is not this release; remove it")
    tmp = release.with_name(release.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    dl = tmp / "download"
    dl.mkdir(parents=True)
    wanted = {f["filename"]: f for f in runtime["files"]}
    if spec.get("base"):
        for name in sorted(wanted):
            url = spec["base"] + name
            try:
                with urllib.request.urlopen(url, timeout=60) as resp, (dl / name).open("wb") as out:
                    shutil.copyfileobj(resp, out)
            except OSError as exc:
                shutil.rmtree(tmp, ignore_errors=True)
                return _fail(EXIT_MISMATCH, f"cannot fetch {url}: {exc}; import the bundle that carries the "
                             "runtime into the segment's mirror")
    else:
        with tarfile.open(fileobj=stdin, mode="r|") as tar:
            for member in tar:
                if member.isfile() and member.name in wanted:
                    src = tar.extractfile(member)
                    if src is not None:
                        with (dl / member.name).open("wb") as out:
                            shutil.copyfileobj(src, out)
    # Every byte checked before any of it is unpacked.
    for name, f in sorted(wanted.items()):
        path = dl / name
        if not path.is_file():
            shutil.rmtree(tmp, ignore_errors=True)
            return _fail(EXIT_MISMATCH, f"{name}: not received")
        size, sha = _digest(path)
        if (size, sha) != (f["size"], f["sha256"]):
            shutil.rmtree(tmp, ignore_errors=True)
            return _fail(EXIT_MISMATCH, f"{name}: sha256 {sha} ({size} bytes), the lock says {f['sha256']} "
                         f"({f['size']} bytes); nothing installed")
    for name in sorted(wanted):
        if name.endswith(".whl"):
            unpack_wheel(dl / name, tmp)
        elif name.startswith(COLLECTION_PREFIX) and name.endswith(".tar"):
            try:
                unpack_collection(dl / name, tmp)
            except ValueError as exc:
                shutil.rmtree(tmp, ignore_errors=True)
                return _fail(EXIT_MISMATCH, f"{exc}; nothing installed")
        else:
            worker = tmp / "bin" / "gpufleet-worker"
            worker.parent.mkdir(parents=True, exist_ok=True)
            worker.write_bytes(f"#!{REMOTE_PYTHON}\n".encode() + (dl / name).read_bytes())
            worker.chmod(0o755)
    shutil.rmtree(dl)
    (tmp / "runtime.json").write_text(json.dumps(runtime, indent=1, sort_keys=True), encoding="utf-8")
    release.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(release)
    print("installed")
    return 0


def main(argv: list[str]) -> int:
    """`python3 -c SOURCE SPEC_JSON` (stdin: the files as a tar stream when the spec names no mirror)."""
    if len(argv) != 1:
        return _fail(2, "usage: install SPEC_JSON")
    spec = json.loads(argv[0])
    return install(spec, None if spec.get("base") else sys.stdin.buffer)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
