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

# A reimage lease outlives the longest SSH wait by this much (power-on and PXE start before the wait).
LEASE_MARGIN_S = 900


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
    """One node alone: apply its roles, then record the outcome (break-glass and the lab; under `pulumi up`
    nodes converge in their segment batch's step, `batch_converge`)."""
    validate: str
    """Print the node's facts as JSON (GPUs, driver, CUDA, reboot_required, validation), then record the outcome."""
    decommission: str = ""
    """What removing the node from the stack runs (`delete` of `<host>-decommission`)."""

    @property
    def decommission_check(self) -> str:
        """The decommission step's create: the same call with `--dry-run` (checks, touches nothing)."""
        return f"{self.decommission} --dry-run" if self.decommission else ""

    def in_order(self) -> list[tuple[str, str]]:
        """(step, command) pairs as `pulumi up` runs them on create."""
        return [("bmc", self.provision), ("wait-ssh", self.wait_ssh), ("converge", self.converge),
                ("validate", self.validate)]


def _recorded(command: str, stack: str, hostname: str, step: str) -> str:
    # `;` not `&&`: the outcome is recorded whether the step passed or failed, and the step's exit
    # status becomes rollout-record's: 0 when passed or tolerated by rollout.max_failures, else 1
    # (see `gpufleet rollout-record --help`). pulumi-command runs `/bin/sh -c <create>`.
    return f"{command}; {_cmd('rollout-record', '--stack', stack, '--node', hostname, '--step', step)} --rc $?"


def node_commands(stack: str, hostname: str, *, reimage_on_create: bool, ssh_timeout_s: int,
                  decommission_policy: str = "", node_json: str = "") -> NodeCommands:
    """The command lines of one node's lifecycle steps (a decommission step only with a policy and node JSON)."""
    power = _cmd("bmc", "power", "--stack", stack, "--node", hostname, "--state", "on")
    provision = power
    if reimage_on_create:
        provision += " && " + _cmd("bmc", "reimage", "--stack", stack, "--node", hostname, "--yes")
    # The BMC step first takes one of rollout.max_parallel_reimage leases on the controller (given back
    # by the node's wait-ssh step, or expiring after `lease`): the bound lives outside the resource graph
    # (infra.components.outcomes), so the graph stays as shallow as one node's steps.
    lease = ssh_timeout_s + LEASE_MARGIN_S
    provision = _cmd("provision-slot", "--stack", stack, "--node", hostname, "--ttl", str(lease)) + " && " + provision
    return NodeCommands(
        power_on=power,
        provision=provision,
        wait_ssh=_cmd("wait-ssh", "--stack", stack, "--node", hostname, "--timeout", str(ssh_timeout_s)),
        converge=_recorded(_cmd("converge", "--stack", stack, "--node", hostname, "--json"), stack, hostname,
                           "converge"),
        validate=_recorded(_cmd("validate-node", "--stack", stack, "--node", hostname, "--json"), stack, hostname,
                           "validate"),
        decommission=decommission(stack, hostname, decommission_policy, node_json)
        if decommission_policy and node_json else "",
    )


def batch_converge(stack: str, hostnames: list[str]) -> str:
    """A segment batch's converge step: one `gpufleet converge` (one Ansible job) over the batch's nodes.

    `--record` writes each node's outcome for the rollout guard and exits 1 naming the failed nodes when
    the segment is over rollout.max_failures; `--batch-slot` holds one of rollout.max_parallel_batches
    controller slots while it runs, so segments' batches run side by side only up to that bound.
    """
    nodes = [part for h in hostnames for part in ("--node", h)]
    return _cmd("converge", "--stack", stack, *nodes, "--json", "--record", "--batch-slot")


def rollout_guard(stack: str, segment: str, batch: int) -> str:
    """Fail when the segment's failed nodes up to `batch` exceed rollout.max_failures (later batches wait on it)."""
    return _cmd("rollout-guard", "--stack", stack, "--segment", segment, "--batch", str(batch))


def decommission(stack: str, hostname: str, policy: str, node_json: str) -> str:
    """What removing a node runs (the `delete` of `<host>-decommission`); `bmc_json` holds no secret.

    At delete time the node is no longer in the stack file, so the command carries what it needs: the
    policy and the node's stack entry as JSON (its BMC password only as a reference; a `config:` secret
    arrives in the step's environment, stored encrypted in the state).
    """
    return _cmd("decommission", "--stack", stack, "--node", hostname, "--policy", policy, "--node-json", node_json)


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


def provision_converge(stack: str, segment: str) -> str:
    """Converge a segment's provisioning service on its provisioning host (before its nodes are reinstalled)."""
    return _cmd("provision", "converge", "--stack", stack, "--segment", segment, "--json")
