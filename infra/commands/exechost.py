"""`gpufleet exec-host runtime | install | status`: the execution runtime of segment-local execution."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from infra import ssh
from infra.ansible.remote import runtime
from infra.ansible.remote.job import ExecHost, exec_host
from infra.bundle.lock import Lock, LockError, lock_path, lock_path_for, runtime_release
from infra.commands.site import add_stack_args, site_from_args
from infra.console import CommandError, Exit, emit, table
from infra.model.site import Site
from infra.plan.execruntime import RuntimeFile, RuntimeSpec, RuntimeSpecError
from infra.ssh import SshSettings

DEFAULT_OUT = Path(".gpufleet/exec-runtime")


def register(sub: Any) -> None:
    """Register `exec-host`."""
    p = sub.add_parser(
        "exec-host",
        help="execution hosts of segment-local execution: fetch, install and check their runtime",
        description="A segment with `execution: {host: ...}` runs its Ansible on that host: `converge` streams "
        "each job to it with ansible-runner's transmit/worker/process protocol over SSH. The host needs the "
        "runtime (the wheels of ansible-core, ansible-runner, Mitogen that uv.lock pins, the job supervisor "
        "and the roles as one collection tar), recorded in the stack's lock, carried by the bundle and fetched from "
        "the segment's mirror; jobs carry only inventory, variables and keys.",
    )
    esub = p.add_subparsers(dest="exec_command", required=True, metavar="ACTION")
    r = esub.add_parser("runtime", help="fetch the runtime's files (checked against uv.lock's sha256) into a dir")
    r.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"directory for the files (default {DEFAULT_OUT})")
    r.add_argument("--json", action="store_true", help="machine-readable JSON output")
    r.set_defaults(func=cmd_runtime)
    for name, func, text in (
        ("install", cmd_install, "install the locked runtime on each selected segment's execution host"),
        ("status", cmd_status, "does each execution host have the runtime the lock records?"),
    ):
        i = esub.add_parser(name, help=text)
        add_stack_args(i)
        i.add_argument("--segment", help="only this segment's execution host")
        if name == "install":
            i.add_argument(
                "--stream",
                action="store_true",
                help="for a segment without a mirror (connected only): send the files over the SSH connection "
                "instead; without it such a segment is refused",
            )
            i.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where --stream keeps the fetched files")
        i.set_defaults(func=func)


def _targets(site: Site, segment: str | None) -> list[ExecHost]:
    names = [segment] if segment else [s.name for s in site.segments]
    if segment and site.segment(segment) is None:
        known = ", ".join(s.name for s in site.segments)
        raise CommandError(Exit.INVALID, f"--segment: no segment {segment!r}; known: {known}")
    out = [t for n in names if (t := exec_host(site, n)) is not None]
    if not out:
        raise CommandError(
            Exit.INVALID,
            "no selected segment has an execution host: set `segments[].execution.host` in the stack "
            "(every segment runs Ansible on the controller now)",
        )
    return out


def _controller_release() -> RuntimeSpec:
    try:
        return runtime.spec()
    except RuntimeSpecError as exc:
        raise CommandError(Exit.INVALID, str(exc)) from None


def _collection(release: RuntimeSpec) -> RuntimeFile | None:
    return next((f for f in release.files if f.is_collection), None)


def locked_release(site: Site, lock_file: Path, segment: str, host: str | None = None) -> RuntimeSpec:
    """The runtime the stack's lock records for `segment`, which must be this controller's (`uv.lock`, roles).

    Raises:
        CommandError: (exit 2) no lock, a lock without the segment's runtime, one made from another uv.lock,
            or one whose roles (the collection) are not this controller's.

    """
    mine = _controller_release()
    try:
        lock = Lock.from_json(lock_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CommandError(
            Exit.INVALID, f"{lock_file}: no lock file; the execution runtime of segment {segment!r} is recorded "
            "there: run `gpufleet lock` first"
        ) from None
    except (OSError, LockError, UnicodeDecodeError) as exc:
        raise CommandError(Exit.INVALID, f"{lock_file}: not a readable lock ({exc}); re-run `gpufleet lock`") from None
    locked = runtime_release(lock, segment, mine.python, mine.glibc)
    if locked is None:
        raise CommandError(
            Exit.INVALID, f"{lock_file}: records no execution runtime for segment {segment!r} (its "
            "`execution.host` is newer than the lock): run `gpufleet lock`, then bundle and import it"
        )
    mine_roles, locked_roles = _collection(mine), _collection(locked)
    if locked.runtime_id != mine.runtime_id and mine_roles != locked_roles:
        # The roles changed (or the lock predates locked roles): the execution host would run other roles
        # than the ones this controller plans with.
        where = f"execution host {host} of segment {segment!r}" if host else f"segment {segment!r}"
        had = locked_roles.version if locked_roles else "none"
        raise CommandError(
            Exit.INVALID, f"{where}: the lock's roles (collection {had}) are not this controller's "
            f"({mine_roles.version if mine_roles else 'none'}, from roles/, plugins/, playbooks/): run `gpufleet "
            f"lock`, then `gpufleet bundle build --kind runtime` into the mirror (or `exec-host install --stream`) "
            f"and `gpufleet exec-host install --segment {segment}`"
        )
    if locked.runtime_id != mine.runtime_id:
        raise CommandError(
            Exit.INVALID, f"{lock_file}: execution runtime {locked.runtime_id} of segment {segment!r} is not this "
            f"controller's ({mine.runtime_id}: ansible-core {mine.version_of('ansible-core')}, from uv.lock): "
            "re-run `gpufleet lock` and bring the new bundle to the mirror"
        )
    return locked


def lock_file_of(args: argparse.Namespace) -> Path:
    """The lock next to the stack the arguments name."""
    return lock_path_for(args.stack_file) if args.stack_file else lock_path(args.stack)


def require_runtime(site: Site, lock_file: Path, segments: set[str]) -> None:
    """Refuse (exit 2) unless every execution host of `segments` has exactly the lock's runtime installed.

    One SSH call per execution host, before any job starts: a converge never runs on a runtime the lock
    (and the bundle its mirror imported) does not record.
    """
    settings = SshSettings.of(site)
    for seg in sorted(segments):
        target = exec_host(site, seg)
        if target is None:
            continue
        locked = locked_release(site, lock_file, seg, target.name)
        try:
            found = runtime.read_installed(
                settings, target.address, user=target.user, runtime_dir=target.runtime_dir,
                runtime_id=locked.runtime_id
            )
        except ssh.SshError as exc:
            raise CommandError(Exit.UNAVAILABLE, f"execution host {target.name}: {exc}") from None
        why = runtime.mismatch(found, locked)
        if why is not None:
            raise CommandError(
                Exit.INVALID, f"execution host {target.name} of segment {seg!r}: {why} (the lock's release, "
                f"ansible-core {locked.version_of('ansible-core')}): run `gpufleet exec-host install --segment {seg}`"
            )


def cmd_runtime(args: argparse.Namespace) -> int:
    """Fetch this controller's runtime files (the connected side's copy; `install --stream` uses it)."""
    release = _controller_release()
    try:
        runtime.fetch(args.out, release)
    except runtime.RuntimeInstallError as exc:
        raise CommandError(Exit.UNAVAILABLE, str(exc)) from None
    data = {"dir": str(args.out), **release.as_dict()}
    emit(
        args.json,
        data,
        lambda d: f"{d['dir']}\nid {d['id']}, python {d['python']}, glibc >= {d['glibc']}\n"
        + "\n".join(f"  {f['filename']}  sha256:{f['sha256']}" for f in d["files"]),
    )
    return Exit.OK


def cmd_install(args: argparse.Namespace) -> int:
    """Install the locked runtime on every selected execution host (from its segment's mirror)."""
    site = site_from_args(args)
    targets = _targets(site, args.segment)
    lock_file = lock_file_of(args)
    settings = SshSettings.of(site)
    plan = []
    for t in targets:
        base = runtime.mirror_base(site, t.segment)
        if base is None and not args.stream:
            raise CommandError(
                Exit.INVALID, f"segment {t.segment!r} has no mirror to fetch the runtime from: give it one, or pass "
                "--stream to send the locked files from this controller (a connected segment's fallback)"
            )
        plan.append((t, locked_release(site, lock_file, t.segment, t.name), base))
    rows = []
    failed = False
    for t, release, base in plan:
        try:
            files = runtime.fetch(args.out, release) if base is None else None
            rel = runtime.install(
                settings, t.address, user=t.user, runtime_dir=t.runtime_dir, release=release, base=base,
                files_dir=files
            )
            rows.append({"segment": t.segment, "host": t.name, "address": t.address, "ok": True, "release": rel,
                         "from": base or "controller (--stream)"})
        except (runtime.RuntimeInstallError, ssh.SshError) as exc:
            failed = True
            rows.append({"segment": t.segment, "host": t.name, "address": t.address, "ok": False, "error": str(exc)})
    emit(
        args.json,
        {"runtime": _controller_release().runtime_id, "hosts": rows},
        lambda d: table(
            [(r["segment"], r["host"], r.get("from", ""), r.get("release") or "FAILED: " + r["error"])
             for r in d["hosts"]],
            ["segment", "host", "from", "release"],
        ),
    )
    return Exit.FAILED if failed else Exit.OK


def cmd_status(args: argparse.Namespace) -> int:
    """Exit 1 when an execution host lacks the runtime release the lock records for its segment."""
    site = site_from_args(args)
    settings = SshSettings.of(site)
    lock_file = lock_file_of(args)
    rows = []
    for t in _targets(site, args.segment):
        locked = locked_release(site, lock_file, t.segment, t.name)
        try:
            found = runtime.read_installed(
                settings, t.address, user=t.user, runtime_dir=t.runtime_dir, runtime_id=locked.runtime_id
            )
            state = runtime.mismatch(found, locked) or "installed"
        except ssh.SshError as exc:
            state = f"unreachable: {exc.detail}"
        rows.append({"segment": t.segment, "host": t.name, "address": t.address, "runtime": state})
    emit(
        args.json,
        {"runtime": _controller_release().runtime_id, "hosts": rows},
        lambda d: table(
            [(r["segment"], r["host"], r["address"], r["runtime"]) for r in d["hosts"]],
            ["segment", "host", "address", f"runtime {d['runtime']}"],
        ),
    )
    return Exit.OK if all(r["runtime"] == "installed" for r in rows) else Exit.FAILED
