"""Run the gpufleet Pulumi program under mocks, once per example stack, with a canary secret."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pulumi
import pytest

from infra.bench import pulumi_mocks as mocks
from infra.components.program import ProgramSettings, build
from infra.components.site import Site
from infra.model.load import CONFIG_KEY, parse_site, read_stack_config, stack_path
from infra.plan.node import SitePlan, plan_site

ROOT = Path(__file__).resolve().parents[2]
STACKS = ("lab", "example-prod", "example-airgap")
CANARY = "canary-Zq8-NOT-A-REAL-PASSWORD"
SECRET_CONFIG = {"gpufleet:bmcPassword": CANARY}


@dataclass
class Run:
    """One mocked program run: the plan, the Site component and what the monitor recorded."""

    plan: SitePlan
    site: Site
    rec: mocks.Recording

    def reg(self, name: str) -> mocks.Registration:
        return self.rec.named(name)

    def commands(self) -> list[mocks.Registration]:
        return [r for r in self.rec.resources if r.type == "command:local:Command"]


def raw_site(stack: str) -> dict[str, Any]:
    return dict(read_stack_config(stack_path(stack, ROOT))[CONFIG_KEY])


def run_program(stack: str, raw: dict[str, Any] | None = None, *, project: Path = ROOT,
                reimage_on_create: bool = True, stdout_for: mocks.StdoutFor = mocks.default_stdout) -> Run:
    """Build the site of `stack` (or of `raw`) under mocks; the value awaited is every output."""
    plan = plan_site(parse_site(raw if raw is not None else raw_site(stack)))
    box: dict[str, Site] = {}

    def program() -> pulumi.Output[Any]:
        site = build(plan, ProgramSettings(stack=stack, project=project, reimage_on_create=reimage_on_create),
                     pulumi.Config("gpufleet").require_secret)
        box["site"] = site
        return pulumi.Output.all(
            nodes=site.node_facts, mirrors=site.mirror_status, endpoints=site.endpoints, converge=site.converge_status,
            health={k: s.health for k, s in site.services.items()},
            bmc_stdout_secret={h: n.bmc.stdout.is_secret() for h, n in site.nodes.items()},
        )

    rec = mocks.run(program, stack=stack, config=SECRET_CONFIG, secret_keys=list(SECRET_CONFIG),
                    stdout_for=stdout_for)
    return Run(plan, box["site"], rec)


@pytest.fixture(scope="session", params=STACKS)
def stack_run(request: pytest.FixtureRequest) -> Run:
    return run_program(request.param)


@pytest.fixture(scope="session")
def prod_run() -> Run:
    return run_program("example-prod")


@pytest.fixture(scope="session")
def lab_run() -> Run:
    return run_program("lab")
