"""The BMC notifier's decisions: which emulator notifications stop, start or reimage a lab node."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from infra.lab import notifier
from infra.lab.config import lab_spec
from infra.model.load import stack_path


class Recorder:
    """Stands in for the host power operations; records what the notifier asked for."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, bool]] = []
        self.running = {"lab-gpu04": True}

    def off(self, spec: Any, paths: Any, name: str) -> bool:
        was = self.running.get(name, False)
        self.running[name] = False
        self.calls.append(("off", name, False))
        return was

    def on(self, spec: Any, paths: Any, name: str, *, reimage: bool = False) -> bool:
        if self.running.get(name):
            return False
        self.running[name] = True
        self.calls.append(("on", name, reimage))
        return True


@pytest.fixture
def ctl(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[notifier.PowerController, Recorder]:
    """A controller for the lab stack with host power recorded, not performed."""
    rec = Recorder()
    monkeypatch.setattr(notifier.lab, "power_off", rec.off)
    monkeypatch.setattr(notifier.lab, "power_on", rec.on)
    monkeypatch.setattr(notifier.PowerController, "_clear_pxe", lambda self, node: None)
    return notifier.PowerController(lab_spec("lab", stack_path("lab")), notifier.Paths(state=tmp_path)), rec


def wait_for(cond: Any, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.01)


def test_pending_off_acts_at_apply_time(ctl: tuple[notifier.PowerController, Recorder]) -> None:
    """A pending ForceOff stops the node only once its apply time has come."""
    c, rec = ctl
    c.handle({"name": "lab-gpu04", "power_state": "On",
              "pending_power": {"power_state": "Off", "apply_time": time.time() + 0.3}})
    assert rec.calls == []
    wait_for(lambda: rec.calls)
    assert rec.calls == [("off", "lab-gpu04", False)]


def test_restart_with_pxe_override_reimages(ctl: tuple[notifier.PowerController, Recorder]) -> None:
    """A restart while the boot target is Pxe stops the node at once and brings it back reimaged."""
    c, rec = ctl
    c.handle({"name": "lab-gpu04", "power_state": "Off", "boot_device": "Pxe",
              "pending_power": {"power_state": "ForceRestart", "apply_time": time.time()}})
    wait_for(lambda: len(rec.calls) == 2)
    assert rec.calls == [("off", "lab-gpu04", False), ("on", "lab-gpu04", True)]


def test_plain_restart_keeps_the_disk(ctl: tuple[notifier.PowerController, Recorder]) -> None:
    """Without a PXE override a restart is a reboot, not a reimage."""
    c, rec = ctl
    c.handle({"name": "lab-gpu04", "power_state": "Off", "boot_device": "Hdd",
              "pending_power": {"power_state": "GracefulRestart", "apply_time": time.time()}})
    wait_for(lambda: len(rec.calls) == 2)
    assert rec.calls[-1] == ("on", "lab-gpu04", False)


def test_final_state_notification_on_a_running_node_changes_nothing(
        ctl: tuple[notifier.PowerController, Recorder]) -> None:
    """An `On` notification (e.g. after the override was cleared) for a running node is a no-op, even with Pxe."""
    c, rec = ctl
    c.handle({"name": "lab-gpu04", "power_state": "On", "boot_device": "Pxe", "pending_power": None})
    assert rec.calls == []


def test_superseded_pending_change_is_dropped(ctl: tuple[notifier.PowerController, Recorder]) -> None:
    """A later notification for the same node cancels an earlier pending change that has not applied yet."""
    c, rec = ctl
    c.handle({"name": "lab-gpu04", "power_state": "On",
              "pending_power": {"power_state": "Off", "apply_time": time.time() + 0.2}})
    c.handle({"name": "lab-gpu04", "power_state": "On", "pending_power": None})
    time.sleep(0.5)
    assert rec.calls == []


def test_unknown_system_is_ignored(ctl: tuple[notifier.PowerController, Recorder]) -> None:
    """Notifications about systems that are not lab nodes touch nothing."""
    c, rec = ctl
    c.handle({"name": "not-a-node", "power_state": "Off", "pending_power": None})
    assert rec.calls == []
