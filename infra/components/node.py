"""`GpuNode`: one bare-metal node's lifecycle — BMC power/boot → wait for SSH → converge → validate.

The converge itself runs in the node's segment batch step (`<segment>-batch<K>-converge`, one Ansible job
for the batch, built in `infra.components.site`); the node keeps `<name>-converge` as a light step that
runs nothing and carries the node's desired state as its trigger, so a preview shows a change on the node
it concerns, in plain words, and the batch step re-runs because that node's step was re-created.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pulumi
from pulumi_command import local

from infra.components.commands import NodeCommands
from infra.components.facts import parse_json_stdout
from infra.plan.desired import DesiredState

STEPS = ("bmc", "wait-ssh", "converge", "validate")


@dataclass(frozen=True)
class GpuNodeArgs:
    """Everything a `GpuNode` needs; built from the node's plan in `infra.components.site`."""

    commands: NodeCommands
    """Command lines of the steps (from `infra.components.commands.node_commands`)."""
    workdir: str
    """Directory the commands run in (the project dir holding Pulumi.yaml and .venv)."""
    provision_trigger: Mapping[str, str]
    """What only a reinstall changes (OS, PXE MAC): a change replaces the BMC step = rebuild."""
    desired: DesiredState
    """Readable desired state plus content hash (its trigger form): a change re-runs converge and validate."""
    secret_env: Mapping[str, pulumi.Input[str]] = field(default_factory=dict)
    """Secrets for the BMC step, by environment variable name (Pulumi secrets, never in strings)."""
    ready: Sequence[pulumi.Resource] = ()
    """What must finish before the node is touched (its segment's mirror import and status)."""

    def __post_init__(self) -> None:
        if not self.workdir:
            raise ValueError("GpuNodeArgs.workdir must be the project directory")
        if not self.desired.content_hash:
            raise ValueError("GpuNodeArgs.desired needs a content_hash (see infra.components.desired)")
        for key in self.secret_env:
            if not key.startswith("GPUFLEET_SECRET_"):
                raise ValueError(f"secret environment variable {key!r} must be named GPUFLEET_SECRET_<KEY>")


class GpuNode(pulumi.ComponentResource):
    """A GPU node: four `local.Command` steps (bmc, wait-ssh, converge, validate) plus decommission.

    Built in two calls: the constructor registers bmc, wait-ssh and the light converge step; `converged_by`
    registers validate after the batch step the Site makes from the batch's converge steps.
    Replacing `<name>-bmc` (`pulumi up --replace <urn>`) rebuilds the node: its id feeds the next
    step's triggers, so wait-ssh, converge (and with it the batch step) and validate all run again.
    """

    bmc: local.Command
    wait_ssh: local.Command
    converge: local.Command
    validate: local.Command
    facts: pulumi.Output[dict[str, Any]]

    def __init__(self, name: str, args: GpuNodeArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("gpufleet:node:GpuNode", name, None, opts)
        c = args.commands
        self.bmc = local.Command(
            f"{name}-bmc",
            create=c.provision,
            # Input changes other than the trigger (e.g. the CLI path) must not reinstall a node.
            update=c.power_on,
            dir=args.workdir,
            # Else pulumi-command puts the previous stdout into the environment: "argument list too long"
            # on large converge output (pulumi-command #285, #552).
            add_previous_output_in_env=False,
            environment=dict(args.secret_env) or None,
            triggers=[dict(args.provision_trigger)],
            # BMC output may echo credentials or session tokens (pulumi-command#401).
            logging=local.Logging.NONE,
            # No dependency on other nodes: how many nodes reinstall at once is bounded by the leases its
            # create command takes (`gpufleet provision-slot`), not by a chain through the graph.
            opts=pulumi.ResourceOptions(parent=self, depends_on=[*args.ready],
                                        additional_secret_outputs=["stdout", "stderr"]),
        )
        self.wait_ssh = local.Command(
            f"{name}-wait-ssh",
            create=c.wait_ssh,
            dir=args.workdir,
            # Else pulumi-command puts the previous stdout into the environment: "argument list too long"
            # on large converge output (pulumi-command #285, #552).
            add_previous_output_in_env=False,
            triggers=[self.bmc.id],
            opts=pulumi.ResourceOptions(parent=self, depends_on=[self.bmc]),
        )
        # Runs nothing (pulumi-command's create is optional: provider/pkg/provider/local/commandController.go
        # returns a new id without running anything when `create` is unset). It carries the node's desired
        # state, so a changed driver shows here, on this node, as `triggers[0].driver`; its new id is a
        # trigger of the batch step, which re-runs the batch's converge. Same name and triggers as the
        # per-node converge step it replaces: existing stacks keep its URN and see an update that runs nothing.
        self.converge = local.Command(
            f"{name}-converge",
            dir=args.workdir,
            add_previous_output_in_env=False,
            triggers=[args.desired.as_trigger(), self.wait_ssh.id],
            opts=pulumi.ResourceOptions(parent=self, depends_on=[self.wait_ssh]),
        )
        self._workdir = args.workdir
        self._validate_command = c.validate
        self.decommission: local.Command | None = None
        if c.decommission:
            # Its own step, not a `delete` on `<name>-bmc`: replacing the BMC step (a reinstall,
            # `pulumi up --replace`) runs the old step's delete after the new create, which would power
            # off the freshly installed node. This step has no triggers and is never replaced; it is
            # deleted only when the node leaves the stack or on `pulumi destroy`. No dependencies, so
            # a node whose provisioning failed is still decommissioned when removed.
            self.decommission = local.Command(
                f"{name}-decommission",
                create=c.decommission_check,
                delete=c.decommission,
                dir=args.workdir,
                add_previous_output_in_env=False,
                environment=dict(args.secret_env) or None,
                logging=local.Logging.NONE,
                opts=pulumi.ResourceOptions(parent=self, additional_secret_outputs=["stdout", "stderr"]),
            )

    def converged_by(self, batch: local.Command) -> local.Command:
        """Register the validate step, after the batch step that converges this node; returns it."""
        self.validate = local.Command(
            f"{self._name}-validate",
            create=self._validate_command,
            dir=self._workdir,
            # Else pulumi-command puts the previous stdout into the environment: "argument list too long"
            # on large converge output (pulumi-command #285, #552).
            add_previous_output_in_env=False,
            # This node's converge id, not the batch's: another node's change re-runs the batch (a no-op
            # here) but does not re-validate this node.
            triggers=[self.converge.id],
            opts=pulumi.ResourceOptions(parent=self, depends_on=[self.converge, batch]),
        )
        self.facts = self.validate.stdout.apply(lambda out: parse_json_stdout(out, "validate-node"))
        self.register_outputs({"facts": self.facts})
        return self.validate
