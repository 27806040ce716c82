"""`hf://` models: the lock pins the hub revision, the bundle carries exactly those bytes, nodes get them.

Every test talks to a local hub the test creates (tests/hubfake.py, on 127.0.0.1): never huggingface.co.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

import infra.bundle.build as build_mod
from infra.bundle import hub
from infra.bundle.build import BuildError, BuildOptions, build
from infra.bundle.declared import Declared, Kind, declared
from infra.bundle.lock import Lock, ResolveOptions, _resolve_other, check, decl_dict
from infra.bundle.manifest import verify_bundle
from infra.bundle.signing import generate_key
from infra.model.load import SiteError, parse_site, project_dir
from infra.model.site import Site
from infra.plan import engines
from infra.plan.node import plan_site
from infra.plan.rolevars import host_vars
from tests.hubfake import FakeHub, git_blob_id

REPO = "gpufleet-test/tiny-gguf"
GGUF = b"GGUF" + bytes(range(256)) * 40  # an LFS file on the hub: its sha256 is in the listing
CONFIG = b'{"architectures": ["LlamaForCausalLM"]}\n'  # a git file: only a blob id in the listing
MODEL_DIR = "files/models/gpufleet-tiny-lab/hub-1"


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """A local hub with one repository (two files and a hidden one on `main`), and HF_ENDPOINT at it."""
    with FakeHub() as h:
        h.repo(REPO).commit({"model.gguf": GGUF, "config.json": CONFIG, ".gitattributes": b"*.gguf lfs\n"})
        monkeypatch.setenv("HF_ENDPOINT", h.url)
        yield h


def _lab_site(source: str, revision: str = "hub-1", *, vllm: bool = False) -> Site:
    """The lab stack with its air-gapped llama.cpp service's model from `source` (under a revision of its own).

    `vllm` serves it with vLLM instead (an image, a model directory: a whole repository).
    """
    raw = yaml.safe_load((project_dir() / "stacks/Pulumi.lab.yaml").read_text())["config"]["gpufleet:site"]
    svc = next(s for s in raw["services"] if s["name"] == "tiny-airgap")
    svc["model"]["source"], svc["model"]["revision"] = source, revision
    if vllm:
        svc.pop("wheel")
        svc.update(engine="vllm", image="198.18.2.10:5000/vllm/vllm-openai@sha256:" + "a" * 64)
    return parse_site(raw)


def _hub_decl(site: Site) -> Declared:
    return next(d for d in declared(site) if d.kind is Kind.MODEL and d.sources[0].startswith("hf://"))


def _lock(site: Site, tmp: Path) -> Lock:
    """The lock of the site's hub model only (debs, wheels and the plugin are other tests' business)."""
    d = _hub_decl(site)
    notes: list[str] = []
    arts = _resolve_other(d, ResolveOptions(), tmp, notes)
    return Lock(site.name, [decl_dict(d)], arts, notes=notes)


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle signing key pair (s.asc secret, p.asc public)."""
    if shutil.which("gpg") is None or shutil.which("gpgv") is None:
        pytest.skip("gpg/gpgv not installed (Debian: gnupg)")
    d = tmp_path_factory.mktemp("keys")
    generate_key(d / "home", "gpufleet test <t@lab.invalid>", d / "s.asc", d / "p.asc")
    return d


def _build(site: Site, lock: Lock, out: Path, keys: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Only the model is in this lock: the drift check against the whole stack is tested apart.
    monkeypatch.setattr(build_mod, "check", lambda lock_, site_: [])
    build(site, lock, lock.to_json(), "airgap", out, keys / "s.asc", BuildOptions(work=out.parent / "work"))


# ------------------------------------------------------------------------------------------- lock

def test_resolve_pins_a_branch_to_its_commit_and_hashes_every_file(fake_hub: FakeHub, tmp_path: Path) -> None:
    """`main` becomes the commit it names now; each file gets the sha256 of its bytes, git files included."""
    first = fake_hub.repo(REPO).refs["main"]
    got = hub.resolve(REPO, "main", None, tmp_path)
    assert got.commit == first
    # Hidden files (.gitattributes) are not model files and are left out.
    assert {f.path: (f.size, f.sha256) for f in got.files} == {
        "model.gguf": (len(GGUF), hashlib.sha256(GGUF).hexdigest()),
        "config.json": (len(CONFIG), hashlib.sha256(CONFIG).hexdigest()),
    }
    second = fake_hub.repo(REPO).commit({"model.gguf": GGUF + b"v2", "config.json": CONFIG})
    assert second != first
    assert hub.resolve(REPO, "main", None, tmp_path).commit == second
    assert hub.resolve(REPO, first, None, tmp_path).commit == first  # a commit stays what it was


def test_lock_records_commit_files_and_hashes_of_an_hf_service(fake_hub: FakeHub, tmp_path: Path) -> None:
    """The lock has one artifact per file: the commit as version, sha256, the mirror path, a pinned source."""
    site = _lab_site(f"hf://{REPO}@main/model.gguf")
    lock = _lock(site, tmp_path)
    sha = fake_hub.repo(REPO).refs["main"]
    assert [(a.kind, a.name, a.version, a.path, a.size, a.sha256, a.source) for a in lock.artifacts] == [
        ("model", "gpufleet-tiny-lab@hub-1", sha, f"{MODEL_DIR}/model.gguf", len(GGUF),
         hashlib.sha256(GGUF).hexdigest(), f"hf://{REPO}@{sha}/model.gguf")]
    assert any(sha in n for n in lock.notes)
    # The lock round-trips, and it still matches the stack after the branch moved on (the lock pins).
    assert Lock.from_json(lock.to_json()).artifacts == lock.artifacts
    fake_hub.repo(REPO).commit({"model.gguf": b"newer", "config.json": CONFIG})
    assert [p for p in check(lock, site) if "hub-1" in p] == []


def test_without_at_the_stack_revision_is_the_hub_revision(fake_hub: FakeHub, tmp_path: Path) -> None:
    """`hf://org/name` with `revision: <commit>` locks that commit, even after `main` moved on."""
    sha = fake_hub.repo(REPO).refs["main"]
    fake_hub.repo(REPO).commit({"model.gguf": b"moved", "config.json": CONFIG})
    site = _lab_site(f"hf://{REPO}", revision=sha, vllm=True)
    assert _hub_decl(site).sources == (f"hf://{REPO}@{sha}",)
    lock = _lock(site, tmp_path)
    assert {a.version for a in lock.artifacts} == {sha}
    assert {a.path.rsplit("/", 1)[1] for a in lock.artifacts} == {"model.gguf", "config.json"}


def test_a_full_sha_revision_that_disagrees_with_the_hub_is_refused(fake_hub: FakeHub, tmp_path: Path) -> None:
    """`revision: <sha A>` with `@main` at sha B would label B as A: the lock refuses, naming both."""
    wrong = "f" * 40
    site = _lab_site(f"hf://{REPO}@main/model.gguf", revision=wrong)
    with pytest.raises(hub.HubError, match=wrong):
        _lock(site, tmp_path)


def test_changing_the_asked_revision_is_lock_drift(fake_hub: FakeHub, tmp_path: Path) -> None:
    """A stack that now asks for another branch or tag no longer matches its lock (`gpufleet lock --check`)."""
    lock = _lock(_lab_site(f"hf://{REPO}@main/model.gguf"), tmp_path)
    problems = check(lock, _lab_site(f"hf://{REPO}@v2/model.gguf"))
    assert any("sources changed" in p and "@v2" in p for p in problems), problems


@pytest.mark.parametrize(("source", "why"), [
    (f"hf://{REPO}@nosuch/model.gguf", "RevisionNotFound"),
    (f"hf://{REPO}@main/other.gguf", "has no file 'other.gguf'"),
    ("hf://gpufleet-test/absent@main/model.gguf", "RepositoryNotFound"),
])
def test_unresolvable_hub_models_are_locked_unresolved_with_the_reason(
        fake_hub: FakeHub, tmp_path: Path, source: str, why: str) -> None:
    """A missing repo, revision or file is a note and an unresolved artifact: no bundle can be built from it."""
    lock = _lock(_lab_site(source), tmp_path)
    assert [a.resolved for a in lock.artifacts] == [False]
    assert any(why in n for n in lock.notes), lock.notes


def test_hub_file_names_that_cannot_be_placed_are_refused(fake_hub: FakeHub, tmp_path: Path) -> None:
    """A repository file named to escape the model directory (or to be an option) is never locked."""
    fake_hub.repo(REPO).commit({"model.gguf": GGUF, "-rf.json": b"{}"})
    with pytest.raises(hub.HubError, match="cannot be placed"):
        hub.resolve(REPO, "main", None, tmp_path)
    sha = "a" * 40
    for bad in ("hf://o/n@main/x", f"hf://o/n@{sha}/../x", f"hf://o/n@{sha}/-x", f"hf://o/n@{sha}/.x",
                f"hf://o/../n@{sha}/x", f"hf://o/n@{sha}/a//b", f"hf://o/n@{sha}/", f"hf://o/n@{sha}"):
        assert hub.parse_locked_source(bad) is None, bad
    assert hub.parse_locked_source(f"hf://o/n@{sha}/sub/x.gguf") == ("o/n", sha, "sub/x.gguf")


def test_a_repository_with_safetensors_leaves_other_weight_formats_out(fake_hub: FakeHub, tmp_path: Path) -> None:
    """vLLM loads safetensors first: the same weights as .bin/.pth/.gguf are not carried."""
    fake_hub.repo(REPO).commit({"model.safetensors": b"st", "pytorch_model.bin": b"pt", "original/x.pth": b"p",
                                "config.json": CONFIG, "tokenizer.json": b"{}"})
    assert [f.path for f in hub.resolve(REPO, "main", None, tmp_path).files] == [
        "config.json", "model.safetensors", "tokenizer.json"]


def test_the_fake_hub_lists_git_blob_ids_as_git_computes_them() -> None:
    """The fake's `blobId` of a git file is git's own object id (`git hash-object`)."""
    if shutil.which("git") is None:
        pytest.skip("git not installed")
    for data in (b"", CONFIG):
        got = subprocess.run(["git", "hash-object", "--stdin"], input=data, capture_output=True, check=True,
                             timeout=30).stdout.decode().strip()
        assert git_blob_id(data) == got


# ------------------------------------------------------------------------------------------ bundle

def test_bundle_carries_the_locked_files_and_their_list(fake_hub: FakeHub, tmp_path: Path, key: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The bundle holds the hub's bytes at the mirror path, and the file list nodes fetch by; it verifies."""
    site = _lab_site(f"hf://{REPO}@main", vllm=True)
    lock = _lock(site, tmp_path)
    out = tmp_path / "bundle"
    _build(site, lock, out, key, monkeypatch)
    assert (out / MODEL_DIR / "model.gguf").read_bytes() == GGUF
    assert (out / MODEL_DIR / "config.json").read_bytes() == CONFIG
    index = json.loads((out / engines.mirror_model_index("gpufleet-tiny-lab", "hub-1")).read_text())
    assert index["commit"] == fake_hub.repo(REPO).refs["main"] and index["repo"] == REPO
    assert {f["path"]: f["sha256"] for f in index["files"]} == {
        "model.gguf": hashlib.sha256(GGUF).hexdigest(), "config.json": hashlib.sha256(CONFIG).hexdigest()}
    man, problems = verify_bundle(out, key / "p.asc")
    assert problems == [] and man is not None
    assert "files/model-index/gpufleet-tiny-lab/hub-1.json" in man.files
    # The pinned commit was fetched, not whatever `main` names by then.
    assert any(f"/resolve/{index['commit']}/model.gguf" in r for r in fake_hub.requests)


def test_bundle_fetches_the_locked_commit_after_the_branch_moved(fake_hub: FakeHub, tmp_path: Path, key: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Building later gives the locked bytes, not the branch's new ones."""
    site = _lab_site(f"hf://{REPO}@main/model.gguf")
    lock = _lock(site, tmp_path)
    fake_hub.repo(REPO).commit({"model.gguf": b"a newer model", "config.json": CONFIG})
    _build(site, lock, tmp_path / "bundle", key, monkeypatch)
    assert (tmp_path / "bundle" / MODEL_DIR / "model.gguf").read_bytes() == GGUF


def test_a_tampered_download_is_refused(fake_hub: FakeHub, tmp_path: Path, key: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Bytes whose sha256 is not the lock's (same size, same commit) stop the build; no manifest is written."""
    site = _lab_site(f"hf://{REPO}@main/model.gguf")
    lock = _lock(site, tmp_path)
    sha = fake_hub.repo(REPO).refs["main"]
    evil = bytes(reversed(GGUF))
    assert len(evil) == len(GGUF) and evil != GGUF
    fake_hub.repo(REPO).served[(sha, "model.gguf")] = evil
    out = tmp_path / "bundle"
    with pytest.raises(BuildError) as err:
        _build(site, lock, out, key, monkeypatch)
    text = str(err.value)
    assert f"has sha256 {hashlib.sha256(evil).hexdigest()}" in text
    assert f"the lock says {hashlib.sha256(GGUF).hexdigest()}" in text
    assert not (out / "manifest.json").exists()
    assert not (out / MODEL_DIR / "model.gguf").exists()


# ------------------------------------------------------------------------------------------- nodes

def _service_vars(site: Site, name: str) -> dict[str, Any]:
    for p in plan_site(site).nodes:
        for s in host_vars(p, site)["inference_server_services"]:
            if s["name"] == name:
                return dict(s)
    raise AssertionError(name)


def test_an_air_gapped_node_fetches_an_hf_model_from_its_mirror_offline() -> None:
    """The node's file list and files come from its mirror; the engine loads the file offline."""
    site = _lab_site(f"hf://{REPO}@main/model.gguf")
    v = _service_vars(site, "tiny-airgap")
    mirror = site.mirror("lab-mirror")
    assert mirror is not None
    base = f"http://{mirror.address}:{mirror.http_port}/"
    assert v["model_index_url"] == base + "files/model-index/gpufleet-tiny-lab/hub-1.json"
    assert v["model_base_url"] == base + MODEL_DIR + "/"
    assert v["model_source"] == "" and v["model_unserved"] == ""
    assert v["model_path"] == "/var/lib/gpufleet/models/gpufleet-tiny-lab/hub-1/model.gguf"
    assert "--model=/var/lib/gpufleet/models/gpufleet-tiny-lab/hub-1/model.gguf" in v["exec_start"]
    assert any(e.startswith("HF_HUB_OFFLINE=1") for e in v["environment"])


def test_a_node_without_a_mirror_is_told_the_hub_model_cannot_reach_it() -> None:
    """Nodes never reach a hub: a segment without a mirror gets a message, not a hub download."""
    raw = yaml.safe_load((project_dir() / "stacks/Pulumi.lab.yaml").read_text())["config"]["gpufleet:site"]
    svc = next(s for s in raw["services"] if s["name"] == "tiny-connected")
    svc["model"]["source"], svc["model"]["revision"] = f"hf://{REPO}@main/model.gguf", "hub-1"
    site = parse_site(raw)
    if any(s.mirror for s in site.segments if s.name == site.nodes_by_name["lab-gpu01"].segment):
        pytest.skip("the lab's connected segment has a mirror")
    v = _service_vars(site, "tiny-connected")
    assert v["model_index_url"] == "" and "give the segment a mirror" in v["model_unserved"]


def test_llamacpp_from_the_hub_must_name_its_gguf() -> None:
    """llama.cpp loads one file: `hf://org/name@rev` without one is a validation problem at the source."""
    with pytest.raises(SiteError) as err:
        _lab_site(f"hf://{REPO}@main")
    (p,) = err.value.problems
    assert p.path == "services[1].model.source" and "one GGUF file" in p.message
    assert f"hf://{REPO}@main/<file>.gguf" in p.fix
    # Past validation, the engine layer refuses it too (the second layer of issue 16).
    svc = _lab_site(f"hf://{REPO}@main/model.gguf").services[1]
    svc = svc.model_copy(update={"model": svc.model.model_copy(update={"source": f"hf://{REPO}@main"})})
    with pytest.raises(engines.EngineError, match=r"hf://<org>/<name>@<revision>/<file>\.gguf"):
        engines.unit_commands(svc, engines.ContainerEngine.PODMAN, "4.3.1")


def test_vllm_from_the_hub_serves_the_model_directory() -> None:
    """vLLM gets the directory (its positional model argument), mounted read-only, hub access off."""
    svc = _lab_site(f"hf://{REPO}@main", vllm=True).services[1]
    assert svc.image is not None
    image = svc.image
    run = engines.container_run(svc, engines.ContainerEngine.PODMAN, "4.3.1", host_model_dir=engines.model_dir(svc))
    assert "--volume=/var/lib/gpufleet/models/gpufleet-tiny-lab/hub-1:/models:ro" in run
    assert run[run.index(image) + 1] == "/models"
    assert "--env=HF_HUB_OFFLINE=1" in run


# ------------------------------------------------------------------------------- the role on a node

ROLE_TASKS = project_dir() / "roles/inference_server/tasks/hub_model.yml"
CHANGED = "FETCH-CHANGED={{ _inference_server_hub_fetch is changed }}"


@pytest.fixture
def mirror_dir(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A directory served over HTTP on 127.0.0.1 (the mirror's files/ tree, as nginx serves it)."""
    root = tmp_path / "srv"
    root.mkdir()

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def _publish(root: Path, files: dict[str, bytes], listed: dict[str, bytes] | None = None) -> None:
    """Files under files/models/m/r/ and their list (of `listed`, default the same bytes) as build writes it."""
    for name, data in files.items():
        p = root / "files/models/m/r" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    entries = [(n, len(d), hashlib.sha256(d).hexdigest()) for n, d in (listed or files).items()]
    index = root / "files/model-index/m/r.json"
    index.parent.mkdir(parents=True, exist_ok=True)
    index.write_bytes(hub.index_bytes("m", "r", REPO, "a" * 40, entries))


def _run_role(tmp: Path, base: str, *, check: bool = False) -> tuple[int, str, Path]:
    """Run the role's hub_model.yml on this machine; (exit code, output, the model directory)."""
    model_dir = tmp / "node/models/m/r"
    play = [{"hosts": "localhost", "gather_facts": False,
             "vars": {"inference_server_service": {"name": "t", "model_index_url": base + "files/model-index/m/r.json",
                                                   "model_base_url": base + "files/models/m/r/"},
                      "_inference_server_model_dir": str(model_dir)},
             "tasks": [{"ansible.builtin.file": {"path": str(model_dir), "state": "directory", "mode": "0755"}},
                       {"ansible.builtin.import_tasks": str(ROLE_TASKS)},
                       {"ansible.builtin.debug": {"msg": CHANGED}}]}]
    (tmp / "play.yml").write_text(yaml.safe_dump(play))
    env = {**os.environ, "ANSIBLE_LOCALHOST_WARNING": "false", "ANSIBLE_INVENTORY_UNPARSED_WARNING": "false",
           "ANSIBLE_HOME": str(tmp / ".ansible"), "ANSIBLE_LOCAL_TEMP": str(tmp / ".tmp"),
           "ANSIBLE_PYTHON_INTERPRETER": sys.executable}
    p = subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"), "-i", "localhost,", "-c", "local",
                        *(["--check"] if check else []), str(tmp / "play.yml")],
                       capture_output=True, text=True, timeout=300, env=env, check=False)
    return p.returncode, p.stdout + p.stderr, model_dir


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the role's files are owned by root")


@needs_root
def test_the_role_fetches_the_listed_files_once(tmp_path: Path, mirror_dir: tuple[Path, str]) -> None:
    """A node gets every listed file (subfolders too) from the mirror; a second run fetches nothing."""
    root, base = mirror_dir
    _publish(root, {"model.gguf": GGUF, "tok/tokenizer.json": b"{}"})
    code, out, model_dir = _run_role(tmp_path, base)
    assert code == 0, out[-3000:]
    assert (model_dir / "model.gguf").read_bytes() == GGUF
    assert (model_dir / "tok/tokenizer.json").read_bytes() == b"{}"
    assert "FETCH-CHANGED=True" in out
    code, out, _ = _run_role(tmp_path, base)
    assert code == 0 and "FETCH-CHANGED=False" in out, out[-3000:]


@needs_root
def test_the_role_refetches_a_file_whose_locked_hash_changed(tmp_path: Path, mirror_dir: tuple[Path, str]) -> None:
    """A new lock (a branch that moved on) changes a file's sha256 in the list: the node fetches it again."""
    root, base = mirror_dir
    _publish(root, {"model.gguf": GGUF})
    assert _run_role(tmp_path, base)[0] == 0
    _publish(root, {"model.gguf": GGUF + b"v2"})
    code, out, model_dir = _run_role(tmp_path, base)
    assert code == 0 and "FETCH-CHANGED=True" in out, out[-3000:]
    assert (model_dir / "model.gguf").read_bytes() == GGUF + b"v2"


@needs_root
def test_the_role_refuses_bytes_that_are_not_the_listed_ones(tmp_path: Path, mirror_dir: tuple[Path, str]) -> None:
    """A mirror file that does not match its sha256 in the list fails the run and is not left in place."""
    root, base = mirror_dir
    _publish(root, {"model.gguf": bytes(reversed(GGUF))}, listed={"model.gguf": GGUF})
    code, out, model_dir = _run_role(tmp_path, base)
    assert code != 0 and "checksum" in out.lower(), out[-3000:]
    assert not (model_dir / "model.gguf").exists()


@needs_root
@pytest.mark.parametrize("bad", ["../escape.gguf", "-rf"])
def test_the_role_refuses_a_list_that_names_paths_outside_the_model(tmp_path: Path, mirror_dir: tuple[Path, str],
                                                                    bad: str) -> None:
    """A file list with a path that leaves the model directory (or is hidden, or an option) fetches nothing."""
    root, base = mirror_dir
    _publish(root, {"model.gguf": GGUF})
    entries = [("model.gguf", len(GGUF), hashlib.sha256(GGUF).hexdigest()), (bad, 2, hashlib.sha256(b"{}").hexdigest())]
    (root / "files/model-index/m/r.json").write_bytes(hub.index_bytes("m", "r", REPO, "a" * 40, entries))
    code, out, model_dir = _run_role(tmp_path, base)
    assert code != 0 and "is not a model file list gpufleet wrote" in out, out[-3000:]
    assert not (model_dir / "model.gguf").exists()
