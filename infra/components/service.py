"""`InferenceService`: endpoints of a served model and a health check after its nodes validate."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pulumi
from pulumi_command import local

from infra.components.facts import parse_json_stdout


@dataclass(frozen=True)
class InferenceServiceArgs:
    """A service as planned: what it serves, where, and how to check it."""

    health_command: str
    """`gpufleet bench-inference --service X --json` (infra.components.commands.service_health)."""
    workdir: str
    """Directory the command runs in (the project dir)."""
    trigger: Mapping[str, str]
    """Readable deployment (engine, model@revision, image, port, nodes): a change re-checks health."""
    endpoints: Sequence[str]
    """OpenAI-compatible base URLs, one per serving node."""
    after: Sequence[local.Command] = ()
    """The validate steps of the serving nodes."""

    def __post_init__(self) -> None:
        if not self.endpoints:
            raise ValueError("an inference service needs at least one endpoint")


class InferenceService(pulumi.ComponentResource):
    """A served model: its endpoints as outputs and a health check step."""

    health_check: local.Command
    health: pulumi.Output[dict[str, Any]]
    endpoints: list[str]

    def __init__(self, name: str, args: InferenceServiceArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("gpufleet:inference:InferenceService", name, None, opts)
        self.endpoints = list(args.endpoints)
        self.health_check = local.Command(
            f"{name}-health",
            create=args.health_command,
            dir=args.workdir,
            # Else pulumi-command puts the previous stdout into the environment: "argument list too long"
            # on large converge output (pulumi-command #285, #552).
            add_previous_output_in_env=False,
            # The nodes' validate ids: any re-converge of a serving node re-checks the service.
            triggers=[dict(args.trigger), *(v.id for v in args.after)],
            opts=pulumi.ResourceOptions(parent=self, depends_on=list(args.after)),
        )
        self.health = self.health_check.stdout.apply(lambda out: parse_json_stdout(out, "bench-inference"))
        self.register_outputs({"endpoints": self.endpoints, "health": self.health})
