"""Turn a `SecretRef` into the secret's value, the one way every gpufleet command does it.

The site model only says *where* a secret lives. Under `pulumi up` a `config:` secret reaches the
`gpufleet` command as the environment variable `GPUFLEET_SECRET_<KEY>`, so the CLI, tests and
break-glass runs (no Pulumi backend) all resolve secrets the same way. Values are never logged and
never part of an exception message.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from infra.model.site import SecretRef

ENV_PREFIX = "GPUFLEET_SECRET_"


class SecretError(Exception):
    """A secret could not be read; the message names where it was looked for, never a value."""


def config_env_name(key: str) -> str:
    """Environment variable that carries Pulumi config secret `key` to a command.

    `bmc.lab-gpu01` → `GPUFLEET_SECRET_BMC_LAB_GPU01`; a project namespace prefix (`gpufleet:`) is dropped
    because the stack file's config keys are already in this project's namespace.
    """
    bare = key.split(":", 1)[1] if ":" in key else key
    return ENV_PREFIX + re.sub(r"[-.]", "_", bare).upper()


def _strip_newline(value: str) -> str:
    # Files written by `echo` or editors end in a newline that is not part of the password.
    return value.removesuffix("\n").removesuffix("\r")


def resolve_secret(ref: SecretRef) -> str:
    """The value `ref` points at.

    Args:
        ref: where the secret lives (exactly one of `config`, `env`, `file`).

    Returns:
        The secret, with one trailing newline removed for files.

    Raises:
        SecretError: the variable is unset or empty, the file is missing, unreadable or empty.

    """
    if ref.env is not None:
        value = os.environ.get(ref.env)
        if not value:
            raise SecretError(f"secret {ref.describe()}: environment variable {ref.env} is not set or empty")
        return value
    if ref.config is not None:
        name = config_env_name(ref.config)
        value = os.environ.get(name)
        if not value:
            raise SecretError(
                f"secret {ref.describe()}: not passed to this command; outside `pulumi up` export it as {name} "
                f"(for example `export {name}=$(pulumi config get {ref.config})`)"
            )
        return value
    path = Path(str(ref.file))
    try:
        value = _strip_newline(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SecretError(f"secret {ref.describe()}: file does not exist") from None
    except PermissionError:
        raise SecretError(f"secret {ref.describe()}: file is not readable by this user") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SecretError(f"secret {ref.describe()}: cannot read file ({type(exc).__name__})") from None
    if not value:
        raise SecretError(f"secret {ref.describe()}: file is empty")
    return value


def loose_permissions(ref: SecretRef) -> bool:
    """True when a file secret can be read by group or others (worth a warning; mode 0600 is expected)."""
    if ref.file is None:
        return False
    try:
        mode = Path(ref.file).stat().st_mode
    except OSError:
        return False
    return bool(mode & (stat.S_IRWXG | stat.S_IRWXO))
