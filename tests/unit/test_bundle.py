"""Air-gap supply chain: lock check, bundle build/verify (tamper), import (nothing on failure, idempotent)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from infra.bundle import hashing, oci
from infra.bundle.build import BuildError, BuildOptions, build
from infra.bundle.declared import Kind, declared
from infra.bundle.lock import Artifact, Lock, check, decl_dict, lock_path_for
from infra.bundle.manifest import MANIFEST, SIGNATURE, verify_bundle, write_manifest
from infra.bundle.publish import ImportRecord, ImportRefused, MirrorState, Target, import_bundle
from infra.bundle.remote import RemoteError, SshMirror
from infra.bundle.signing import generate_key
from infra.bundle.store import Store, file_digest
from infra.cli import main
from infra.model.load import load_site, project_dir

STACKS = project_dir() / "stacks"
pytestmark = pytest.mark.skipif(shutil.which("gpg") is None or shutil.which("gpgv") is None,
                                reason="gpg/gpgv not installed (Debian: gnupg)")


# ------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A trusted signing key and an unrelated one (the attacker's)."""
    d = tmp_path_factory.mktemp("keys")
    out = {}
    for who in ("site", "other"):
        generate_key(d / f"home-{who}", f"gpufleet {who} <{who}@lab.invalid>", d / f"{who}.sec.asc",
                     d / f"{who}.pub.asc")
        out[f"{who}_secret"], out[f"{who}_public"] = d / f"{who}.sec.asc", d / f"{who}.pub.asc"
    return out


def make_bundle(root: Path, secret: Path, *, big: int = 0, piece_size: int | None = None, serial: int = 1,
                site: str = "lab", segment: str | None = "airgap", mirrors: tuple[str, ...] = ("lab-mirror",),
                model: bytes | None = None) -> Path:
    """A small signed bundle: two debs, a model file (optionally `big` bytes), an OCI image."""
    (root / "apt").mkdir(parents=True)
    (root / "apt/a_1.0_amd64.deb").write_bytes(b"deb-a" * 1000)
    (root / "apt/b_2.0_all.deb").write_bytes(b"deb-b" * 777)
    model_file = root / "files/models/tiny/r1/model.gguf"
    model_file.parent.mkdir(parents=True)
    model_file.write_bytes(model if model is not None else bytes(range(256)) * max(1, big // 256))
    model = model_file
    digest = oci.write_image(root / "images/lab/hello", {"bin/hello": b"#!/bin/sh\necho hello\n"})
    arts = [Artifact("deb", "a", "1.0", "apt/a_1.0_amd64.deb", *file_digest(root / "apt/a_1.0_amd64.deb"),
                     "http://198.18.1.250/apt/a.deb", ("airgap",), True),
            Artifact("model", "tiny@r1", "r1", "files/models/tiny/r1/model.gguf", *file_digest(model),
                     "http://198.18.1.250/files/models/tiny/r1/model.gguf", ("airgap",), True),
            Artifact("image", "lab/hello", digest, "images/lab/hello", 1, digest.split(":")[1], "oci", ("airgap",),
                     True)]
    write_manifest(root, site, segment, "0" * 64, arts, secret, piece_size=piece_size, serial=serial,
                   mirrors=mirrors)
    return root


TARGET = Target("lab", "lab-mirror", ("airgap",))


class RecordingPublisher:
    """An in-memory mirror that records every call (a fake for the SSH publisher)."""

    def __init__(self) -> None:
        self.st = MirrorState()
        self.images: set[tuple[str, str]] = set()
        self.calls: list[str] = []
        self.staged: dict[str, dict[str, bytes]] = {}

    def state(self) -> MirrorState:
        self.calls.append("state")
        return self.st

    def stage(self, root: Path, rels: list[str], expected: dict[str, str], generated: dict[str, bytes],
              base: str) -> str:
        self.calls.append(f"stage:{len(rels)}")
        self.staged["s1"] = {**{r: (root / r).read_bytes() for r in rels}, **generated}
        return "s1"

    def switch(self, stage: str, base: str) -> None:
        self.calls.append("switch")
        tree = self.staged.pop(stage)
        for rel, data in tree.items():
            if rel.startswith(("apt/", "files/")) and rel.endswith((".deb", ".gguf")):
                self.st.files[rel] = (len(data), hashlib.sha256(data).hexdigest())
                if rel.startswith("apt/"):
                    self.st.debs.add(rel.removeprefix("apt/"))
        if "apt/Packages" in tree:
            self.st.packages, self.st.signed = tree["apt/Packages"], True
        self.st.record = ImportRecord.parse(tree["import.json"].decode())

    def discard(self, stage: str) -> None:
        self.calls.append("discard")

    def has_image(self, repo: str, digest: str) -> bool:
        return (repo, digest) in self.images

    def put_image(self, layout: Path, repo: str, digest: str) -> None:
        self.calls.append(f"put_image:{repo}")
        self.images.add((repo, digest))

    @property
    def writes(self) -> list[str]:
        return [c for c in self.calls if c.startswith(("stage", "switch", "put_"))]


def _fake_scan(apt: Path) -> bytes:
    return b"".join(f"Package: {p.name}\nFilename: ./{p.name}\n\n".encode() for p in sorted(apt.glob("*.deb")))


def _no_sign(data: bytes) -> tuple[bytes, bytes]:
    return b"clear:" + data, b"sig"


# ------------------------------------------------------------------------------ verify / tamper

def test_intact_bundle_verifies(tmp_path: Path, keys: dict[str, Path]) -> None:
    """A freshly built bundle passes verification with the site's public key."""
    b = make_bundle(tmp_path / "b", keys["site_secret"])
    man, problems = verify_bundle(b, keys["site_public"])
    assert problems == []
    assert man is not None and "apt/a_1.0_amd64.deb" in man.files


@pytest.mark.parametrize("target", ["apt/b_2.0_all.deb", "files/models/tiny/r1/model.gguf"])
def test_flipped_byte_is_rejected_naming_the_file(tmp_path: Path, keys: dict[str, Path], target: str) -> None:
    """One flipped byte in any file is found and the message names that file."""
    b = make_bundle(tmp_path / "b", keys["site_secret"])
    data = bytearray((b / target).read_bytes())
    data[len(data) // 2] ^= 0x01
    (b / target).write_bytes(bytes(data))
    _, problems = verify_bundle(b, keys["site_public"])
    assert len(problems) == 1 and problems[0].startswith(f"{target}: content does not match")


def test_flipped_byte_in_one_piece_of_a_large_file(tmp_path: Path, keys: dict[str, Path]) -> None:
    """Large files are checked piece by piece in parallel; a flip in a middle piece is still caught."""
    b = make_bundle(tmp_path / "b", keys["site_secret"], big=40_000, piece_size=4096)
    target = b / "files/models/tiny/r1/model.gguf"
    assert len(json.loads((b / MANIFEST).read_text())["files"]["files/models/tiny/r1/model.gguf"]["pieces"]) > 3
    with target.open("r+b") as f:
        f.seek(3 * 4096 + 17)
        byte = f.read(1)
        f.seek(3 * 4096 + 17)
        f.write(bytes([byte[0] ^ 0x80]))
    _, problems = verify_bundle(b, keys["site_public"])
    assert problems == ["files/models/tiny/r1/model.gguf: content does not match the manifest (size or sha256)"]


def test_missing_file_is_rejected(tmp_path: Path, keys: dict[str, Path]) -> None:
    """A file listed in the manifest but absent is named."""
    b = make_bundle(tmp_path / "b", keys["site_secret"])
    (b / "apt/a_1.0_amd64.deb").unlink()
    _, problems = verify_bundle(b, keys["site_public"])
    assert "apt/a_1.0_amd64.deb: missing (listed in the manifest)" in problems


def test_extra_file_is_rejected(tmp_path: Path, keys: dict[str, Path]) -> None:
    """A file the manifest does not list (a smuggled package) is named."""
    b = make_bundle(tmp_path / "b", keys["site_secret"])
    (b / "apt/evil_6.6_amd64.deb").write_bytes(b"not from the lock")
    _, problems = verify_bundle(b, keys["site_public"])
    assert problems == ["apt/evil_6.6_amd64.deb: extra file (not in the manifest)"]


def test_signature_by_another_key_is_rejected(tmp_path: Path, keys: dict[str, Path]) -> None:
    """A bundle signed by a key not in the trusted keyring is rejected at the signature."""
    b = make_bundle(tmp_path / "b", keys["other_secret"])
    _, problems = verify_bundle(b, keys["site_public"])
    assert len(problems) == 1 and problems[0].startswith(f"{SIGNATURE}: bad signature")


def test_rewritten_manifest_breaks_the_signature(tmp_path: Path, keys: dict[str, Path]) -> None:
    """Swapping a file and fixing its hash in the manifest still fails: the manifest is signed."""
    b = make_bundle(tmp_path / "b", keys["site_secret"])
    (b / "apt/b_2.0_all.deb").write_bytes(b"trojan")
    man = json.loads((b / MANIFEST).read_text())
    size, sha = file_digest(b / "apt/b_2.0_all.deb")
    man["files"]["apt/b_2.0_all.deb"] = {"size": size, "sha256": sha}
    (b / MANIFEST).write_text(json.dumps(man, indent=1, sort_keys=True) + "\n")
    _, problems = verify_bundle(b, keys["site_public"])
    assert [p for p in problems if p.startswith(SIGNATURE)], problems


def test_missing_signature_is_rejected(tmp_path: Path, keys: dict[str, Path]) -> None:
    """An unsigned bundle is never trusted."""
    b = make_bundle(tmp_path / "b", keys["site_secret"])
    (b / SIGNATURE).unlink()
    _, problems = verify_bundle(b, keys["site_public"])
    assert problems == [f"{SIGNATURE}: missing (an unsigned bundle is never trusted)"]


@pytest.mark.parametrize("damage", ["flip", "missing", "extra", "signature"])
def test_import_publishes_nothing_when_verify_fails(tmp_path: Path, keys: dict[str, Path], damage: str) -> None:
    """Import verifies first: a damaged bundle makes no call at all on the mirror."""
    b = make_bundle(tmp_path / "b", keys["site_secret"] if damage != "signature" else keys["other_secret"])
    if damage == "flip":
        (b / "apt/a_1.0_amd64.deb").write_bytes(b"X" + (b / "apt/a_1.0_amd64.deb").read_bytes()[1:])
    elif damage == "missing":
        shutil.rmtree(b / "files")
    elif damage == "extra":
        (b / "files/extra.bin").write_bytes(b"x")
    pub = RecordingPublisher()
    with pytest.raises(ImportRefused) as err:
        import_bundle(b, keys["site_public"], pub, _no_sign, _fake_scan, target=TARGET)
    assert pub.calls == []
    assert err.value.problems


def test_import_is_idempotent(tmp_path: Path, keys: dict[str, Path]) -> None:
    """First import uploads files, re-signs apt and copies the image; the second changes nothing."""
    b = make_bundle(tmp_path / "b", keys["site_secret"])
    pub = RecordingPublisher()
    _, first = import_bundle(b, keys["site_public"], pub, _no_sign, _fake_scan, target=TARGET)
    assert first.changed and first.apt_reindexed
    assert set(first.uploaded) == {"apt/a_1.0_amd64.deb", "apt/b_2.0_all.deb", "files/models/tiny/r1/model.gguf"}
    assert first.images == [f"lab/hello@{next(d for r, d in pub.images)}"]
    before = list(pub.writes)
    _, second = import_bundle(b, keys["site_public"], pub, _no_sign, _fake_scan, target=TARGET)
    assert not second.changed and second.unchanged == 3
    assert pub.writes == before  # the second run did not upload, re-sign or copy anything


def test_verify_cli_exit_codes(tmp_path: Path, keys: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """`gpufleet bundle verify` exits 0 on a good bundle and 1 naming the problem on a bad one."""
    b = make_bundle(tmp_path / "b", keys["site_secret"])
    assert main(["bundle", "verify", str(b), "--keyring", str(keys["site_public"])]) == 0
    (b / "apt/a_1.0_amd64.deb").unlink()
    capsys.readouterr()
    assert main(["bundle", "verify", str(b), "--keyring", str(keys["site_public"]), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False and out["problems"] == ["apt/a_1.0_amd64.deb: missing (listed in the manifest)"]


def test_parallel_check_matches_serial_hashes(tmp_path: Path) -> None:
    """Piece-wise parallel hashing gives the same verdicts as whole-file sha256 (good and bad files)."""
    files = []
    for i in range(5):
        p = tmp_path / f"f{i}"
        p.write_bytes(bytes([i]) * (10_000 + i * 3333) if i else b"")  # f0 is empty
        files.append(p)
    digests = hashing.digest_files(files, piece_size=4096, threads=2)
    assert [d.sha256 for d in digests] == [file_digest(f)[1] for f in files]
    files[2].write_bytes(b"\0" + files[2].read_bytes()[1:])
    assert hashing.check_files(list(zip(files, digests, strict=True)), threads=2) == [files[2]]


# -------------------------------------------------------------------------------- build

def _fake_lock(site: object, store: Path, *, skip: set[str] = frozenset()) -> Lock:  # type: ignore[assignment]
    """A lock whose file artifacts are resolved from `store` (no network, no apt)."""
    decl = declared(site)  # type: ignore[arg-type]
    arts = []
    for d in decl:
        if d.kind in (Kind.MODEL, Kind.WHEEL, Kind.PLUGIN):
            rel = ("files/plugins/x.tar.gz" if d.kind is Kind.PLUGIN else
                   "files/" + d.sources[0].split("/files/", 1)[1])
            p = store / rel
            if d.name not in skip:
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(f"{d.kind}:{d.name}".encode() * 100)
            size, sha = file_digest(p) if p.exists() else (1, "f" * 64)
            # Source = the store path itself: unit tests never fall back to the stack's (lab) URLs.
            arts.append(Artifact(d.kind.value, d.name, d.version, rel, size, sha, str(p), d.segments, True))
    return Lock(site.name, [decl_dict(d) for d in decl if d.kind is not Kind.DEB], arts)  # type: ignore[attr-defined]


def test_build_refuses_naming_what_is_missing_and_where(tmp_path: Path, keys: dict[str, Path]) -> None:
    """A locked model that no --artifacts store holds stops the build; the error names it and the places tried."""
    site = load_site("lab")
    store = tmp_path / "store"
    # Debs are out of scope here (they need apt): the lock carries files only.
    lock = _fake_lock(site, store, skip={"gpufleet-tiny-lab@lab-1"})
    with pytest.raises(BuildError) as err:
        _build_without_debs(site, lock, tmp_path / "out", keys["site_secret"], store)
    text = str(err.value)
    assert "model gpufleet-tiny-lab@lab-1" in text
    assert str(store / "files/models/gpufleet-tiny-lab/lab-1/model.gguf") in text
    assert not (tmp_path / "out" / MANIFEST).exists()


def _build_without_debs(site: object, lock: Lock, out: Path, key: Path, store: Path) -> object:
    import infra.bundle.build as b

    orig = b.check
    b.check = lambda lock_, site_: []  # type: ignore[assignment]
    try:
        return build(site, lock, lock.to_json(), "airgap", out, key, BuildOptions(artifacts=[Store(str(store))]))  # type: ignore[arg-type]
    finally:
        b.check = orig


# -------------------------------------------------------------------------------- lock check

def _lab_copy(tmp_path: Path, edit: Callable[[dict[str, object]], None] | None = None) -> Path:
    raw = yaml.safe_load((STACKS / "Pulumi.lab.yaml").read_text())
    if edit:
        edit(raw["config"]["gpufleet:site"])
    path = tmp_path / "Pulumi.labcopy.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_lock_check_passes_on_an_unchanged_stack(tmp_path: Path) -> None:
    """A lock made from a stack matches that stack."""
    path = _lab_copy(tmp_path)
    site = load_site(path=path)
    lock = _fake_lock(site, tmp_path / "s")
    lock.declared = [decl_dict(d) for d in declared(site)]
    assert [p for p in check(lock, site) if "no artifact resolved" not in p] == []


def test_lock_check_names_a_changed_version(tmp_path: Path) -> None:
    """Changing the driver in a copy of the stack without re-locking is drift, naming each package."""
    path = _lab_copy(tmp_path)
    site = load_site(path=path)
    lock = Lock(site.name, [decl_dict(d) for d in declared(site)], [])

    def bump(s: dict[str, object]) -> None:
        s["profiles"]["lab-570"]["driver"]["version"] = "570.124.06"  # type: ignore[index]
        s["profiles"]["lab-570"]["fabric_manager"]["version"] = "570.124.06"  # type: ignore[index]

    changed = load_site(path=_lab_copy(tmp_path, bump))
    drift = [p for p in check(lock, changed) if "stack wants" in p]
    assert drift == [f"deb {name}: stack wants 570.124.06-1, lock has 570.133.20-1"
                     for name in ("nvidia-driver", "nvidia-fabricmanager-570", "nvidia-kernel-open-dkms",
                                  "nvidia-persistenced")]


def test_lock_check_cli_fails_on_drift(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`gpufleet lock --check --stack-file` exits 1 and prints the difference after a model revision change."""
    path = _lab_copy(tmp_path)
    site = load_site(path=path)
    lock = _fake_lock(site, tmp_path / "s")
    lock.declared = [decl_dict(d) for d in declared(site)]
    lock_path_for(path).write_text(lock.to_json())

    def new_rev(s: dict[str, object]) -> None:
        for svc in s["services"]:  # type: ignore[attr-defined]
            svc["model"]["revision"] = "lab-2"

    path2 = _lab_copy(tmp_path, new_rev)
    assert path2 == path
    assert main(["lock", "--check", "--stack-file", str(path)]) == 1
    err = capsys.readouterr().out
    assert "model gpufleet-tiny-lab@lab-2 lab-2: in the stack, not in the lock" in err
    assert "model gpufleet-tiny-lab@lab-1 lab-1: in the lock, no longer in the stack" in err


@pytest.mark.parametrize("lock_file", sorted(STACKS.glob("Pulumi.*.lock.json")), ids=lambda p: p.name)
def test_committed_locks_match_their_stacks(lock_file: Path) -> None:
    """CI gate: every committed lock still matches its stack (`gpufleet lock --check`)."""
    stack = lock_file.with_name(lock_file.name.replace(".lock.json", ".yaml"))
    assert main(["lock", "--check", "--stack-file", str(stack)]) == 0


def test_declared_air_gap_set_comes_from_the_plan() -> None:
    """The air-gapped segment's declared set holds the plan's pinned packages, nftables and its model."""
    site = load_site("lab")
    got = {(d.kind.value, d.name, d.version) for d in declared(site, "airgap")}
    assert ("deb", "nvidia-driver", "570.133.20-1") in got
    assert ("deb", "nvidia-fabricmanager-570", "570.133.20-1") in got  # lab-gpu04 has NVSwitch
    assert ("deb", "nftables", None) in got  # the air-gap firewall role needs it
    assert ("model", "gpufleet-tiny-lab@lab-1", "lab-1") in got
    assert all("connected" not in d.segments for d in declared(site, "airgap"))


def test_skopeo_reads_a_hand_written_image(tmp_path: Path) -> None:
    """The hand-written OCI layout is deterministic and readable by skopeo (what import copies)."""
    d1 = oci.write_image(tmp_path / "a", {"hello": b"hi\n"}, "t")
    d2 = oci.write_image(tmp_path / "b", {"hello": b"hi\n"}, "t")
    assert d1 == d2
    if shutil.which("skopeo") is None:
        pytest.skip("skopeo not installed")
    raw = subprocess.run(["skopeo", "inspect", "--raw", f"oci:{tmp_path / 'a'}:t"], capture_output=True,
                         check=True, timeout=60).stdout
    import hashlib

    assert "sha256:" + hashlib.sha256(raw).hexdigest() == d1


def test_build_writes_a_bundle_that_verifies(tmp_path: Path, keys: dict[str, Path]) -> None:
    """Files from an --artifacts store are copied, hash-checked against the lock, signed, and verify."""
    site = load_site("lab")
    store = tmp_path / "store"
    lock = _fake_lock(site, store)
    _build_without_debs(site, lock, tmp_path / "out", keys["site_secret"], store)
    man, problems = verify_bundle(tmp_path / "out", keys["site_public"])
    assert problems == []
    assert man is not None and "files/models/gpufleet-tiny-lab/lab-1/model.gguf" in man.files


def test_build_rejects_bytes_that_differ_from_the_lock(tmp_path: Path, keys: dict[str, Path]) -> None:
    """A store serving different bytes than were locked is refused, naming the path and both hashes."""
    site = load_site("lab")
    store = tmp_path / "store"
    lock = _fake_lock(site, store)
    (store / "files/models/gpufleet-tiny-lab/lab-1/model.gguf").write_bytes(b"other weights")
    with pytest.raises(BuildError) as err:
        _build_without_debs(site, lock, tmp_path / "out", keys["site_secret"], store)
    assert "files/models/gpufleet-tiny-lab/lab-1/model.gguf has sha256" in str(err.value)


def test_merged_apt_index_keeps_earlier_imports_and_drops_deleted_files() -> None:
    """The mirror index keeps stanzas of debs still on the mirror, replaces re-imported ones, drops gone ones."""
    from infra.bundle.publish import merge_packages

    current = (b"Package: a\nVersion: 1\nFilename: ./a_1.deb\n\nPackage: gone\nVersion: 1\nFilename: ./gone_1.deb\n\n"
               b"Package: c\nVersion: 1\nFilename: ./c_1.deb\nSize: 1\n\n")
    new = b"Package: b\nVersion: 2\nFilename: ./b_2.deb\n\nPackage: c\nVersion: 1\nFilename: ./c_1.deb\nSize: 9\n\n"
    merged = merge_packages(current, {"a_1.deb", "b_2.deb", "c_1.deb"}, new).decode()
    assert [ln for ln in merged.splitlines() if ln.startswith("Package")] == ["Package: a", "Package: b", "Package: c"]
    assert "Size: 9" in merged and "gone" not in merged
    assert merge_packages(merged.encode(), {"a_1.deb", "b_2.deb", "c_1.deb"}, new) == merged.encode()


def test_release_keeps_the_repository_identity() -> None:
    """Re-publishing keeps Suite/Codename of the existing Release (apt rejects a renamed repository)."""
    from infra.bundle.publish import release_text

    text = release_text({"Packages": b"x"}, {"Suite": "lab", "Codename": "lab", "Origin": "lab-mirror"}).decode()
    assert "Suite: lab\n" in text and "Codename: lab\n" in text and "Origin: lab-mirror\n" in text
    sha_lines = text.split("SHA256:\n", 1)[1].split()
    assert sha_lines == ["2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881", "1", "Packages"]


def test_keygen_cli_makes_a_pair_that_signs_and_verifies(tmp_path: Path) -> None:
    """`bundle keygen` writes a 0600 secret key whose signatures verify with the public key; no overwrite."""
    out = tmp_path / "k"
    assert main(["bundle", "keygen", "--out", str(out)]) == 0
    assert (out / "bundle.sec.asc").stat().st_mode & 0o077 == 0
    b = make_bundle(tmp_path / "b", out / "bundle.sec.asc")
    assert verify_bundle(b, out / "bundle.pub.asc")[1] == []
    assert main(["bundle", "keygen", "--out", str(out)]) == 2


# ------------------------------------------------------------------ the SSH publisher, run locally

class LocalMirror(SshMirror):
    """The real SSH publisher with `ssh HOST CMD` replaced by `sh -c CMD` on this machine.

    The registry is an in-memory set: unit tests never send traffic to a registry.
    """

    def _ssh(self) -> list[str]:
        return ["sh", "-c"]

    def has_image(self, repo: str, digest: str) -> bool:
        return (repo, digest) in self.__dict__.setdefault("registry", set())

    def put_image(self, layout: Path, repo: str, digest: str) -> None:
        assert oci.image_in_layout(layout, digest)
        self.__dict__.setdefault("registry", set()).add((repo, digest))


def _local_mirror(root: Path) -> LocalMirror:
    from infra.model.site import Mirror

    m = Mirror(name="lab-mirror", segment="airgap", address="198.18.2.10", keyring="/dev/null")
    return LocalMirror(m, None, None, str(root))


def _real_deb(out: Path, name: str, version: str) -> Path:
    pkg = out / f"{name}-src"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "DEBIAN/control").write_text(f"Package: {name}\nVersion: {version}\nArchitecture: all\n"
                                        f"Maintainer: t <t@lab.invalid>\nDescription: test package\n")
    deb = out / f"{name}_{version}_all.deb"
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(pkg), str(deb)], check=True,
                   capture_output=True, timeout=60)
    shutil.rmtree(pkg)
    return deb


@pytest.mark.skipif(shutil.which("dpkg-deb") is None or shutil.which("dpkg-scanpackages") is None,
                    reason="dpkg-dev not installed")
def test_ssh_publisher_publishes_a_signed_repo_idempotently(tmp_path: Path, keys: dict[str, Path]) -> None:
    """Import through the real publisher: debs and files land, Release is signed by the mirror key, re-run no-op."""
    from infra.bundle.publish import release_signer

    b = tmp_path / "b"
    (b / "apt").mkdir(parents=True)
    for name in ("alpha", "beta"):
        _real_deb(b / "apt", name, "1.0-1")
    (b / "files/models/m/r").mkdir(parents=True)
    (b / "files/models/m/r/model.gguf").write_bytes(b"weights")
    write_manifest(b, "lab", "airgap", "0" * 64, [], keys["site_secret"], mirrors=["lab-mirror"])
    served = tmp_path / "srv"
    mirror = _local_mirror(served)
    _, first = import_bundle(b, keys["site_public"], mirror, release_signer(keys["other_secret"]), target=TARGET)
    assert first.apt_reindexed and len(first.uploaded) == 3
    packages = (served / "apt/Packages").read_text()
    assert "Package: alpha" in packages and "Package: beta" in packages
    assert (served / "files/models/m/r/model.gguf").read_bytes() == b"weights"
    ring = tmp_path / "mirror.gpg"
    subprocess.run(["gpg", "--dearmor", "--output", str(ring), str(keys["other_public"])], check=True, timeout=30)
    assert subprocess.run(["gpgv", "--keyring", str(ring), str(served / "apt/InRelease")], capture_output=True,
                          timeout=30).returncode == 0
    assert [p.name for p in (served / ".gpufleet/trees").iterdir()] == [os.readlink(served / ".gpufleet/current")[6:]]
    stamp = (served / "apt/InRelease").read_bytes()
    _, second = import_bundle(b, keys["site_public"], mirror, release_signer(keys["other_secret"]), target=TARGET)
    assert not second.changed and (served / "apt/InRelease").read_bytes() == stamp


def test_upload_aborts_when_a_file_changed_after_verify(tmp_path: Path) -> None:
    """Bytes that no longer match the verified hash stop the stream; nothing reaches the served tree."""
    from infra.bundle.remote import RemoteError

    src = tmp_path / "b"
    (src / "files").mkdir(parents=True)
    (src / "files/a.bin").write_bytes(b"verified bytes")
    (src / "files/b.bin").write_bytes(b"swapped after verify")
    good = file_digest(src / "files/a.bin")[1]
    served = tmp_path / "srv"
    with pytest.raises(RemoteError, match=r"files/b\.bin: changed since it was verified"):
        _local_mirror(served).stage(src, ["files/a.bin", "files/b.bin"], {"files/a.bin": good,
                                                                         "files/b.bin": "0" * 64}, {}, "")
    assert not list(served.rglob("*.bin"))
    assert not list((served / ".gpufleet/trees").iterdir())  # the mirror removed the half-made tree itself


def test_build_refuses_a_lock_that_no_longer_matches_the_stack(tmp_path: Path, keys: dict[str, Path]) -> None:
    """A stack changed after locking cannot be bundled from the old lock; the error names the change."""
    path = _lab_copy(tmp_path)
    site = load_site(path=path)
    lock = _fake_lock(site, tmp_path / "s")
    lock.declared = [decl_dict(d) for d in declared(site)]

    def bump(s: dict[str, object]) -> None:
        s["profiles"]["lab-570"]["container_toolkit"]["version"] = "1.18.0-1"  # type: ignore[index]

    changed = load_site(path=_lab_copy(tmp_path, bump))
    with pytest.raises(BuildError) as err:
        build(changed, lock, lock.to_json(), "airgap", tmp_path / "out", keys["site_secret"], BuildOptions())
    assert "deb nvidia-container-toolkit: stack wants 1.18.0-1, lock has 1.17.8-1" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_mirror_status_names_what_the_mirror_lacks() -> None:
    """Status compares served packages, files and registry tags with the lock of the mirror's segments."""
    from infra.bundle.status import mirror_status

    site = load_site("lab")
    arts = [Artifact("deb", "podman", "4.3", "apt/podman_4.3_amd64.deb", 1, "a" * 64, "u", ("airgap",), True),
            Artifact("deb", "chrony", "4.3", "apt/chrony_4.3_amd64.deb", 1, "b" * 64, "u", ("airgap",), True),
            Artifact("model", "m@r", "r", "files/models/m/r/model.gguf", 1, "c" * 64, "u", ("airgap",), True),
            Artifact("image", "lab/x", "sha256:" + "d" * 64, "images/lab/x", 1, "d" * 64, "u", ("airgap",), True),
            Artifact("deb", "curl", "7", "", 0, "", "baseline", ("airgap",), True),
            Artifact("deb", "only-connected", "1", "apt/oc.deb", 1, "e" * 64, "u", ("connected",), True)]
    lock = Lock("lab", [], arts)

    class View:
        def list_files(self) -> dict[str, tuple[int, str]]:
            return {"apt/podman_4.3_amd64.deb": (1, "a" * 64), "apt/chrony_4.3_amd64.deb": (1, "0" * 64),
                    "files/models/m/r/model.gguf": (1, "c" * 64)}

        def packages_index(self) -> bytes:
            return b"Package: podman\nVersion: 4.3\n\nPackage: chrony\nVersion: 4.3\n\n"

        def catalog(self) -> dict[str, object]:
            return {"ok": True, "repos": {"lab/x": ["other-tag"]}}

    st = mirror_status(site, lock, View(), "lab-mirror")
    assert st["segments"] == ["airgap"] and st["apt_packages"] == 2
    assert st["missing"] == ["deb chrony 4.3", f"image lab/x@sha256:{'d' * 64}"]
    assert st["matches_lock"] is False


# ------------------------------------------- binding, rollback, atomic switch (the real mirror scripts, locally)

def served_snapshot(root: Path) -> dict[str, str]:
    """Every entry under the mirror root (type, symlink target, sha256 of bytes) plus what is served.

    "Served" walks apt/ and files/ through their symlinks, as nginx resolves them. The hash cache
    (`.gpufleet-hashes.json`) is bookkeeping of the read-only state query, not content: left out.
    """
    out: dict[str, str] = {}
    for d, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            p = Path(d) / name
            rel = p.relative_to(root).as_posix()
            if rel == ".gpufleet-hashes.json":
                continue
            out[rel] = ("link:" + os.readlink(p) if p.is_symlink() else "dir" if p.is_dir()
                        else hashlib.sha256(p.read_bytes()).hexdigest())
    for area in ("apt", "files"):
        for d, _, files in os.walk(root / area):
            for name in files:
                p = Path(d) / name
                out["served:" + p.relative_to(root).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture
def mirror_at_2(tmp_path: Path, keys: dict[str, Path]) -> tuple[LocalMirror, Path]:
    """A mirror that imported serial 2 (model bytes b'weights v2') through the real scripts."""
    served = tmp_path / "srv"
    mirror = _local_mirror(served)
    b = make_bundle(tmp_path / "v2", keys["site_secret"], serial=2, model=b"weights v2")
    _, res = import_bundle(b, keys["site_public"], mirror, _no_sign, _fake_scan, target=TARGET)
    assert res.switched and (served / "files/models/tiny/r1/model.gguf").read_bytes() == b"weights v2"
    return mirror, served


def _import(b: Path, keys: dict[str, Path], mirror: object, **kw: object) -> object:
    return import_bundle(b, keys["site_public"], mirror, kw.pop("sign", _no_sign), _fake_scan,  # type: ignore[arg-type]
                         target=kw.pop("target", TARGET), **kw)  # type: ignore[arg-type]


def test_rollback_to_an_older_serial_is_refused_byte_identical(mirror_at_2: tuple[LocalMirror, Path],
                                                              tmp_path: Path, keys: dict[str, Path]) -> None:
    """A validly signed older bundle (serial 1, old model bytes) is refused; the mirror does not change a byte."""
    mirror, served = mirror_at_2
    before = served_snapshot(served)
    old = make_bundle(tmp_path / "v1", keys["site_secret"], serial=1, model=b"weights v1")
    with pytest.raises(ImportRefused, match="serial 1 is older than serial 2"):
        _import(old, keys, mirror)
    assert served_snapshot(served) == before


def test_same_serial_with_other_content_is_refused(mirror_at_2: tuple[LocalMirror, Path], tmp_path: Path,
                                                   keys: dict[str, Path]) -> None:
    """Serial 2 again but with other bytes is not the bundle the mirror imported: refused, unchanged."""
    mirror, served = mirror_at_2
    before = served_snapshot(served)
    other = make_bundle(tmp_path / "v2b", keys["site_secret"], serial=2, model=b"other weights")
    with pytest.raises(ImportRefused, match="serial 2 was already imported with other content"):
        _import(other, keys, mirror)
    assert served_snapshot(served) == before


@pytest.mark.parametrize(("binding", "message"), [
    ({"site": "other-site"}, "bundle is for site 'other-site'"),
    ({"segment": "connected"}, "bundle is for segment 'connected'"),
    ({"mirrors": ("other-mirror",)}, "bundle is for mirror(s) other-mirror, not 'lab-mirror'"),
])
def test_bundle_for_another_site_segment_or_mirror_is_refused(mirror_at_2: tuple[LocalMirror, Path], tmp_path: Path,
                                                              keys: dict[str, Path], binding: dict[str, object],
                                                              message: str) -> None:
    """A newer, validly signed bundle built for elsewhere is refused before the mirror is asked anything."""
    mirror, served = mirror_at_2
    before = served_snapshot(served)
    b = make_bundle(tmp_path / "elsewhere", keys["site_secret"], serial=9, **binding)  # type: ignore[arg-type]
    with pytest.raises(ImportRefused) as err:
        _import(b, keys, mirror)
    assert message in str(err.value)
    assert served_snapshot(served) == before


def _special(path: Path, kind: str) -> None:
    """Put a non-regular file (or a hard link) at `path`."""
    import socket

    path.unlink(missing_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink":
        path.symlink_to("/etc/hostname")
    elif kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(path))
        s.close()
    elif kind == "device":
        if os.geteuid() != 0:
            pytest.skip("making a device node needs root")
        os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # /dev/null's numbers
    elif kind == "hardlink":
        outside = path.parent.parent.parent / "outside.bin"
        outside.write_bytes(b"changes after verify")
        os.link(outside, path)


@pytest.mark.parametrize("where", ["extra", "listed"])
@pytest.mark.parametrize("kind", ["fifo", "symlink", "socket", "device", "hardlink"])
def test_non_regular_files_are_refused_without_opening_them(mirror_at_2: tuple[LocalMirror, Path], tmp_path: Path,
                                                            keys: dict[str, Path], kind: str, where: str) -> None:
    """A FIFO, symlink, socket, device or hard link in a bundle fails verify (never opened) and import."""
    mirror, served = mirror_at_2
    before = served_snapshot(served)
    b = make_bundle(tmp_path / "b", keys["site_secret"], serial=3)
    rel = "apt/evil_1.0_all.deb" if where == "extra" else "apt/a_1.0_amd64.deb"
    _special(b / rel, kind)
    signal.alarm(60)  # opening a FIFO would block forever: fail instead of hanging the suite
    try:
        _, problems = verify_bundle(b, keys["site_public"])
        with pytest.raises(ImportRefused):
            _import(b, keys, mirror)
    finally:
        signal.alarm(0)
    assert [p for p in problems if p.startswith(f"{rel}: ")], problems
    assert not [p for p in problems if p.startswith(f"{rel}: missing")]
    assert served_snapshot(served) == before


@pytest.mark.parametrize("rel", ["files/../../etc/passwd", "/etc/passwd", "files/./x", "apt//x.deb", "other/x"])
def test_manifest_paths_escaping_the_bundle_are_refused(tmp_path: Path, keys: dict[str, Path], rel: str) -> None:
    """A signed manifest naming a path outside the bundle's areas is not a manifest gpufleet reads."""
    b = make_bundle(tmp_path / "b", keys["site_secret"])
    man = json.loads((b / MANIFEST).read_text())
    man["files"][rel] = {"size": 1, "sha256": "0" * 64}
    (b / MANIFEST).write_text(json.dumps(man))
    from infra.bundle.signing import sign_detached

    sign_detached(b / MANIFEST, keys["site_secret"], b / SIGNATURE)
    man_, problems = verify_bundle(b, keys["site_public"])
    assert man_ is None and len(problems) == 1 and problems[0].startswith(f"{MANIFEST}: unreadable")


def test_unusable_mirror_key_refuses_before_anything(mirror_at_2: tuple[LocalMirror, Path], tmp_path: Path,
                                                     keys: dict[str, Path]) -> None:
    """A mirror key that cannot sign stops the import first: no call on the mirror, no byte changed."""
    from infra.bundle.publish import release_signer

    mirror, served = mirror_at_2
    before = served_snapshot(served)
    b = make_bundle(tmp_path / "v3", keys["site_secret"], serial=3, model=b"weights v3")
    broken = tmp_path / "mirror.sec.asc"
    broken.write_text("-----BEGIN PGP PRIVATE KEY BLOCK-----\n\nnot a key\n-----END PGP PRIVATE KEY BLOCK-----\n")
    with pytest.raises(ImportRefused, match="mirror signing key unusable"):
        _import(b, keys, mirror, sign=release_signer(broken))
    assert served_snapshot(served) == before
    pub = RecordingPublisher()
    with pytest.raises(ImportRefused):
        _import(b, keys, pub, sign=release_signer(tmp_path / "no-such-key.asc"))
    assert pub.calls == []


class FailAfterStaging(LocalMirror):
    """The real scripts, with a failure injected after the new tree is staged."""

    fail_in = "switch"

    def switch(self, stage: str, base: str) -> None:
        assert (Path(self.root) / ".gpufleet/trees" / stage / "files/models/tiny/r1/model.gguf").read_bytes() == \
            b"weights v3"  # the tree really was staged next to the served one
        if self.fail_in == "switch":
            raise RemoteError("injected: connection lost before the switch")
        super().switch(stage, base)

    def has_image(self, repo: str, digest: str) -> bool:
        return False  # always copies, so the "image" case fails after staging

    def put_image(self, layout: Path, repo: str, digest: str) -> None:
        if self.fail_in == "image":
            raise RemoteError("injected: registry refused the image")


@pytest.mark.parametrize("fail_in", ["switch", "image"])
def test_failure_after_staging_leaves_the_mirror_byte_identical(tmp_path: Path, keys: dict[str, Path],
                                                                fail_in: str) -> None:
    """A failure between staging and the switch removes the stage; the served tree does not change a byte."""
    served = tmp_path / "srv"
    mirror = FailAfterStaging(_local_mirror(served).mirror, None, None, str(served))
    mirror.fail_in = "none"
    b2 = make_bundle(tmp_path / "v2", keys["site_secret"], serial=2, model=b"weights v2")
    import_bundle(b2, keys["site_public"], _local_mirror(served), _no_sign, _fake_scan, target=TARGET)
    before = served_snapshot(served)
    mirror.fail_in = fail_in
    b3 = make_bundle(tmp_path / "v3", keys["site_secret"], serial=3, model=b"weights v3")
    with pytest.raises(RemoteError, match="injected"):
        import_bundle(b3, keys["site_public"], mirror, _no_sign, _fake_scan, target=TARGET)
    assert served_snapshot(served) == before


def test_deliberate_downgrade_with_a_reason_works_and_is_logged(mirror_at_2: tuple[LocalMirror, Path],
                                                                 tmp_path: Path, keys: dict[str, Path]) -> None:
    """--allow-downgrade --reason imports the older bundle, records the reason on the mirror; newer ones follow."""
    mirror, served = mirror_at_2
    old = make_bundle(tmp_path / "v1", keys["site_secret"], serial=1, model=b"weights v1")
    _, res = _import(old, keys, mirror, override="v2 model regressed, INC-42")
    assert res.switched and res.previous_serial == 2 and res.serial == 1  # type: ignore[attr-defined]
    assert (served / "files/models/tiny/r1/model.gguf").read_bytes() == b"weights v1"
    log = [json.loads(line) for line in (served / ".gpufleet/imports.log").read_text().splitlines()]
    assert [(r["serial"], r["override"], r["previous_serial"]) for r in log] == [
        (2, None, None), (1, "v2 model regressed, INC-42", 2)]
    newer = make_bundle(tmp_path / "v3", keys["site_secret"], serial=3, model=b"weights v3")
    _import(newer, keys, mirror)
    assert (served / "files/models/tiny/r1/model.gguf").read_bytes() == b"weights v3"


def test_a_mirror_in_the_old_layout_moves_to_trees_without_losing_a_file(tmp_path: Path,
                                                                         keys: dict[str, Path]) -> None:
    """apt/ and files/ as plain folders (lab seeding, older imports) become symlinks; earlier content stays."""
    served = tmp_path / "srv"
    (served / "apt").mkdir(parents=True)
    (served / "apt/old_0.9_all.deb").write_bytes(b"old package")
    (served / "files/wheels").mkdir(parents=True)
    (served / "files/wheels/w-1-py3-none-any.whl").write_bytes(b"wheel")
    (served / "registry").mkdir()
    b = make_bundle(tmp_path / "b", keys["site_secret"])
    import_bundle(b, keys["site_public"], _local_mirror(served), _no_sign, _fake_scan, target=TARGET)
    assert os.readlink(served / "apt") == ".gpufleet/current/apt" and (served / "files").is_symlink()
    assert (served / "apt/old_0.9_all.deb").read_bytes() == b"old package"
    assert (served / "files/wheels/w-1-py3-none-any.whl").read_bytes() == b"wheel"
    assert (served / "apt/a_1.0_amd64.deb").is_file() and (served / "registry").is_dir()
    assert sorted(p.name for p in served.iterdir() if p.name.startswith(".") and p.name != ".gpufleet"
                  and p.name != ".gpufleet-hashes.json") == []  # no leftover temporary names


def test_switch_refuses_when_another_import_switched_meanwhile(mirror_at_2: tuple[LocalMirror, Path],
                                                               tmp_path: Path) -> None:
    """The switch is a compare-and-swap on the served tree: a stale stage is not served."""
    mirror, served = mirror_at_2
    src = tmp_path / "src"
    (src / "files").mkdir(parents=True)
    (src / "files/x.bin").write_bytes(b"x")
    before = served_snapshot(served)
    stage = mirror.stage(src, ["files/x.bin"], {"files/x.bin": file_digest(src / "files/x.bin")[1]}, {}, "")
    with pytest.raises(RemoteError, match="served tree changed since this import read it"):
        mirror.switch(stage, "trees/stage-someone-else")
    mirror.discard(stage)
    assert served_snapshot(served) == before


# ------------------------------------------------------------------------------------------ CLI exit codes

def test_verify_with_a_missing_keyring_is_bad_input(tmp_path: Path, keys: dict[str, Path],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """`bundle verify --keyring /missing` exits 2 with one line (the README's table: 2 no keyring)."""
    b = make_bundle(tmp_path / "b", keys["site_secret"])
    assert main(["bundle", "verify", str(b), "--keyring", str(tmp_path / "missing.asc")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --keyring") and err.count("\n") == 1


@pytest.mark.parametrize("text", ["{", "[]", '{"format": 2}', '{"format": 1, "site": "lab"}', "\xff\xfe",
                                  '{"format": 2, "format": 2}'])
def test_malformed_manifest_is_bad_input_without_traceback(tmp_path: Path, keys: dict[str, Path], text: str,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """A malformed (unsigned) manifest: `verify` exits 2 with JSON naming the problem, `import` exits 2 too."""
    b = make_bundle(tmp_path / "b", keys["site_secret"])
    (b / MANIFEST).write_bytes(text.encode("utf-8", "surrogateescape") if text != "\xff\xfe" else b"\xff\xfe")
    assert main(["bundle", "verify", str(b), "--keyring", str(keys["site_public"]), "--json"]) == 2
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False and any(p.startswith(f"{MANIFEST}: unreadable") for p in out["problems"])


def test_lock_check_on_a_corrupted_lock_is_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`lock --check` with a corrupted lock file exits 2 with one line, never a traceback."""
    path = _lab_copy(tmp_path)
    for bad in ('{"format": 1, "site": "lab", "declared": [], "artifacts": [{"kind": 3}]}', "{not json", "[1]",
                '{"format": 1, "site": "lab", "artifacts": [], "declared": [{"kind": "deb", "name": "x", '
                '"sources": [], "segments": []}]}', '{"format": true, "site": "lab"}', "\udcff"):
        lock_path_for(path).write_bytes(bad.encode("utf-8", "surrogateescape"))  # the last one: not UTF-8
        assert main(["lock", "--check", "--stack-file", str(path)]) == 2
        err = capsys.readouterr().err
        assert "not a readable lock file" in err and err.count("\n") == 1


def test_import_override_needs_a_reason(tmp_path: Path, keys: dict[str, Path],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """--allow-downgrade without --reason (or a reason with a newline) is bad input: exit 2, nothing contacted."""
    b = make_bundle(tmp_path / "b", keys["site_secret"])
    base = ["bundle", "import", str(b), "--stack", "lab", "--mirror", "lab-mirror", "--keyring",
            str(keys["site_public"]), "--mirror-key", str(keys["other_secret"])]
    assert main([*base, "--allow-downgrade"]) == 2
    assert main([*base, "--allow-downgrade", "--reason", "two\nlines"]) == 2
    assert "go together" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ build: serial, files

def test_build_copies_a_local_file_artifact_into_a_new_folder(tmp_path: Path, keys: dict[str, Path]) -> None:
    """A locked file whose source is a local path (no --artifacts) is copied into a folder build creates.

    This is the README's `bundle build` traceback (FileNotFoundError in `_fetch_file`) without the lab.
    """
    site = load_site("lab")
    store = tmp_path / "store"
    lock = _fake_lock(site, store)
    import infra.bundle.build as bmod

    orig = bmod.check
    bmod.check = lambda lock_, site_: []  # type: ignore[assignment]
    try:
        man = build(site, lock, lock.to_json(), "airgap", tmp_path / "out", keys["site_secret"], BuildOptions(),
                    serial=7)
    finally:
        bmod.check = orig
    assert verify_bundle(tmp_path / "out", keys["site_public"])[1] == []
    assert man.serial == 7 and man.mirrors == ("lab-mirror",) and man.site == "lab" and man.segment == "airgap"
    assert man.lock_sha256 == hashlib.sha256(lock.to_json().encode()).hexdigest()


def test_serial_record_only_grows(tmp_path: Path) -> None:
    """The builder's serial record starts at 0, is never lowered, and a corrupted one is an error."""
    from infra.bundle.build import last_serial, save_serial, serial_path

    record = serial_path(tmp_path / "Pulumi.lab.lock.json")
    assert record.name == "Pulumi.lab.bundle-serial" and last_serial(record) == 0
    save_serial(record, 5)
    save_serial(record, 3)
    assert last_serial(record) == 5
    record.write_text("five\n")
    with pytest.raises(BuildError, match="expected one positive integer"):
        last_serial(record)


# ------------------------------------------------------------- property tests: the manifest parser is total

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from infra.bundle.hashing import Digest  # noqa: E402
from infra.bundle.manifest import Manifest, ManifestError, check_rel  # noqa: E402

_BASE = Manifest(
    "lab", "airgap", "a" * 64,
    {"apt/a_1.0_amd64.deb": Digest(5, "b" * 64),
     "files/models/tiny/r1/model.gguf": Digest(10, "c" * 64, ("d" * 64, "e" * 64), 8),
     "images/lab/hello/index.json": Digest(2, "f" * 64)},
    [Artifact("deb", "a", "1.0", "apt/a_1.0_amd64.deb", 5, "b" * 64, "http://198.18.1.250/a.deb", ("airgap",), True),
     Artifact("image", "lab/hello", "sha256:" + "f" * 64, "images/lab/hello", 1, "f" * 64, "oci", ("airgap",), True)],
    3, ("lab-mirror",))
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats(allow_nan=False)
    | st.text(max_size=70) | st.sampled_from(["a" * 64, "A" * 64, "a" * 63, "../x", "apt/x.deb", "/etc/x", "lab"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12)


def _paths(node: object, prefix: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


@st.composite
def mutated_manifests(draw: st.DrawFn) -> str:
    """A valid manifest with 1–4 random edits: a value replaced, a key deleted or added, a list grown."""
    data = json.loads(_BASE.to_json())
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(_paths(data)))
        op = draw(st.sampled_from(["replace", "delete", "add"]))
        if not path:
            data = draw(_JSON) if op == "replace" else data
            continue
        parent: object = data
        for step in path[:-1]:
            parent = parent[step]  # type: ignore[index]
        last = path[-1]
        if op == "replace":
            parent[last] = draw(_JSON)  # type: ignore[index]
        elif op == "delete" and isinstance(parent, dict):
            del parent[last]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = draw(_JSON)
        elif isinstance(parent, list):
            parent.append(draw(_JSON))
    return json.dumps(data)


def _parse_ends_cleanly(text: str | bytes) -> Manifest | None:
    try:
        man = Manifest.from_json(text)
    except ManifestError as exc:
        assert str(exc) and "\n" not in str(exc)
        return None
    # Whatever parses is a manifest gpufleet can trust the shape of, and writes back unchanged.
    assert all(check_rel(p) is None for p in man.files) and all(check_rel(a.path) is None for a in man.artifacts)
    assert Manifest.from_json(man.to_json()) == man
    return man


@pytest.mark.slow
@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_manifests())
def test_property_mutated_manifests_parse_or_fail_cleanly(text: str) -> None:
    """Thousands of mutated manifests end in a Manifest or a one-line ManifestError — never another exception."""
    _parse_ends_cleanly(text)


@pytest.mark.slow
@settings(max_examples=1500, deadline=None)
@given(st.one_of(st.binary(max_size=300), st.text(max_size=300), _JSON.map(json.dumps),
                 st.tuples(st.integers(0, 2000), st.binary(max_size=3)).map(
                     lambda cut: _BASE.to_json().encode()[: cut[0]] + cut[1])))
def test_property_arbitrary_bytes_parse_or_fail_cleanly(text: str | bytes) -> None:
    """Random bytes, text, JSON values and truncated manifests never raise anything but ManifestError."""
    _parse_ends_cleanly(text)


def test_base_manifest_of_the_property_tests_is_valid() -> None:
    """The mutation seed parses (so the property tests start from an accepted manifest)."""
    assert _parse_ends_cleanly(_BASE.to_json()) == _BASE
    assert _parse_ends_cleanly("[" * 100_000) is None  # deep nesting: RecursionError becomes ManifestError


def test_import_refusal_is_one_json_object_under_json(tmp_path: Path, keys: dict[str, Path],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """A bundle for another site: exit 1 and one JSON object naming it; refused before the mirror is contacted."""
    b = make_bundle(tmp_path / "b", keys["site_secret"], site="other-site")
    code = main(["bundle", "import", str(b), "--stack", "lab", "--mirror", "lab-mirror", "--keyring",
                 str(keys["site_public"]), "--mirror-key", str(keys["other_secret"]), "--json"])
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert code == 1 and out["ok"] is False and out["exit"] == 1
    assert "bundle is for site 'other-site'; this stack is site 'lab'" in out["error"]
    assert "Traceback" not in captured.err
