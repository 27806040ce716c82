"""converge: each wave's nodes go to the controller or to their segment's execution host, results fold per node."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from infra.ansible import converge as conv
from infra.ansible.converge import Execution, converge
from infra.ansible.remote.job import ExecHost
from infra.ansible.runner import HostResult, RunResult
from infra.model.load import parse_site
from infra.plan.node import plan_site
from tests.unit.factories import make_site


class Calls:
    def __init__(self) -> None:
        self.local: list[list[str]] = []
        self.remote: list[tuple[str, list[str]]] = []
        self.lock = threading.Lock()

    def result(self, hosts: Sequence[str], fail: Sequence[str] = ()) -> RunResult:
        return RunResult(
            playbook="node.yml",
            check=False,
            status="failed" if fail else "successful",
            rc=2 if fail else 0,
            duration_s=1.0,
            hosts={h: HostResult(h, ok=5, failed=int(h in fail)) for h in hosts},
            run_dir=f"/runs/{'-'.join(hosts)}",
        )


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Calls:
    c = Calls()

    def local(playbook: str, inventory: Mapping[str, Any], hosts: Sequence[str], **_: Any) -> RunResult:
        with c.lock:
            c.local.append(list(hosts))
        return c.result(hosts)

    def remote(
        playbook: str, inventory: Mapping[str, Any], hosts: Sequence[str], *, target: ExecHost, **_: Any
    ) -> RunResult:
        with c.lock:
            c.remote.append((target.name, list(hosts)))
        return c.result(hosts, fail=[h for h in hosts if h == "gpu03"])

    monkeypatch.setattr(conv, "run_playbook", local)
    monkeypatch.setattr(conv, "run_playbook_remote", remote)
    return c


def _site(execution: dict[str, Any] | None) -> Any:
    raw = make_site()
    if execution is not None:
        raw["segments"][1]["execution"] = execution
    return parse_site(raw)


def test_segment_with_an_execution_host_runs_there_the_other_on_the_controller(calls: Calls) -> None:
    site = _site({"host": "mirror01"})
    plan = plan_site(site)
    result = converge(plan, list(plan.nodes))
    assert calls.local == [["gpu01"]]
    assert calls.remote == [("mirror01", ["gpu02"])]
    assert [n.status for n in result.nodes] == ["ok", "ok"]


def test_execution_local_overrides_the_stack(calls: Calls) -> None:
    site = _site({"host": "mirror01"})
    plan = plan_site(site)
    converge(plan, list(plan.nodes), execution=Execution.LOCAL)
    assert calls.remote == []
    assert sorted(h for run in calls.local for h in run) == ["gpu01", "gpu02"]


def test_default_stack_never_goes_remote(calls: Calls) -> None:
    site = _site(None)
    plan = plan_site(site)
    converge(plan, list(plan.nodes))
    assert calls.remote == []


def test_merge_keeps_each_hosts_outcome_and_the_worst_status() -> None:
    c = Calls()
    merged = conv.merge_results([c.result(["a"]), c.result(["gpu03", "b"], fail=["gpu03"])])
    assert set(merged.hosts) == {"a", "gpu03", "b"}
    assert merged.hosts["gpu03"].failed and not merged.hosts["a"].failed
    assert merged.status == "failed" and merged.rc == 2
    assert not merged.succeeded
