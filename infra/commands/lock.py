"""`gpufleet lock`: derive the stack's lock file (every artifact pinned), or --check it against the stack."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from infra.bundle.apt import AptError
from infra.bundle.lock import (
    Lock,
    LockError,
    ResolveOptions,
    carry_os_images,
    check,
    resolve,
    unlocked_images,
    unresolved,
)
from infra.bundle.store import FetchError, Store
from infra.commands.site import add_stack_args, site_from_args
from infra.commands.supply import (
    guarded,
    load_sources,
    read_lock,
    sources_arg,
    stack_lock_path,
)
from infra.console import Exit, emit, table


def register(sub: Any) -> None:
    """Register lock."""
    p = sub.add_parser("lock", help="derive the stack's lock file (every artifact with version, size, sha256), "
                                    "or --check that it still matches the stack")
    add_stack_args(p)
    p.add_argument("--check", action="store_true", help="compare the lock with the stack (no network); exit 1 on drift")
    p.add_argument("--artifacts", action="append", default=[], metavar="DIR|URL",
                   help="where model files, wheels, plugin tarballs and OCI layouts are (mirror layout); repeatable")
    p.add_argument("--registry", action="append", default=[], metavar="HOST[:PORT]",
                   help="registry to resolve images by repository and digest; repeatable")
    p.add_argument("--dpkg-status", type=Path, help="installed baseline of the nodes' OS (default: nothing)")
    sources_arg(p)
    p.add_argument("--out", type=Path, help="lock file to write (default: next to the stack file)")
    p.set_defaults(func=guarded(cmd_lock))


def cmd_lock(args: argparse.Namespace) -> int:
    """Write the lock, or check it (exit 1 naming each difference)."""
    site = site_from_args(args)
    path = stack_lock_path(args)
    if args.check:
        lock = read_lock(path)
        if lock is None:
            return Exit.FAILED
        problems = check(lock, site) + [f"nodes[{i}].image {name}: not in the lock (run `gpufleet image build {name} "
                                        "--lock …`)" for i, name in unlocked_images(site, lock)]
        missing = [f"{a.kind} {a.name} {a.version or ''}".strip() for a in unresolved(lock)]
        emit(args.json, {"lock": str(path), "ok": not problems, "differences": problems, "unresolved": missing},
             lambda d: (f"{d['lock']}: matches the stack" if d["ok"] else
                        f"{d['lock']} does not match the stack (run `gpufleet lock`):\n"
                        + "\n".join(f"  - {p}" for p in d["differences"]))
             + ("".join(f"\n  note: unresolved (bundle build will refuse): {m}" for m in d["unresolved"])))
        return Exit.OK if not problems else Exit.FAILED
    try:
        sources = load_sources(args.sources)
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"error: --sources: {exc}\n")
        return Exit.INVALID
    opts = ResolveOptions(artifacts=[Store(a) for a in args.artifacts], registries=args.registry,
                          dpkg_status=args.dpkg_status, apt_sources=sources)
    t0 = time.monotonic()
    try:
        lock = resolve(site, opts)
    except (AptError, FetchError) as exc:
        sys.stderr.write(f"error: cannot resolve the lock: {exc}\n")
        return Exit.UNAVAILABLE
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    carry_os_images(_previous(old), lock, site)
    text = lock.to_json()
    if old != text:
        path.write_text(text, encoding="utf-8")
    kinds: dict[str, list[int]] = {}
    for a in lock.artifacts:
        k = kinds.setdefault(a.kind, [0, 0])
        k[0] += 1
        k[1] += a.size or 0
    data = {"lock": str(path), "changed": old != text, "artifacts": {k: {"count": v[0], "bytes": v[1]}
                                                                      for k, v in kinds.items()},
            "unresolved": [f"{a.kind} {a.name}" for a in unresolved(lock)], "notes": lock.notes,
            "seconds": round(time.monotonic() - t0, 1)}
    emit(args.json, data, lambda d: "\n".join(
        [f"{d['lock']}: {'written' if d['changed'] else 'unchanged'} ({d['seconds']} s)",
         table([(k, v["count"], f"{v['bytes'] / 1e6:.1f} MB") for k, v in sorted(d["artifacts"].items())],
               ["kind", "artifacts", "size"]), *(f"note: {n}" for n in d["notes"])]))
    return Exit.OK


def _previous(text: str) -> Lock | None:
    """The lock being replaced (its OS images are built, not resolved: they carry over); None if unreadable."""
    try:
        return Lock.from_json(text) if text else None
    except LockError:
        return None
