"""The monitoring server's inputs: the probe zipapp, the Prometheus hosts' role variables, the federation flow."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from infra.commands.monitoring import check_role_arguments
from infra.inference.fakeserver import FakeBehaviour, FakeOpenAIServer
from infra.lab.config import lab_spec
from infra.lab.network import host_routes, lab_flows, render_ruleset
from infra.model.load import load_site, project_dir
from infra.observe import server
from infra.plan.node import plan_site
from tests.unit.ansible_local import run_local_play

# The interpreter a monitoring host has: Debian's python3, no gpufleet, no site-packages (-I -S).
SYSTEM_PYTHON = "/usr/bin/python3"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("probe") / "gpufleet-slo-probe.pyz"
    path.write_bytes(server.probe_zipapp())
    return path


def test_probe_zipapp_is_the_same_bytes_every_time() -> None:
    """The role copies it by checksum: a rebuild from the same sources must not look like a change."""
    assert server.probe_zipapp() == server.probe_zipapp()


@pytest.mark.skipif(not Path(SYSTEM_PYTHON).exists(), reason="no system python3")
def test_probe_zipapp_runs_on_the_bare_standard_library(app: Path, tmp_path: Path) -> None:
    """Without site-packages or gpufleet, the zipapp probes a streaming server and serves its metrics."""
    port = _free_port()
    with FakeOpenAIServer(FakeBehaviour()) as fake:
        cfg = {
            "listen": f"127.0.0.1:{port}",
            "interval_s": 0.2,
            "endpoints": [{"service": "svc", "node": "n1", "engine": "llamacpp", "url": fake.url, "model": "m"}],
        }
        (tmp_path / "probe.json").write_text(json.dumps(cfg))
        proc = subprocess.Popen([SYSTEM_PYTHON, "-I", "-S", str(app), "--config", str(tmp_path / "probe.json")],
                                stderr=subprocess.PIPE, text=True)
        try:
            text = ""
            deadline = time.monotonic() + 30
            while 'gpufleet_probe_requests_total{service="svc",node="n1"} 2' not in text:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                assert time.monotonic() < deadline, text
                time.sleep(0.1)
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                        text = r.read().decode()
                except OSError:
                    continue
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    assert 'gpufleet_probe_success{service="svc",node="n1"} 1' in text


@pytest.mark.skipif(not Path(SYSTEM_PYTHON).exists(), reason="no system python3")
def test_probe_zipapp_refuses_a_bad_configuration_in_one_line(app: Path, tmp_path: Path) -> None:
    """A broken probe.json: exit 2 and one line naming the file, never a traceback."""
    bad = tmp_path / "probe.json"
    bad.write_text('{"listen": "0.0.0.0:9479", "interval_s": 5, "endpoints": []}')
    p = subprocess.run([SYSTEM_PYTHON, "-I", "-S", str(app), "--config", str(bad)], capture_output=True, text=True,
                       timeout=30, check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.count("\n") == 1 and str(bad) in p.stderr and "127.0.0.1" in p.stderr


def test_lab_prometheus_hosts_get_their_segment_files_and_sources() -> None:
    """The mirror installs from its own repository, the node keeps base's sources; each gets its segment's
    prometheus.yml; both pin the stack's versions; the variables satisfy the role's argument spec."""
    plan = plan_site(load_site(stack="lab"))
    inv = server.inventory(plan, "/controller/probe.pyz")
    hosts = inv["all"]["children"][server.GROUP]["hosts"]
    assert sorted(hosts) == ["lab-gpu01", "lab-mirror"]
    mirror, node = hosts["lab-mirror"], hosts["lab-gpu01"]
    assert mirror["ansible_host"] == "198.18.2.10" and node["ansible_host"] == "198.18.1.11"
    assert [s["uris"] for s in mirror["monitoring_server_apt_sources"]] == ["http://198.18.2.10/apt"]
    assert node["monitoring_server_apt_sources"] == []
    pins = {p["name"]: p["version"] for p in mirror["monitoring_server_packages"]}
    assert pins == {"prometheus": "2.42.0+ds-5+deb12u1", "prometheus-alertmanager": "0.25.0-1+b4"}
    assert "segment: airgap" in mirror["monitoring_server_prometheus_config"]
    assert "/federate" in node["monitoring_server_prometheus_config"]
    assert "/federate" not in mirror["monitoring_server_prometheus_config"]
    assert "198.18.2.11:8080" in mirror["monitoring_server_probe_config"]
    assert check_role_arguments(inv) == []


def test_role_argument_check_names_a_bad_variable() -> None:
    """A variable of the wrong type is caught on the controller, before any host is touched."""
    plan = plan_site(load_site(stack="lab"))
    inv = server.inventory(plan, "/controller/probe.pyz", ["lab-mirror"])
    inv["all"]["children"][server.GROUP]["hosts"]["lab-mirror"]["monitoring_server_port"] = "not a port"
    found = check_role_arguments(inv)
    assert len(found) == 1 and found[0].startswith("lab-mirror:") and "monitoring_server_port" in found[0]


def test_federation_is_the_one_flow_between_segments() -> None:
    """The lab allows the site view's host to the mirror's Prometheus port, and routes only that pair."""
    spec = lab_spec("lab")
    flows = lab_flows(spec)
    assert [(str(f.from_address), str(f.to_address), f.port) for f in flows] == [("198.18.1.11", "198.18.2.10", 9090)]
    text = render_ruleset(spec.bridges, "gpufleet_test", flows)
    assert "ip daddr 198.18.2.10 tcp dport 9090 ct state new,established accept" in text
    assert "ip saddr 198.18.2.10 ip daddr 198.18.1.11 tcp sport 9090 ct state established accept" in text
    # Every other packet between the bridges still meets the drops after these two rules.
    drops = 'iifname { "gpfl-connected", "gpfl-airgap", "gpfl-f-lab-roce" } drop'
    assert text.index("tcp dport 9090") < text.index(drops)
    assert [(str(d), str(v)) for d, v in host_routes(spec, "lab-mirror")] == [("198.18.1.11", "198.18.2.1")]
    assert host_routes(spec, "lab-gpu03") == []


@pytest.mark.skipif(shutil.which("nft") is None, reason="nft not installed")
def test_federation_ruleset_is_accepted_by_nft() -> None:
    """`nft -c` (check only, nothing loaded) accepts the table with the flow rules."""
    spec = lab_spec("lab")
    p = subprocess.run(["nft", "-c", "-f", "-"], input=render_ruleset(spec.bridges, "gpufleet_test", lab_flows(spec)),
                       capture_output=True, text=True, timeout=30, check=False)
    assert p.returncode == 0, p.stderr


SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
ROLE = project_dir() / "roles" / "monitoring_server"
# Debian's units the drop-ins extend (prometheus 2.42 and prometheus-alertmanager 0.25, installed by setup.sh --test).
DEBIAN_UNITS = {"prometheus": Path("/lib/systemd/system/prometheus.service"),
                "prometheus-alertmanager": Path("/lib/systemd/system/prometheus-alertmanager.service")}


@pytest.mark.skipif(SYSTEMD_ANALYZE is None or not all(p.exists() for p in DEBIAN_UNITS.values()),
                    reason="needs systemd-analyze and Debian's prometheus packages")
def test_probe_unit_and_drop_ins_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """Rendered by real Ansible from the lab's variables: the probe unit, and Debian's units with our drop-ins,
    pass `systemd-analyze verify` without a warning; the drop-ins name our files and the stack's ports."""
    hostvars = server.inventory(plan_site(load_site(stack="lab")), "/controller/probe.pyz", ["lab-mirror"])
    hv = hostvars["all"]["children"][server.GROUP]["hosts"]["lab-mirror"]
    role_vars: dict[str, object] = {}
    for f in ("defaults/main.yml", "vars/main.yml"):
        role_vars |= yaml.safe_load((ROLE / f).read_text()) or {}
    templates = {"gpufleet-slo-probe.service": "gpufleet-slo-probe.service.j2",
                 "prometheus.service.d/gpufleet.conf": "prometheus-dropin.conf.j2",
                 "prometheus-alertmanager.service.d/gpufleet.conf": "alertmanager-dropin.conf.j2"}
    tasks = [{"name": f"Render {out}", "ansible.builtin.copy": {
        "content": "{{ lookup('ansible.builtin.template', '%s') }}" % (ROLE / "templates" / src),
        "dest": str(tmp_path / "out" / out.replace("/", "__")), "mode": "0644"}} for out, src in templates.items()]
    (tmp_path / "out").mkdir()
    run_local_play([{"name": "Render", "hosts": "localhost", "gather_facts": False,
                     "vars": role_vars | {k: v for k, v in hv.items() if k.startswith("monitoring_server_")},
                     "tasks": tasks}], tmp_path)
    root = tmp_path / "root"
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    etc = root / "etc/systemd/system"
    for out in templates:
        dest = etc / out
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text((tmp_path / "out" / out.replace("/", "__")).read_text())
    for name, unit in DEBIAN_UNITS.items():
        shutil.copy(unit, root / "usr/lib/systemd/system" / f"{name}.service")
    lib = root / "usr/lib/systemd/system"
    units = [*(etc / out for out in templates), *(lib / f"{n}.service" for n in DEBIAN_UNITS)]
    for line in (ln for u in units for ln in u.read_text().splitlines()):
        if line.startswith(("ExecStart=/", "ExecReload=/")):  # verify checks executables exist: stand-ins
            stub = root / line.split("=", 1)[1].split()[0].lstrip("/")
            stub.parent.mkdir(parents=True, exist_ok=True)
            stub.write_text("#!/bin/sh\n")
            stub.chmod(0o755)
    for name in ("gpufleet-slo-probe.service", "prometheus.service", "prometheus-alertmanager.service"):
        p = subprocess.run([str(SYSTEMD_ANALYZE), "verify", f"--root={root}", name], capture_output=True, text=True,
                           timeout=60, check=False)
        noise = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.strip()]
        assert p.returncode == 0 and not noise, f"{name}: {noise}"
    prom = (etc / "prometheus.service.d/gpufleet.conf").read_text()
    assert "--config.file=/etc/gpufleet/monitoring/prometheus.yml --web.listen-address=:9090" in prom
    am = (etc / "prometheus-alertmanager.service.d/gpufleet.conf").read_text()
    assert "--web.listen-address=127.0.0.1:9093 --cluster.listen-address=" in am
