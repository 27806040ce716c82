"""`Segment` and `AirGappedSegment`: what must be in place before any node of a segment is touched."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pulumi
from pulumi_command import local

from infra.components.facts import parse_json_stdout


@dataclass(frozen=True)
class SegmentArgs:
    """A connected segment: nothing to prepare; it holds the rollout guards between its batches."""

    cidr: str
    """Segment network, for the outputs."""


class Segment(pulumi.ComponentResource):
    """A connected segment: parent of the rollout guards between its batches.

    Its nodes are *not* its children: they sit under the Site, so a node keeps its URN when it moves.
    """

    ready: list[pulumi.Resource]
    status: pulumi.Output[dict[str, Any] | None]

    def __init__(self, name: str, args: SegmentArgs, opts: pulumi.ResourceOptions | None = None,
                 *, _type: str = "gpufleet:segment:Segment") -> None:
        super().__init__(_type, name, None, opts)
        self.ready = []
        self.status = pulumi.Output.from_input(None)
        if _type == "gpufleet:segment:Segment":
            self.register_outputs({"cidr": args.cidr})


@dataclass(frozen=True)
class AirGappedSegmentArgs(SegmentArgs):
    """An air-gapped segment with the mirror it installs from."""

    mirror: str = ""
    """Mirror name."""
    import_command: str = ""
    """`gpufleet bundle import` for this mirror (infra.components.commands.mirror_import)."""
    status_command: str = ""
    """`gpufleet mirror status --json` for this mirror."""
    workdir: str = ""
    """Directory the commands run in (the project dir)."""
    import_trigger: Mapping[str, str] | None = None
    """Mirror identity and lock-file hash: a new lock re-imports the bundle."""

    def __post_init__(self) -> None:
        if not (self.mirror and self.import_command and self.status_command and self.workdir):
            raise ValueError("an air-gapped segment needs its mirror, both commands and the workdir")


class AirGappedSegment(Segment):
    """An air-gapped segment: bundle import, then mirror status, before any of its nodes converge."""

    mirror_import: local.Command
    mirror_status: local.Command

    def __init__(self, name: str, args: AirGappedSegmentArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__(name, args, opts, _type="gpufleet:segment:AirGappedSegment")
        self.mirror_import = local.Command(
            f"{name}-mirror-import",
            create=args.import_command,
            dir=args.workdir,
            # Else pulumi-command puts the previous stdout into the environment: "argument list too long"
            # on large converge output (pulumi-command #285, #552).
            add_previous_output_in_env=False,
            triggers=[dict(args.import_trigger or {})],
            opts=pulumi.ResourceOptions(parent=self),
        )
        self.mirror_status = local.Command(
            f"{name}-mirror-status",
            create=args.status_command,
            dir=args.workdir,
            # Else pulumi-command puts the previous stdout into the environment: "argument list too long"
            # on large converge output (pulumi-command #285, #552).
            add_previous_output_in_env=False,
            triggers=[self.mirror_import.id],
            opts=pulumi.ResourceOptions(parent=self, depends_on=[self.mirror_import]),
        )
        self.ready = [self.mirror_status]
        self.status = self.mirror_status.stdout.apply(lambda out: parse_json_stdout(out, "mirror status"))
        self.register_outputs({"cidr": args.cidr, "mirror": args.mirror, "status": self.status})
