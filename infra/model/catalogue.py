"""The built-in catalogue (infra/data/catalogue.yaml) merged with a stack's additions."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from typing import Any

import yaml

from infra.model.site import Catalogue, GpuCatalogueEntry, ModelArch, ServerTopology


@cache
def _builtin() -> dict[str, Any]:
    text = files("infra.data").joinpath("catalogue.yaml").read_text(encoding="utf-8")
    data: dict[str, Any] = yaml.safe_load(text)
    return data


@dataclass(frozen=True)
class ResolvedCatalogue:
    """GPUs, models and CUDA minimum drivers, built-ins first, stack entries over them."""

    gpus: dict[str, GpuCatalogueEntry]
    models: dict[str, ModelArch]
    cuda_min_driver: dict[str, str]
    servers: dict[str, ServerTopology]


@cache
def _builtin_catalogue() -> ResolvedCatalogue:
    raw = _builtin()
    return ResolvedCatalogue(
        gpus={k: GpuCatalogueEntry(**v) for k, v in raw["gpus"].items()},
        models={k: ModelArch(**v) for k, v in raw["models"].items()},
        cuda_min_driver=dict(raw["cuda_min_driver"]),
        servers={k: ServerTopology(**v) for k, v in raw.get("servers", {}).items()},
    )


def resolve(extra: Catalogue | None = None) -> ResolvedCatalogue:
    """Return the built-in catalogue extended by a stack's `catalogue` section."""
    base = _builtin_catalogue()
    if extra is None or (not extra.gpus and not extra.models and not extra.servers):
        return base
    return ResolvedCatalogue(
        gpus={**base.gpus, **extra.gpus},
        models={**base.models, **extra.models},
        cuda_min_driver=base.cuda_min_driver,
        servers={**base.servers, **extra.servers},
    )
