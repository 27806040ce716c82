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
    provisioning_command: str = ""
    """`gpufleet provision converge` for this segment (infra.components.commands.provision_converge); empty
    when the segment declares no provisioning service."""
    provisioning_trigger: Mapping[str, str] | None = None
    """Provisioning host and the digest of what it serves (infra.provision.service.served_digest)."""
    provisioning_dir: str = ""
    """Directory the provisioning command runs in (the project dir)."""

    def __post_init__(self) -> None:
        if self.provisioning_command and not (self.provisioning_trigger and self.provisioning_dir):
            raise ValueError("a segment's provisioning step needs its trigger and the workdir")


class Segment(pulumi.ComponentResource):
    """A connected segment: parent of the rollout guards between its batches.

    Its nodes are *not* its children: they sit under the Site, so a node keeps its URN when it moves.
    """

    ready: list[pulumi.Resource]
    status: pulumi.Output[dict[str, Any] | None]
    provisioning: local.Command | None
    """`<segment>-provisioning`: the segment's provisioning service converged on its host (None without one)."""

    def __init__(self, name: str, args: SegmentArgs, opts: pulumi.ResourceOptions | None = None,
                 *, _type: str = "gpufleet:segment:Segment") -> None:
        super().__init__(_type, name, None, opts)
        self.ready = []
        self.status = pulumi.Output.from_input(None)
        self.provisioning = None
        if _type == "gpufleet:segment:Segment":
            self._add_provisioning(name, args)
            self.register_outputs({"cidr": args.cidr})

    def _add_provisioning(self, name: str, args: SegmentArgs) -> None:
        """Register `<name>-provisioning` after what the segment needs first (an air-gapped mirror's import)."""
        if not args.provisioning_command:
            return
        self.provisioning = local.Command(
            f"{name}-provisioning",
            create=args.provisioning_command,
            dir=args.provisioning_dir,
            # Else pulumi-command puts the previous stdout into the environment: "argument list too long"
            # on large converge output (pulumi-command #285, #552).
            add_previous_output_in_env=False,
            # What the service serves and installs, hashed: a changed stack, lock or role re-runs it; nothing
            # else does. The mirror's import id (air-gapped): a new bundle may bring new packages or images.
            triggers=[dict(args.provisioning_trigger or {}), *(r.id for r in self.ready
                                                               if isinstance(r, local.Command))],
            opts=pulumi.ResourceOptions(parent=self, depends_on=[*self.ready]),
        )


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
        super().__post_init__()
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
        self._add_provisioning(name, args)
        self.register_outputs({"cidr": args.cidr, "mirror": args.mirror, "status": self.status})
