"""Air-gap supply chain: lock check, bundle build/verify (tamper), import (nothing on failure, idempotent)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
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
from infra.bundle.remote import SshMirror
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
    """The real SSH publisher with `ssh HOST CMD` replaced by `sh -c CMD` on this machine."""

    def _ssh(self) -> list[str]:
        return ["sh", "-c"]


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
