"""The exact `gpufleet` command lines that Pulumi resources run — the one place that builds them.

The lab test runs these same strings by hand, so a change here is a change to what `pulumi up`
does. Strings never contain secrets: secret values travel in the command's `environment` only
(`GPUFLEET_SECRET_<KEY>`, see `secret_env_name`).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from infra.secrets import ENV_PREFIX, config_env_name

# Relative to the command's `dir` (the project dir). Pulumi.yaml pins the same `.venv` for the
# program, and scripts/setup.sh creates it, so provider-run commands use the program's own code
# rather than whatever `gpufleet` happens to be first on the provider's PATH.
CLI = ".venv/bin/gpufleet"

SECRET_ENV_PREFIX = ENV_PREFIX


def secret_env_name(config_key: str) -> str:
    """Environment variable carrying a `config:` SecretRef's value to the CLI (`bmcPassword` → ..._BMCPASSWORD).

    The CLI side (`infra.secrets.resolve_secret`) reads the same name: one function decides it.
    """
    return config_env_name(config_key)


def _cmd(*parts: str) -> str:
    return " ".join([CLI, *(shlex.quote(p) for p in parts)])


@dataclass(frozen=True)
class NodeCommands:
    """Command lines of one node's steps, in the order they run."""

    power_on: str
    """Ensure the node is powered on (idempotent; the BMC step's `update`)."""
    provision: str
    """What the BMC step runs on create/replace: power on, then (if enabled) one-time PXE + reset."""
    wait_ssh: str
    """Wait until SSH answers with the pinned host key."""
    converge: str
    """Apply the node's roles (rolling order is Pulumi's `depends_on`)."""
    validate: str
    """Print the node's facts as JSON (GPUs, driver, CUDA, reboot_required, validation)."""

    def in_order(self) -> list[tuple[str, str]]:
        """(step, command) pairs as `pulumi up` runs them on create."""
        return [("bmc", self.provision), ("wait-ssh", self.wait_ssh), ("converge", self.converge),
                ("validate", self.validate)]


def node_commands(stack: str, hostname: str, *, reimage_on_create: bool, ssh_timeout_s: int) -> NodeCommands:
    """The command lines of one node's lifecycle steps."""
    power = _cmd("bmc", "power", "--stack", stack, "--node", hostname, "--state", "on")
    provision = power
    if reimage_on_create:
        provision += " && " + _cmd("bmc", "reimage", "--stack", stack, "--node", hostname, "--yes")
    return NodeCommands(
        power_on=power,
        provision=provision,
        wait_ssh=_cmd("wait-ssh", "--stack", stack, "--node", hostname, "--timeout", str(ssh_timeout_s)),
        converge=_cmd("converge", "--stack", stack, "--node", hostname, "--json"),
        validate=_cmd("validate-node", "--stack", stack, "--node", hostname, "--json"),
    )


def mirror_import(stack: str, mirror: str, bundle_dir: str) -> str:
    """Verify the bundle in `bundle_dir`, then publish it into an air-gapped segment's mirror.

    The keyring and the mirror's signing key come from the environment `pulumi up` runs in
    (see `gpufleet bundle import --help`), so they never appear in the command or the state.
    """
    return _cmd("bundle", "import", bundle_dir, "--stack", stack, "--mirror", mirror)


def mirror_status(stack: str, mirror: str) -> str:
    """Report the mirror's state as JSON (must pass before any node of the segment converges)."""
    return _cmd("mirror", "status", "--stack", stack, "--mirror", mirror, "--json")


def service_health(stack: str, service: str) -> str:
    """Probe an inference service's endpoints with one short completion each (JSON result)."""
    return _cmd("bench-inference", "--stack", stack, "--service", service, "--smoke", "--json")
