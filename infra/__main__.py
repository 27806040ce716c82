"""Pulumi entry point (Pulumi.yaml `main: infra/`): read `gpufleet:site`, validate, plan, build."""

from __future__ import annotations

import sys
from pathlib import Path

# The language host runs this directory as a script, which puts infra/ itself first on sys.path:
# infra/ansible would then shadow the real `ansible` package. Import the project as a package instead
# (and make it importable even without the editable install).
_PROJECT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _PROJECT / "infra"]
if str(_PROJECT) not in sys.path:
    sys.path.insert(0, str(_PROJECT))

import pulumi  # noqa: E402

from infra.components.program import build, export, settings_from_config  # noqa: E402
from infra.model.load import SiteError, parse_site  # noqa: E402
from infra.plan.node import plan_site  # noqa: E402

config = pulumi.Config("gpufleet")
try:
    site = parse_site(config.require_object("site"), source=f"stack {pulumi.get_stack()} (gpufleet:site)")
except SiteError as exc:
    # RunError prints the message (every problem with its config path) without a Python traceback.
    raise pulumi.RunError(str(exc)) from None
export(build(plan_site(site), settings_from_config(config, _PROJECT), config.require_secret))
