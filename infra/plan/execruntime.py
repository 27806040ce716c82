"""The execution runtime as locked files: exact wheels from `uv.lock`, the job supervisor and the roles.

An execution host (segment-local execution) runs `ansible-runner worker` and, under it, `ansible-playbook` with
Mitogen. What it needs is the dependency closure of ansible-core, ansible-runner and mitogen at the versions the
controller itself runs, and `uv.lock` is where those versions are written: this module reads the closure and,
for every package, the one wheel `uv.lock` lists for the execution host's platform, with the registry's own
sha256 and size (no second copy of a version, no hash computed here). The supervisor (`gpufleet-worker`,
`infra/ansible/remote/worker.py`) and the roles (the collection `galaxy.yml` declares, as one deterministic
tar: `collection_bytes`) are gpufleet's own files; their sha256 is computed from the checkout, so roles the
controller did not lock give another runtime id.

The target is the controller's Python minor version (3.11 now: Debian 12's `/usr/bin/python3`) on x86_64 Linux
with glibc >= the highest `manylinux_2_X` of the wheels chosen: a platform wheel (cryptography, PyYAML, cffi,
MarkupSafe) is taken only when its tags say it runs there. Pure in the sense of the plan layer: it reads
`uv.lock` and `worker.py`, nothing on the network. The bundle (lock, build) and the execution host's installer
(`infra/ansible/remote/runtime.py`) share this one description.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import sys
import tarfile
import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from packaging.markers import Marker
from packaging.tags import Tag, compatible_tags, cpython_tags
from packaging.utils import parse_wheel_filename

# The distributions a job runs; everything they require (for the target platform) comes along.
ROOTS = ("ansible-core", "ansible-runner", "mitogen")
FORMAT = 3  # bump when the layout of an installed release changes (2: wheels from the mirror, 3: + the roles)
WORKER_NAME = "gpufleet-worker"
WORKER_SOURCE = "gpufleet:infra/ansible/remote/worker.py"
# The roles: the collection `galaxy.yml` declares, as one deterministic tar built from the checkout.
COLLECTION_NAME = "gpufleet-collection"
COLLECTION_SOURCE = "gpufleet-build:collection"
COLLECTION_PARTS = ("galaxy.yml", "meta", "plugins", "roles", "playbooks")
# Where the collection lies inside an installed release (ANSIBLE_COLLECTIONS_PATH of a job).
COLLECTIONS_DIR = "collections"
# The execution host's platform. Debian 12 has glibc 2.36; the wheels chosen may need less, never more.
MACHINE = "x86_64"
GLIBC_MAX = (2, 36)
# Where the files live in a bundle and on a mirror (served as http://<mirror>/files/gpufleet-exec/<file>).
MIRROR_DIR = "files/gpufleet-exec"

_PROJECT = Path(__file__).resolve().parents[2]


class RuntimeSpecError(ValueError):
    """`uv.lock` cannot give a runtime for the execution host (the message names the package and the fix)."""


def norm(name: str) -> str:
    """PEP 503 normalised project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True, order=True)
class RuntimeFile:
    """One file of the runtime: a wheel of one distribution, or the supervisor."""

    name: str
    """Distribution name (normalised), or `gpufleet-worker`."""
    version: str
    filename: str
    source: str
    """Where the connected side fetches it: the registry URL `uv.lock` names, or `gpufleet:<path>`."""
    sha256: str
    size: int

    @property
    def path(self) -> str:
        """Path in a bundle and on the mirror."""
        return f"{MIRROR_DIR}/{self.filename}"

    @property
    def is_wheel(self) -> bool:
        """A wheel (else the supervisor script or the roles' collection)."""
        return self.filename.endswith(".whl")

    @property
    def is_collection(self) -> bool:
        """The roles' collection tar."""
        return self.name == COLLECTION_NAME


@dataclass(frozen=True)
class RuntimeSpec:
    """What one release of the runtime is: Python minor version, minimum glibc and its files."""

    python: str
    glibc: str
    files: tuple[RuntimeFile, ...]

    @property
    def runtime_id(self) -> str:
        """Stable id of the release: a digest of every file's name and sha256 (and the layout format)."""
        data = json.dumps(
            {
                "format": FORMAT,
                "python": self.python,
                "glibc": self.glibc,
                "files": sorted([f.filename, f.sha256] for f in self.files),
            },
            sort_keys=True,
        )
        return hashlib.sha256(data.encode()).hexdigest()[:16]

    def version_of(self, name: str) -> str:
        """Version of one distribution in the runtime (`?` when absent)."""
        return next((f.version for f in self.files if f.name == norm(name)), "?")

    def as_dict(self) -> dict[str, Any]:
        """JSON form: what an installed release records as `runtime.json`."""
        return {
            "format": FORMAT,
            "id": self.runtime_id,
            "python": self.python,
            "glibc": self.glibc,
            "files": [{"name": f.name, "version": f.version, "filename": f.filename, "sha256": f.sha256,
                       "size": f.size} for f in sorted(self.files)],
        }


def python_tag() -> str:
    """`3.11`: the Python minor version of the controller, which the execution host must have too."""
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def target_environment(python: str) -> dict[str, str]:
    """PEP 508 marker environment of the execution host (Linux, CPython `python`, x86_64)."""
    return {
        "implementation_name": "cpython",
        "implementation_version": f"{python}.0",
        "os_name": "posix",
        "platform_machine": MACHINE,
        "platform_python_implementation": "CPython",
        "platform_release": "",
        "platform_system": "Linux",
        "platform_version": "",
        "python_full_version": f"{python}.0",
        "python_version": python,
        "sys_platform": "linux",
        "extra": "",
    }


def target_tags(python: str) -> list[Tag]:
    """Wheel tags the execution host accepts, best first (PEP 600 manylinux up to `GLIBC_MAX`)."""
    major, minor = (int(x) for x in python.split("."))
    platforms = [f"manylinux_2_{m}_{MACHINE}" for m in range(GLIBC_MAX[1], 4, -1)]
    # The legacy aliases (PEP 513/571/599) of manylinux_2_5/2_12/2_17.
    platforms += [f"manylinux2014_{MACHINE}", f"manylinux2010_{MACHINE}", f"manylinux1_{MACHINE}"]
    return [
        *cpython_tags((major, minor), abis=[f"cp{major}{minor}"], platforms=platforms),
        *compatible_tags((major, minor), interpreter=f"cp{major}{minor}", platforms=platforms),
    ]


def _glibc_needed(tag: Tag) -> tuple[int, int]:
    legacy = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}
    m = re.match(r"manylinux_(\d+)_(\d+)_", tag.platform)
    if m:
        return int(m.group(1)), int(m.group(2))
    for prefix, need in legacy.items():
        if tag.platform.startswith(prefix + "_"):
            return need
    return (0, 0)


def _dependencies(pkg: dict[str, Any], env: dict[str, str]) -> list[str]:
    out = []
    for dep in pkg.get("dependencies", []):
        marker = dep.get("marker")
        if marker is None or Marker(marker).evaluate(env):
            out.append(norm(dep["name"]))
    return out


def worker_file(project: Path = _PROJECT) -> RuntimeFile:
    """The supervisor as a runtime file (its name carries its digest, so a new one is a new file)."""
    data = (project / WORKER_SOURCE.removeprefix("gpufleet:")).read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    return RuntimeFile(WORKER_NAME, sha[:16], f"{WORKER_NAME}-{sha[:16]}.py", WORKER_SOURCE, sha, len(data))


def collection_id(project: Path = _PROJECT) -> tuple[str, str]:
    """(namespace, name) of the collection from the project's `galaxy.yml`."""
    data = yaml.safe_load((project / "galaxy.yml").read_text(encoding="utf-8"))
    return str(data["namespace"]), str(data["name"])


def _collection_members(project: Path) -> list[Path]:
    out: list[Path] = []
    for part in COLLECTION_PARTS:
        src = project / part
        if src.is_file():
            out.append(src)
        elif src.is_dir():
            out += [p for p in src.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                    and p.suffix != ".pyc"]
    return sorted(out, key=lambda p: p.relative_to(project).as_posix())


def collection_bytes(project: Path = _PROJECT) -> bytes:
    """The roles (`COLLECTION_PARTS` of the checkout) as an uncompressed tar whose bytes depend on content only.

    Members are `ansible_collections/<namespace>/<name>/<path>`, sorted, regular files only, with mtime 0,
    owner 0:0 and mode 0644 (0755 when the file is executable): the same tree gives the same bytes on every
    controller. `ansible-galaxy collection build` is not used for the identity because it stamps every
    member with the build time (ansible-core 2.19, `ansible/galaxy/collection/__init__.py`:
    `tar_info.mtime = int(time.time())`), so two builds of one tree differ.
    """
    namespace, name = collection_id(project)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for path in _collection_members(project):
            data = path.read_bytes()
            info = tarfile.TarInfo(f"ansible_collections/{namespace}/{name}/{path.relative_to(project).as_posix()}")
            info.size = len(data)
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mode = 0o755 if path.stat().st_mode & 0o111 else 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def collection_file(project: Path = _PROJECT) -> RuntimeFile:
    """The roles as a runtime file: its name and version carry the tar's digest (new roles, new file)."""
    data = collection_bytes(project)
    sha = hashlib.sha256(data).hexdigest()
    return RuntimeFile(COLLECTION_NAME, sha[:16], f"{COLLECTION_NAME}-{sha[:16]}.tar", COLLECTION_SOURCE, sha,
                       len(data))


def own_file_bytes(f: RuntimeFile, project: Path = _PROJECT) -> bytes | None:
    """The bytes of a file of gpufleet's own (supervisor, roles) made from `project`; None for a wheel."""
    if f.source == COLLECTION_SOURCE:
        return collection_bytes(project)
    if f.source.startswith("gpufleet:"):
        return (project / f.source.removeprefix("gpufleet:")).read_bytes()
    return None


def spec_from(
    uv_lock: str, python: str, worker: RuntimeFile, collection: RuntimeFile | None = None
) -> RuntimeSpec:
    """The runtime `uv_lock` (its text) gives for an execution host with CPython `python`.

    `worker` is the supervisor and `collection` the roles (`collection_file`), both gpufleet's own files.

    Raises:
        RuntimeSpecError: a package of the closure is missing, listed twice, or has no wheel for the target.

    """
    try:
        data = tomllib.loads(uv_lock)
    except tomllib.TOMLDecodeError as exc:
        raise RuntimeSpecError(f"uv.lock: not TOML ({exc})") from None
    packages: dict[str, list[dict[str, Any]]] = {}
    for pkg in data.get("package", []):
        packages.setdefault(norm(pkg["name"]), []).append(pkg)
    env = target_environment(python)
    tags = target_tags(python)
    rank = {t: i for i, t in enumerate(tags)}
    files: list[RuntimeFile] = []
    glibc = (0, 0)
    seen: set[str] = set()
    todo = [norm(r) for r in ROOTS]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        found = packages.get(name, [])
        if len(found) != 1:
            raise RuntimeSpecError(
                f"uv.lock: {len(found)} entries for {name!r} (the execution runtime needs exactly one); "
                "run `uv lock` so the controller's environment has one version of it"
            )
        pkg = found[0]
        todo += _dependencies(pkg, env)
        best: tuple[int, dict[str, Any], Tag] | None = None
        for wheel in pkg.get("wheels", []):
            filename = wheel["url"].rsplit("/", 1)[-1]
            for tag in parse_wheel_filename(filename)[3]:
                if tag in rank and (best is None or rank[tag] < best[0]):
                    best = (rank[tag], wheel, tag)
        if best is None:
            raise RuntimeSpecError(
                f"uv.lock: {name} {pkg.get('version')} has no wheel for CPython {python} on manylinux {MACHINE} "
                "(an sdist cannot be installed offline on an execution host); pin a version that ships one"
            )
        _, wheel, tag = best
        glibc = max(glibc, _glibc_needed(tag))
        algo, _, digest = str(wheel.get("hash", "")).partition(":")
        if algo != "sha256" or not re.fullmatch(r"[0-9a-f]{64}", digest) or not isinstance(wheel.get("size"), int):
            raise RuntimeSpecError(f"uv.lock: the wheel of {name} has no sha256 hash and size; run `uv lock` again")
        files.append(RuntimeFile(name, str(pkg["version"]), wheel["url"].rsplit("/", 1)[-1], wheel["url"], digest,
                                 wheel["size"]))
    own = (worker,) if collection is None else (worker, collection)
    return RuntimeSpec(python, f"{glibc[0]}.{glibc[1]}", (*sorted(files), *own))


@cache
def spec(project: Path = _PROJECT) -> RuntimeSpec:
    """The runtime this controller's `uv.lock` gives (for its own Python minor version)."""
    lock = project / "uv.lock"
    try:
        text = lock.read_text(encoding="utf-8")
    except OSError as exc:
        raise RuntimeSpecError(f"{lock}: cannot read ({exc.strerror}); the execution runtime is made from it") from None
    return spec_from(text, python_tag(), worker_file(project), collection_file(project))
