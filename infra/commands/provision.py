"""`gpufleet provision render|check` and `gpufleet image build`: network install of nodes, from the stack."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from infra.bundle.lock import OS_IMAGE_KIND, Artifact, Lock, LockError, OsImage, lock_path, lock_path_for, put_os_image
from infra.commands.hostplay import converge_hosts, role_problems
from infra.commands.site import add_stack_args, site_from_args
from infra.console import CommandError, Exit
from infra.model.site import Site
from infra.provision import service
from infra.provision.firstboot import HostKeyStore, KeyStoreError, firstboot_tar
from infra.provision.image import (
    DEFAULT_EPOCH,
    DEFAULT_PACKAGES,
    ImageError,
    ImageResult,
    ImageSpec,
    build,
    digest,
    manifest_rel,
    pins_from,
)
from infra.provision.render import ImageRecord, RenderError, SegmentService, firstboot_name, render_site
from infra.provision.service import LOCK_DIR, ProvisioningInputError


def register(sub: Any) -> None:
    """Register `provision`."""
    p = sub.add_parser(
        "provision",
        help="provisioning service (dnsmasq DHCP/TFTP + iPXE scripts) per segment, derived from the stack",
    )
    psub = p.add_subparsers(dest="provision_command", required=True, metavar="ACTION")
    r = psub.add_parser(
        "render",
        help="write <segment>/dnsmasq.conf and <segment>/http/… (boot.ipxe, ipxe/<mac>.ipxe) into a directory",
    )
    add_stack_args(r, json_flag=False)
    r.add_argument("--out", type=Path, required=True, help="directory to write into")
    r.add_argument("--images", type=Path, help="output directory of `gpufleet image build` (images/<name>.json): "
                   "adds each image's sha256/size and the first-boot/done URLs to the deploy command lines")
    r.add_argument("--keys", type=Path, help="host key store (one ed25519 key per node, made on first use): "
                   "writes each imaged node's first-boot data (http/firstboot/<mac>.tar.gz, mode 0600)")
    r.set_defaults(func=cmd_render)
    c = psub.add_parser("check", help="render into a temporary directory, then `dnsmasq --test -C` each config")
    add_stack_args(c, json_flag=False)
    c.set_defaults(func=cmd_check)
    cv = psub.add_parser(
        "converge",
        help="install and run each segment's provisioning service (dnsmasq, iPXE, HTTP) on its provisioning host",
        description="Runs playbooks/provisioning.yml (role provisioning) over the provisioning hosts of the stack's "
        "segments (`segments[].provisioning.host`: a node, the mirror, or a dedicated host), with every variable "
        "derived from the stack and its lock (packages, dnsmasq.conf, iPXE scripts, the locked OS images). Exit 0 "
        "when every host converged, 1 when one failed, 2 for bad input (nothing touched).",
    )
    add_stack_args(cv)
    cv.add_argument("--segment", action="append", help="only this segment's provisioning host (repeatable)")
    cv.add_argument("--check", action="store_true", help="check mode with diff: report, change nothing")
    cv.set_defaults(func=cmd_converge)

    i = sub.add_parser("image", help="node OS images for network install (reproducible, from one apt repository)")
    isub = i.add_subparsers(dest="image_command", required=True, metavar="ACTION")
    b = isub.add_parser("build", help="build images/<name>.img (+ .json manifest) and deploy/vmlinuz + initrd.img")
    b.add_argument("name", help="image name (what nodes[].image says)")
    b.add_argument("--repo", required=True,
                   help="flat apt repository to install from: the mirror's URL, or copy:///DIR for a local one")
    b.add_argument("--out", type=Path, required=True, help="output directory (HTTP-root layout)")
    b.add_argument("--packages", default=",".join(DEFAULT_PACKAGES), help="comma-separated package list")
    b.add_argument("--pins", type=Path, help="manifest of a previous build: its exact versions and epoch")
    b.add_argument("--epoch", type=int, help="SOURCE_DATE_EPOCH (default: the manifest's, else 2025-01-01)")
    b.add_argument("--work", type=Path, help="scratch directory (default: <out>.work)")
    b.add_argument("--lock", type=Path, help="lock file to record the built files in (kind os-image)")
    b.add_argument("--segment", action="append", default=[], help="segment the image is for (repeatable)")
    b.set_defaults(func=cmd_image_build)


def write_service(out: Path, svc: SegmentService) -> list[Path]:
    """Write one segment's files under `out/<segment>/`; return the paths written."""
    base = out / svc.segment
    written = []
    files = {"dnsmasq.conf": svc.dnsmasq_conf} | {f"http/{rel}": text for rel, text in svc.http_files.items()}
    for rel, text in files.items():
        path = base / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def image_records(images: Path | None) -> dict[str, ImageRecord]:
    """Image name → sha256/size from the manifests under `images/` of an image build's output."""
    out: dict[str, ImageRecord] = {}
    if images is None:
        return out
    for m in sorted((images / "images").glob("*.json")):
        try:
            data = json.loads(m.read_text(encoding="utf-8"))
            out[str(data["name"])] = ImageRecord(int(data["disk"]["size"]), str(data["disk"]["sha256"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CommandError(Exit.INVALID, f"--images: {m} is not an image manifest ({exc})") from None
    return out


def write_firstboot(out: Path, site: Site, svc: SegmentService, keys: HostKeyStore) -> list[Path]:
    """First-boot tarballs of the segment's imaged nodes (private host keys inside: mode 0600)."""
    written = []
    for node in site.nodes:
        if node.segment != svc.segment or node.image is None:
            continue
        path = out / svc.segment / "http" / firstboot_name(node.macs[0])
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(firstboot_tar(site, node, keys.get(node.hostname)))
        written.append(path)
    return written


def cmd_render(args: argparse.Namespace) -> int:
    """Write the files of every segment with a provisioning service."""
    site = site_from_args(args)
    services = render_site(site, images=image_records(args.images))
    if not services:
        sys.stderr.write("error: no segment declares `provisioning`; see docs/bare-metal.md\n")
        return Exit.INVALID
    count = sum(len(write_service(args.out, svc)) for svc in services)
    if args.keys is not None:
        try:
            count += sum(len(write_firstboot(args.out, site, svc, HostKeyStore(args.keys))) for svc in services)
        except KeyStoreError as exc:
            raise CommandError(Exit.UNAVAILABLE, str(exc)) from None
    for svc in services:
        sys.stdout.write(
            f"{svc.segment}: {svc.mode.value} on {svc.host} ({svc.address}), {len(svc.nodes)} reservations, "
            f"HTTP {svc.base_url}\n"
        )
    sys.stdout.write(f"wrote {count} files under {args.out}\n")
    return Exit.OK


def dnsmasq_test(conf: Path) -> subprocess.CompletedProcess[str]:
    """`dnsmasq --test -C FILE`: dnsmasq's own syntax check of a configuration file."""
    return subprocess.run(
        ["dnsmasq", "--test", f"--conf-file={conf}"], capture_output=True, text=True, check=False, timeout=30
    )


def cmd_check(args: argparse.Namespace) -> int:
    """Render into a temporary directory and let dnsmasq judge every configuration."""
    if shutil.which("dnsmasq") is None:
        sys.stderr.write("error: dnsmasq is not installed (Debian: apt-get install dnsmasq-base)\n")
        return Exit.UNAVAILABLE
    services = render_site(site_from_args(args))
    failed = 0
    with tempfile.TemporaryDirectory(prefix="gpufleet-provision-") as tmp:
        for svc in services:
            write_service(Path(tmp), svc)
            result = dnsmasq_test(Path(tmp) / svc.segment / "dnsmasq.conf")
            ok = result.returncode == 0
            failed += not ok
            sys.stdout.write(f"{svc.segment}: dnsmasq --test {'ok' if ok else 'FAILED'}\n")
            if not ok:
                sys.stdout.write(result.stdout + result.stderr)
    return Exit.FAILED if failed else Exit.OK


def record_in_lock(lock_file: Path, result: ImageResult, out: Path, segments: list[str]) -> None:
    """Put the build into the lock: its `os_images` entry and its four files (replacing an earlier build)."""
    try:
        lock = Lock.from_json(lock_file.read_text(encoding="utf-8"))
    except (OSError, LockError, ValueError) as exc:
        raise CommandError(Exit.INVALID, f"--lock {lock_file}: {exc}") from None
    files = [
        (result.name, result.disk.path),
        (f"{result.name}.json", manifest_rel(result.name)),
        (f"{result.name}:deploy-kernel", result.kernel.path),
        (f"{result.name}:deploy-initrd", result.initrd.path),
    ]
    segs = tuple(sorted(set(segments)))
    arts = []
    for name, rel in files:
        f = out / rel
        size = f.stat().st_size
        sha = result.disk.sha256 if rel == result.disk.path else digest(f)[1]
        arts.append(Artifact(OS_IMAGE_KIND, name, f"epoch-{result.epoch}", f"{LOCK_DIR}{rel}", size, sha,
                             str(f.resolve()), segs))
    image = OsImage(result.name, result.disk.sha256, result.disk.size, result.epoch,
                    tuple(sorted(f"{k}={v}" for k, v in result.packages.items())), segs)
    put_os_image(lock, image, arts)
    lock_file.write_text(lock.to_json(), encoding="utf-8")


def cmd_image_build(args: argparse.Namespace) -> int:
    """Build an image; print its sha256, size and build time."""
    epoch: int | None = None
    pins: tuple[tuple[str, str], ...] = ()
    if args.pins is not None:
        try:
            epoch, pins = pins_from(args.pins)
        except ImageError as exc:
            raise CommandError(Exit.INVALID, str(exc)) from None
    spec = ImageSpec(
        name=args.name,
        repo=args.repo,
        packages=tuple(p.strip() for p in args.packages.split(",") if p.strip()),
        epoch=args.epoch if args.epoch is not None else epoch if epoch is not None else DEFAULT_EPOCH,
        pins=pins,
    )
    try:
        spec.check()
    except ImageError as exc:
        raise CommandError(Exit.INVALID, str(exc)) from None
    if args.lock is not None and not args.lock.is_file():
        raise CommandError(Exit.INVALID, f"--lock {args.lock}: no such file (run `gpufleet lock` first)")
    if os.geteuid() != 0:
        # mmdebstrap --mode=root: package maintainer scripts run in a chroot as root, files keep their owners.
        raise CommandError(Exit.UNAVAILABLE, "gpufleet image build needs root (mmdebstrap --mode=root)")
    if shutil.which("mmdebstrap") is None:
        raise CommandError(Exit.UNAVAILABLE, "mmdebstrap is not installed (Debian: apt-get install mmdebstrap)")
    try:
        result = build(spec, args.out, args.work or args.out.with_name(args.out.name + ".work"))
    except ImageError as exc:
        raise CommandError(Exit.FAILED, one_line_error(exc)) from None
    if args.lock is not None:
        record_in_lock(args.lock, result, args.out, args.segment)
    sys.stdout.write(
        f"{result.disk.path}: {result.disk.size} bytes, sha256 {result.disk.sha256}\n"
        f"{result.kernel.path}: sha256 {result.kernel.sha256}\n{result.initrd.path}: sha256 {result.initrd.sha256}\n"
        f"{len(result.packages)} packages, {result.used_bytes} bytes of files, built in {result.seconds:.0f} s\n"
    )
    return Exit.OK


def one_line_error(exc: Exception) -> str:
    """The first line of an error (tool output follows on later lines in ImageError)."""
    lines = str(exc).splitlines()
    return lines[0] + (f" — {lines[-1].strip()}" if len(lines) > 1 else "")


def stack_lock(args: argparse.Namespace) -> tuple[Lock | None, str]:
    """The stack's lock (None when there is none) and its name for messages; exit 2 when it cannot be read."""
    path = lock_path_for(args.stack_file) if args.stack_file else lock_path(args.stack)
    if not path.is_file():
        return None, str(path)
    try:
        return Lock.from_json(path.read_text(encoding="utf-8")), str(path)
    except (OSError, UnicodeDecodeError, LockError) as exc:
        raise CommandError(Exit.INVALID, f"{path}: not a readable lock ({exc}); re-run `gpufleet lock`") from None


def check_role_arguments(inventory: dict[str, Any]) -> list[str]:
    """Every violation of the provisioning role's argument spec, checked on the controller before a run."""
    return role_problems(inventory, service.GROUP, service.ROLE)


def cmd_converge(args: argparse.Namespace) -> int:
    """Converge the provisioning hosts (check mode with --check)."""
    site = site_from_args(args)
    known = [s.name for s in site.segments if s.provisioning is not None]
    unknown = sorted(set(args.segment or []) - set(known))
    if unknown:
        raise CommandError(Exit.INVALID, f"--segment {', '.join(unknown)}: no such segment with `provisioning` "
                           f"(segments with a provisioning service: {', '.join(known) or 'none'})")
    if not known:
        raise CommandError(Exit.INVALID, "no segment declares `provisioning`; see docs/bare-metal.md")
    lock, lock_name = stack_lock(args)
    hosts = service.provisioning_hosts(site, args.segment or known)
    try:
        inventory = service.inventory(site, lock, hosts, lock_name)
    except (ProvisioningInputError, RenderError) as exc:
        raise CommandError(Exit.INVALID, str(exc)) from None
    return converge_hosts(args, site, "provisioning.yml", inventory, [h.name for h in hosts], group=service.GROUP,
                          role=service.ROLE, label="provisioning")
