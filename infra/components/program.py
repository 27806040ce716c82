"""The Pulumi program body, callable from `infra/__main__.py`, the mock tests and the benchmark."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pulumi

from infra.bundle.lock import Lock, LockError
from infra.components.desired import Fingerprints, lock_path
from infra.components.site import SecretResolver, Site, SiteArgs
from infra.plan.node import SitePlan

# pulumi-command runs a command in `dir`, resolved against the provider's working directory
# (provider/pkg/provider/local/commandOutputs.go: `cmd.Dir = *in.Dir`), and the engine starts every
# plugin in the directory `main` names (pulumi pkg/engine/project.go getPwdMain, plugin.go
# `cmd.Dir = pwd`): `main: infra/` → the project is "..". A relative `dir` keeps absolute checkout
# paths out of the inputs, so `pulumi up` from another checkout changes nothing, and a delete
# command stored in the state still runs after the checkout moved. tests/pulumi checks the
# pairing with Pulumi.yaml's `main`.
COMMAND_DIR = ".."


@dataclass(frozen=True)
class ProgramSettings:
    """Program-level settings from Pulumi config (not part of the site model)."""

    stack: str
    """Stack name (`pulumi.get_stack()`)."""
    project: Path
    """Project dir: where Pulumi.yaml, .venv, roles/ and stacks/ live (read at program time only)."""
    command_dir: str = COMMAND_DIR
    """Every command's `dir`, relative so the state holds no checkout path (see COMMAND_DIR)."""
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


def read_lock(project: Path, stack: str) -> Lock | None:
    """The stack's lock, None when there is none or it cannot be read (the provisioning step then says why)."""
    try:
        return Lock.from_json(lock_path(project, stack).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, LockError):
        return None


def build(plan: SitePlan, settings: ProgramSettings, secret: SecretResolver) -> Site:
    """Register the whole site; the role tree and lock file are hashed once here, not per node."""
    return Site(plan.site.name, SiteArgs(
        plan=plan,
        stack=settings.stack,
        workdir=settings.command_dir,
        fingerprints=Fingerprints.of(settings.project, settings.stack),
        secret=secret,
        reimage_on_create=settings.reimage_on_create,
        bundle_dir=settings.bundle_dir or f"bundles/{settings.stack}",
        lock=read_lock(settings.project, settings.stack),
    ))


def export(site: Site) -> None:
    """Stack outputs: node facts, per-node converge status, inference endpoints, mirror status (no secrets)."""
    pulumi.export("nodes", site.node_facts)
    pulumi.export("converge", site.converge_status)
    pulumi.export("endpoints", site.endpoints)
    pulumi.export("mirrors", site.mirror_status)
