"""The network-install (provisioning) service of a segment, derived from the stack: see docs/bare-metal.md."""
