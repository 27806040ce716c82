"""`gpufleet rollout-record`, `rollout-guard` and `decommission`: the commands `pulumi up` runs, run for real.

The rollout tests run the exact strings of the Pulumi program's steps through `/bin/sh -c` in the
directory the provider would (infra/ + `dir`), with a temporary GPUFLEET_RECORDS_DIR. The
decommission test powers a system off on sushy-tools' emulator (tests/unit/test_bmc.py starts it).
"""

from __future__ import annotations

import copy
import json
import os
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.components import commands
from infra.components.outcomes import RECORDS_ENV
from tests.pulumi.conftest import ROOT, Run, raw_site, run_program
from tests.unit.test_bmc import PASSWORD, Emulator, _start_emulator, _stop, client, free_port, run_cli


@pytest.fixture
def records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    out = tmp_path / "records"
    monkeypatch.setenv(RECORDS_ENV, str(out))
    return out


@pytest.fixture(scope="module")
def prod() -> Run:
    return run_program("example-prod")


def _sh(command: str, dir_: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """As pulumi-command's local provider: `/bin/sh -c` in `dir` relative to the provider's cwd (infra/)."""
    return subprocess.run(["/bin/sh", "-c", command], cwd=ROOT / "infra" / dir_, env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=120, check=False)


def _step_with_exit(run: Run, name: str, rc: int) -> str:
    """The step's real command with its gpufleet call replaced by `sh -c 'exit rc'`; the recording part unchanged."""
    create = run.reg(name).inputs["create"]
    _, record = create.split("; ", 1)
    return f"sh -c 'exit {rc}'; {record}"


def test_pulumi_strings_record_and_guard_a_strict_rollout(prod: Run, records: Path) -> None:
    """example-prod (max_failures 0): a passing converge records and exits 0; a failing one fails the step
    and the guard of its batch then fails, so the next batch of that segment never starts."""
    seg = prod.plan.site.segments[0].name
    first, second = prod.plan.batches(seg)[0][0].hostname, prod.plan.batches(seg)[1][0].hostname
    guard = prod.reg(f"{seg}-batch0-guard").inputs

    # Three runs through the shell (each gpufleet start costs seconds); the rest in-process.
    # (Converge outcomes are written by the batch step itself: tests/unit/test_batch_rollout.py.)
    ok = _sh(_step_with_exit(prod, f"{first}-validate", 0), guard["dir"])
    assert ok.returncode == 0, ok.stderr
    saved = json.loads((records / "rollout" / "example-prod" / f"{first}.validate.json").read_text())
    assert (saved["node"], saved["segment"], saved["batch"], saved["step"], saved["rc"]) == (
        first, seg, 0, "validate", 0)
    assert run_cli(*shlex.split(guard["create"])[1:])[0] == 0

    bad = _sh(_step_with_exit(prod, f"{first}-validate", 1), guard["dir"])
    assert bad.returncode == 1 and "max_failures=0" in bad.stderr
    stopped = _sh(guard["create"] + " --json", guard["dir"])
    assert stopped.returncode == 1
    assert json.loads(stopped.stdout) | {"unknown": []} == {
        "segment": seg, "batch": 0, "max_failures": 0, "failed": [first], "unknown": [], "exceeded": True}
    # Repaired (converge and validate pass again): the guard lets the next batch go.
    record = shlex.split(_step_with_exit(prod, f"{first}-validate", 0).split("; ", 1)[1].replace("$?", "0"))
    assert run_cli(*record[1:])[0] == 0
    assert run_cli(*shlex.split(guard["create"])[1:])[0] == 0
    assert second != first


def _stack_file(tmp: Path, max_failures: int) -> Path:
    raw = raw_site("example-prod")
    raw["rollout"]["max_failures"] = max_failures
    path = tmp / "Pulumi.tolerant.yaml"
    path.write_text(yaml.safe_dump({"config": {"gpufleet:site": raw}}))
    return path


def test_failures_within_max_failures_are_tolerated_until_exceeded(tmp_path: Path, records: Path) -> None:
    """max_failures 1: the first failed node exits 0 (the rollout goes on), the second exits 1; the guard agrees."""
    stack = _stack_file(tmp_path, 1)
    plan_nodes = [b[0].hostname for b in run_program("example-prod").plan.batches("compute")]
    a, b = plan_nodes[0], plan_nodes[1]
    args = ["--stack-file", str(stack)]
    # With --stack-file the records are filed under the default stack name ("lab"); the guard reads the same.
    code, _, err = run_cli("rollout-record", *args, "--node", a, "--step", "converge", "--rc", "1")
    assert code == 0 and "tolerated" in err and f"pulumi up --replace <URN of {a}-converge>" in err
    code, out, _ = run_cli("rollout-guard", *args, "--segment", "compute", "--batch", "0", "--json")
    assert code == 0 and json.loads(out)["failed"] == [a] and not json.loads(out)["exceeded"]
    code, _, err = run_cli("rollout-record", *args, "--node", b, "--step", "validate", "--rc", "2")
    assert code == 1 and "2 failed node(s)" in err
    code, out, _ = run_cli("rollout-guard", *args, "--segment", "compute", "--batch", "1", "--json")
    assert code == 1 and json.loads(out)["failed"] == [a, b]
    # Failures are counted per segment: the other segment is unaffected.
    code, out, _ = run_cli("rollout-guard", *args, "--segment", "edge", "--batch", "0", "--json")
    assert code == 0 and json.loads(out)["failed"] == []


@pytest.mark.parametrize("argv", [
    ["rollout-guard", "--stack", "example-prod", "--segment", "nowhere", "--batch", "0"],
    ["rollout-record", "--stack", "example-prod", "--node", "no-such-node", "--step", "converge", "--rc", "0"],
    ["decommission", "--stack", "../../etc", "--node", "n1", "--policy", "keep", "--node-json", "{}"],
    ["decommission", "--stack", "s", "--node", "n1/../x", "--policy", "keep", "--node-json", "{}"],
    ["decommission", "--stack", "s", "--node", "n1", "--policy", "keep", "--node-json", "{\"hostname\": 1}"],
    ["decommission", "--stack", "s", "--node", "n1", "--policy", "keep", "--node-json", "not json"],
])
def test_bad_arguments_exit_2_with_one_line(argv: list[str], records: Path) -> None:
    code, _, err = run_cli(*argv)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert not records.exists()  # nothing written


def _lab_node(endpoint: str, system: str, secret_env: str) -> dict[str, Any]:
    node = copy.deepcopy(raw_site("lab")["nodes"][0])
    node["bmc"] = {"endpoint": endpoint, "system_id": system, "username": "admin", "password": {"env": secret_env}}
    return node


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    emu = _start_emulator(tmp_path_factory.mktemp("sushy"))
    yield emu
    _stop(emu)


def _decommission(node: dict[str, Any], policy: str) -> str:
    return commands.decommission("lab", node["hostname"], policy, json.dumps(node, sort_keys=True))


def test_decommission_powers_off_via_the_bmc_and_records(emulator: Emulator, records: Path) -> None:
    """The delete string, run as the provider runs it: node-b (On) is powered off and a record written."""
    node = _lab_node(emulator.url, "node-b", "GPUFLEET_TEST_BMC_PW")
    env = {"GPUFLEET_TEST_BMC_PW": PASSWORD}
    os.environ.update(env)  # in-process dry run (the create): same variables as the shell run below
    try:
        code, out, _ = run_cli(*shlex.split(_decommission(node, "power-off") + " --dry-run")[1:])
    finally:
        del os.environ["GPUFLEET_TEST_BMC_PW"]
    assert code == 0 and "power it off" in out
    assert not records.exists()  # the create (dry run) touches nothing

    p = _sh(_decommission(node, "power-off") + " --json", "..", env)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["power"]["after"] == "Off"
    record = json.loads(Path(out["record"]).read_text())
    assert Path(out["record"]).parent == records / "decommission" / "lab"
    assert (record["node"], record["policy"], record["bmc"]) == (node["hostname"], "power-off", emulator.url)
    assert PASSWORD not in Path(out["record"]).read_text()
    # The emulator agrees (asked directly, not the command's own word).
    with client(emulator, system="node-b") as c:
        assert c.system()["PowerState"] == "Off"


def test_decommission_keep_records_without_touching_the_bmc(records: Path) -> None:
    """`keep` never contacts the BMC (here: nothing listens) and still writes a record."""
    node = _lab_node(f"http://127.0.0.1:{free_port()}", "node-a", "GPUFLEET_TEST_UNSET_PW")
    code, out, _ = run_cli(*_argv(node, "keep"), "--json")
    assert code == 0
    assert json.loads(Path(json.loads(out)["record"]).read_text())["power"] == "left as it was"


def _argv(node: dict[str, Any], policy: str) -> list[str]:
    return ["decommission", "--stack", "lab", "--node", node["hostname"], "--policy", policy,
            "--node-json", json.dumps(node)]


def test_decommission_that_cannot_reach_the_bmc_fails_without_a_record(records: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Unreachable BMC: exit 5, no record — Pulumi keeps the step, the next up/destroy retries it."""
    monkeypatch.setenv("GPUFLEET_TEST_BMC_PW", PASSWORD)
    node = _lab_node(f"http://127.0.0.1:{free_port()}", "node-a", "GPUFLEET_TEST_BMC_PW")
    code, _, err = run_cli(*_argv(node, "power-off"), "--timeout", "2")
    assert code == 5 and "power off failed" in err
    assert not (records / "decommission").exists()


def test_decommission_dry_run_needs_the_password_it_will_use(records: Path) -> None:
    """The create checks the secret can be read now, not months later when the node is removed."""
    node = _lab_node("https://198.18.9.1", "node-a", "GPUFLEET_TEST_UNSET_PW")
    code, _, err = run_cli(*_argv(node, "power-off"), "--dry-run")
    assert code == 5 and "GPUFLEET_TEST_UNSET_PW" in err


def test_every_node_step_carries_its_decommission(prod: Run) -> None:
    """`<host>-decommission`: create = the delete with --dry-run, the site's policy, the BMC secret in env only."""
    for p in prod.plan.nodes:
        step = prod.reg(f"{p.hostname}-decommission")
        assert step.inputs["create"] == step.inputs["delete"] + " --dry-run"
        assert f"--policy {prod.plan.site.rollout.decommission.value}" in step.inputs["delete"]
        assert "triggers" not in step.inputs  # never replaced: only deleted when the node leaves
        assert step.inputs["environment"] == prod.reg(f"{p.hostname}-bmc").inputs["environment"]
        assert any(s.startswith("environment") for s in step.secret_inputs)
