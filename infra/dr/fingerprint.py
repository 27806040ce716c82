"""A node's fingerprint (what a rebuild must give back) and the differences between two fingerprints.

The fingerprint holds what identifies the *configured* node, not the install: package versions of the
managed stack, sha256 of every managed config file, holds, service states, and the GPUs nvidia-smi sees
(UUIDs included: a rebuild must come back on the same hardware). Host keys, boot ids and timestamps
are left out on purpose: they legitimately change on a reimage.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra.plan.nodestate import NodeState

FINGERPRINT_VERSION = 1


@dataclass(frozen=True)
class Difference:
    """One thing that differs: `kind` (package, hold, file, service, gpu), the item, before and after."""

    kind: str
    item: str
    before: Any
    after: Any

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"kind": self.kind, "item": self.item, "before": self.before, "after": self.after}

    def __str__(self) -> str:
        return f"{self.kind} {self.item}: {_short(self.before)} → {_short(self.after)}"


def _short(v: Any) -> str:
    if v is None:
        return "(absent)"
    if isinstance(v, str) and len(v) == 64:
        return v[:12]  # sha256: enough to tell apart
    if isinstance(v, dict):
        return ",".join(f"{k}={v[k]}" for k in sorted(v))
    return str(v)


def fingerprint(state: NodeState) -> dict[str, Any]:
    """The comparable part of a node's state."""
    return {
        "version": FINGERPRINT_VERSION,
        "hostname": state.hostname,
        "packages": dict(sorted(state.packages.items())),
        "held": sorted(state.held),
        "files": dict(sorted(state.files.items())),
        "services": {k: state.services[k].as_dict() for k in sorted(state.services)},
        "gpus": [g.as_smi() for g in sorted(state.gpus, key=lambda g: g.index)],
    }


def compare(before: dict[str, Any], after: dict[str, Any]) -> list[Difference]:
    """Every difference between two fingerprints, in a stable order."""
    out: list[Difference] = []
    for kind, key in (("package", "packages"), ("file", "files"), ("service", "services")):
        b, a = before.get(key, {}), after.get(key, {})
        out.extend(
            Difference(kind, item, b.get(item), a.get(item))
            for item in sorted(set(b) | set(a))
            if b.get(item) != a.get(item)
        )
    hb, ha = set(before.get("held", [])), set(after.get("held", []))
    out.extend(Difference("hold", p, p in hb, p in ha) for p in sorted(hb ^ ha))
    gb = {g.get("uuid", str(i)): g for i, g in enumerate(before.get("gpus", []))}
    ga = {g.get("uuid", str(i)): g for i, g in enumerate(after.get("gpus", []))}
    out.extend(Difference("gpu", u, gb.get(u), ga.get(u)) for u in sorted(set(gb) | set(ga)) if gb.get(u) != ga.get(u))
    return out


def record_path(directory: Path, stack: str, hostname: str) -> Path:
    """Where the last recorded fingerprint of a node lives."""
    return directory / stack / f"{hostname}.json"


def save(directory: Path, stack: str, fp: dict[str, Any]) -> Path:
    """Write a fingerprint atomically (no secrets in it: versions, hashes, unit states, GPU ids)."""
    path = record_path(directory, stack, str(fp["hostname"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(fp, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def load(directory: Path, stack: str, hostname: str) -> dict[str, Any] | None:
    """The last recorded fingerprint, or None."""
    path = record_path(directory, stack, hostname)
    if not path.is_file():
        return None
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data
