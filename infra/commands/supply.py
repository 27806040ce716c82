"""What the supply-chain commands (`lock`, `bundle`, `mirror`) share: their options, errors and lock reading."""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path

import yaml
from pydantic import ValidationError

from infra.bundle.apt import AptError
from infra.bundle.build import BuildError
from infra.bundle.lock import Lock, LockError, lock_path, lock_path_for
from infra.bundle.manifest import ManifestError, read_regular
from infra.bundle.publish import ImportRefused
from infra.bundle.remote import RemoteError
from infra.bundle.signing import SigningError
from infra.bundle.store import FetchError
from infra.console import Exit, emit
from infra.model.load import SiteError
from infra.model.site import AptSource
from infra.plan.node import UnknownNodeError


def sources_arg(p: argparse.ArgumentParser) -> None:
    """`--sources FILE`: apt sources to resolve and fetch from instead of the stack's."""
    p.add_argument("--sources", type=Path, metavar="FILE",
                   help="YAML list of apt sources ({name, url, suite, components, keyring}) to resolve and fetch "
                        "packages from instead of the stack's connected sources (e.g. when the connected side "
                        "is not in the stack)")


def load_sources(path: Path | None) -> list[AptSource]:
    """The apt sources of a `--sources` file (none without one)."""
    if path is None:
        return []
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or []
    if not isinstance(raw, list):
        raise ValueError(f"{path}: expected a YAML list of apt sources")
    return [AptSource.model_validate(s) for s in raw]


def env_path(name: str) -> Path | None:
    """A path from an environment variable (a default of an option), None when unset."""
    v = os.environ.get(name)
    return Path(v) if v else None


def stack_lock_path(args: argparse.Namespace) -> Path:
    """The stack's lock file (`lock --out` when given)."""
    if getattr(args, "out", None) and args.command == "lock":
        return Path(args.out)
    return lock_path_for(args.stack_file) if args.stack_file else lock_path(args.stack)


class InputError(Exception):
    """Bad input to a bundle/lock/mirror command (exit 2)."""


def fail(args: argparse.Namespace, code: int, message: str) -> int:
    """One line on stderr (or a JSON object under --json) and the exit code."""
    # A refused bundle lists each problem on its own line; everything else is one line.
    line = message if message.startswith("bundle rejected") else " ".join(message.split())
    if getattr(args, "json", False):
        emit(True, {"ok": False, "error": message, "exit": int(code)}, str)
    else:
        sys.stderr.write(f"error: {line}\n")
    return code


def guarded(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Map every error of a bundle/lock/mirror command to an exit code and a message; never a traceback."""

    @functools.wraps(func)
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except (InputError, LockError, ManifestError, ValidationError) as exc:
            return fail(args, Exit.INVALID, str(exc))
        except (SiteError, UnknownNodeError):
            raise  # the CLI's own handler lists every stack problem (exit 2)
        except ImportRefused as exc:
            return fail(args, Exit.INVALID if exc.invalid else Exit.FAILED, str(exc))
        except (BuildError, SigningError) as exc:
            return fail(args, Exit.FAILED, str(exc))
        except (RemoteError, AptError, FetchError) as exc:
            return fail(args, Exit.UNAVAILABLE if isinstance(exc, AptError | FetchError) else Exit.FAILED, str(exc))
        except OSError as exc:
            return fail(args, Exit.FAILED, f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": "))
        except Exception as exc:
            return fail(args, Exit.FAILED, f"unexpected {type(exc).__name__}: {exc} (please report this)")

    return run


def read_lock(path: Path) -> Lock | None:
    """The lock file, or None (after saying so) when there is none yet."""
    if not path.is_file():
        sys.stderr.write(f"error: no lock file {path}; run `gpufleet lock` first\n")
        return None
    try:
        return Lock.from_json(read_regular(path, 1 << 30).decode("utf-8"))
    except (LockError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a readable lock file ({exc}); re-run `gpufleet lock`") from None
