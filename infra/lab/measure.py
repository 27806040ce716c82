"""Benchmark figures of the lab itself (cold/warm `up`, idle `up`, `down`) without touching the shared lab.

The figures come from a second lab: the lab stack with other host and segment names, addresses in
198.19.0.0/16, its own BMC port, state directory (and, for a cold run, cache directory), so the
lab other people are using stays up.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from infra.lab import lab
from infra.lab.config import LAB_KEY, Paths, lab_spec
from infra.model.load import stack_path


def second_stack(source: Path, work: Path, prefix: str = "bm", bmc_port: int = 8300,
                 nodes: tuple[str, ...] | None = None) -> Path:
    """Write a copy of the lab stack that can run beside it: `<prefix>-` names, 198.19.x, own BMC port and paths."""
    text = source.read_text(encoding="utf-8")
    for old, new in (("198.18.", "198.19."), ("lab-gpu0", f"{prefix}-gpu0"), ("lab-mirror", f"{prefix}-mirror"),
                     ("lab-upstream", f"{prefix}-upstream"), ("/var/lib/gpufleet/lab/", f"{work}/state/"),
                     ("name: connected", f"name: {prefix}-conn"), ("segment: connected", f"segment: {prefix}-conn"),
                     ("name: airgap", f"name: {prefix}-gap"), ("segment: airgap", f"segment: {prefix}-gap")):
        text = text.replace(old, new)
    data = yaml.safe_load(text)
    site = data["config"]["gpufleet:site"]
    site["name"] = f"lab{prefix}"
    # Hosts and networks only: no services, and no monitoring (it names the first lab's segments).
    site["services"] = []
    site.pop("observability", None)
    if nodes is not None:
        site["nodes"] = [n for n in site["nodes"] if n["hostname"] in nodes]
    # Fabrics get their own names too: a fabric's bridge is named after it, and must not be the first lab's.
    for f in site.get("fabrics", []):
        f["name"] = f"{prefix}-{f['name']}"
    for n in site["nodes"]:
        for port in n.get("fabric_ports", []):
            port["fabric"] = f"{prefix}-{port['fabric']}"
    for n in site["nodes"]:
        if n.get("bmc"):
            n["bmc"]["endpoint"] = f"http://127.0.0.1:{bmc_port}"
    data["config"][LAB_KEY]["bmc_listen"] = {"address": "127.0.0.1", "port": bmc_port}
    path = work / f"Pulumi.lab{prefix}.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def measure(cold: bool = False, work: Path | None = None) -> dict[str, Any]:
    """Seconds for `up` (cold: empty caches), `up` again (idle), `down`, warm `up`, `down`; cleans up after."""
    own = work is None
    work = work or Path(tempfile.mkdtemp(prefix="gpufleet-lab-measure-"))
    path = second_stack(stack_path("lab"), work)
    paths = Paths(state=work / "state", cache=work / "cache") if cold else Paths(state=work / "state")
    spec = lab_spec(path.stem.removeprefix("Pulumi."), path)
    out: dict[str, Any] = {"cold": cold, "hosts": len(spec.hosts)}
    try:
        t = time.monotonic()
        out["first_up_steps"] = lab.up(spec, paths, path)["timings"]
        out["first_up_s"] = round(time.monotonic() - t, 2)
        t = time.monotonic()
        lab.up(spec, paths, path)
        out["idle_up_s"] = round(time.monotonic() - t, 2)
        t = time.monotonic()
        lab.down(paths)
        out["down_s"] = round(time.monotonic() - t, 2)
        t = time.monotonic()
        out["warm_up_steps"] = lab.up(spec, paths, path)["timings"]
        out["warm_up_s"] = round(time.monotonic() - t, 2)
    finally:
        t = time.monotonic()
        lab.down(paths)
        out["final_down_s"] = round(time.monotonic() - t, 2)
        if own:
            shutil.rmtree(work, ignore_errors=True)
    return out
