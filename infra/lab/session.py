"""A handle on a running lab for tests and scripts: hosts, SSH with pinned keys, BMC access."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from infra.lab import lab as lab_mod
from infra.lab.config import LabHost, LabSpec, Paths
from infra.lab.hosts import ssh_base


@dataclass
class Lab:
    """A running lab and the helpers lab tests need."""

    spec: LabSpec
    paths: Paths
    stack_file: Path
    started_here: bool

    @property
    def stack(self) -> str:
        """Stack name (`lab`)."""
        return self.spec.stack

    @property
    def hosts(self) -> tuple[LabHost, ...]:
        """Every lab host: `.name`, `.address.ip`, `.segment`, `.kind` (node, mirror, outside)."""
        return self.spec.hosts

    def host(self, name: str) -> LabHost:
        """One host by name."""
        return self.spec.host(name)

    @property
    def ssh_config(self) -> Path:
        """OpenSSH config with every lab host (pinned known_hosts, controller key)."""
        return self.spec.ssh_config

    @property
    def known_hosts(self) -> Path:
        """known_hosts with each host's real key."""
        return self.spec.known_hosts

    @property
    def bmc_url(self) -> str:
        """Redfish service root (`http://127.0.0.1:8000`)."""
        return f"http://{self.spec.bmc.address}:{self.spec.bmc.port}"

    def bmc_auth(self) -> tuple[str, str]:
        """(user, password) of the lab BMCs."""
        return ("admin", self.paths.bmc_password.read_text().strip())

    def ssh(self, host: str, cmd: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run a shell command on a lab host as root over SSH with StrictHostKeyChecking=yes."""
        return subprocess.run([*ssh_base(self.spec, 5), host, cmd], capture_output=True, text=True,
                              timeout=timeout, check=False)

    def healthy(self) -> bool:
        """Every host running and answering SSH."""
        st = lab_mod.status(self.spec, self.paths)
        return bool(st["up"]) and all(h["ssh"] or h["bmc_off"] for h in st["hosts"])
