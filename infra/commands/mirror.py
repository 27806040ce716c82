"""`gpufleet mirror status`: what a segment mirror serves, against the lock."""

from __future__ import annotations

import argparse
from typing import Any

from infra.bundle.remote import MIRROR_ROOT, RemoteError, SshMirror
from infra.bundle.status import mirror_status
from infra.commands.site import add_stack_args, site_from_args
from infra.commands.supply import (
    InputError,
    fail,
    guarded,
    read_lock,
    stack_lock_path,
)
from infra.console import Exit, emit


def register(sub: Any) -> None:
    """Register mirror (status)."""
    m = sub.add_parser("mirror", help="what a segment mirror serves")
    msub = m.add_subparsers(dest="mirror_command", required=True, metavar="STEP")
    p = msub.add_parser("status", help="apt packages, images, files served, and whether they match the lock")
    add_stack_args(p)
    p.add_argument("--mirror", required=True)
    p.add_argument("--mirror-root", default=MIRROR_ROOT)
    p.set_defaults(func=guarded(cmd_mirror_status))


def cmd_mirror_status(args: argparse.Namespace) -> int:
    """What the mirror serves vs. the lock; exit 3 when it lacks locked artifacts."""
    site = site_from_args(args)
    lock = read_lock(stack_lock_path(args))
    if lock is None:
        return Exit.FAILED
    try:
        pub = SshMirror.for_site(site, args.mirror, args.mirror_root)
    except KeyError as exc:
        raise InputError(str(exc.args[0])) from None
    try:
        data = mirror_status(site, lock, pub)
    except RemoteError as exc:
        return fail(args, Exit.UNAVAILABLE, str(exc))
    emit(args.json, data, lambda d: "\n".join([
        f"{d['mirror']} (segments {', '.join(d['segments'])}): apt {d['apt_packages']} packages, "
        f"{d['images']} images, {d['files']} files — " + ("matches the lock" if d["matches_lock"] else
                                                           f"MISSING {len(d['missing'])} locked artifact(s)"),
        *(f"  - missing: {m}" for m in d["missing"])]))
    return Exit.OK if data["matches_lock"] else Exit.DRIFT
