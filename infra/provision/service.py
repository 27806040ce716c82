"""What `roles/provisioning` gets on each segment's provisioning host, derived from the stack and its lock. Pure.

The one place that turns a segment's `provisioning:` entry into the role's variables:

- `provisioning_packages`: `dnsmasq-base` and `ipxe` at the stack's exact versions (`provisioning.dnsmasq_version`,
  `ipxe_version`), the versions `gpufleet lock` resolves and `infra.bundle.declared` declares for the segment, so
  `lock --check` notices a change and an air-gapped mirror carries them;
- `provisioning_apt_sources`: a mirror host installs from the repository it serves itself (as for Prometheus);
  a node keeps the sources `base` manages;
- `provisioning_dnsmasq_conf`, `provisioning_http_files`, `provisioning_address`, `provisioning_http_port`: the
  renderer's `SegmentService` (`infra.provision.render`), with the lock's image sha256/size in the deploy
  command lines;
- `provisioning_files`: the lock's `os-image` files of every image the segment's nodes name (disk image, deploy
  kernel, deploy initrd), each with its sha256 and a URL in a file store of the mirror layout: the segment's
  mirror (`http://<mirror>:<port>/files/…`, where `gpufleet bundle import` puts them), else the segment's
  `provisioning.files_url`.

Every problem is a `ProvisioningInputError` naming the stack path (or lock file) and the fix: the CLI turns it
into exit 2 before any host is touched.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any

from infra.bundle.lock import OS_IMAGE_KIND, Artifact, Lock
from infra.model.load import CONFIG_KEY
from infra.model.site import Segment, Site
from infra.plan.packages import PROVISIONING_VERSION_FIELDS, provisioning_packages
from infra.provision.render import (
    DEPLOY_INITRD,
    DEPLOY_KERNEL,
    ImageRecord,
    SegmentService,
    provisioning_address,
    render_segment,
)

GROUP = "gpufleet_provisioning"
"""Inventory group of the provisioning hosts (playbooks/provisioning.yml)."""
ROLE = "provisioning"
#: Where `gpufleet image build --lock` records an image's files in the lock (and so in a bundle and on a mirror's
#: file store): `files/provision/images/<name>.img`, `files/provision/deploy/{vmlinuz,initrd.img}`. Below this
#: prefix is the file's path under the provisioning host's HTTP root.
LOCK_DIR = "files/provision/"
_FILES_AREA = "files/"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ProvisioningInputError(ValueError):
    """The stack or lock cannot give a segment's provisioning host its variables (exit 2, nothing touched)."""


@dataclass(frozen=True)
class ProvisioningHost:
    """One segment's provisioning host and how Ansible reaches it."""

    segment: str
    name: str
    address: IPv4Address
    user: str
    is_mirror: bool


def _path(site: Site, segment: Segment, key: str) -> str:
    i = site.segments.index(segment)
    return f"config.{CONFIG_KEY}.segments[{i}].provisioning.{key}"


def provisioning_hosts(site: Site, segments: list[str] | None = None) -> list[ProvisioningHost]:
    """The provisioning host of every segment that declares one (of `segments` when given), in stack order."""
    out = []
    for seg in site.segments:
        prov = seg.provisioning
        if prov is None or (segments is not None and seg.name not in segments):
            continue
        node = site.nodes_by_name.get(prov.host)
        mirror = site.mirror(prov.host)
        address = provisioning_address(site, seg)
        # A node is reached as its ssh_user (become when not root); a mirror or dedicated host as root, like
        # `gpufleet mirror` and `monitoring converge` reach mirrors.
        user = node.ssh_user if node is not None else "root"
        out.append(ProvisioningHost(seg.name, prov.host, address, user, mirror is not None and node is None))
    return out


def packages(site: Site, segment: Segment) -> list[dict[str, str]]:
    """`dnsmasq-base` and `ipxe` at the segment's exact versions (ProvisioningInputError when one is unset)."""
    prov = segment.provisioning
    if prov is None:
        raise ProvisioningInputError(f"segment {segment.name!r} has no provisioning service")
    for key, name in PROVISIONING_VERSION_FIELDS:
        if getattr(prov, key) is None:
            raise ProvisioningInputError(
                f"{_path(site, segment, key)}: unset; the provisioning host installs {name} at an exact version: "
                f"set it (Debian 12: `apt-cache policy {name}`), then run `gpufleet lock`"
            )
    return [p.as_dict() for p in provisioning_packages(segment)]


def _mirror_files_base(site: Site, segment: Segment) -> str | None:
    mirror = site.mirror(segment.mirror) if segment.mirror else None
    if mirror is None:
        return None
    port = "" if mirror.http_port == 80 else f":{mirror.http_port}"
    return f"http://{mirror.address}{port}/{_FILES_AREA}"


def files_base(site: Site, segment: Segment) -> str | None:
    """Base URL (ending in `/`) of the file store the segment's provisioning host fetches images from.

    The segment's mirror when it has one (air-gapped segments always do: the bundle brings the images there);
    else `provisioning.files_url`; None when neither is set.
    """
    prov = segment.provisioning
    mirror = _mirror_files_base(site, segment)
    if prov is not None and prov.files_url is not None:
        if segment.airgapped:
            raise ProvisioningInputError(
                f"{_path(site, segment, 'files_url')}: an air-gapped segment fetches its images from its mirror "
                "(the bundle carries them): remove files_url"
            )
        return prov.files_url.rstrip("/") + "/"
    return mirror


def _segment_images(site: Site, segment: Segment) -> list[str]:
    return sorted({n.image for n in site.nodes if n.segment == segment.name and n.image is not None})


def image_records(lock: Lock | None) -> dict[str, ImageRecord]:
    """Image name → sha256/size as the lock's `os_images` records them (none without a lock)."""
    return {} if lock is None else {i.name: ImageRecord(i.size, i.sha256) for i in lock.os_images}


def _served_rel(a: Artifact) -> str:
    # Locks written before images moved under the mirror's file area said `provision/…`.
    for prefix in (LOCK_DIR, "provision/"):
        if a.path.startswith(prefix):
            return a.path.removeprefix(prefix)
    return a.path


def files(site: Site, segment: Segment, lock: Lock | None, lock_name: str = "the lock") -> list[dict[str, str]]:
    """`provisioning_files`: every image the segment's nodes name, and the one deploy kernel and initrd.

    Raises:
        ProvisioningInputError: an image is not in the lock, images disagree on the deploy files (they are
            served at one path each), or there is no file store to fetch them from.

    """
    images = _segment_images(site, segment)
    if not images:
        return []
    base = files_base(site, segment)
    if base is None:
        raise ProvisioningInputError(
            f"{_path(site, segment, 'files_url')}: unset, and segment {segment.name!r} has no mirror; its nodes "
            f"install {', '.join(images)}: set files_url to a file store holding `gpufleet image build`'s output "
            "under provision/ (or give the segment a mirror)"
        )
    by_name = {} if lock is None else {a.name: a for a in lock.artifacts if a.kind == OS_IMAGE_KIND and a.resolved}
    out: dict[str, dict[str, str]] = {}
    for image in images:
        wanted = ((image, f"images/{image}.img"), (f"{image}:deploy-kernel", DEPLOY_KERNEL),
                  (f"{image}:deploy-initrd", DEPLOY_INITRD))
        for name, served in wanted:
            a = by_name.get(name)
            if a is None or _served_rel(a) != served:
                raise ProvisioningInputError(
                    f"{lock_name}: no os-image file {name!r} (at {LOCK_DIR}{served}) for segment {segment.name!r}: "
                    f"run `gpufleet image build {image} --repo <mirror> --out <dir> --lock <lock>`"
                )
            if not _SHA256.fullmatch(a.sha256 or ""):
                raise ProvisioningInputError(f"{lock_name}: os-image file {name!r} has no sha256 (edited by hand?): "
                                             "re-run `gpufleet image build … --lock`")
            entry = {"path": served, "url": base + a.path.removeprefix(_FILES_AREA), "sha256": a.sha256 or ""}
            other = out.get(served)
            if other is not None and other["sha256"] != entry["sha256"]:
                raise ProvisioningInputError(
                    f"{lock_name}: images {', '.join(images)} of segment {segment.name!r} were built with different "
                    f"deploy files, but the service serves one {served}: rebuild them from one lock"
                )
            out[served] = entry
    return [out[k] for k in sorted(out)]


def apt_sources(site: Site, host: ProvisioningHost) -> list[dict[str, Any]]:
    """A mirror host installs from the repository it serves itself; a node keeps what `base` manages."""
    mirror = site.mirror(host.name) if host.is_mirror else None
    if mirror is None:
        return []
    port = "" if mirror.http_port == 80 else f":{mirror.http_port}"
    return [{"name": mirror.name, "uris": f"http://{mirror.address}{port}/apt", "suites": "/", "components": [],
             "keyring": mirror.keyring}]


def service(site: Site, segment: Segment, lock: Lock | None) -> SegmentService:
    """The segment's rendered service, its deploy command lines carrying the lock's image sha256/size."""
    return render_segment(site, segment, images=image_records(lock))


def host_vars(site: Site, host: ProvisioningHost, lock: Lock | None, lock_name: str = "the lock") -> dict[str, Any]:
    """Role variables of one provisioning host (ProvisioningInputError naming the stack path when one is missing)."""
    segment = site.segment(host.segment)
    assert segment is not None  # provisioning_hosts only yields the site's own segments
    svc = service(site, segment, lock)
    return {
        "provisioning_packages": packages(site, segment),
        "provisioning_apt_sources": apt_sources(site, host),
        "provisioning_dnsmasq_conf": svc.dnsmasq_conf,
        "provisioning_http_files": dict(svc.http_files),
        "provisioning_address": str(svc.address),
        "provisioning_http_port": svc.http_port,
        "provisioning_files": files(site, segment, lock, lock_name),
    }


def inventory(site: Site, lock: Lock | None, hosts: list[ProvisioningHost], lock_name: str = "the lock"
              ) -> dict[str, Any]:
    """Inventory of the given provisioning hosts (group `gpufleet_provisioning`), plain values."""
    entries: dict[str, Any] = {}
    for h in hosts:
        entries[h.name] = {
            "ansible_host": str(h.address),
            "ansible_user": h.user,
            "ansible_become": h.user != "root",
            **host_vars(site, h, lock, lock_name),
        }
    return {"all": {"children": {GROUP: {"hosts": entries}}}}


def served_digest(site: Site, segment: Segment, lock: Lock | None, role_tree: str = "") -> str:
    """sha256 of what the segment's service serves and installs: the Pulumi step's trigger.

    Never raises for missing versions or images (the step's command reports those, exit 2): the digest covers
    the rendered files, the package versions as the stack has them, and the lock's entries of the images the
    segment's nodes name; `role_tree` (the roles' hash) makes a role change re-run the step too.
    """
    svc = service(site, segment, lock)
    prov = segment.provisioning
    assert prov is not None
    wanted = set(_segment_images(site, segment))
    locked = sorted((a.name, a.path, a.sha256 or "") for a in (lock.artifacts if lock else [])
                    if a.kind == OS_IMAGE_KIND and a.name.split(":", 1)[0].removesuffix(".json") in wanted)
    data = {
        "host": svc.host, "address": str(svc.address), "http_port": svc.http_port,
        "dnsmasq_conf": svc.dnsmasq_conf, "http_files": svc.http_files,
        "packages": [prov.dnsmasq_version, prov.ipxe_version], "files_url": prov.files_url,
        "mirror": _mirror_files_base(site, segment), "images": locked, "roles": role_tree,
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
