"""`<segment>-provisioning`: each segment's provisioning service as a Pulumi step, under the mocks."""

from __future__ import annotations

from typing import Any

from tests.pulumi.conftest import Run, raw_site, run_program


def _trigger(run: Run, segment: str) -> Any:
    return run.reg(f"{segment}-provisioning").inputs["triggers"][0]


def test_one_step_per_segment_with_provisioning_under_its_segment(stack_run: Run) -> None:
    site = stack_run.plan.site
    steps = {r.name for r in stack_run.commands() if r.name.endswith("-provisioning")}
    assert steps == {f"{s.name}-provisioning" for s in site.segments if s.provisioning is not None}
    for seg in site.segments:
        if seg.provisioning is None:
            continue
        step = stack_run.reg(f"{seg.name}-provisioning")
        assert step.parent == stack_run.reg(seg.name).urn
        stack = stack_run.rec.resources[0].urn.split(":")[2]
        assert step.inputs["create"] == (
            f".venv/bin/gpufleet provision converge --stack {stack} --segment {seg.name} --json")
        assert step.inputs["dir"] == ".."
        assert _trigger(stack_run, seg.name)["host"] == seg.provisioning.host
        if seg.airgapped:
            # The mirror serves the service its packages and images: after the bundle import and status.
            status = stack_run.reg(f"{seg.name}-mirror-status")
            assert status.urn in step.dependencies
            assert f"{status.name}-id" in step.inputs["triggers"]


def test_an_image_nodes_reimage_waits_for_its_segments_service() -> None:
    raw = raw_site("lab")
    node = next(n for n in raw["nodes"] if n["hostname"] == "lab-gpu01")
    node["image"] = "debian-12-node"
    run = run_program("lab", raw)
    assert run.reg("connected-provisioning").urn in run.reg("lab-gpu01-bmc").dependencies
    # A node without an image is not installed by the service: its BMC step does not wait for it.
    others = [n["hostname"] for n in raw["nodes"] if n["hostname"] != "lab-gpu01"]
    for h in others:
        assert not any(d.endswith("-provisioning") for d in run.reg(f"{h}-bmc").dependencies)


def test_the_trigger_changes_with_what_the_segment_serves_only(lab_run: Run) -> None:
    same = run_program("lab")
    for seg in ("connected", "airgap"):
        assert _trigger(same, seg) == _trigger(lab_run, seg)
    # A new MAC on a connected node: a new reservation and script there; the air-gapped service is untouched.
    raw = raw_site("lab")
    node = next(n for n in raw["nodes"] if n["segment"] == "connected")
    node["macs"] = ["02:00:5e:10:99:99", *node["macs"][1:]]
    changed = run_program("lab", raw)
    assert _trigger(changed, "connected")["served"] != _trigger(lab_run, "connected")["served"]
    assert _trigger(changed, "airgap") == _trigger(lab_run, "airgap")
    # A new pinned package version re-runs only that segment's service.
    raw = raw_site("lab")
    seg = next(s for s in raw["segments"] if s["name"] == "airgap")
    seg["provisioning"]["dnsmasq_version"] = "2.90-4~deb12u9"
    changed = run_program("lab", raw)
    assert _trigger(changed, "airgap")["served"] != _trigger(lab_run, "airgap")["served"]
    assert _trigger(changed, "connected") == _trigger(lab_run, "connected")
