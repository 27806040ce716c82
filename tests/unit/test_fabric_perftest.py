"""perftest reports read back (infra/fabric/perftest.py) and the pairwise run over the one SSH client.

Report rows are printed with perftest's own C formats (tests/fixtures/perftest/report_formats.yaml, copied
from linux-rdma/perftest src/perftest_parameters.h), not with a layout of ours.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import yaml

from infra import ssh
from infra.cli import main
from infra.fabric.pairwise import run_pair
from infra.fabric.perftest import PerftestError, parse_bandwidth, parse_latency
from infra.model.load import parse_site
from infra.plan.fabric import port_pairs

ROOT = Path(__file__).resolve().parents[2]
F = yaml.safe_load((ROOT / "tests" / "fixtures" / "perftest" / "report_formats.yaml").read_text())


def bw_report(gbits: bool, rows: list[tuple[int, int, float, float, float]]) -> str:
    head = "                    RDMA_Write BW Test\n Dual-port       : OFF\t\tDevice         : mlx5_0\n"
    body = "".join(F["REPORT_FMT"] % r + F["RESULT_EXT"] for r in rows)
    return head + F["RESULT_LINE"] + (F["RESULT_FMT_G"] if gbits else F["RESULT_FMT"]) + "\n" + body + F["RESULT_LINE"]


def lat_report(row: tuple[int, int, float, float, float, float, float, float, float]) -> str:
    return (
        F["RESULT_LINE"] + F["RESULT_FMT_LAT"] + "\n" + F["REPORT_FMT_LAT"] % row + F["RESULT_EXT"] + F["RESULT_LINE"]
    )


def test_bandwidth_in_gbits() -> None:
    bw = parse_bandwidth(bw_report(True, [(65536, 5000, 392.71, 391.88, 0.747452)]))
    assert (bw.message_bytes, bw.iterations, bw.peak_gbps, bw.average_gbps) == (65536, 5000, 392.71, 391.88)


def test_bandwidth_in_mib_is_converted() -> None:
    bw = parse_bandwidth(bw_report(False, [(65536, 5000, 11920.93, 11920.93, 0.190735)]))
    assert bw.average_gbps == pytest.approx(100.0, rel=1e-4)  # 11920.93 MiB/s = 100 Gb/s


def test_last_row_of_a_size_sweep_counts() -> None:
    bw = parse_bandwidth(bw_report(True, [(2, 5000, 0.1, 0.1, 6.0), (8388608, 5000, 380.0, 379.5, 0.0056)]))
    assert bw.message_bytes == 8388608


def test_latency_row() -> None:
    lat = parse_latency(lat_report((2, 1000, 1.01, 4.32, 1.07, 1.09, 0.05, 1.30, 4.32)))
    assert (lat.min_us, lat.typical_us, lat.p99_us, lat.p999_us) == (1.01, 1.07, 1.30, 4.32)


def test_failure_output_names_perftest_last_words() -> None:
    text = " Couldn't connect to 10.50.0.11:18515\nUnable to init the socket connection\n"
    with pytest.raises(PerftestError, match="Unable to init the socket connection"):
        parse_bandwidth(text)
    with pytest.raises(PerftestError, match="no latency report"):
        parse_latency(bw_report(True, [(65536, 5000, 1.0, 1.0, 1.0)]))


def _site() -> object:
    doc = yaml.safe_load((ROOT / "stacks" / "Pulumi.example-prod.yaml").read_text())
    return parse_site(doc["config"]["gpufleet:site"])


def test_pairs_cover_each_two_nodes_once() -> None:
    site = _site()
    pairs = port_pairs(site)  # type: ignore[arg-type]
    assert len(pairs) == 6  # 4 HGX nodes on ib-compute: C(4, 2)
    assert {frozenset((p.a[0], p.b[0])) for p in pairs} == {
        frozenset(x)
        for x in [
            ("hgx-01", "hgx-02"),
            ("hgx-01", "hgx-03"),
            ("hgx-01", "hgx-04"),
            ("hgx-02", "hgx-03"),
            ("hgx-02", "hgx-04"),
            ("hgx-03", "hgx-04"),
        ]
    }
    assert all(p.threshold_gbps == 320 for p in pairs)  # 80 % of 400 Gb/s without a stack threshold


def _fake_ssh(tmp_path: Path, bw: str, lat: str, log: Path) -> None:
    """An `ssh` on PATH that plays perftest: servers wait, clients print the given reports."""
    (tmp_path / "bw.txt").write_text(bw)
    (tmp_path / "lat.txt").write_text(lat)
    script = tmp_path / "bin" / "ssh"
    script.parent.mkdir()
    script.write_text(
        "#!/bin/bash\n"
        f'printf "%s\\n" "$*" >> {log}\n'
        'cmd="${!#}"\n'
        'case "$cmd" in\n'
        '  "timeout "*) sleep 0.2 ;;\n'
        f"  ib_write_bw*) cat {tmp_path}/bw.txt ;;\n"
        f"  ib_write_lat*) cat {tmp_path}/lat.txt ;;\n"
        "esac\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


def test_pair_run_uses_pinned_ssh_and_fabric_address(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = _site()
    pair = port_pairs(site)[0]  # type: ignore[arg-type]
    log = tmp_path / "ssh.log"
    _fake_ssh(
        tmp_path,
        bw_report(True, [(65536, 5000, 391.0, 390.2, 0.74)]),
        lat_report((2, 1000, 1.0, 3.0, 1.1, 1.2, 0.1, 1.5, 3.0)),
        log,
    )
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    result = run_pair(site, pair, ssh.SshSettings(None, "/etc/gpufleet/known_hosts"))  # type: ignore[arg-type]
    assert result.ok, result.errors
    assert result.bandwidth is not None and result.bandwidth.average_gbps == 390.2
    calls = log.read_text().splitlines()
    server = next(c for c in calls if "timeout 60 ib_write_bw" in c)
    client = next(c for c in calls if c.endswith("ib_write_bw -R --report_gbits 10.50.0.11"))
    assert "-l root -- 10.40.0.11" in server and "-l root -- 10.40.0.12" in client  # management addresses
    assert "StrictHostKeyChecking=yes" in client


def test_slow_pair_fails_its_threshold(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = _site()
    pair = port_pairs(site)[0]  # type: ignore[arg-type]
    _fake_ssh(
        tmp_path,
        bw_report(True, [(65536, 5000, 200.0, 198.0, 0.37)]),
        lat_report((2, 1000, 1.0, 3.0, 1.1, 1.2, 0.1, 1.5, 3.0)),
        tmp_path / "log",
    )
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    result = run_pair(site, pair, ssh.SshSettings(None, None))  # type: ignore[arg-type]
    assert not result.ok and result.as_dict()["bandwidth_gbps"] == 198.0


def test_iterations_reach_both_tests_and_bad_counts_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    site = _site()
    pair = port_pairs(site)[0]  # type: ignore[arg-type]
    log = tmp_path / "ssh.log"
    _fake_ssh(
        tmp_path,
        bw_report(True, [(65536, 1000, 391.0, 390.2, 0.74)]),
        lat_report((2, 1000, 1.0, 3.0, 1.1, 1.2, 0.1, 1.5, 3.0)),
        log,
    )
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    assert run_pair(site, pair, ssh.SshSettings(None, None), iterations=1000).ok  # type: ignore[arg-type]
    calls = log.read_text().splitlines()
    assert any(c.endswith("ib_write_bw -R --report_gbits -n 1000 10.50.0.11") for c in calls)
    assert any(c.endswith("ib_write_lat -R -n 1000 10.50.0.11") for c in calls)
    assert any("timeout 60 ib_write_lat -R -n 1000" in c for c in calls)  # the server runs the same test
    with pytest.raises(ValueError, match="iterations 4"):
        run_pair(site, pair, ssh.SshSettings(None, None), iterations=4)  # type: ignore[arg-type]
    assert main(["fabric", "test", "--stack", "example-prod", "--iterations", "0"]) == 2
    assert "--iterations 0: give 5–1000000" in capsys.readouterr().err
