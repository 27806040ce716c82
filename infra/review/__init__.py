"""`gpufleet review`: a `pulumi preview --json` digest plus the plan → a Markdown change review."""
