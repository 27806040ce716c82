"""Component args validate at construction; every command string is accepted by the real CLI parser."""

from __future__ import annotations

import re
import shlex

import pytest

from infra.cli import build_parser
from infra.components import commands
from infra.components.node import GpuNodeArgs
from infra.components.segment import AirGappedSegmentArgs
from infra.components.service import InferenceServiceArgs
from infra.plan.desired import DesiredState
from tests.pulumi.conftest import Run

CMDS = commands.node_commands("lab", "lab-gpu01", reimage_on_create=True, ssh_timeout_s=600)


def test_every_resource_command_parses_with_the_gpufleet_cli(stack_run: Run) -> None:
    """Each create/update (each `&&` part) is a valid `gpufleet` invocation naming this stack."""
    parser = build_parser()
    stack = stack_run.rec.resources[0].urn.split("::")[0].removeprefix("urn:pulumi:")
    seen = 0
    for r in stack_run.commands():
        for key in ("create", "update", "delete"):
            for part in re.split(r" && |; ", str(r.inputs.get(key) or "")):
                if not part:
                    continue
                # `--rc $?` gets the previous command's exit status from /bin/sh.
                argv = shlex.split(part.replace(" --rc $?", " --rc 0"))
                assert argv[0] == commands.CLI
                args = parser.parse_args(argv[1:])  # SystemExit here means the contract drifted
                assert args.stack == stack and callable(args.func)
                seen += 1
    assert seen >= 5 * len(stack_run.plan.nodes)


def test_node_args_need_a_content_hash() -> None:
    """A converge trigger without content_hash would miss role edits: refused at construction."""
    with pytest.raises(ValueError, match="content_hash"):
        GpuNodeArgs(commands=CMDS, workdir="/p", provision_trigger={},
                    desired=DesiredState.from_trigger({"driver": "x"}))


def test_node_args_only_take_gpufleet_secret_env_names() -> None:
    """Secret environment variables must be the GPUFLEET_SECRET_* names the CLI reads."""
    with pytest.raises(ValueError, match="GPUFLEET_SECRET_"):
        GpuNodeArgs(commands=CMDS, workdir="/p", provision_trigger={},
                    desired=DesiredState.from_trigger({"content_hash": "h"}),
                    secret_env={"BMC_PASSWORD": "x"})
    assert commands.secret_env_name("bmc.lab-gpu01") == "GPUFLEET_SECRET_BMC_LAB_GPU01"


def test_airgapped_segment_args_need_the_mirror_commands() -> None:
    """An air-gapped segment without its mirror import/status cannot be built."""
    with pytest.raises(ValueError, match="mirror"):
        AirGappedSegmentArgs(cidr="198.18.2.0/24", mirror="m", workdir="/p")


def test_service_args_need_endpoints() -> None:
    """A service with no serving node is refused."""
    with pytest.raises(ValueError, match="endpoint"):
        InferenceServiceArgs(health_command="x", workdir="/p", trigger={}, endpoints=[])


def test_reimage_only_on_create_and_never_in_update() -> None:
    """The BMC step's create reinstalls only when enabled; its update is always power-on only."""
    adopt = commands.node_commands("lab", "n1", reimage_on_create=False, ssh_timeout_s=600)
    assert "bmc reimage" not in adopt.provision and "reimage" not in adopt.power_on
    # Adopting still takes a provisioning lease (power-on counts against max_parallel_reimage), then powers on.
    assert adopt.provision == (f"{commands.CLI} provision-slot --stack lab --node n1 --ttl "
                               f"{600 + commands.LEASE_MARGIN_S} && {adopt.power_on}")
    assert CMDS.provision.endswith(f"{CMDS.power_on} && {commands.CLI} bmc reimage --stack lab --node lab-gpu01 --yes")
