"""What the mirror and outside-world hosts serve: a signed flat apt repo, a registry, a file store.

On-host layout (bind-mounted from /var/lib/gpufleet/lab/srv/<host>/ as /srv/gpufleet):
  apt/       flat repo: *.deb, Packages(.gz), Release, InRelease, Release.gpg  → http://HOST/apt/  (suite `/`)
  files/     models/<name>/<revision>/…, wheels/…                             → http://HOST/files/
  registry/  docker-registry storage (filesystem driver)                       → HOST:5000 (plain HTTP)

`seed_repo()` is the one function that fills a host; the air-gap bundle import can replace it.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable
from email.utils import formatdate
from pathlib import Path

from infra.lab.sh import run

log = logging.getLogger("gpufleet.lab")

KEY_UID = "gpufleet lab repository key for {host} (SIMULATED lab, not for production)"


def _gpg(home: Path, *args: str | Path, timeout: float = 60) -> str:
    return run(["gpg", "--batch", "--no-tty", "--homedir", home, *args], timeout=timeout).stdout


def stop_agent(home: Path) -> None:
    """Stop the gpg-agent gpg starts per home directory: it outlives us (`lab down` leaves no process)."""
    if home.is_dir():
        run(["gpgconf", "--homedir", home, "--kill", "all"], timeout=30, check=False)


def ensure_signing_key(home: Path, host: str, keyring: Path) -> str:
    """A per-host ed25519 signing key (created once, kept across `down`); export its public keyring."""
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    home.chmod(0o700)
    listing = _gpg(home, "--with-colons", "--list-secret-keys")
    if "fpr:" not in listing:
        _gpg(home, "--pinentry-mode", "loopback", "--passphrase", "", "--quick-gen-key",
             KEY_UID.format(host=host), "ed25519", "sign", "never")
        listing = _gpg(home, "--with-colons", "--list-secret-keys")
    fpr = next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:"))
    keyring.parent.mkdir(parents=True, exist_ok=True)
    # Binary keyring (what apt's signed-by expects for *.gpg); via gpg --export to bytes.
    data = _export_bytes(home, fpr)
    if not keyring.exists() or keyring.read_bytes() != data:
        keyring.write_bytes(data)
    keyring.chmod(0o644)
    return fpr


def _export_bytes(home: Path, fpr: str) -> bytes:
    import subprocess

    return subprocess.run(["gpg", "--batch", "--homedir", str(home), "--export", fpr], capture_output=True,
                          timeout=30, check=True).stdout


def release_text(apt_dir: Path, origin: str, date: float | None = None, files: dict[str, bytes] | None = None) -> str:
    """Release of a flat repository: checksums of the index files (given, or read from `apt_dir`)."""
    if files is None:
        files = {f: (apt_dir / f).read_bytes() for f in ("Packages", "Packages.gz") if (apt_dir / f).exists()}
    lines = [f"Origin: {origin}", f"Label: {origin}", "Suite: lab", "Codename: lab", "Architectures: amd64 all",
             f"Date: {formatdate(date if date is not None else time.time(), usegmt=True)}",
             f"Description: gpufleet lab repository on {origin} (SIMULATED NVIDIA stand-ins + Debian packages)"]
    for field, algo in (("MD5Sum", "md5"), ("SHA256", "sha256")):
        lines.append(f"{field}:")
        for f, data in files.items():
            lines.append(f" {hashlib.new(algo, data).hexdigest()} {len(data)} {f}")
    return "\n".join(lines) + "\n"


def _same(src: Path, dst: Path) -> bool:
    """Same file (hard link) or an identical copy (copy2 keeps size and mtime)."""
    if os.path.samefile(src, dst):
        return True
    a, b = src.stat(), dst.stat()
    return (a.st_size, int(a.st_mtime)) == (b.st_size, int(b.st_mtime))


def _scan(srv: Path, wanted: dict[str, Path], scan_cache: Path | None) -> str:
    """`dpkg-scanpackages --multiversion` over exactly the wanted files (in a staging dir of hard links).

    The index depends only on the .debs, so hosts seeded from the same files share one scan.
    """
    scan_key = hashlib.sha256(json.dumps(sorted(str(p) for p in wanted.values())).encode()).hexdigest()[:16]
    cached = scan_cache / f"Packages-{scan_key}" if scan_cache else None
    if cached and cached.exists():
        return cached.read_text(encoding="utf-8")
    staging = srv / ".apt-staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        for name, src in wanted.items():
            _link_or_copy(src, staging / name)
        packages = run(["dpkg-scanpackages", "--multiversion", "."], cwd=staging, timeout=600).stdout
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if cached:
        cached.parent.mkdir(parents=True, exist_ok=True)
        for old in cached.parent.glob("Packages-*"):
            old.unlink()
        cached.write_text(packages, encoding="utf-8")
    return packages


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def seed_repo(host: str, srv: Path, debs: Iterable[Path], gnupg_home: Path, keyring: Path,
              files_src: Path | None = None, scan_cache: Path | None = None) -> bool:
    """Fill a serving host's /srv/gpufleet: apt repo of `debs` signed with its key, files, registry dir.

    Idempotent: a stamp of the inputs skips the rescan when nothing changed. Returns True if it
    (re)built the repository.
    """
    try:
        return _seed(host, srv, debs, gnupg_home, keyring, files_src, scan_cache)
    finally:
        stop_agent(gnupg_home)


def _seed(host: str, srv: Path, debs: Iterable[Path], gnupg_home: Path, keyring: Path,
          files_src: Path | None, scan_cache: Path | None) -> bool:
    fpr = ensure_signing_key(gnupg_home, host, keyring)
    apt = srv / "apt"
    for sub in ("apt", "files/models", "files/wheels", "registry"):
        (srv / sub).mkdir(parents=True, exist_ok=True)
    if files_src and files_src.is_dir():
        run(["cp", "-a", "--no-preserve=ownership", f"{files_src}/.", srv / "files"], timeout=300)
    wanted = {p.name: p for p in debs}
    # Source paths carry the cache keys, so rebuilt stand-ins with unchanged file names still re-seed.
    stamp = hashlib.sha256(json.dumps([fpr, sorted(str(p) for p in wanted.values())]).encode()).hexdigest()
    stamp_file = apt / ".gpufleet-seed"
    if stamp_file.exists() and (apt / "InRelease").exists():
        recorded = stamp_file.read_text().split()
        current = hashlib.sha256((apt / "InRelease").read_bytes()).hexdigest()
        if len(recorded) == 2 and recorded[1] != current:
            # Someone else published this repo since (e.g. `gpufleet bundle import`): theirs now.
            log.info("%s: apt repo republished by another tool; lab seeding leaves it alone", host)
            return False
        if recorded and recorded[0] == stamp:
            return False
    # Republish so that a client never sees an index without its files: add and replace packages
    # first (each replacement an atomic rename), switch the index files by rename, and only then
    # remove packages that are no longer wanted. (Roles saw a failed apt run during a re-seed.)
    for name, src in wanted.items():
        dst = apt / name
        if not dst.exists() or not _same(src, dst):
            tmp = apt / f".{name}.tmp"
            tmp.unlink(missing_ok=True)
            _link_or_copy(src, tmp)
            os.replace(tmp, dst)
    packages = _scan(srv, wanted, scan_cache)
    staged = {
        "Packages.gz": gzip.compress(packages.encode(), mtime=0),
        "Packages": packages.encode(),
    }
    for name, data in staged.items():
        (apt / f".{name}.tmp").write_bytes(data)
    release = release_text(apt, host, files={n: staged[n] for n in ("Packages", "Packages.gz")}).encode()
    (apt / ".Release.tmp").write_bytes(release)
    for out, args in ((".InRelease.tmp", ["--clearsign"]), (".Release.gpg.tmp", ["-abs"])):
        (apt / out).unlink(missing_ok=True)
        _gpg(gnupg_home, "--pinentry-mode", "loopback", "--passphrase", "", "--local-user", fpr, *args,
             "-o", apt / out, apt / ".Release.tmp")
    for name in ("Packages.gz", "Packages", "Release.gpg", "Release", "InRelease"):
        os.replace(apt / f".{name}.tmp", apt / name)
    for old in apt.glob("*.deb"):
        if old.name not in wanted:
            old.unlink()
    stamp_file.write_text(f"{stamp} {hashlib.sha256((apt / 'InRelease').read_bytes()).hexdigest()}\n")
    return True
