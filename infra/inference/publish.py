"""Lay the llama.cpp artifacts out as a file store serves them (`http://HOST/files/…`).

The one call the LAB seeding (`infra/lab`) and the air-gap BUNDLE make:

    publish_llamacpp_files(files_dir)   # files_dir is what http://HOST/files/ serves

gives
    files_dir/wheels/llama_cpp_python-0.3.36-cp311-cp311-linux_x86_64.whl  (+ every `[server]` dependency)
    files_dir/models/gpufleet-tiny-lab/lab-1/model.gguf

matching the lab stack's service URLs. Files are copied from the caches (see `_place`) and replaced
atomically, so a host serving files_dir never sees a partial file; an identical file is left alone.
"""

from __future__ import annotations

import filecmp
import os
import shutil
from pathlib import Path

from infra.inference.tinymodel import MODEL_NAME, MODEL_REVISION, ensure_tiny_model
from infra.inference.wheel import ensure_server_wheelhouse


def _place(src: Path, dest: Path) -> Path:
    # Copies, never hard links: the lab seeding copies the drop-in onto the stores with `cp -a`, which
    # refuses ("are the same file") when source and target share an inode.
    if dest.is_file() and not os.path.samefile(src, dest) and filecmp.cmp(src, dest, shallow=False):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.unlink(missing_ok=True)
    shutil.copyfile(src, tmp)
    tmp.replace(dest)
    return dest


def publish_llamacpp_files(files_dir: Path, *, wheel_cache: Path | None = None,
                           model_cache: Path | None = None) -> list[Path]:
    """Build/generate once, then place the wheelhouse and the tiny model under `files_dir`; paths placed."""
    house = ensure_server_wheelhouse(wheel_cache)
    model = ensure_tiny_model(model_cache)
    placed = [_place(w, files_dir / "wheels" / w.name) for w in sorted(house.glob("*.whl"))]
    placed.append(_place(model, files_dir / "models" / MODEL_NAME / MODEL_REVISION / "model.gguf"))
    return placed
