"""Ansible settings of a run: the tuned profile gpufleet uses and plain defaults for comparison.

Settings travel as environment variables of the single ansible-playbook process (never an
ansible.cfg in the project, which would silently apply to every other Ansible run on the machine).
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import sys
from enum import StrEnum
from pathlib import Path

from infra.model.load import project_dir

# SshSettings moved to infra.ssh (the one SSH client); re-exported here for one release so callers
# importing it from infra.ansible.settings keep working.
from infra.ssh import SshSettings

__all__ = ["MAX_FORKS", "SshSettings", "Tuning", "mitogen_strategy_dir", "project_root", "runner_env"]


class Tuning(StrEnum):
    """Which runner settings a converge uses (`--tuning`).

    `tuned` (the default) runs Ansible's free strategy through Mitogen: one SSH connection and one
    persistent Python interpreter per node for the whole run, and each node goes through its tasks at
    its own pace (no wait for the slowest node after every task). `pipelined` is stock Ansible made
    fast (pipelining, ControlPersist, a fork per host, the same free strategy), the fallback if a node
    cannot run Mitogen.
    `defaults` is plain Ansible (forks 5, no pipelining, no ControlPersist), for benchmarks.
    """

    TUNED = "tuned"
    PIPELINED = "pipelined"
    DEFAULTS = "defaults"


# Upper bound of parallel hosts per run; a batch is rarely larger and each fork costs ~60 MB.
MAX_FORKS = 32


def project_root() -> Path:
    """The checkout holding roles/ and playbooks/ (installed package: its parent directory)."""
    return project_dir()


def mitogen_strategy_dir() -> Path:
    """The strategy plugins shipped in the installed mitogen package (ansible_mitogen)."""
    spec = importlib.util.find_spec("ansible_mitogen")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("mitogen is not installed (a gpufleet dependency): run scripts/setup.sh")
    return Path(spec.submodule_search_locations[0]) / "plugins" / "strategy"


def runner_env(
    tuning: Tuning,
    *,
    hosts: int,
    ssh: SshSettings,
    work_dir: Path,
    control_dir: Path,
    fact_cache: Path | None,
) -> tuple[dict[str, str], int]:
    """Environment of the ansible-playbook process and the fork count for `hosts` parallel hosts."""
    root = project_root()
    venv_bin = str(Path(sys.executable).parent)
    env = {
        # ansible-runner finds ansible-playbook on PATH only; without the venv's bin it "fails" with
        # rc=127 and no exception (see notes/pulumi-and-runner.md).
        "PATH": f"{venv_bin}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}",
        "ANSIBLE_ROLES_PATH": str(root / "roles"),
        "ANSIBLE_HOME": str(work_dir / "ansible-home"),
        "ANSIBLE_LOCAL_TEMP": str(work_dir / "tmp"),
        "ANSIBLE_RETRY_FILES_ENABLED": "false",
        "ANSIBLE_HOST_KEY_CHECKING": "true",
        "ANSIBLE_NOCOLOR": "true",
        "ANSIBLE_DEPRECATION_WARNINGS": "false",
        "ANSIBLE_SSH_RETRIES": "2",
        "ANSIBLE_TIMEOUT": "15",
    }
    # Ansible and Mitogen split this with shlex: quote each option so a path can never split in two.
    ssh_args = shlex.join(ssh.args())
    if tuning in (Tuning.TUNED, Tuning.PIPELINED):
        forks = max(1, min(hosts, MAX_FORKS))
        env |= {
            # One SSH connection per host for the whole run instead of one per task.
            "ANSIBLE_SSH_ARGS": f"{ssh_args} -o ControlMaster=auto -o ControlPersist=120s",
            # A short path: the socket name must fit in 108 bytes.
            "ANSIBLE_SSH_CONTROL_PATH_DIR": str(control_dir),
            # Modules go over stdin instead of sftp + chmod + execute + rm per task.
            "ANSIBLE_PIPELINING": "true",
            "ANSIBLE_PYTHON_INTERPRETER": "/usr/bin/python3",
            "ANSIBLE_GATHER_SUBSET": "!all,min",
            # Roles read facts as ansible_facts[...] only (tests/unit/test_roles_lint.py): not copying
            # every fact into a top-level `ansible_*` variable saves work on every task of every host.
            "ANSIBLE_INJECT_FACT_VARS": "false",
            # Nodes of a run share nothing (no run_once, no other host's variables): the linear
            # strategy's barrier after every task only makes each node wait for the slowest one.
            "ANSIBLE_STRATEGY": "free",
        }
        if tuning is Tuning.TUNED:
            env |= {
                # Mitogen keeps its own connection per node (same ssh config, pinned keys and
                # StrictHostKeyChecking: it builds its ssh command line from these settings).
                "ANSIBLE_SSH_ARGS": ssh_args,
                "ANSIBLE_STRATEGY_PLUGINS": str(mitogen_strategy_dir()),
                "ANSIBLE_STRATEGY": "mitogen_free",
            }
        if fact_cache is not None:
            env |= {
                "ANSIBLE_GATHERING": "smart",
                "ANSIBLE_CACHE_PLUGIN": "ansible.builtin.jsonfile",
                "ANSIBLE_CACHE_PLUGIN_CONNECTION": str(fact_cache),
                "ANSIBLE_CACHE_PLUGIN_TIMEOUT": "3600",
            }
    else:
        forks = 5
        env |= {
            "ANSIBLE_SSH_ARGS": f"{ssh_args} -o ControlMaster=no",
            "ANSIBLE_PIPELINING": "false",
        }
    return env, forks
