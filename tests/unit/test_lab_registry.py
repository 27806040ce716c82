"""The lab's test image: deterministic layer and config whose diff_id matches the uncompressed layer."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile

from infra.lab.registry import build_image


def test_image_is_reproducible_and_consistent() -> None:
    """Same busybox bytes give the same blobs; the config's diff_id is the uncompressed layer digest."""
    layer, config = build_image(b"\x7fELF fake busybox")
    assert (layer, config) == build_image(b"\x7fELF fake busybox")
    raw = gzip.decompress(layer)
    assert json.loads(config)["rootfs"]["diff_ids"] == ["sha256:" + hashlib.sha256(raw).hexdigest()]
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert members["bin/busybox"].mode == 0o755 and members["bin/sh"].linkname == "busybox"
