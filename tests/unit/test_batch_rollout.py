"""`pulumi up`'s batch converge step and its controller-side bounds, run through the real CLI entry point.

`gpufleet converge --record --batch-slot` is what `<segment>-batch<K>-converge` runs; here the Ansible part
(`infra.ansible.converge.converge`) is replaced by a stand-in that returns per-node outcomes, so the tests see
what the step records, how it exits and what it says. The slot and lease helpers are exercised with real
`flock`s and real processes (a holder that is SIGKILLed must not keep its slot).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.ansible.rollout import NodeOutcome, RolloutResult
from infra.commands import converge as converge_cmd
from infra.components import commands
from infra.components.outcomes import (
    RECORDS_ENV,
    batch_slot,
    live_leases,
    release_reimage_lease,
    take_reimage_lease,
)
from infra.plan.node import NodePlan, SitePlan
from tests.pulumi.conftest import raw_site, run_program
from tests.unit.test_bmc import run_cli


@pytest.fixture
def records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    out = tmp_path / "records"
    monkeypatch.setenv(RECORDS_ENV, str(out))
    return out


def _stack_file(tmp: Path, max_failures: int) -> Path:
    raw = raw_site("example-prod")
    raw["rollout"]["max_failures"] = max_failures
    path = tmp / "Pulumi.batch.yaml"
    path.write_text(yaml.safe_dump({"config": {"gpufleet:site": raw}}))
    return path


def _fake_converge(monkeypatch: pytest.MonkeyPatch, failing: set[str], seen: list[list[str]]) -> None:
    """Replace the Ansible run: every selected node ok, except `failing` (a failed task each)."""

    def fake(plan: SitePlan, nodes: Sequence[NodePlan], **_: Any) -> RolloutResult:
        seen.append([n.hostname for n in nodes])
        out = [NodeOutcome(n.hostname, n.segment.name, n.batch, "failed" if n.hostname in failing else "ok",
                           0 if n.hostname in failing else 3,
                           {"failures": [{"task": "gpufleet_driver : install", "msg": "E: broken"}]}
                           if n.hostname in failing else {})
               for n in nodes]
        return RolloutResult(out, [], {})

    monkeypatch.setattr(converge_cmd, "converge", fake)


def _batch_argv(hosts: list[str], stack_file: Path) -> list[str]:
    """The batch step's real command line (infra.components.commands), pointed at a test stack file."""
    argv = commands.batch_converge("lab", hosts).split()[1:]
    i = argv.index("--stack")
    return [*argv[:i], "--stack-file", str(stack_file), *argv[i + 2:]]


def test_a_passing_batch_records_every_node_and_exits_0(tmp_path: Path, records: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []
    _fake_converge(monkeypatch, set(), seen)
    prod = run_program("example-prod")
    hosts = [p.hostname for p in prod.plan.batches("compute")[0]]
    code, out, _ = run_cli(*_batch_argv(hosts, _stack_file(tmp_path, 0)))
    assert code == 0 and seen == [hosts]
    assert [n["hostname"] for n in json.loads(out)["nodes"]] == hosts
    for h in hosts:  # with --stack-file, records are filed under the default stack name
        rec = json.loads((records / "rollout" / "lab" / f"{h}.converge.json").read_text())
        assert (rec["rc"], rec["detail"]["status"], rec["detail"]["changed"]) == (0, "ok", 3)


def test_a_failed_node_over_the_budget_fails_the_batch_naming_it(tmp_path: Path, records: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """max_failures 0: exit 1, stderr names the failed node; its record says why, the others passed."""
    prod = run_program("example-prod")
    nodes = [p.hostname for b in prod.plan.batches("compute")[:2] for p in b]
    bad, good = nodes[0], nodes[1]
    _fake_converge(monkeypatch, {bad}, [])
    code, _, err = run_cli(*_batch_argv([bad, good], _stack_file(tmp_path, 0)))
    assert code == 1
    assert f"converge failed on {bad} (failed)" in err and "rollout.max_failures=0" in err and good not in err
    rec = json.loads((records / "rollout" / "lab" / f"{bad}.converge.json").read_text())
    assert rec["rc"] == 1 and rec["detail"]["failures"] == ["gpufleet_driver : install: E: broken"]
    assert json.loads((records / "rollout" / "lab" / f"{good}.converge.json").read_text())["rc"] == 0
    # The guard after that batch counts it, as it counts per-node records.
    code, out, _ = run_cli("rollout-guard", "--stack-file", str(_stack_file(tmp_path, 0)), "--segment", "compute",
                           "--batch", "1", "--json")
    assert code == 1 and json.loads(out)["failed"] == [bad]


def test_a_failure_within_the_budget_is_tolerated_and_says_how_to_retry(tmp_path: Path, records: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    prod = run_program("example-prod")
    bad = prod.plan.batches("compute")[0][0].hostname
    _fake_converge(monkeypatch, {bad}, [])
    code, _, err = run_cli(*_batch_argv([bad], _stack_file(tmp_path, 1)))
    assert code == 0 and "tolerated" in err and f"{bad} (failed)" in err and "pulumi up --replace" in err


def test_records_that_cannot_be_written_stop_the_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(RECORDS_ENV, str(blocker / "records"))  # under a file: every mkdir fails
    _fake_converge(monkeypatch, set(), [])
    host = run_program("example-prod").plan.nodes[0].hostname
    code, out, _ = run_cli(*_batch_argv([host], _stack_file(tmp_path, 0)))
    assert code == 5
    assert RECORDS_ENV in json.loads(out)["error"]  # one JSON document: the error, not the result and then it


def test_batch_slots_bound_how_many_run_at_once(tmp_path: Path) -> None:
    """Two slots: two holders run, a third waits until one ends."""
    events: list[str] = []
    with batch_slot("s", 2, base=tmp_path) as a, batch_slot("s", 2, base=tmp_path) as b:
        assert {a, b} == {0, 1}
        third_done = threading.Event()

        def third() -> None:
            with batch_slot("s", 2, base=tmp_path, poll_s=0.05, waiting=lambda: events.append("waiting")):
                events.append("ran")
            third_done.set()

        t = threading.Thread(target=third)
        t.start()
        for _ in range(200):  # until it has tried every slot once
            if events:
                break
            time.sleep(0.01)
        assert events == ["waiting"]
    t.join(10)
    assert third_done.is_set() and events == ["waiting", "ran"]


def test_a_killed_holder_leaves_no_slot_taken(tmp_path: Path) -> None:
    """The slot is a flock: SIGKILL of the process holding it (a killed `pulumi up`) frees it."""
    code = ("import sys, time; from pathlib import Path; from infra.components.outcomes import batch_slot\n"
            "with batch_slot('s', 1, base=Path(sys.argv[1])):\n"
            "    print('held', flush=True); time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[2])
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        waited: list[bool] = []
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(10)
        with batch_slot("s", 1, base=tmp_path, poll_s=0.05, waiting=lambda: waited.append(True)) as i:
            assert i == 0
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_provisioning_leases_bound_nodes_between_power_on_and_ssh(tmp_path: Path) -> None:
    """Width 2: a third node waits (here: times out); a node giving its lease back lets it in."""
    assert take_reimage_lease("s", "n1", 2, 60, base=tmp_path)
    assert take_reimage_lease("s", "n2", 2, 60, base=tmp_path)
    held: list[list[str]] = []
    assert not take_reimage_lease("s", "n3", 2, 60, base=tmp_path, poll_s=0.05, timeout_s=0.2,
                                  waiting=held.append)
    assert held == [["n1", "n2"]]
    assert take_reimage_lease("s", "n1", 2, 60, base=tmp_path, timeout_s=0.1)  # a retry of n1 re-takes its own
    assert release_reimage_lease("s", "n1", base=tmp_path) and not release_reimage_lease("s", "n1", base=tmp_path)
    assert take_reimage_lease("s", "n3", 2, 60, base=tmp_path, timeout_s=0.1)
    assert set(live_leases("s", base=tmp_path)) == {"n2", "n3"}


def test_a_lease_nobody_gives_back_expires(tmp_path: Path) -> None:
    assert take_reimage_lease("s", "n1", 1, 0.2, base=tmp_path)
    assert not take_reimage_lease("s", "n2", 1, 60, base=tmp_path, poll_s=0.05, timeout_s=0.05)
    assert take_reimage_lease("s", "n2", 1, 60, base=tmp_path, poll_s=0.05, timeout_s=5)


def test_provision_slot_string_takes_a_lease_and_wait_ssh_gives_it_back(records: Path) -> None:
    """The BMC step's first part, run as the CLI; then the lease is in place until released."""
    prod = run_program("example-prod")
    p = prod.plan.nodes[0]
    create = prod.reg(f"{p.hostname}-bmc").inputs["create"]
    slot = create.split(" && ")[0].split()
    code, _, _ = run_cli(*slot[1:])
    assert code == 0
    assert set(live_leases("example-prod", base=records)) == {p.hostname}
    assert release_reimage_lease("example-prod", p.hostname, base=records)


@pytest.mark.parametrize("argv", [
    ["provision-slot", "--stack", "example-prod", "--node", "no-such-node", "--ttl", "10"],
    ["provision-slot", "--stack", "example-prod", "--node", "hgx-01", "--ttl", "-1"],
])
def test_bad_provision_slot_arguments_exit_2(argv: list[str], records: Path) -> None:
    try:
        code, _, err = run_cli(*argv)
        assert err.count("\n") == 1
    except SystemExit as exc:  # argparse's own refusal (a bad --ttl)
        code = int(str(exc.code))
    assert code == 2
    assert not (records / "slots").exists()


def test_max_parallel_batches_is_validated(tmp_path: Path) -> None:
    """0 is refused with the config path, like every rollout setting."""
    raw = raw_site("lab")
    raw.setdefault("rollout", {})["max_parallel_batches"] = 0
    path = tmp_path / "Pulumi.bad.yaml"
    path.write_text(yaml.safe_dump({"config": {"gpufleet:site": raw}}))
    code, _, err = run_cli("validate", "--stack-file", str(path))
    assert code == 2 and "rollout.max_parallel_batches" in err
