"""Debian's podman (4.3.1) runs a container with a CDI GPU device on a converged lab node, from a unit.

What is shown, by the runtime and by systemd themselves (no string match on our own output):
- the `nvidia_container_toolkit` role's CDI spec (written by the lab's `nvidia-ctk cdi generate` stand-in)
  is a real CDI spec: `cdiVersion`, kind `nvidia.com/gpu`, one device per GPU with `containerEdits.deviceNodes`
  backed by the node's `/dev/null` (the documented lab choice: nspawn hosts have no GPU device nodes);
- a unit whose command line is built by `infra.plan.engines` (the GPU options podman gets, quoted by
  `systemd_command_line`) is started by the node's systemd; podman resolves `nvidia.com/gpu=0` through the
  spec and the container sees `/dev/nvidia0` as a character device, and only that GPU;
- an argument full of characters systemd treats specially reaches the container byte for byte;
- a CDI name that no spec defines is refused by podman (the device really comes from the spec).

The image is built on the node without network: a rootfs of the node's own `sh`, `stat` and `ls` (with
their libraries) imported with `podman import`.
"""

from __future__ import annotations

import base64
import json

import pytest

from infra.lab.session import Lab
from infra.model.site import ContainerEngine
from infra.plan import engines
from tests.lab.test_inference_lab import converge, stable_lab, stores  # noqa: F401  (fixtures)

pytestmark = pytest.mark.lab

NODE = "lab-gpu01"
IMAGE = "localhost/gpufleet-lab/cdi-probe:1"
WORK = "/tmp/gpufleet-cdi-probe"
UNIT = "gpufleet-cdi-probe.service"
HOSTILE = "a b\n'q' \"d\" $HOME $$ %n %% \\ ; ExecStartPre=/bin/false"

_BUILD = f"""set -e
rm -rf {WORK} && mkdir -p {WORK}/root {WORK}/out
for b in /bin/sh /usr/bin/stat /usr/bin/ls; do
  for f in "$b" $(ldd "$b" | grep -o '/[^ ]*'); do
    mkdir -p "{WORK}/root$(dirname "$f")" && cp -L "$f" "{WORK}/root$f"
  done
done
tar -C {WORK}/root -cf {WORK}/probe.tar .
podman rmi --force {IMAGE} >/dev/null 2>&1 || true
podman import {WORK}/probe.tar {IMAGE} >/dev/null
"""


def _sh(lab: Lab, script: str, timeout: float = 300) -> str:
    encoded = base64.b64encode(script.encode()).decode()
    r = lab.ssh(NODE, f"echo {encoded} | base64 -d | bash", timeout=timeout)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r.stdout


@pytest.fixture(scope="module")
def probe_image(stable_lab: Lab, stores: None) -> Lab:  # noqa: F811
    """The node converged (podman, toolkit, CDI spec) and a local probe image imported."""
    converge(NODE)
    _sh(stable_lab, _BUILD)
    return stable_lab


def test_cdi_spec_is_real(probe_image: Lab) -> None:
    """The spec the role generated has the CDI structure, a device per GPU, nodes that exist on the host."""
    spec = json.loads(_sh(probe_image, "cat /etc/cdi/nvidia.yaml"))
    assert spec["cdiVersion"] and spec["kind"] == "nvidia.com/gpu"
    names = {d["name"] for d in spec["devices"]}
    assert {"0", "all"} <= names
    gpu0 = next(d for d in spec["devices"] if d["name"] == "0")
    nodes = gpu0["containerEdits"]["deviceNodes"]
    assert [n["path"] for n in nodes] == ["/dev/nvidia0"]
    for n in nodes:
        assert _sh(probe_image, f"stat -c %F {n['hostPath']}").strip() == "character special file"


def test_podman_runs_a_cdi_gpu_container_from_a_unit(probe_image: Lab) -> None:
    """systemd starts the unit engines.py's quoting wrote; podman gives the container GPU 0 and only it."""
    argv: list[engines.Word] = [
        # No --cgroups: as in the units engines.py writes, containers.conf decides; the container_runtime role
        # disabled cgroups there because the lab host declares container_cgroups=false.
        engines.RUNTIME_BIN[ContainerEngine.PODMAN], "run", "--rm", "--network=none",
        *engines.gpu_options(ContainerEngine.PODMAN, "4.3.1+ds1-8+deb12u1+b3", "0"),
        f"--volume={WORK}/out:/out", IMAGE,
        "/bin/sh", "-c", 'stat -c "%F %t:%T" /dev/nvidia0 > /out/dev; ls /dev > /out/ls; printf %s "$1" > /out/arg',
        "sh", HOSTILE,
    ]
    unit = (
        "[Unit]\nDescription=gpufleet CDI probe\n[Service]\nType=oneshot\n"
        f"ExecStart={engines.systemd_command_line(argv)}\n"
    )
    out = _sh(probe_image, f"""set -e
rm -f {WORK}/out/*
printf %s {_b64(unit)} | base64 -d > /run/systemd/system/{UNIT}
systemctl daemon-reload
systemctl start {UNIT} || {{ journalctl -u {UNIT} --no-pager | tail -20; exit 1; }}
echo "DEV=$(cat {WORK}/out/dev)"
echo "LS=$(grep '^nvidia' {WORK}/out/ls | tr '\\n' ' ')"
echo "ARG=$(base64 -w0 < {WORK}/out/arg)"
rm -f /run/systemd/system/{UNIT} && systemctl daemon-reload
""", timeout=300)
    got = dict(line.split("=", 1) for line in out.splitlines() if line.split("=", 1)[0] in ("DEV", "LS", "ARG"))
    assert got["DEV"] == "character special file 1:3"  # /dev/null's major:minor, the spec's hostPath
    gpus = [d for d in got["LS"].split() if d[len("nvidia"):].isdigit()]
    assert gpus == ["nvidia0"]  # gpu=0 only; the other GPUs are not in the container
    assert {"nvidiactl", "nvidia-uvm"} <= set(got["LS"].split())  # the spec's edits common to every device
    assert base64.b64decode(got["ARG"]).decode() == HOSTILE  # systemd passed the word through unchanged


def test_podman_refuses_a_cdi_name_no_spec_defines(probe_image: Lab) -> None:
    """An unknown CDI device is an error of podman's CDI resolution, not silently ignored."""
    r = probe_image.ssh(NODE, f"podman run --rm --cgroups=disabled --network=none "
                              f"--device=nvidia.com/gpu=no-such-gpu {IMAGE} /bin/sh -c true")
    assert r.returncode != 0
    assert "no-such-gpu" in r.stderr or "CDI" in r.stderr or "cdi" in r.stderr, r.stderr


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()
