"""`gpufleet bundle build | keygen | verify | import`: the air-gap bundle, connected side to isolated side."""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from infra.bundle.build import BuildError, BuildOptions, build, last_serial, save_serial, serial_path
from infra.bundle.declared import Kind
from infra.bundle.manifest import MAX_SERIAL, verify_bundle
from infra.bundle.publish import MIRROR_KEY_ENV, Target, import_bundle, release_signer
from infra.bundle.remote import MIRROR_ROOT, RemoteError, SshMirror
from infra.bundle.signing import KEYRING_ENV, SIGNING_KEY_ENV, SigningError, generate_key
from infra.bundle.store import Store
from infra.commands.site import add_stack_args, site_from_args
from infra.commands.supply import (
    InputError,
    env_path,
    guarded,
    load_sources,
    read_lock,
    sources_arg,
    stack_lock_path,
)
from infra.console import Exit, emit


def register(sub: Any) -> None:
    """Register bundle (build, keygen, verify, import)."""
    b = sub.add_parser("bundle", help="air-gap bundle: build (connected side), verify, import (isolated side)")
    bsub = b.add_subparsers(dest="bundle_command", required=True, metavar="STEP")
    p = bsub.add_parser("build", help="fetch exactly the locked artifacts into DIR, write and sign the manifest")
    add_stack_args(p)
    p.add_argument("--segment", help="only what this segment needs (default: every segment)")
    p.add_argument("--out", type=Path, required=True, help="new, empty directory for the bundle")
    p.add_argument("--artifacts", action="append", default=[], metavar="DIR|URL")
    p.add_argument("--registry", action="append", default=[], metavar="HOST[:PORT]")
    p.add_argument("--kind", action="append", default=[], choices=[k.value for k in Kind],
                   help="only locked artifacts of this kind (repeatable; e.g. `runtime`: the execution runtime alone)")
    sources_arg(p)
    p.add_argument("--signing-key", type=Path, default=env_path(SIGNING_KEY_ENV),
                   help=f"armored OpenPGP secret key file that signs the manifest (env {SIGNING_KEY_ENV})")
    p.add_argument("--serial", type=int,
                   help="the bundle's serial (default: the last one in Pulumi.<stack>.bundle-serial next to "
                        "the lock, plus 1); a mirror refuses a serial not newer than its last import")
    p.set_defaults(func=guarded(cmd_build))

    p = bsub.add_parser("keygen", help="make a bundle signing key pair (DIR/bundle.sec.asc, DIR/bundle.pub.asc)")
    p.add_argument("--out", type=Path, required=True, help="directory for the key files (created, mode 0700)")
    p.add_argument("--uid", default="gpufleet bundle signing key", help="user id of the key")
    p.set_defaults(func=guarded(cmd_keygen))

    p = bsub.add_parser("verify", help="check signature, manifest, every hash, no missing and no extra file")
    p.add_argument("dir", type=Path)
    p.add_argument("--keyring", type=Path, default=env_path(KEYRING_ENV),
                   help=f"public key(s) trusted to sign bundles (env {KEYRING_ENV})")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=guarded(cmd_verify))

    p = bsub.add_parser("import", help="verify, then publish into a mirror host over SSH (idempotent)")
    p.add_argument("dir", type=Path)
    add_stack_args(p)
    p.add_argument("--mirror", required=True, help="mirror name from the stack")
    p.add_argument("--keyring", type=Path, default=env_path(KEYRING_ENV))
    p.add_argument("--mirror-key", type=Path, default=env_path(MIRROR_KEY_ENV),
                   help=f"armored secret key that signs the mirror's apt Release (env {MIRROR_KEY_ENV})")
    p.add_argument("--mirror-root", default=MIRROR_ROOT, help=f"served tree on the mirror (default {MIRROR_ROOT})")
    p.add_argument("--allow-downgrade", action="store_true",
                   help="import a bundle whose serial is not newer than the mirror's (needs --reason; logged)")
    p.add_argument("--reason", help="why the downgrade is deliberate (recorded on the mirror and printed)")
    p.set_defaults(func=guarded(cmd_import))


def cmd_build(args: argparse.Namespace) -> int:
    """Build and sign a bundle."""
    site = site_from_args(args)
    if args.signing_key is None or not args.signing_key.is_file():
        sys.stderr.write(f"error: give --signing-key FILE (or {SIGNING_KEY_ENV}); bundles are always signed\n")
        return Exit.INVALID
    if args.serial is not None and not 1 <= args.serial <= MAX_SERIAL:
        raise InputError(f"--serial {args.serial}: give a positive integer")
    path = stack_lock_path(args)
    lock = read_lock(path)
    if lock is None:
        return Exit.FAILED
    record = serial_path(path)
    serial = args.serial if args.serial is not None else last_serial(record) + 1
    try:
        sources = load_sources(args.sources)
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"error: --sources: {exc}\n")
        return Exit.INVALID
    opts = BuildOptions(artifacts=[Store(a) for a in args.artifacts], registries=args.registry,
                        apt_sources=sources, kinds=args.kind)
    t0 = time.monotonic()
    try:
        man = build(site, lock, path.read_text(encoding="utf-8"), args.segment, args.out, args.signing_key, opts,
                    serial=serial)
    except BuildError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return Exit.FAILED
    except SigningError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return Exit.FAILED
    save_serial(record, serial)
    total = sum(d.size for d in man.files.values())
    emit(args.json, {"bundle": str(args.out), "files": len(man.files), "bytes": total,
                     "artifacts": len(man.artifacts), "serial": man.serial, "mirrors": list(man.mirrors),
                     "seconds": round(time.monotonic() - t0, 1)},
         lambda d: f"{d['bundle']}: serial {d['serial']} for {', '.join(d['mirrors'])}: {d['artifacts']} artifacts, "
                   f"{d['files']} files, {d['bytes'] / 1e6:.1f} MB, signed ({d['seconds']} s)")
    return Exit.OK


def cmd_keygen(args: argparse.Namespace) -> int:
    """Generate a signing key pair; refuses to overwrite."""
    sec, pub = args.out / "bundle.sec.asc", args.out / "bundle.pub.asc"
    if sec.exists() or pub.exists():
        sys.stderr.write(f"error: {args.out} already holds a key; refusing to overwrite it\n")
        return Exit.INVALID
    args.out.mkdir(parents=True, exist_ok=True)
    args.out.chmod(0o700)
    with tempfile.TemporaryDirectory(prefix="gpufleet-keygen-") as home:
        try:
            fpr = generate_key(Path(home) / "gnupg", args.uid, sec, pub)
        except SigningError as exc:
            sys.stderr.write(f"error: {exc}\n")
            return Exit.FAILED
    sys.stdout.write(f"{fpr}\n  secret: {sec} (keep it on the connected side)\n  public: {pub} (give it to "
                     "`bundle verify/import --keyring`)\n")
    return Exit.OK


def cmd_verify(args: argparse.Namespace) -> int:
    """Verify a bundle; exit 1 naming each problem."""
    _check_keyring(args.keyring)
    t0 = time.monotonic()
    man, problems = verify_bundle(args.dir, args.keyring)
    total = sum(d.size for d in man.files.values()) if man else 0
    secs = time.monotonic() - t0
    data = {"bundle": str(args.dir), "ok": not problems, "problems": problems, "files": len(man.files) if man else 0,
            "bytes": total, "seconds": round(secs, 2)}
    emit(args.json, data, lambda d: (f"{d['bundle']}: OK — signature good, {d['files']} files, "
                                     f"{d['bytes'] / 1e6:.1f} MB verified in {d['seconds']} s")
         if d["ok"] else f"{d['bundle']}: REJECTED\n" + "\n".join(f"  - {p}" for p in d["problems"]))
    if man is None:
        return Exit.INVALID  # not a bundle: no manifest, or one that does not parse
    return Exit.OK if not problems else Exit.FAILED


def _check_keyring(keyring: Path | None) -> None:
    """A keyring is required and must be a readable file: bad input (exit 2), as the README's table says."""
    if keyring is None:
        raise InputError(f"give --keyring FILE (or {KEYRING_ENV}): the keys trusted to sign bundles")
    if not keyring.is_file():
        raise InputError(f"--keyring {keyring}: no such file (give the public key(s) trusted to sign bundles)")


_REASON = re.compile(r"^[^\x00-\x1f\x7f]{3,300}$")


def cmd_import(args: argparse.Namespace) -> int:
    """Check the mirror key, verify, check site/mirror/segment/serial, then stage and switch."""
    site = site_from_args(args)
    _check_keyring(args.keyring)
    if args.mirror_key is None:
        raise InputError(f"give --mirror-key (or {MIRROR_KEY_ENV}): the key that signs the mirror's apt index")
    if args.allow_downgrade != (args.reason is not None):
        raise InputError("--allow-downgrade and --reason TEXT go together (a deliberate downgrade says why)")
    if args.reason is not None and not _REASON.match(args.reason):
        raise InputError("--reason: give 3 to 300 printable characters on one line")
    try:
        pub = SshMirror.for_site(site, args.mirror, args.mirror_root)
    except KeyError as exc:
        raise InputError(str(exc.args[0])) from None
    lock_file = stack_lock_path(args)
    lock_sha = hashlib.sha256(lock_file.read_bytes()).hexdigest() if lock_file.is_file() else None
    target = Target(site.name, args.mirror, tuple(s.name for s in site.segments if s.mirror == args.mirror),
                    lock_sha)
    try:
        _man, res = import_bundle(args.dir, args.keyring, pub, release_signer(args.mirror_key), target=target,
                                  override=args.reason if args.allow_downgrade else None)
    except (RemoteError, SigningError) as exc:
        raise RemoteError(f"import into {args.mirror} failed (the served tree is unchanged): {exc}") from None
    if res.override and res.switched and res.previous_serial is not None and res.serial <= res.previous_serial:
        sys.stderr.write(f"warning: DOWNGRADE of {args.mirror} from serial {res.previous_serial} to {res.serial} "
                         f"(--allow-downgrade, reason: {res.override}); recorded in the mirror's imports.log\n")
    data = {"mirror": args.mirror, "changed": res.changed, "uploaded": res.uploaded, "images": res.images,
            "apt_reindexed": res.apt_reindexed, "unchanged_files": res.unchanged, "serial": res.serial,
            "previous_serial": res.previous_serial, "downgrade": bool(
                res.switched and res.previous_serial is not None and res.serial <= res.previous_serial)}
    emit(args.json, data, lambda d: f"{d['mirror']}: serial {d['serial']}: " + (
        f"{len(d['uploaded'])} files uploaded, {len(d['images'])} images copied, apt index "
        f"{'re-signed' if d['apt_reindexed'] else 'unchanged'}" if d["changed"] else
        f"already up to date ({d['unchanged_files']} files, nothing changed)"))
    return Exit.OK
