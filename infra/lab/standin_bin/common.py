"""Shared by the stand-in tools: where the simulated GPU declaration and driver facts live."""

from __future__ import annotations

import json
import os
from typing import Any

GPUS_FILE = os.environ.get("GPUFLEET_LAB_GPUS_FILE", "/etc/gpufleet-lab/gpus.json")
DRIVER_FILE = os.environ.get("GPUFLEET_LAB_DRIVER_FILE", "/usr/lib/gpufleet-lab/driver.json")
SIMULATED = "SIMULATED — gpufleet lab stand-in, not NVIDIA software"


def load(path: str) -> dict[str, Any] | None:
    """A JSON file, or None when it is missing (no driver / not a GPU node)."""
    try:
        with open(path, encoding="utf-8") as f:
            data: dict[str, Any] = json.load(f)
            return data
    except FileNotFoundError:
        return None
