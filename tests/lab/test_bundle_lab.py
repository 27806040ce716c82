"""Air-gap supply chain end to end on the lab: lock → build → verify → import → an air-gapped node installs.

Needs the running lab (`gpufleet lab up`, root). Uses a copy of the lab stack whose air-gapped node also
runs a locally built OCI image (the lab stack itself has no image), so the bundle carries every kind:
real Debian packages and the stand-in NVIDIA packages from lab-upstream, the image, the tiny model,
the llama.cpp wheelhouse and a (SIMULATED) pulumi-resource-command plugin tarball.
"""

from __future__ import annotations

import gzip
import io
import json
import shutil
import subprocess
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from infra.bundle import oci
from infra.bundle.declared import plugin_file, plugin_version
from infra.bundle.signing import generate_key
from infra.model.load import project_dir

pytestmark = pytest.mark.lab

LAB = Path("/var/lib/gpufleet/lab")
SSH_CONFIG = LAB / "ssh/config"
MIRROR_GNUPG = LAB / "gnupg/lab-mirror"
OUTSIDE = "198.18.1.250"
MIRROR = "198.18.2.10"
NODE = "lab-gpu03"
IMAGE_REPO = "gpufleet-lab/hello"
ARTIFACTS_CACHE = Path("/var/cache/gpufleet/bundle/artifacts")


def standin_plugin(dest_dir: Path) -> Path:
    """A SIMULATED pulumi-resource-command tarball with the real file name (the lab has no internet).

    Deterministic bytes (fixed mtimes, gzip without timestamp) so a lock can pin its sha256.
    """
    version = plugin_version()
    script = (b"#!/bin/sh\necho 'SIMULATED pulumi-resource-command (gpufleet lab stand-in, not Pulumi software)'\n"
              b"exit 1\n")
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data, mode in (("pulumi-resource-command", script, 0o755),
                                 ("README.SIMULATED", b"gpufleet lab stand-in; install the real plugin in "
                                                      b"production (docs/airgap.md)\n", 0o644)):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), mode, 0
            tar.addfile(info, io.BytesIO(data))
    out = dest_dir / "files" / "plugins" / plugin_file(version)
    out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as z:
        z.write(raw.getvalue())
    out.write_bytes(buf.getvalue())
    return out


def lab_artifacts(root: Path = ARTIFACTS_CACHE) -> tuple[Path, str]:
    """The connected side's artifacts store for the lab: llama.cpp files, plugin stand-in, an OCI image."""
    from infra.inference.publish import publish_llamacpp_files

    publish_llamacpp_files(root / "files")
    standin_plugin(root)
    digest = oci.write_image(root / "images" / IMAGE_REPO,
                             {"hello": b"#!/bin/sh\necho 'gpufleet lab image (air-gap bundle test)'\n"}, "lab")
    return root, digest


def node_baseline() -> Path:
    """dpkg status of the lab nodes' base root filesystem: what every node has before any role runs."""
    state = json.loads((LAB / "state.json").read_text())
    return Path(state["hosts"][NODE]["lower"]) / "var/lib/dpkg/status"


def ssh(host: str, cmd: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    """Run a command on a lab host with the lab's pinned SSH config."""
    return subprocess.run(["ssh", "-F", str(SSH_CONFIG), host, cmd], capture_output=True, text=True,
                          timeout=timeout, check=False)


def gpufleet(*args: str, timeout: int = 1200) -> subprocess.CompletedProcess[str]:
    """Run the CLI exactly as a user would."""
    return subprocess.run([str(project_dir() / ".venv/bin/gpufleet"), *args], capture_output=True, text=True,
                          timeout=timeout, check=False, cwd=project_dir())


def outside_unreachable_from_node() -> bool:
    """The air-gapped node cannot open a connection to the outside-world host (3 s probe)."""
    r = ssh(NODE, f"curl -s -o /dev/null -m 3 http://{OUTSIDE}/apt/Release; echo rc=$?", timeout=30)
    return "rc=0" not in r.stdout and "rc=" in r.stdout


@dataclass
class Flow:
    """Everything one run of the flow produced."""

    stack: Path
    lock: Path
    bundle: Path
    keyring: Path
    digest: str
    outputs: dict[str, subprocess.CompletedProcess[str]]
    secret: Path
    serial: int


@pytest.fixture(scope="module")
def flow(lab: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flow]:
    """Lock, build and import once for the module (each step's output kept for the tests)."""
    if ssh("lab-mirror", "true", timeout=20).returncode != 0:
        pytest.skip("lab-mirror does not answer SSH")
    for tool in ("skopeo", "gpg", "gpgv", "dpkg-scanpackages"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed on the controller")
    tmp = tmp_path_factory.mktemp("airgap")
    art, digest = lab_artifacts()
    raw = yaml.safe_load((project_dir() / "stacks/Pulumi.lab.yaml").read_text())
    site = raw["config"]["gpufleet:site"]
    prof = json.loads(json.dumps(site["profiles"]["lab-570"]))
    prof.setdefault("monitoring", {})["dcgm_exporter_image"] = f"{MIRROR}:5000/{IMAGE_REPO}@{digest}"
    site["profiles"]["lab-570-image"] = prof
    for n in site["nodes"]:
        if n["hostname"] == NODE:
            n["profile"] = "lab-570-image"
    stack = tmp / "Pulumi.labbundle.yaml"
    stack.write_text(yaml.safe_dump(raw, sort_keys=False))
    secret, keyring = tmp / "bundle.sec.asc", tmp / "bundle.pub.asc"
    generate_key(tmp / "gnupg", "gpufleet lab bundle key (SIMULATED) <bundle@lab.invalid>", secret, keyring)
    bundle = tmp / "bundle"
    out: dict[str, subprocess.CompletedProcess[str]] = {}
    out["outside_before"] = subprocess.CompletedProcess([], int(not outside_unreachable_from_node()))
    out["lock"] = gpufleet("lock", "--stack-file", str(stack), "--artifacts", str(art), "--dpkg-status",
                           str(node_baseline()), "--json")
    # The lab mirror keeps what it imported across `lab down/up` and test runs, so the serial must be newer
    # than any earlier run's: seconds since the epoch only grow (a site would use its serial record).
    serial = int(time.time())
    out["build"] = gpufleet("bundle", "build", "--stack-file", str(stack), "--segment", "airgap", "--out",
                            str(bundle), "--artifacts", str(art), "--signing-key", str(secret), "--serial",
                            str(serial), "--json")
    out["verify"] = gpufleet("bundle", "verify", str(bundle), "--keyring", str(keyring), "--json")
    imp = ("bundle", "import", str(bundle), "--stack-file", str(stack), "--mirror", "lab-mirror",
           "--keyring", str(keyring), "--mirror-key", str(MIRROR_GNUPG), "--json")
    out["import1"] = gpufleet(*imp)
    out["import2"] = gpufleet(*imp)
    out["status"] = gpufleet("mirror", "status", "--stack-file", str(stack), "--mirror", "lab-mirror", "--json")
    yield Flow(stack, stack.with_name("Pulumi.labbundle.lock.json"), bundle, keyring, digest, out, secret, serial)


def _ok(p: subprocess.CompletedProcess[str]) -> dict[str, object]:
    assert p.returncode == 0, f"exit {p.returncode}\nstdout: {p.stdout[-3000:]}\nstderr: {p.stderr[-3000:]}"
    data: dict[str, object] = json.loads(p.stdout)
    return data


def test_lock_resolves_every_kind(flow: Flow) -> None:
    """The lock holds resolved debs (closure), the image by digest, model, wheels and the plugin."""
    _ok(flow.outputs["lock"])
    lock = json.loads(flow.lock.read_text())
    kinds = {a["kind"] for a in lock["artifacts"]}
    assert kinds == {"deb", "image", "model", "wheel", "plugin"}
    fetched = [a for a in lock["artifacts"] if a["source"] != "baseline"]
    assert all(a["sha256"] and a["size"] for a in fetched)
    # Only unpinned packages the nodes' base OS already has may come from the baseline.
    assert {a["name"] for a in lock["artifacts"] if a["source"] == "baseline"} <= {"ca-certificates", "python3-apt",
                                                                                   "curl", "chrony"}
    debs = {a["name"] for a in fetched if a["kind"] == "deb"}
    assert {"nvidia-driver", "podman", "nftables", "conmon", "crun"} <= debs  # dependency closure included
    assert any(a["kind"] == "image" and a["version"] == flow.digest for a in lock["artifacts"])


def test_bundle_builds_and_verifies(flow: Flow) -> None:
    """The air-gapped segment's bundle is built, signed, and verifies with the site key."""
    built = _ok(flow.outputs["build"])
    ver = _ok(flow.outputs["verify"])
    assert ver["ok"] is True and ver["files"] == built["files"]


def test_import_then_reimport_changes_nothing(flow: Flow) -> None:
    """The first import publishes, the second reports no change (idempotent)."""
    first, second = _ok(flow.outputs["import1"]), _ok(flow.outputs["import2"])
    served = [f for f in json.loads((flow.bundle / "manifest.json").read_text())["files"]
              if f.startswith(("apt/", "files/"))]
    # The first run uploads whatever the mirror lacked (all of it on a fresh mirror, less after an earlier run).
    assert len(first["uploaded"]) + first["unchanged_files"] == len(served)
    assert second["changed"] is False and second["uploaded"] == [] and second["images"] == []
    assert second["unchanged_files"] == len(served)


def test_mirror_status_matches_the_lock(flow: Flow) -> None:
    """After import the mirror serves every locked artifact of its segment."""
    st = _ok(flow.outputs["status"])
    assert st["matches_lock"] is True, st["missing"]
    assert st["apt_packages"] > 50 and st["images"] >= 1


def test_air_gapped_node_converges_from_the_imported_mirror(flow: Flow) -> None:
    """The ROLES engineer's converge of lab-gpu03 (lab stack) succeeds with only the imported mirror reachable."""
    # The lab stack itself: the bundle's stack copy differs only by an image on this node, which the
    # mirror now also serves; converging the real stack is what the other lab tests expect on the node.
    r = gpufleet("converge", "--stack", "lab", "--node", NODE, "--json", timeout=1500)
    policy = ssh(NODE, "apt-cache policy nvidia-driver podman | grep -E '^ +[0-9]+ http' | sort -u").stdout
    assert f"http://{MIRROR}/apt" in policy and OUTSIDE not in policy
    assert outside_unreachable_from_node()
    data = json.loads(r.stdout)
    assert r.returncode == 0 and data["succeeded"], [n.get("failures") for n in data.get("nodes", [])]


def test_air_gapped_node_installs_from_the_mirror_only(flow: Flow) -> None:
    """lab-gpu03 fetches and signature-checks the whole locked set from lab-mirror; outside stays unreachable."""
    assert flow.outputs["outside_before"].returncode == 0, "outside-world host reachable from the air-gapped node"
    sources = ssh(NODE, "cat /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null | grep -v '^#'").stdout
    assert OUTSIDE not in sources and "deb.debian.org" not in sources
    lock = json.loads(flow.lock.read_text())
    top = sorted({f"{a['name']}={a['version']}" for a in lock["artifacts"]
                  if a["kind"] == "deb" and a["declared"] and "airgap" in a["segments"]})
    # A private cache dir: proves apt on the node fetches and hash-checks every package from the mirror
    # without changing the node's installed state (the ROLES engineer's converge tests own that).
    cmd = ("rm -rf /tmp/gpf-bundle-dl && mkdir -p /tmp/gpf-bundle-dl/partial && apt-get -q update && "
           "apt-get -y -q --no-install-recommends -o Dir::Cache::archives=/tmp/gpf-bundle-dl "
           "--download-only install --reinstall " + " ".join(top) + " && ls /tmp/gpf-bundle-dl/*.deb | wc -l")
    r = ssh(NODE, cmd, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"http://{MIRROR}/apt" in r.stdout and OUTSIDE not in r.stdout
    assert int(r.stdout.strip().splitlines()[-1]) >= len(top)
    model = next(a for a in lock["artifacts"] if a["kind"] == "model")
    got = ssh(NODE, f"curl -sf -m 20 http://{MIRROR}/{model['path']} | sha256sum").stdout.split()[0]
    assert got == model["sha256"]
    man = ssh(NODE, f"curl -sf -m 20 -H 'Accept: application/vnd.oci.image.manifest.v1+json' "
                    f"http://{MIRROR}:5000/v2/{IMAGE_REPO}/manifests/{flow.digest} | sha256sum").stdout.split()[0]
    assert "sha256:" + man == flow.digest  # the registry serves the image under its locked digest
    assert outside_unreachable_from_node(), "outside-world host became reachable from the air-gapped node"


# Everything nginx serves (through the apt/ and files/ symlinks) plus which tree `current` names.
SERVED_HASH = ("cd /srv/gpufleet && { readlink .gpufleet/current; find -L apt files -type f | sort | xargs sha256sum; }"
               " | sha256sum")


def test_tampered_bundle_is_not_imported(flow: Flow, tmp_path: Path) -> None:
    """A copy of the bundle with one flipped byte is rejected by import and the mirror is untouched."""
    before = ssh("lab-mirror", SERVED_HASH).stdout
    bad = tmp_path / "bad"
    shutil.copytree(flow.bundle, bad)
    victim = sorted((bad / "apt").glob("*.deb"))[0]
    data = bytearray(victim.read_bytes())
    data[100] ^= 1
    victim.write_bytes(bytes(data))
    r = gpufleet("bundle", "import", str(bad), "--stack-file", str(flow.stack), "--mirror", "lab-mirror",
                 "--keyring", str(flow.keyring), "--mirror-key", str(MIRROR_GNUPG))
    assert r.returncode == 1 and f"apt/{victim.name}: content does not match" in r.stderr
    after = ssh("lab-mirror", SERVED_HASH).stdout
    assert before == after


def _resigned(flow: Flow, dest: Path, **changes: object) -> Path:
    """A copy of the flow's bundle whose manifest is edited and signed again with the real bundle key."""
    from infra.bundle.signing import sign_detached

    shutil.copytree(flow.bundle, dest)
    man = json.loads((dest / "manifest.json").read_text())
    man.update(changes)
    (dest / "manifest.json").write_text(json.dumps(man, indent=1, sort_keys=True) + "\n")
    sign_detached(dest / "manifest.json", flow.secret, dest / "manifest.json.asc")
    return dest


def _import(flow: Flow, bundle: Path, *extra: str, mirror_key: Path = MIRROR_GNUPG) -> subprocess.CompletedProcess[str]:
    return gpufleet("bundle", "import", str(bundle), "--stack-file", str(flow.stack), "--mirror", "lab-mirror",
                    "--keyring", str(flow.keyring), "--mirror-key", str(mirror_key), *extra)


@pytest.mark.parametrize(("case", "message"), [
    ("older serial", "is older than serial"),
    ("other site", "bundle is for site 'elsewhere'"),
    ("other segment", "bundle is for segment 'connected'"),
    ("mirror key unusable", "mirror signing key unusable"),
])
def test_refused_imports_leave_the_mirror_byte_identical(flow: Flow, tmp_path: Path, case: str, message: str) -> None:
    """Rollback, another site or segment, an unusable mirror key: exit 1, the served tree does not change."""
    _ok(flow.outputs["import1"])
    changes = {"older serial": {"serial": flow.serial - 1}, "other site": {"site": "elsewhere"},
               "other segment": {"segment": "connected"}, "mirror key unusable": {}}[case]
    bundle = _resigned(flow, tmp_path / "b", **changes) if changes else flow.bundle
    key = tmp_path / "no-such-key.asc" if case == "mirror key unusable" else MIRROR_GNUPG
    before = ssh("lab-mirror", SERVED_HASH).stdout
    r = _import(flow, bundle, mirror_key=key)
    assert r.returncode == 1 and message in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert ssh("lab-mirror", SERVED_HASH).stdout == before


def test_deliberate_downgrade_is_logged_then_the_newer_bundle_returns(flow: Flow, tmp_path: Path) -> None:
    """--allow-downgrade --reason imports an older serial and logs it on the mirror; the newer one follows."""
    _ok(flow.outputs["import1"])
    older = _resigned(flow, tmp_path / "older", serial=flow.serial - 1)
    down = _import(flow, older, "--allow-downgrade", "--reason", "lab test: deliberate downgrade", "--json")
    assert _ok(down)["downgrade"] is True and "DOWNGRADE" in down.stderr
    last = json.loads(ssh("lab-mirror", "tail -n 1 /srv/gpufleet/.gpufleet/imports.log").stdout)
    assert (last["serial"], last["previous_serial"], last["override"]) == (
        flow.serial - 1, flow.serial, "lab test: deliberate downgrade")
    back = _ok(_import(flow, flow.bundle, "--json"))
    assert back["serial"] == flow.serial and back["downgrade"] is False
