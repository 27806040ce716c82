"""OCI image layouts: read one by digest, and write a tiny deterministic one (lab, tests).

A bundle carries each image as an OCI layout under `images/<repo>/`; the manifest digest is what
the stack pins, and it survives `skopeo copy oci:… docker://…` unchanged (no re-compression).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"


def _blob(layout: Path, digest: str) -> Path:
    algo, hexd = digest.split(":", 1)
    return layout / "blobs" / algo / hexd


def _write_blob(layout: Path, data: bytes) -> dict[str, Any]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    p = _blob(layout, digest)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return {"digest": digest, "size": len(data)}


def write_image(layout: Path, files: dict[str, bytes], tag: str = "latest",
                cmd: tuple[str, ...] = ("/bin/sh",)) -> str:
    """Write a one-layer image holding `files` (path → bytes) as an OCI layout; returns its digest.

    Every timestamp, owner and compression header is fixed, so the same files give the same digest
    on every machine — a lock can pin it.
    """
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(files):
            info = tarfile.TarInfo(name.lstrip("/"))
            info.size, info.mtime, info.mode, info.uid, info.gid = len(files[name]), 0, 0o755, 0, 0
            tar.addfile(info, io.BytesIO(files[name]))
    layer_tar = raw.getvalue()
    gz = io.BytesIO()
    with gzip.GzipFile(fileobj=gz, mode="wb", mtime=0) as z:
        z.write(layer_tar)
    layout.mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    layer = _write_blob(layout, gz.getvalue())
    config = {
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": list(cmd)},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer_tar).hexdigest()]},
    }
    cfg = _write_blob(layout, json.dumps(config, sort_keys=True, separators=(",", ":")).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **cfg},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **layer}],
    }
    man = _write_blob(layout, json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode())
    index = {"schemaVersion": 2, "manifests": [
        {"mediaType": MANIFEST_TYPE, **man, "annotations": {"org.opencontainers.image.ref.name": tag}}]}
    (layout / "index.json").write_text(json.dumps(index, sort_keys=True))
    return str(man["digest"])


def image_in_layout(layout: Path, digest: str) -> tuple[int, list[str]] | None:
    """(total size, blob digests) of the image `digest` in a layout, or None when it is not there."""
    index = layout / "index.json"
    if not index.is_file():
        return None
    entries = json.loads(index.read_text()).get("manifests", [])
    if not any(m.get("digest") == digest for m in entries):
        return None
    mpath = _blob(layout, digest)
    if not mpath.is_file():
        return None
    manifest = json.loads(mpath.read_bytes())
    blobs = [manifest["config"]["digest"], *(la["digest"] for la in manifest.get("layers", []))]
    size = mpath.stat().st_size + manifest["config"]["size"] + sum(la["size"] for la in manifest.get("layers", []))
    return size, [digest, *blobs]


def ref_name(layout: Path, digest: str) -> str | None:
    """The tag (`org.opencontainers.image.ref.name`) the layout gives `digest`, if any."""
    for m in json.loads((layout / "index.json").read_text()).get("manifests", []):
        if m.get("digest") == digest:
            name = m.get("annotations", {}).get("org.opencontainers.image.ref.name")
            return str(name) if name else None
    return None
