"""`lab up` boots a host that stays silent once more, and reports its console when that fails too."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from infra.lab import hosts, lab
from infra.lab.config import Paths, lab_spec
from infra.lab.sh import LabCommandError
from infra.model.load import stack_path


class FakeHosts:
    """poll_ssh answers from a script of silent hosts; start/stop are recorded."""

    def __init__(self, silent_rounds: list[list[str]]) -> None:
        self.silent_rounds = silent_rounds
        self.started: list[str] = []
        self.stopped: list[int] = []

    def poll_ssh(self, spec: Any, names: list[str], timeout: float) -> tuple[dict[str, float], list[str]]:
        silent = [n for n in self.silent_rounds.pop(0) if n in names]
        return {n: 1.0 for n in names if n not in silent}, silent

    def start(self, spec: Any, host: Any, paths: Paths) -> int:
        self.started.append(host.name)
        return 4242

    def stop_many(self, pids: list[int]) -> None:
        self.stopped.extend(pids)


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    spec = lab_spec("lab", stack_path("lab"))
    paths = Paths(state=tmp_path / "state")
    names = [h.name for h in spec.hosts]
    st: dict[str, Any] = {"hosts": {n: {"pid": 100 + i} for i, n in enumerate(names)}}
    (hosts.host_dir(paths, names[1])).mkdir(parents=True)
    (hosts.host_dir(paths, names[1]) / "console.log").write_text("Failed to add new veth interfaces: File exists\n")

    def use(fake: FakeHosts) -> FakeHosts:
        for attr in ("poll_ssh", "start", "stop_many"):
            monkeypatch.setattr(hosts, attr, getattr(fake, attr))
        monkeypatch.setattr(hosts, "alive", lambda pid: False)
        return fake

    return spec, paths, names, st, use


def test_all_hosts_answer_nothing_is_rebooted(setup: Any) -> None:
    spec, paths, names, st, use = setup
    fake = use(FakeHosts([[]]))
    lab._wait_booted(spec, paths, st, names)
    assert fake.started == []


def test_silent_host_is_booted_again_and_its_new_pid_recorded(setup: Any) -> None:
    spec, paths, names, st, use = setup
    fake = use(FakeHosts([[names[1]], []]))
    lab._wait_booted(spec, paths, st, names)
    assert fake.started == [names[1]]
    assert fake.stopped == [101]
    assert st["hosts"][names[1]]["pid"] == 4242
    assert st["hosts"][names[0]]["pid"] == 100


def test_host_silent_after_two_boots_fails_with_its_console(setup: Any) -> None:
    spec, paths, names, st, use = setup
    use(FakeHosts([[names[1]], [names[1]]]))
    with pytest.raises(LabCommandError) as exc:
        lab._wait_booted(spec, paths, st, names)
    assert names[1] in str(exc.value)
    assert "Failed to add new veth interfaces" in str(exc.value)


def test_up_publishes_inference_files_only_for_stacks_serving_the_tiny_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lab stack's llama.cpp services need the wheelhouse and model in the stores; other stacks do not."""
    calls: list[Path] = []
    monkeypatch.setattr(lab, "publish_llamacpp_files", lambda d: calls.append(d) or [])
    monkeypatch.setattr(lab, "wheel_cached", lambda: True)
    spec = lab_spec("lab", stack_path("lab"))
    paths = Paths(state=tmp_path / "state", cache=tmp_path / "cache")
    assert lab._publish_inference_files(spec, paths) is True
    assert calls == [paths.files_dir]
    kept = [s for s in spec.site.services if s.engine.value != "llamacpp"]
    no_llama = spec.site.model_copy(update={"services": kept})
    assert lab._publish_inference_files(dataclasses.replace(spec, site=no_llama), paths) is False
    assert len(calls) == 1
