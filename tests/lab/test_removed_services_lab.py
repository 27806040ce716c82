"""A service no longer in the stack is shown by `check` and stopped and cleaned by `converge` (issue 18).

On lab-gpu01 (serves `tiny-connected`): a unit with the role's prefix that the stack does not name is
planted and started, with a venv directory of its name. `gpufleet check` reports the removal as a change
and leaves it running; `gpufleet converge` stops it and removes unit and venv, the stack's own service
keeps answering, and a second converge changes nothing.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest

from infra.lab.session import Lab
from tests.lab.test_inference_lab import converge, stable_lab, stores  # noqa: F401  (fixtures)
from tests.lab.test_roles_lab import gpufleet

pytestmark = pytest.mark.lab

NODE = "lab-gpu01"
GONE = "gpufleet-inference-gone"
PLANT = (
    f"printf '[Service]\\nExecStart=/bin/sleep infinity\\n[Install]\\nWantedBy=multi-user.target\\n' "
    f"> /etc/systemd/system/{GONE}.service && mkdir -p /opt/gpufleet/inference/gone/venv "
    f"&& systemctl daemon-reload && systemctl enable --now {GONE}.service"
)


def _node(rep: dict[str, Any]) -> dict[str, Any]:
    return next(n for n in rep["nodes"] if n["hostname"] == NODE)


def test_removed_service_is_stopped_and_cleaned(stable_lab: Lab, stores: None) -> None:  # noqa: F811
    """check shows the removal, converge does it, the served service stays, the next converge is a no-op."""
    converge(NODE)
    r = stable_lab.ssh(NODE, PLANT)
    assert r.returncode == 0, r.stderr
    runs = Path(tempfile.mkdtemp(prefix="gpufleet-removed-", dir="/var/tmp"))
    try:
        code, rep = gpufleet("check", "--stack", "lab", "--node", NODE, runs=runs)
        tasks = " ".join(str(t) for t in _node(rep).get("changed_tasks", []))
        assert code == 3 and "removed from the stack" in tasks, rep
        assert stable_lab.ssh(NODE, f"systemctl is-active {GONE}").stdout.strip() == "active"  # check changed nothing
        code, rep = gpufleet("converge", "--stack", "lab", "--node", NODE, runs=runs)
        assert code == 0, rep
        state = stable_lab.ssh(NODE, f"systemctl is-active {GONE}; test -e /etc/systemd/system/{GONE}.service "
                                     "&& echo unit || echo nounit; test -e /opt/gpufleet/inference/gone && echo venv "
                                     "|| echo novenv; systemctl is-active gpufleet-inference-tiny-connected").stdout
        assert state.split() == ["inactive", "nounit", "novenv", "active"], state
        code, rep = gpufleet("converge", "--stack", "lab", "--node", NODE, runs=runs)
        assert code == 0 and _node(rep)["changed"] == 0, _node(rep).get("changed_tasks")
    finally:
        stable_lab.ssh(NODE, f"systemctl disable --now {GONE} 2>/dev/null; rm -f /etc/systemd/system/{GONE}.service; "
                             "rm -rf /opt/gpufleet/inference/gone; systemctl daemon-reload")
        shutil.rmtree(runs, ignore_errors=True)
