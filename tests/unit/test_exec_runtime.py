"""The execution runtime as a locked artifact: uv.lock → lock → bundle → the execution host's installer → converge.

Test data about uv.lock is uv's own format (https://docs.astral.sh/uv/concepts/projects/layout/#the-lockfile,
uv 0.9; the `[[package]]` entries with `wheels = [{url, hash, size}]` are copied in shape from this repository's
uv.lock); wheel tags follow PEP 425/600 (`packaging.tags`, the same code pip uses to pick a wheel).
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import importlib.metadata
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import threading
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.utils import parse_wheel_filename

from infra import ssh as ssh_module
from infra.ansible.remote import install as installer
from infra.ansible.remote import runtime
from infra.bundle.build import BuildError, BuildOptions, build
from infra.bundle.declared import Kind, declared, runtime_declared
from infra.bundle.lock import Artifact, Lock, check, decl_dict, runtime_artifact, runtime_release
from infra.bundle.manifest import verify_bundle
from infra.bundle.signing import generate_key
from infra.bundle.store import Store, file_digest
from infra.cli import main
from infra.commands.exechost import require_runtime
from infra.console import CommandError, Exit
from infra.model.load import parse_site, project_dir
from infra.plan import execruntime
from infra.ssh import SshSettings
from tests.unit.factories import make_site

UV_LOCK = project_dir() / "uv.lock"


# ------------------------------------------------------------------------------------ uv.lock → release

def test_the_release_is_the_controllers_own_environment_with_uv_locks_hashes() -> None:
    release = execruntime.spec()
    wheels = [f for f in release.files if f.is_wheel]
    assert {"ansible-core", "ansible-runner", "mitogen"} <= {f.name for f in wheels}
    # Read uv.lock independently: every file is the registry's wheel with the registry's sha256 and size.
    entries = {execruntime.norm(p["name"]): p for p in tomllib.loads(UV_LOCK.read_text())["package"]}
    for f in wheels:
        # The version the controller runs (uv installed it from uv.lock): no second copy of a version.
        assert importlib.metadata.version(f.name) == f.version, f.name
        listed = {w["url"]: w for w in entries[f.name]["wheels"]}
        assert f.source in listed, f
        assert listed[f.source]["hash"] == f"sha256:{f.sha256}" and listed[f.source]["size"] == f.size
    worker = next(f for f in release.files if f.name == execruntime.WORKER_NAME)
    data = (project_dir() / "infra/ansible/remote/worker.py").read_bytes()
    assert (worker.size, worker.sha256) == (len(data), hashlib.sha256(data).hexdigest())


def test_platform_wheels_are_for_the_execution_hosts_python_and_glibc() -> None:
    text = UV_LOCK.read_text()
    worker = execruntime.worker_file()
    for python in ("3.11", "3.12"):
        release = execruntime.spec_from(text, python, worker)
        accepted = set(execruntime.target_tags(python))
        for f in release.files:
            if f.is_wheel:
                tags = parse_wheel_filename(f.filename)[3]
                assert tags & accepted, (python, f.filename)
        pyyaml = next(f for f in release.files if f.name == "pyyaml")
        assert f"cp{python.replace('.', '')}-" in pyyaml.filename  # a compiled extension: this ABI only
        assert tuple(int(x) for x in release.glibc.split(".")) <= execruntime.GLIBC_MAX
    ids = {execruntime.spec_from(text, python, worker).runtime_id for python in ("3.11", "3.12")}
    assert len(ids) == 2


def _uv_lock(pyyaml_wheels: list[str], *, marker: str = "") -> str:
    def pkg(name: str, version: str, wheels: list[str], deps: str = "") -> str:
        ws = ", ".join(
            f'{{ url = "https://files.pythonhosted.org/packages/aa/{w}", hash = "sha256:{"a" * 64}", size = 10 }}'
            for w in wheels
        )
        return f'[[package]]\nname = "{name}"\nversion = "{version}"\n{deps}wheels = [{ws}]\n\n'

    deps = 'dependencies = [{ name = "pyyaml" }' + (f', {{ name = "pywin32", marker = "{marker}" }}' if marker else "")
    return (
        pkg("ansible-core", "2.19.14", ["ansible_core-2.19.14-py3-none-any.whl"], deps + "]\n")
        + pkg("ansible-runner", "2.4.3", ["ansible_runner-2.4.3-py3-none-any.whl"])
        + pkg("mitogen", "0.3.54", ["mitogen-0.3.54-py2.py3-none-any.whl"])
        + pkg("pyyaml", "6.0.3", pyyaml_wheels)
    )


@pytest.mark.parametrize(
    "wheels",
    [
        ["pyyaml-6.0.3-cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"],  # another Python's ABI
        ["pyyaml-6.0.3-cp311-cp311-manylinux_2_39_x86_64.whl"],  # a newer glibc than Debian 12's 2.36
        ["pyyaml-6.0.3-cp311-cp311-macosx_11_0_arm64.whl", "pyyaml-6.0.3-cp311-cp311-win_amd64.whl"],
        [],  # an sdist only
    ],
)
def test_a_package_without_a_wheel_for_the_execution_host_is_refused_by_name(wheels: list[str]) -> None:
    with pytest.raises(execruntime.RuntimeSpecError, match=re.escape("pyyaml 6.0.3 has no wheel for CPython 3.11")):
        execruntime.spec_from(_uv_lock(wheels), "3.11", execruntime.worker_file())


def test_best_wheel_wins_and_markers_are_evaluated_for_the_execution_host() -> None:
    wheels = ["pyyaml-6.0.3-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
              "pyyaml-6.0.3-cp311-cp311-manylinux_2_28_x86_64.whl", "pyyaml-6.0.3-py3-none-any.whl"]
    # pywin32 is not in this uv.lock: following it (marker true) would fail; Linux never follows it.
    release = execruntime.spec_from(_uv_lock(wheels, marker="sys_platform == 'win32'"), "3.11",
                                    execruntime.worker_file())
    assert next(f for f in release.files if f.name == "pyyaml").filename.endswith("manylinux_2_28_x86_64.whl")
    assert release.glibc == "2.28"
    with pytest.raises(execruntime.RuntimeSpecError, match="0 entries for 'pywin32'"):
        execruntime.spec_from(_uv_lock(wheels, marker="sys_platform == 'linux'"), "3.11", execruntime.worker_file())


# ----------------------------------------------------------------------------------- lock and bundle

# ------------------------------------------------------------------------------------------ the roles

def _collection_tree(dest: Path) -> Path:
    """A copy of the checkout's collection parts (galaxy.yml, meta, plugins, roles, playbooks) in `dest`."""
    dest.mkdir()
    for part in execruntime.COLLECTION_PARTS:
        src = project_dir() / part
        if src.is_dir():
            shutil.copytree(src, dest / part, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif src.is_file():
            shutil.copy2(src, dest / part)
    return dest


def _galaxy() -> tuple[str, str]:
    data = yaml.safe_load((project_dir() / "galaxy.yml").read_text())
    return data["namespace"], data["name"]


def test_the_roles_tar_depends_on_content_only_and_holds_every_role_file(tmp_path: Path) -> None:
    a = _collection_tree(tmp_path / "a")
    b = _collection_tree(tmp_path / "b")
    # Another checkout: other mtimes, a stray bytecode cache.
    for i, f in enumerate(sorted(b.rglob("*"), reverse=True)):
        os.utime(f, (1_000_000 + i, 1_000_000 + i))
    (b / "plugins" / "__pycache__").mkdir(exist_ok=True)
    (b / "plugins" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"cache")
    assert execruntime.collection_bytes(a) == execruntime.collection_bytes(b)
    with tarfile.open(fileobj=io.BytesIO(execruntime.collection_bytes(a))) as tar:
        members = tar.getmembers()
    namespace, name = _galaxy()
    prefix = f"ansible_collections/{namespace}/{name}/"
    want = sorted(prefix + f.relative_to(a).as_posix() for f in a.rglob("*") if f.is_file())
    assert sorted(m.name for m in members) == want and any("/roles/" in n for n in want)
    assert {m.mtime for m in members} == {0} and {(m.uid, m.gid) for m in members} == {(0, 0)}
    # One changed role file: another file, another release id (the lock no longer matches the controller).
    role_task = sorted(b.glob("roles/*/tasks/main.yml"))[0]
    role_task.write_text(role_task.read_text() + "\n# changed\n")
    fa, fb = execruntime.collection_file(a), execruntime.collection_file(b)
    assert fa.sha256 != fb.sha256 and fa.filename != fb.filename
    text, worker = UV_LOCK.read_text(), execruntime.worker_file()
    assert (execruntime.spec_from(text, "3.11", worker, fa).runtime_id
            != execruntime.spec_from(text, "3.11", worker, fb).runtime_id)


def test_the_controllers_release_locks_the_checkouts_roles() -> None:
    roles = [f for f in execruntime.spec().files if f.is_collection]
    assert len(roles) == 1
    data = execruntime.collection_bytes(project_dir())
    assert (roles[0].size, roles[0].sha256) == (len(data), hashlib.sha256(data).hexdigest())
    # The lock records it like every runtime file (a `runtime` entry with its sha256).
    lock = _lock(_site())
    entry = next(a for a in lock.artifacts if a.name == execruntime.COLLECTION_NAME)
    assert (entry.sha256, entry.size, entry.path) == (roles[0].sha256, roles[0].size, roles[0].path)


def _site(execution: bool = True) -> Any:
    raw = make_site()
    if execution:
        raw["segments"][1]["execution"] = {"host": "mirror01"}
    return parse_site(raw)


def _lock(site: Any) -> Lock:
    notes: list[str] = []
    decl = runtime_declared(site)
    return Lock(site.name, [decl_dict(d) for d in decl], [runtime_artifact(d, notes) for d in decl])


def test_the_runtime_is_declared_for_segments_with_an_execution_host_only() -> None:
    assert runtime_declared(_site(execution=False)) == []
    assert [d for d in declared(_site(execution=False)) if d.kind is Kind.RUNTIME] == []
    site = _site()
    ours = [d for d in declared(site) if d.kind is Kind.RUNTIME]
    assert ours and all(d.segments == ("iso",) for d in ours)
    assert {(d.name, d.version) for d in ours} == {(f.name, f.version) for f in execruntime.spec().files}
    lock = _lock(site)
    assert all(a.path.startswith("files/gpufleet-exec/") and a.resolved for a in lock.artifacts)
    release = runtime_release(lock, "iso", execruntime.spec().python, execruntime.spec().glibc)
    assert release is not None and release.runtime_id == execruntime.spec().runtime_id
    assert runtime_release(lock, "compute", "3.11", "2.36") is None


def test_lock_check_fails_when_uv_lock_moves_a_runtime_version() -> None:
    site = _site()
    lock = _lock(site)
    assert [p for p in check(lock, site) if "ansible-core" in p] == []
    moved = Lock(lock.site, [
        {**d, "version": "2.18.0"} if d["name"] == "ansible-core" else d for d in lock.declared
    ], lock.artifacts)
    problems = check(moved, site)
    assert any("runtime ansible-core" in p and "2.19" in p and "2.18.0" in p for p in problems), problems


@pytest.fixture(scope="module")
def signing(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("key")
    generate_key(d / "home", "gpufleet test <t@lab.invalid>", d / "s.asc", d / "p.asc")
    return d / "s.asc", d / "p.asc"


def _small_lock(site: Any, store: Path, data: bytes, locked: bytes) -> Lock:
    """A lock of one runtime file whose store copy is `data` and whose lock entry says `locked`."""
    f = store / "files/gpufleet-exec/x-1.0-py3-none-any.whl"
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_bytes(data)
    sha = hashlib.sha256(locked).hexdigest()
    return Lock(site.name, [], [Artifact("runtime", "x", "1.0", "files/gpufleet-exec/x-1.0-py3-none-any.whl",
                                         len(locked), sha, "https://files.invalid/x.whl", ("iso",), True)])


def test_bundle_of_the_runtime_alone_carries_exactly_the_locked_bytes(
    tmp_path: Path, signing: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import infra.bundle.build as b

    monkeypatch.setattr(b, "check", lambda lock, site: [])  # the lock here holds the runtime only
    site = _site()
    lock = _small_lock(site, tmp_path / "store", b"wheel bytes", b"wheel bytes")
    lock.artifacts.append(Artifact("model", "m@1", "1", "files/models/m/1/w", 3, "0" * 64, "/nowhere", ("iso",), True))
    opts = BuildOptions(artifacts=[Store(str(tmp_path / "store"))], kinds=["runtime"])
    build(site, lock, lock.to_json(), "iso", tmp_path / "out", signing[0], opts)
    man, problems = verify_bundle(tmp_path / "out", signing[1])
    assert problems == [] and man is not None
    assert sorted(man.files) == ["files/gpufleet-exec/x-1.0-py3-none-any.whl"]  # the model is not asked for
    bad = _small_lock(site, tmp_path / "store2", b"other bytes", b"wheel bytes")
    with pytest.raises(BuildError, match=re.escape("x-1.0-py3-none-any.whl has sha256")):
        build(site, bad, bad.to_json(), "iso", tmp_path / "out2", signing[0],
              BuildOptions(artifacts=[Store(str(tmp_path / "store2"))], kinds=["runtime"]))


def test_bundle_carries_the_roles_made_from_the_checkout_and_refuses_other_roles(
    tmp_path: Path, signing: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import infra.bundle.build as b

    monkeypatch.setattr(b, "check", lambda lock, site: [])  # the lock here holds the roles only
    site = _site()
    roles = execruntime.collection_file()
    entry = Artifact("runtime", roles.name, roles.version, roles.path, roles.size, roles.sha256, roles.source,
                     ("iso",), True)
    lock = Lock(site.name, [], [entry])
    build(site, lock, lock.to_json(), "iso", tmp_path / "out", signing[0], BuildOptions(kinds=["runtime"]))
    man, problems = verify_bundle(tmp_path / "out", signing[1])
    assert problems == [] and man is not None and sorted(man.files) == [roles.path]
    assert (tmp_path / "out" / roles.path).read_bytes() == execruntime.collection_bytes()
    # A lock made from other roles than this checkout's: the bundle is refused, naming the fix.
    stale = Lock(site.name, [], [Artifact(**{**entry.__dict__, "sha256": "2" * 64})])
    with pytest.raises(BuildError, match="re-run"):
        build(site, stale, stale.to_json(), "iso", tmp_path / "out2", signing[0], BuildOptions(kinds=["runtime"]))


# -------------------------------------------------------------------------- the execution host's installer

def _wheel(path: Path, name: str, files: dict[str, bytes], entry_points: str = "") -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for n, data in files.items():
            z.writestr(n, data)
        if entry_points:
            z.writestr(f"{name}-1.0.dist-info/entry_points.txt", entry_points)
        z.writestr(f"{name}-1.0.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    return path


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A directory served over HTTP on 127.0.0.1 (a free port), standing in for the segment mirror's /files/."""
    root = tmp_path / "mirror"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def _release(root: Path) -> execruntime.RuntimeSpec:
    _wheel(root / "demo-1.0-py3-none-any.whl", "demo",
           {"demo/__init__.py": b"def main():\n    print('demo ran')\n    return 0\n",
            "demo-1.0.data/purelib/demo_extra.py": b"X = 1\n"},
           "[console_scripts]\ndemo-cli = demo:main\n")
    (root / "gpufleet-worker-abc.py").write_bytes(b"import sys\nsys.exit(0)\n")
    files = []
    for p in sorted(root.iterdir()):
        size, sha = file_digest(p)
        files.append(execruntime.RuntimeFile(p.name.split("-")[0], "1.0", p.name, "x", sha, size))
    return execruntime.RuntimeSpec(execruntime.python_tag(), "2.17", tuple(files))


def test_installer_fetches_from_the_mirror_checks_and_lays_out_the_release(
    tmp_path: Path, mirror: tuple[Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    root, base = mirror
    release = _release(root)
    spec = runtime.install_spec(str(tmp_path / "rt"), release, base)
    assert installer.install(spec) == 0
    rel = Path(spec["release"])
    assert json.loads((rel / "runtime.json").read_text()) == release.as_dict()
    assert (rel / "site" / "demo_extra.py").is_file()  # *.data/purelib goes into site/
    out = subprocess.run([sys.executable, str(rel / "bin" / "demo-cli")], capture_output=True, text=True, check=True)
    assert out.stdout == "demo ran\n"
    assert (rel / "bin" / "gpufleet-worker").read_bytes().startswith(b"#!/usr/bin/python3\n")
    assert not (rel / "download").exists() and (tmp_path / "rt" / "jobs").stat().st_mode & 0o777 == 0o700
    assert installer.install(spec) == 0
    assert capsys.readouterr().out.split() == ["installed", "kept"]


def test_installer_installs_nothing_when_the_mirror_serves_other_bytes(
    tmp_path: Path, mirror: tuple[Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    root, base = mirror
    release = _release(root)
    (root / "demo-1.0-py3-none-any.whl").write_bytes(b"tampered")
    spec = runtime.install_spec(str(tmp_path / "rt"), release, base)
    assert installer.install(spec) == installer.EXIT_MISMATCH
    err = capsys.readouterr().err
    assert "demo-1.0-py3-none-any.whl: sha256" in err and "the lock says" in err
    assert not (tmp_path / "rt" / "releases").exists() or list((tmp_path / "rt" / "releases").iterdir()) == []


def _roles_release(root: Path, member: str, kind: bytes) -> execruntime.RuntimeSpec:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo(member)
        info.type = kind
        if kind == tarfile.SYMTYPE:
            info.linkname = "/etc/passwd"
            tar.addfile(info)
        else:
            info.size = 5
            tar.addfile(info, io.BytesIO(b"x: 1\n"))
    name = f"{execruntime.COLLECTION_NAME}-abc.tar"
    (root / name).write_bytes(buf.getvalue())
    size, sha = file_digest(root / name)
    f = execruntime.RuntimeFile(execruntime.COLLECTION_NAME, "abc", name, execruntime.COLLECTION_SOURCE, sha, size)
    return execruntime.RuntimeSpec(execruntime.python_tag(), "2.17", (f,))


def test_installer_lays_the_roles_out_beside_the_wheels(tmp_path: Path, mirror: tuple[Path, str]) -> None:
    root, base = mirror
    roles = execruntime.collection_file()
    (root / roles.filename).write_bytes(execruntime.collection_bytes())
    release = execruntime.RuntimeSpec(execruntime.python_tag(), "2.17", (roles,))
    spec = runtime.install_spec(str(tmp_path / "rt"), release, base)
    assert installer.install(spec) == 0
    namespace, name = _galaxy()
    coll = Path(spec["release"]) / "collections" / "ansible_collections" / namespace / name
    checked = 0
    for f in (project_dir() / "roles").rglob("*"):
        if f.is_file() and "__pycache__" not in f.parts:
            assert (coll / "roles" / f.relative_to(project_dir() / "roles")).read_bytes() == f.read_bytes(), f
            checked += 1
    assert checked > 0
    assert (coll / "playbooks" / "node.yml").read_bytes() == (project_dir() / "playbooks" / "node.yml").read_bytes()


@pytest.mark.parametrize(("member", "kind"), [("ansible_collections/../../escape.yml", tarfile.REGTYPE),
                                              ("elsewhere/x.yml", tarfile.REGTYPE),
                                              ("ansible_collections/g/f/roles/link", tarfile.SYMTYPE)])
def test_installer_refuses_a_roles_tar_that_leaves_its_place(
    tmp_path: Path, mirror: tuple[Path, str], capsys: pytest.CaptureFixture[str], member: str, kind: bytes
) -> None:
    root, base = mirror
    release = _roles_release(root, member, kind)
    spec = runtime.install_spec(str(tmp_path / "rt"), release, base)
    assert installer.install(spec) == installer.EXIT_MISMATCH
    assert "unsafe member" in capsys.readouterr().err
    assert not (tmp_path / "escape.yml").exists() and not Path(spec["release"]).exists()


# --------------------------------------------------------------------------------- converge refuses

def _local_ssh(monkeypatch: pytest.MonkeyPatch) -> None:
    def argv(settings: SshSettings, host: str, command: str | None = None, **_: Any) -> list[str]:
        assert command is not None
        return ["sh", "-c", command]

    monkeypatch.setattr(ssh_module, "argv", argv)


def _stack(tmp_path: Path) -> tuple[Path, Any]:
    raw = make_site()
    raw["segments"][1]["execution"] = {"host": "mirror01", "runtime_dir": str(tmp_path / "rt")}
    stack = tmp_path / "Pulumi.t.yaml"
    stack.write_text(yaml.safe_dump({"config": {"gpufleet:site": raw}}))
    return stack, parse_site(raw)


def test_converge_refuses_an_execution_host_whose_runtime_is_not_the_locks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _local_ssh(monkeypatch)
    stack, site = _stack(tmp_path)
    lock_file = tmp_path / "Pulumi.t.lock.json"
    argv = ["converge", "--stack-file", str(stack), "--segment", "iso"]
    # No lock: nothing runs.
    assert main(argv) == Exit.INVALID
    assert "run `gpufleet lock` first" in capsys.readouterr().err
    lock = _lock(site)
    lock_file.write_text(lock.to_json())
    # Locked, not installed on the execution host.
    assert main(argv) == Exit.INVALID
    err = capsys.readouterr().err
    assert "mirror01" in err and "is not installed" in err and "exec-host install --segment iso" in err
    # Installed exactly as the lock records it: the check passes.
    release = execruntime.spec()
    rel = Path(runtime.release_dir(str(tmp_path / "rt"), release.runtime_id))
    rel.mkdir(parents=True)
    (rel / "runtime.json").write_text(json.dumps(release.as_dict()))
    require_runtime(site, lock_file, {"iso", "compute"})
    # A release whose record names other bytes than the lock's is refused too.
    other = release.as_dict()
    other["files"][0] = {**other["files"][0], "sha256": "0" * 64}
    (rel / "runtime.json").write_text(json.dumps(other))
    with pytest.raises(CommandError) as err_:
        require_runtime(site, lock_file, {"iso"})
    assert err_.value.code == Exit.INVALID and "does not record the lock's files" in str(err_.value)
    # A lock made from another uv.lock than this controller's.
    stale = Lock(lock.site, lock.declared, [
        Artifact(**{**a.__dict__, "sha256": "1" * 64}) if a.name == "ansible-core" else a for a in lock.artifacts])
    lock_file.write_text(stale.to_json())
    with pytest.raises(CommandError, match="is not this controller's"):
        require_runtime(site, lock_file, {"iso"})
    # A lock whose roles are not the controller's (a role changed since `gpufleet lock`): refused by host.
    other_roles = Lock(lock.site, lock.declared, [
        Artifact(**{**a.__dict__, "sha256": "3" * 64, "version": "3" * 16})
        if a.name == execruntime.COLLECTION_NAME else a for a in lock.artifacts])
    lock_file.write_text(other_roles.to_json())
    assert main(argv) == Exit.INVALID
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "execution host mirror01" in err and "roles" in err, err
    assert "gpufleet lock" in err and "bundle build" in err and "exec-host install --segment iso" in err
