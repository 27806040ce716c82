"""`gpufleet mirror status`: what a mirror serves, compared with the lock of its segments."""

from __future__ import annotations

from typing import Any, Protocol

from infra.bundle.build import image_tag
from infra.bundle.lock import Lock
from infra.model.site import Site


class MirrorView(Protocol):
    """Read-only questions status asks a mirror (SshMirror answers them)."""

    def list_files(self) -> dict[str, tuple[int, str]]:
        """Relative path → (size, sha256)."""

    def packages_index(self) -> bytes:
        """The apt Packages file."""

    def catalog(self) -> dict[str, object]:
        """Registry repositories → tags."""


def mirror_status(site: Site, lock: Lock, view: MirrorView, mirror: str | None = None) -> dict[str, Any]:
    """Counts of what is served and every locked artifact of the mirror's segments it lacks."""
    name = mirror or getattr(getattr(view, "mirror", None), "name", "")
    segments = sorted(s.name for s in site.segments if s.mirror == name)
    files = view.list_files()
    packages = view.packages_index().decode(errors="replace")
    served_debs = {(rec.get("Package"), rec.get("Version")) for rec in _paras(packages)}
    cat = view.catalog()
    repos: dict[str, list[str]] = cat.get("repos", {}) if isinstance(cat.get("repos"), dict) else {}  # type: ignore[assignment]
    missing = []
    for a in lock.artifacts:
        if not set(a.segments) & set(segments) or a.source == "baseline":
            continue
        if a.kind == "deb":
            if (a.name, a.version) not in served_debs or files.get(a.path, (0, ""))[1] != a.sha256:
                missing.append(f"deb {a.name} {a.version}")
        elif a.kind == "image":
            if image_tag(a.version or "") not in repos.get(a.name, []):
                missing.append(f"image {a.name}@{a.version}")
        elif files.get(a.path, (0, ""))[1] != a.sha256:
            missing.append(f"{a.kind} {a.name} ({a.path})")
    return {
        "mirror": name,
        "segments": segments,
        "apt_packages": len(served_debs),
        "apt_signed": bool(packages),
        "images": sum(len(t) for t in repos.values()),
        "image_repos": repos,
        "registry_ok": bool(cat.get("ok")),
        "files": sum(1 for p in files if p.startswith("files/")),
        "missing": missing,
        "matches_lock": not missing,
    }


def _paras(text: str) -> list[dict[str, str]]:
    out = []
    for para in text.split("\n\n"):
        rec = {}
        for line in para.splitlines():
            if line and not line[0].isspace() and ":" in line:
                k, _, v = line.partition(":")
                rec[k] = v.strip()
        if rec:
            out.append(rec)
    return out
