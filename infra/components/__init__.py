"""Pulumi components: Site → Segment/AirGappedSegment → GpuNode → InferenceService.

Every step is a `pulumi_command.local.Command` running a `gpufleet` CLI call built in
`infra.components.commands`, so the same strings run under `pulumi up`, in break-glass operation and
in the lab tests.
"""
