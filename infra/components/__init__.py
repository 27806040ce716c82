"""Pulumi components: a Site holding Segments, GpuNodes and InferenceServices.

Segments (and AirGappedSegments) hold mirror steps and rollout guards; nodes sit directly under the
Site so their URNs do not depend on their segment.

Every step is a `pulumi_command.local.Command` running a `gpufleet` CLI call built in
`infra.components.commands`, so the same strings run under `pulumi up`, in break-glass operation and
in the lab tests.
"""
