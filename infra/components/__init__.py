"""Pulumi components: a Site holding Segment/AirGappedSegment (mirror steps, rollout guards), GpuNode
and InferenceService components; nodes sit under the Site so their URNs do not depend on their segment.

Every step is a `pulumi_command.local.Command` running a `gpufleet` CLI call built in
`infra.components.commands`, so the same strings run under `pulumi up`, in break-glass operation and
in the lab tests.
"""
