"""Ports gpufleet itself listens on or connects to on a node: the one place these numbers live.

The validator keeps inference services off them, and the plan hands the exporter port to the
monitoring role, so a service can never be planned onto a port the node already uses.
"""

from __future__ import annotations

SSH_PORT = 22
"""sshd: Ansible and `gpufleet wait-ssh` reach every node here (OpenSSH's default; gpufleet sets no other)."""
NODE_EXPORTER_PORT = 9100
"""prometheus-node-exporter's packaged default listen port (`--web.listen-address=:9100`); the role keeps it."""
DCGM_EXPORTER_PORT = 9400
"""DCGM exporter (its upstream default); passed to the monitoring role as `monitoring_dcgm_exporter_port`."""
