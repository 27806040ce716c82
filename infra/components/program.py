"""The Pulumi program body, callable from `infra/__main__.py`, the mock tests and the benchmark."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pulumi

from infra.components.desired import Fingerprints
from infra.components.site import SecretResolver, Site, SiteArgs
from infra.plan.node import SitePlan


@dataclass(frozen=True)
class ProgramSettings:
    """Program-level settings from Pulumi config (not part of the site model)."""

    stack: str
    """Stack name (`pulumi.get_stack()`)."""
    project: Path
    """Project dir: where Pulumi.yaml, .venv, roles/ and stacks/ live."""
    reimage_on_create: bool = True
    """`gpufleet:reimageOnCreate` (default true): a newly created node is PXE-reinstalled."""
    bundle_dir: str = ""
    """`gpufleet:bundleDir` (default `bundles/<stack>`): the air-gap bundle the mirrors import."""


def settings_from_config(config: pulumi.Config, project: Path) -> ProgramSettings:
    """Read program settings from the `gpufleet` config namespace."""
    reimage = config.get_bool("reimageOnCreate")
    return ProgramSettings(stack=pulumi.get_stack(), project=project,
                           reimage_on_create=True if reimage is None else reimage,
                           bundle_dir=config.get("bundleDir") or "")


def build(plan: SitePlan, settings: ProgramSettings, secret: SecretResolver) -> Site:
    """Register the whole site; the role tree and lock file are hashed once here, not per node."""
    return Site(plan.site.name, SiteArgs(
        plan=plan,
        stack=settings.stack,
        workdir=str(settings.project),
        fingerprints=Fingerprints.of(settings.project, settings.stack),
        secret=secret,
        reimage_on_create=settings.reimage_on_create,
        bundle_dir=settings.bundle_dir or f"bundles/{settings.stack}",
    ))


def export(site: Site) -> None:
    """Stack outputs: node facts, inference endpoints, mirror status (no secrets among them)."""
    pulumi.export("nodes", site.node_facts)
    pulumi.export("endpoints", site.endpoints)
    pulumi.export("mirrors", site.mirror_status)
