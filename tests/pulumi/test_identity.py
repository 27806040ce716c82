"""Stable identity and portable state: what `pulumi up` would replace, decided from URNs and inputs.

Under mocks there is no engine, so "would the engine replace it" is asked the way the engine asks
it: same URN (or an alias the step generator matches, `pulumi_mocks.match_olds`) and the same
inputs → no step at all; a changed `triggers` entry → replace (pulumi-command#855).
"""

from __future__ import annotations

import copy
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.bench import pulumi_mocks as mocks
from infra.components.program import COMMAND_DIR
from tests.pulumi.conftest import ROOT, STACKS, Run, raw_site, run_program

PINNED = Path(__file__).with_name("urns")
STEPS = ("bmc", "wait-ssh", "converge", "validate")


def _replicas_only(raw: dict[str, Any]) -> dict[str, Any]:
    """The lab site without its spanning service (tiny-span would hold lab-gpu02 to lab-gpu01's segment)."""
    out = copy.deepcopy(raw)
    out["services"] = [s for s in out["services"] if not s.get("span_nodes")]
    return out


def _moved(raw: dict[str, Any]) -> dict[str, Any]:
    """lab-gpu02 moved from segment `connected` to `airgap` (new address in that segment's CIDR)."""
    out = copy.deepcopy(raw)
    node = next(n for n in out["nodes"] if n["hostname"] == "lab-gpu02")
    assert node["segment"] == "connected"
    node["segment"], node["address"] = "airgap", "198.18.2.13"
    return out


def _inputs(run: Run) -> dict[str, dict[str, Any]]:
    return {r.urn: r.inputs for r in run.rec.resources}


def test_segment_move_reconverges_and_never_reinstalls() -> None:
    """Same URNs for the node and its steps, same BMC inputs (no reimage); converge trigger changes."""
    raw = _replicas_only(raw_site("lab"))
    before, after = run_program("lab", raw), run_program("lab", _moved(raw))
    assert {r.urn for r in before.rec.resources if r.name.startswith("lab-gpu02")} == {
        r.urn for r in after.rec.resources if r.name.startswith("lab-gpu02")}
    # Nothing else changes identity; the airgap segment gains a second batch (3 nodes, batch_size 2),
    # so a guard and that batch's converge step appear there.
    urns_before, urns_after = {r.urn for r in before.rec.resources}, {r.urn for r in after.rec.resources}
    assert urns_before <= urns_after
    assert sorted(u.rsplit("::", 1)[1] for u in urns_after - urns_before) == [
        "airgap-batch0-guard", "airgap-batch1-converge"]
    assert before.reg("lab-gpu02-bmc").inputs == after.reg("lab-gpu02-bmc").inputs
    assert before.reg("lab-gpu02-wait-ssh").inputs == after.reg("lab-gpu02-wait-ssh").inputs
    old_trig = before.reg("lab-gpu02-converge").inputs["triggers"][0]
    new_trig = after.reg("lab-gpu02-converge").inputs["triggers"][0]
    assert old_trig["content_hash"] != new_trig["content_hash"]  # re-converge (replace of converge only)
    # Its new segment's mirror now gates the node's BMC step (a dependency, not an input: no diff).
    assert after.reg("airgap-mirror-status").urn in after.reg("lab-gpu02-bmc").dependencies
    assert before.reg("airgap-mirror-status").urn not in before.reg("lab-gpu02-bmc").dependencies


def _legacy_urn(run: Run, hostname: str, segment: str, step: str | None) -> str:
    """The URN the program gave before nodes moved under the Site (node under its segment).

    Written by hand in the engine's URN format (`urn:pulumi:<stack>::<project>::<parent types>$<type>::<name>`,
    pulumi sdk/go/common/resource/urn.go), from the old layout Site → Segment → GpuNode → Command.
    """
    seg = run.reg(segment)
    chain = f"gpufleet:site:Site${seg.type}$gpufleet:node:GpuNode"
    if step is None:
        return f"urn:pulumi:lab::gpufleet::{chain}::{hostname}"
    return f"urn:pulumi:lab::gpufleet::{chain}$command:local:Command::{hostname}-{step}"


def _newer(name: str) -> bool:
    """Steps the segment layout did not have: rollout guards, decommission steps, segment batch converges."""
    return name.endswith(("-guard", "-decommission")) or re.search(r"-batch\d+-converge$", name) is not None


def test_stacks_from_the_segment_layout_keep_every_node_through_aliases() -> None:
    """Old state (nodes under segments): every node and step is found by alias, none created or deleted,
    including a node that moves segment in the same update."""
    raw = _replicas_only(raw_site("lab"))
    old_run = run_program("lab", raw)
    node_names = {f"{p.hostname}{s}" for p in old_run.plan.nodes for s in ("", *(f"-{x}" for x in STEPS))}
    # Site, segments, mirrors, services: as before. Guards, decommission and batch steps did not exist then.
    olds = {r.urn for r in old_run.rec.resources if r.name not in node_names and not _newer(r.name)}
    for p in old_run.plan.nodes:
        olds.add(_legacy_urn(old_run, p.hostname, p.segment.name, None))
        olds |= {_legacy_urn(old_run, p.hostname, p.segment.name, s) for s in STEPS}

    for variant in (raw, _moved(raw)):
        new = run_program("lab", variant)
        found = mocks.match_olds(olds, new.rec.resources)
        # Created: only what the old layout did not have (rollout guards, decommission and batch steps).
        assert sorted(u.rsplit("::", 1)[1] for u, o in found.items() if o is None) == sorted(
            [r.name for r in new.rec.resources if _newer(r.name)])
        assert {o for o in found.values() if o} == olds  # nothing left over to delete
        assert found[new.reg("lab-gpu02-bmc").urn] == _legacy_urn(old_run, "lab-gpu02", "connected", "bmc")


def test_match_olds_reports_a_create_for_an_unknown_urn() -> None:
    """The alias matcher can say "create": a node whose old URN is not in the state is not matched."""
    run = run_program("lab")
    olds = {r.urn for r in run.rec.resources if not r.name.startswith("lab-gpu01")}
    found = mocks.match_olds(olds, run.rec.resources)
    assert found[run.reg("lab-gpu01-bmc").urn] is None and found[run.reg("lab-gpu02-bmc").urn] is not None


def _copy_project(dst: Path) -> Path:
    for part in ("roles", "playbooks", "stacks"):
        if (ROOT / part).exists():
            shutil.copytree(ROOT / part, dst / part, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


@pytest.mark.parametrize("stack", STACKS)
def test_two_checkouts_give_identical_inputs(stack: str, tmp_path: Path) -> None:
    """The same stack from two project paths: identical URNs and inputs for every resource, no path in them."""
    here, there = run_program(stack), run_program(stack, project=_copy_project(tmp_path / "elsewhere"))
    assert _inputs(here) == _inputs(there)
    text = repr(_inputs(there))
    assert str(ROOT) not in text and str(tmp_path) not in text
    assert {r.inputs.get("dir") for r in there.commands()} == {COMMAND_DIR}
    assert all(r.inputs.get("addPreviousOutputInEnv") is False for r in there.commands())


def test_command_dir_is_the_project_seen_from_where_the_engine_starts_the_provider() -> None:
    """Providers run in the directory `main` names (pulumi getPwdMain); COMMAND_DIR must lead back to the project."""
    main = yaml.safe_load((ROOT / "Pulumi.yaml").read_text())["main"]
    assert (ROOT / main / COMMAND_DIR).resolve() == ROOT


def _urns(run: Run) -> list[str]:
    return sorted(r.urn for r in run.rec.resources)


@pytest.mark.parametrize("stack", STACKS)
def test_urns_of_the_example_stacks_are_pinned(stack: str) -> None:
    """Changing a URN replaces (reinstalls) machines: the list is committed, changing it is a reviewed act.

    Regenerate deliberately with `python -m tests.pulumi.test_identity --write`.
    """
    pinned = (PINNED / f"{stack}.txt").read_text().split()
    assert _urns(run_program(stack)) == pinned


def _write() -> None:
    PINNED.mkdir(exist_ok=True)
    for stack in STACKS:
        (PINNED / f"{stack}.txt").write_text("\n".join(_urns(run_program(stack))) + "\n")


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    _write()
