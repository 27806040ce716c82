"""The lab's out-of-band host-key channel: read a rebuilt lab host's key straight from its rootfs on this machine."""

from __future__ import annotations

from pathlib import Path

from infra import hostkeys
from infra.lab import lab as lab_module
from infra.lab.config import lab_spec
from infra.model.site import Node, Site


class LabSource:
    """The lab's re-pin function: reads the host key from the host's own disk on this machine."""

    refreshable = True  # the reimage may finish after the BMC reports On: re-read until SSH agrees

    def __init__(self, stack: str | None, stack_file: Path | None) -> None:
        self.stack = stack
        self.stack_file = stack_file

    def describe(self) -> str:
        """For reports."""
        return "lab host's own disk (infra.lab.lab.repin_host_key)"

    def check(self, site: Site, node: Node) -> None:
        """Nothing to check up-front: the lab reads the key after the reimage."""

    def pin(self, site: Site, node: Node) -> str:
        """Let the lab pin the node's current key; returns its fingerprint."""
        try:
            spec = lab_spec(self.stack or "lab", path=self.stack_file)
            pub = str(lab_module.repin_host_key(spec, node.hostname))
        except Exception as exc:  # the lab's errors are its own types; report them, don't guess
            raise hostkeys.HostKeyError(f"lab re-pin of {node.hostname} failed: {exc}") from exc
        return hostkeys.key_fingerprint(hostkeys.parse_public_key(pub)[1])


def register(site: Site) -> None:
    """Make the lab's source the registered one, for a lab stack only (called by the CLI layer).

    `lab_mode` is the lab's own marker of its stacks: a real site's rebuild must never take a key from here.
    """
    if site.lab_mode:
        hostkeys.register_lab_source(LabSource)
