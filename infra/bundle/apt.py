"""Resolve and download OS packages with apt in a private root (never the controller's own apt state).

`apt-get -o Dir=ROOT -o Dir::Etc::sourcelist=…` reads only the sources we write, with `signed-by`
keyrings, so what is resolved is exactly what the configured sources serve, verified by their keys.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from infra.model.site import AptSource

APT_TIMEOUT_S = 600  # apt has no overall timeout of its own (a dead mirror hung a run for 10+ minutes)
_INST = re.compile(r"^Inst (\S+) (?:\[\S+\] )?\((\S+) ")
_URI = re.compile(r"^'([^']+)' (\S+) (\d+) ")


class AptError(Exception):
    """apt could not resolve or fetch what was asked; the message carries apt's own words."""


@dataclass(frozen=True, order=True)
class DebFile:
    """One resolved .deb: identity, where apt fetches it from, and its size and sha256 from the index."""

    name: str
    version: str
    arch: str
    filename: str
    url: str
    size: int
    sha256: str


def source_line(src: AptSource) -> str:
    """One-line `deb` entry with `signed-by` (flat repositories have suite `/` and no components)."""
    comps = " ".join(src.components)
    return f"deb [signed-by={src.keyring}] {src.url} {src.suite}{(' ' + comps) if comps else ''}".rstrip()


class AptRoot:
    """A private apt root with given sources and an optional dpkg status as the installed baseline."""

    def __init__(self, root: Path, sources: Sequence[AptSource], dpkg_status: Path | None = None,
                 arch: str = "amd64") -> None:
        self.root = root
        for d in ("etc/apt/preferences.d", "etc/apt/apt.conf.d", "etc/apt/trusted.gpg.d",
                  "var/lib/apt/lists/partial", "var/cache/apt/archives/partial", "var/lib/dpkg"):
            (root / d).mkdir(parents=True, exist_ok=True)
        (root / "etc/apt/sources.list").write_text("".join(source_line(s) + "\n" for s in sources))
        status = root / "var/lib/dpkg/status"
        if dpkg_status is not None:
            shutil.copyfile(dpkg_status, status)
        elif not status.exists():
            # Empty status = nothing installed: the closure is complete down to libc.
            status.write_text("")
        self.options = [
            f"-oDir={root}",
            f"-oDir::State::status={status}",
            f"-oDir::Etc::sourcelist={root / 'etc/apt/sources.list'}",
            "-oDir::Etc::sourceparts=-",
            f"-oDir::Etc::trustedparts={root / 'etc/apt/trusted.gpg.d'}",
            "-oDebug::NoLocking=1",
            f"-oAPT::Architecture={arch}",
            f"-oAPT::Architectures::={arch}",
            # Roles install without recommends; a lock with recommends would carry packages nobody uses.
            "-oAPT::Install-Recommends=false",
            "-oAcquire::Retries=2",
            "-oAcquire::http::Timeout=20",
        ]

    def _run(self, tool: str, *args: str, cwd: Path | None = None) -> str:
        cmd = [tool, *self.options, *args]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=APT_TIMEOUT_S, cwd=cwd,
                                  check=False, env={"LC_ALL": "C", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
        except subprocess.TimeoutExpired:
            raise AptError(f"{tool} {' '.join(args[:3])}… timed out after {APT_TIMEOUT_S}s") from None
        except FileNotFoundError:
            raise AptError(f"{tool} not found: gpufleet lock/bundle need apt (Debian/Ubuntu controller)") from None
        if proc.returncode != 0:
            raise AptError(f"{tool} {' '.join(args)} failed:\n{proc.stderr.strip() or proc.stdout.strip()}")
        return proc.stdout

    def update(self) -> None:
        """Fetch the sources' indexes (signature-checked against their `signed-by` keyrings)."""
        out = self._run("apt-get", "-q", "update")
        if "W: " in out or "Err:" in out:
            raise AptError(f"apt-get update reported problems:\n{out}")

    def closure(self, wanted: Sequence[str]) -> list[DebFile]:
        """Every package (with dependencies) apt would install for `name[=version]` specs."""
        if not wanted:
            return []
        sim = self._run("apt-get", "-s", "-y", "-q", "install", *wanted)
        insts = [(m.group(1), m.group(2)) for line in sim.splitlines() if (m := _INST.match(line))]
        uris = self._run("apt-get", "-y", "-qq", "--print-uris", "install", *wanted)
        by_file = {m.group(2): m.group(1) for line in uris.splitlines() if (m := _URI.match(line))}
        info = self._show([f"{n}={v}" for n, v in insts])
        out = []
        for name, version in insts:
            rec = info.get((name, version))
            if rec is None:
                raise AptError(f"apt-cache show has no record of {name} {version}")
            filename = rec["Filename"].rsplit("/", 1)[-1]
            # print-uris escapes the epoch in its file names and '+' in URLs: match the unquoted URL tail.
            url = next((u for u in by_file.values() if unquote(u.rsplit("/", 1)[-1]) == filename), "")
            if not url:
                raise AptError(f"apt gave no download URL for {name} {version} ({filename})")
            out.append(DebFile(name, version, rec.get("Architecture", "all"), filename, url,
                               int(rec["Size"]), rec["SHA256"]))
        return sorted(out)

    def _show(self, specs: Sequence[str]) -> dict[tuple[str, str], dict[str, str]]:
        text = self._run("apt-cache", "show", "--no-all-versions", *specs) if specs else ""
        out: dict[tuple[str, str], dict[str, str]] = {}
        for para in text.split("\n\n"):
            rec: dict[str, str] = {}
            for line in para.splitlines():
                if line and not line[0].isspace() and ":" in line:
                    k, _, v = line.partition(":")
                    rec[k] = v.strip()
            if "Package" in rec and "Version" in rec:
                out.setdefault((rec["Package"], rec["Version"]), rec)
        return out

    def download(self, specs: Sequence[str], dest: Path) -> None:
        """`apt-get download` exact `name=version` specs into `dest` (apt checks hashes on the way)."""
        dest.mkdir(parents=True, exist_ok=True)
        if specs:
            self._run("apt-get", "-q", "download", *specs, cwd=dest)
        # apt-get download writes the epoch as `%3a`; bundles use the pool file name (no epoch).
        for f in dest.glob("*%3a*.deb"):
            f.rename(f.with_name(re.sub(r"_\d+%3a", "_", f.name)))
