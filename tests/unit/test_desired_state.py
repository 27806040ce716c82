"""DesiredState: the converge trigger the program writes is the one the review reads back (issue 17)."""

from __future__ import annotations

import pytest

from infra.model.load import load_site
from infra.plan.desired import DesiredState, Serving
from infra.plan.node import plan_site


@pytest.mark.parametrize("stack", ["lab", "example-prod", "example-airgap"])
def test_every_node_round_trips_through_its_trigger(stack: str) -> None:
    for plan in plan_site(load_site(stack=stack)).nodes:
        state = DesiredState.of(plan, "h" * 64)
        trigger = state.as_trigger()
        assert DesiredState.from_trigger(trigger) == state
        assert list(trigger)[-1] == "content_hash" and trigger["roles"] == ",".join(plan.roles)
        assert DesiredState.from_trigger(trigger).services == [s.name for s in plan.services]


def test_a_trigger_without_a_hash_has_none() -> None:
    assert "content_hash" not in DesiredState.of(plan_site(load_site(stack="lab")).nodes[0]).as_trigger()


def test_service_text_is_parsed_by_its_parts() -> None:
    """`name=engine:model@revision`; a model revision is split at the last `@`, missing parts stay empty."""
    assert Serving.from_text("chat=vllm:org/m@v1@abc") == Serving("chat", "vllm", "org/m@v1", "abc")
    assert Serving.from_text("chat") == Serving("chat")
    assert Serving("chat", "tgi", "m", "r").as_text() == "chat=tgi:m@r"


def test_a_foreign_trigger_reads_as_empty_fields() -> None:
    """A trigger of another version (or a preview's unknowns) never raises: missing keys are empty."""
    state = DesiredState.from_trigger({"driver": "[unknown]", "extra": 1})
    assert state.driver == "[unknown]" and state.roles == () and state.fabric_manager is None and not state.inference
