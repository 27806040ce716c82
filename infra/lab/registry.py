"""Seed the serving hosts' container registries with a tiny test image (busybox, from Debian).

`gpufleet/lab-hello:1` lets roles and tests pull and run a container from the mirror or the
outside world without any public registry. The image is built here, deterministically (fixed
mtimes, gzip without timestamp), and pushed over the registry's plain-HTTP v2 API.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import tarfile
from pathlib import Path

import requests

from infra.lab.sh import LabCommandError, apt_update, run

IMAGE = "gpufleet/lab-hello"
TAG = "1"
MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
LAYER_TYPE = "application/vnd.docker.image.rootfs.diff.tar.gzip"
CONFIG_TYPE = "application/vnd.docker.container.image.v1+json"


def busybox_binary(cache: Path) -> Path:
    """The static busybox from Debian's busybox-static package (downloaded once into the cache)."""
    out = cache / "busybox"
    if out.exists():
        return out
    work = cache / "busybox-deb"
    work.mkdir(parents=True, exist_ok=True)
    if not list(work.glob("busybox-static_*.deb")):
        r = run(["apt-get", "download", "busybox-static"], cwd=work, timeout=300, check=False)
        if r.returncode != 0:  # a fresh machine may have no package lists yet
            apt_update()
            run(["apt-get", "download", "busybox-static"], cwd=work, timeout=300)
    deb = sorted(work.glob("busybox-static_*.deb"))[-1]
    run(["dpkg-deb", "-x", deb, work / "x"], timeout=60)
    (work / "x/bin/busybox").rename(out)
    return out


def build_image(busybox: bytes) -> tuple[bytes, bytes]:
    """(gzipped layer, config JSON) of an image holding /bin/busybox and /bin/sh → busybox."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        d = tarfile.TarInfo("bin")
        d.type, d.mode, d.mtime = tarfile.DIRTYPE, 0o755, 0
        tar.addfile(d)
        f = tarfile.TarInfo("bin/busybox")
        f.size, f.mode, f.mtime = len(busybox), 0o755, 0
        tar.addfile(f, io.BytesIO(busybox))
        link = tarfile.TarInfo("bin/sh")
        link.type, link.linkname, link.mtime, link.mode = tarfile.SYMTYPE, "busybox", 0, 0o777
        tar.addfile(link)
    layer_tar = raw.getvalue()
    layer = gzip.compress(layer_tar, mtime=0)
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["/bin/sh"], "Labels": {"org.gpufleet.lab": "simulated test image"}},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer_tar).hexdigest()]},
    }, sort_keys=True).encode()
    return layer, config


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def push(registry: str, layer: bytes, config: bytes) -> str:
    """Push the image to `registry` (host:port, plain HTTP) unless it is there; returns the manifest digest."""
    base = f"http://{registry}/v2/{IMAGE}"
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": CONFIG_TYPE, "size": len(config), "digest": _digest(config)},
        "layers": [{"mediaType": LAYER_TYPE, "size": len(layer), "digest": _digest(layer)}],
    }, sort_keys=True).encode()
    head = requests.head(f"{base}/manifests/{TAG}", headers={"Accept": MANIFEST_TYPE}, timeout=10)
    if head.status_code == 200 and head.headers.get("Docker-Content-Digest") == _digest(manifest):
        return _digest(manifest)
    for blob in (layer, config):
        if requests.head(f"{base}/blobs/{_digest(blob)}", timeout=10).status_code == 200:
            continue
        start = requests.post(f"{base}/blobs/uploads/", timeout=10)
        if start.status_code != 202:
            raise LabCommandError(f"registry {registry}: upload start {start.status_code}: {start.text[:200]}")
        loc = start.headers["Location"]
        url = loc if loc.startswith("http") else f"http://{registry}{loc}"
        sep = "&" if "?" in url else "?"
        put = requests.put(f"{url}{sep}digest={_digest(blob)}", data=blob,
                           headers={"Content-Type": "application/octet-stream"}, timeout=60)
        if put.status_code != 201:
            raise LabCommandError(f"registry {registry}: blob upload {put.status_code}: {put.text[:200]}")
    r = requests.put(f"{base}/manifests/{TAG}", data=manifest, headers={"Content-Type": MANIFEST_TYPE}, timeout=10)
    if r.status_code != 201:
        raise LabCommandError(f"registry {registry}: manifest {r.status_code}: {r.text[:200]}")
    return _digest(manifest)


def seed_registry(registry: str, cache: Path) -> str:
    """Make sure `gpufleet/lab-hello:1` is in the registry; returns its digest."""
    try:
        layer, config = build_image(busybox_binary(cache).read_bytes())
    except (LabCommandError, subprocess.SubprocessError, OSError) as exc:
        raise LabCommandError(f"cannot build the lab test image: {exc}") from exc
    return push(registry, layer, config)
