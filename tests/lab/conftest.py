"""The `lab` fixture: the lab stack brought up once per session (or a developer's running lab reused).

Lab tests use it like this:

    def test_x(lab):
        r = lab.ssh("lab-gpu03", "nvidia-smi -L")
        assert r.returncode == 0
        mirror = lab.host("lab-mirror").address

If the lab was already up when the session started, it is reused and left up; otherwise the
fixture brings it up and takes it down at the end, even when tests fail. Skipped (with the reason)
when not root or when the host cannot provide systemd-nspawn/debootstrap.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from infra.lab import lab as lab_mod
from infra.lab import state as lab_state
from infra.lab.config import Paths, lab_spec
from infra.lab.session import Lab
from infra.model.load import stack_path

STACK = "lab"


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    """The lab of stacks/Pulumi.lab.yaml, up for the whole session."""
    try:
        lab_mod.check_prerequisites(install=True)
    except lab_mod.LabUnavailable as exc:
        pytest.skip(f"lab unavailable: {exc}")
    paths = Paths.from_env()
    path = stack_path(STACK)
    spec = lab_spec(STACK, path)
    handle = Lab(spec, paths, path, started_here=lab_state.load(paths) is None)
    if not handle.started_here:
        lab_mod.up(spec, paths, path)  # a running lab: re-check it (BMC-off nodes stay off), leave it up
        yield handle
        return
    try:
        lab_mod.up(spec, paths, path)
        yield handle
    finally:
        lab_mod.down(paths)


# Tests that take the whole lab down and up again, or run a second lab beside it, go last: whatever
# they leave behind can then not break the tests of other files that share the session's lab. The
# quick benchmark goes just before them, when the nodes are converged (its no-op figure means no-op).
_LAST = ("test_down_leaves_nothing_behind", "test_second_lab_comes_up_and_goes_down_without_touching_the_first")
_LATE = ("test_lab_figures_are_measured_not_skipped",)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the quick benchmark, then the lab-lifecycle tests, after every other lab test."""
    items.sort(key=lambda item: 2 if item.name in _LAST else 1 if item.name in _LATE else 0)
