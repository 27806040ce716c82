"""The Pulumi program under mocks: resource graph, commands, triggers, secrets, URN stability."""

from __future__ import annotations

import copy
import itertools
import json
import runpy
from pathlib import Path
from typing import Any

import pulumi
import pytest

from infra.bench import pulumi_mocks as mocks
from infra.components import commands
from infra.components.desired import HOST_VARS, Fingerprints, converge_trigger
from infra.model.load import parse_site
from infra.plan.desired import DesiredState
from infra.plan.node import plan_site
from tests.pulumi.conftest import CANARY, ROOT, SECRET_CONFIG, Run, raw_site, run_program

CMD = "command:local:Command"


def _by_type(run: Run) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in run.rec.resources:
        out[r.type] = out.get(r.type, 0) + 1
    return out


def test_resource_counts_follow_the_site(stack_run: Run) -> None:
    """One Site, a component per segment/node/service, 5 steps per node, 2 per mirror, 1 per service, guards."""
    site = stack_run.plan.site
    airgapped = [s for s in site.segments if s.airgapped]
    assert _by_type(stack_run) == {
        "gpufleet:site:Site": 1,
        **({"gpufleet:segment:Segment": len(site.segments) - len(airgapped)}
           if len(site.segments) > len(airgapped) else {}),
        **({"gpufleet:segment:AirGappedSegment": len(airgapped)} if airgapped else {}),
        "gpufleet:node:GpuNode": len(site.nodes),
        **({"gpufleet:inference:InferenceService": len(site.services)} if site.services else {}),
        # 5 steps per node (bmc, wait-ssh, converge, validate, decommission), 2 per mirror, 1 per service,
        # one converge step per batch of a segment and one rollout guard between consecutive batches,
        # one provisioning step per segment with a provisioning service.
        CMD: 5 * len(site.nodes) + 2 * len(airgapped) + len(site.services)
        + sum(s.provisioning is not None for s in site.segments)
        + sum(len(stack_run.plan.batches(s.name)) for s in site.segments)
        + sum(max(0, len(stack_run.plan.batches(s.name)) - 1) for s in site.segments),
    }


def test_children_are_parented_and_named_from_their_component(stack_run: Run) -> None:
    """Steps are `<node>-<step>` under their GpuNode; nodes and segments sit directly under Site."""
    site_urn = stack_run.reg(stack_run.plan.site.name).urn
    for p in stack_run.plan.nodes:
        node = stack_run.reg(p.hostname)
        assert node.parent == site_urn  # not the segment: a segment move must keep the URN
        assert stack_run.reg(p.segment.name).parent == site_urn
        for step in ("bmc", "wait-ssh", "converge", "validate"):
            assert stack_run.reg(f"{p.hostname}-{step}").parent == node.urn
        # The batch step that converges it sits under its segment, like the guards.
        batch = stack_run.reg(f"{p.segment.name}-batch{p.batch}-converge")
        assert batch.parent == stack_run.reg(p.segment.name).urn
    for svc in stack_run.plan.site.services:
        assert stack_run.reg(svc.name).parent == site_urn
        assert stack_run.reg(f"{svc.name}-health").parent == stack_run.reg(svc.name).urn


def test_node_steps_run_in_lifecycle_order(stack_run: Run) -> None:
    """bmc → wait-ssh → converge → the batch's converge → validate, each depending on the one before."""
    for p in stack_run.plan.nodes:
        h = p.hostname
        batch = stack_run.reg(f"{p.segment.name}-batch{p.batch}-converge")
        assert stack_run.reg(f"{h}-bmc").urn in stack_run.reg(f"{h}-wait-ssh").dependencies
        assert stack_run.reg(f"{h}-wait-ssh").urn in stack_run.reg(f"{h}-converge").dependencies
        assert stack_run.reg(f"{h}-converge").urn in batch.dependencies
        assert {stack_run.reg(f"{h}-converge").urn, batch.urn} <= set(stack_run.reg(f"{h}-validate").dependencies)


def test_one_converge_step_per_segment_batch_over_its_nodes(stack_run: Run) -> None:
    """Each batch step runs one `gpufleet converge` over exactly its batch's nodes, triggered by their steps."""
    stack = _stack_of(stack_run)
    for seg in stack_run.plan.site.segments:
        for batch in stack_run.plan.batches(seg.name):
            step = stack_run.reg(f"{seg.name}-batch{batch[0].batch}-converge")
            hosts = [p.hostname for p in batch]
            assert step.inputs["create"] == commands.batch_converge(stack, hosts)
            words = step.inputs["create"].split()
            assert words[1] == "converge" and {"--record", "--batch-slot", "--json"} <= set(words)
            assert [words[i + 1] for i, w in enumerate(words) if w == "--node"] == hosts
            assert step.inputs["triggers"] == [f"{h}-converge-id" for h in hosts]
            assert step.inputs["dir"] == ".."


def test_dependencies_stay_inside_a_segment(stack_run: Run) -> None:
    """No step depends on a step of another segment's nodes: the graph is as deep as one segment, not the site."""
    seg_of: dict[str, str] = {}
    for p in stack_run.plan.nodes:
        for step in ("bmc", "wait-ssh", "converge", "validate"):
            seg_of[stack_run.reg(f"{p.hostname}-{step}").urn] = p.segment.name
    for seg in stack_run.plan.site.segments:
        for batch in stack_run.plan.batches(seg.name):
            seg_of[stack_run.reg(f"{seg.name}-batch{batch[0].batch}-converge").urn] = seg.name
    for urn, seg in seg_of.items():
        deps = stack_run.rec.monitor.by_urn[urn].dependencies
        assert {seg_of[d] for d in deps if d in seg_of} <= {seg}


def test_airgapped_nodes_wait_for_their_mirror(stack_run: Run) -> None:
    """Import then status of the segment's mirror happen before any of its nodes is touched."""
    for seg in stack_run.plan.site.segments:
        nodes = [p for p in stack_run.plan.nodes if p.segment.name == seg.name]
        if not seg.airgapped:
            for p in nodes:
                assert not any("mirror" in d for d in stack_run.reg(f"{p.hostname}-bmc").dependencies)
            continue
        imp, status = stack_run.reg(f"{seg.name}-mirror-import"), stack_run.reg(f"{seg.name}-mirror-status")
        assert imp.urn in status.dependencies
        stack = _stack_of(stack_run)
        assert imp.inputs["create"] == commands.mirror_import(stack, seg.mirror or "", f"bundles/{stack}")
        for p in nodes:
            assert status.urn in stack_run.reg(f"{p.hostname}-bmc").dependencies


def _stack_of(run: Run) -> str:
    return run.rec.resources[0].urn.split("::")[0].removeprefix("urn:pulumi:")


def test_later_rolling_batches_converge_after_earlier_ones(prod_run: Run) -> None:
    """With batch_size 1, each batch of a segment converges only after the previous one validated."""
    for seg in prod_run.plan.site.segments:
        batch_list = prod_run.plan.batches(seg.name)
        assert len(batch_list) > 1  # the example has several nodes per segment
        for earlier, later in itertools.pairwise(batch_list):
            deps = prod_run.reg(f"{seg.name}-batch{later[0].batch}-converge").dependencies
            guards = [prod_run.rec.monitor.by_urn[d] for d in deps if d.endswith("-guard")]
            assert len(guards) == 1  # through the guard of the earlier batch (tests/pulumi/test_rollout.py)
            for e in earlier:
                assert prod_run.reg(f"{e.hostname}-validate").urn in guards[0].dependencies
    # ... and never on another segment's nodes; the first batch waits for no guard at all.
    first = prod_run.reg("edge-batch0-converge").dependencies
    assert not [d for d in first if "validate" in d or "guard" in d]


def test_services_wait_for_their_nodes_to_validate(stack_run: Run) -> None:
    """A service's health check depends on the validate step of every node serving it."""
    for svc in stack_run.plan.site.services:
        health = stack_run.reg(f"{svc.name}-health")
        assert {stack_run.reg(f"{h}-validate").urn for h in svc.nodes} <= set(health.dependencies)
        assert health.inputs["create"] == commands.service_health(_stack_of(stack_run), svc.name)
        assert "--smoke" in health.inputs["create"]


def test_commands_are_the_shared_cli_strings(stack_run: Run) -> None:
    """Each step's create/update is exactly what infra.components.commands builds, run from the project dir."""
    stack = _stack_of(stack_run)
    for p in stack_run.plan.nodes:
        want = commands.node_commands(stack, p.hostname, reimage_on_create=True,
                                      ssh_timeout_s=max(600, stack_run.plan.site.reboot.timeout_s))
        bmc = stack_run.reg(f"{p.hostname}-bmc").inputs
        assert (bmc["create"], bmc["update"]) == (want.provision, want.power_on)
        assert "bmc reimage" in bmc["create"] and "reimage" not in bmc["update"]
        # The reimage bound: a lease first, then power-on and reimage; the update (power-on) takes none.
        assert bmc["create"].startswith(f"{commands.CLI} provision-slot --stack {stack} --node {p.hostname} ")
        for step, attr in (("wait-ssh", "wait_ssh"), ("validate", "validate")):
            inputs = stack_run.reg(f"{p.hostname}-{step}").inputs
            assert inputs["create"] == getattr(want, attr)
            assert inputs["dir"] == ".."  # relative: see infra.components.program.COMMAND_DIR
        # The node's converge step runs nothing: its batch step converges it.
        assert "create" not in stack_run.reg(f"{p.hostname}-converge").inputs


def test_adopting_installed_nodes_never_reimages() -> None:
    """With reimageOnCreate=false, creating the BMC step only powers the node on."""
    run = run_program("lab", reimage_on_create=False)
    for p in run.plan.nodes:
        bmc = run.reg(f"{p.hostname}-bmc").inputs
        assert bmc["create"].endswith(" && " + bmc["update"])
        assert "bmc reimage" not in bmc["create"] and "reimage" not in bmc["update"]


def test_converge_triggers_are_readable_summary_plus_hash(stack_run: Run) -> None:
    """triggers[0] is the plan summary (versions, roles, inference) plus content_hash; [1] the SSH step id."""
    for p in stack_run.plan.nodes:
        trig = stack_run.reg(f"{p.hostname}-converge").inputs["triggers"]
        assert {k: v for k, v in trig[0].items() if k != "content_hash"} == DesiredState.of(p).summary()
        assert DesiredState.from_trigger(trig[0]) == DesiredState.of(p, trig[0]["content_hash"])
        assert len(trig[0]["content_hash"]) == 64
        assert trig[1] == f"{p.hostname}-wait-ssh-id"
        assert stack_run.reg(f"{p.hostname}-validate").inputs["triggers"] == [f"{p.hostname}-converge-id"]
        assert stack_run.reg(f"{p.hostname}-bmc").inputs["triggers"] == [
            {"os": p.node.os.value, "pxe_mac": p.node.macs[0]}]


def test_hash_changes_with_driver_role_files_and_lock(tmp_path: Path) -> None:
    """Driver bump changes summary and hash; a role edit or a new lock changes only the hash."""
    raw = raw_site("lab")
    site = parse_site(raw)
    plan = plan_site(site).nodes[0]
    (tmp_path / "roles" / "base" / "tasks").mkdir(parents=True)
    role_file = tmp_path / "roles" / "base" / "tasks" / "main.yml"
    role_file.write_text("- name: One\n")
    host_vars = HOST_VARS
    base = converge_trigger(plan, site, Fingerprints.of(tmp_path, "lab"), host_vars)

    bumped_raw = copy.deepcopy(raw)
    bumped_raw["profiles"]["lab-570"]["driver"]["version"] = "570.172.08"
    bumped_raw["profiles"]["lab-570"]["fabric_manager"]["version"] = "570.172.08"
    bumped_site = parse_site(bumped_raw)
    bumped = converge_trigger(plan_site(bumped_site).nodes[0], bumped_site,
                              Fingerprints.of(tmp_path, "lab"), host_vars)
    assert bumped["driver"].startswith("570.172.08") and base["driver"].startswith("570.133.20")
    assert bumped["content_hash"] != base["content_hash"]

    role_file.write_text("- name: Two\n")
    from infra.plan.node import tree_hash
    tree_hash.cache_clear()  # the program hashes once per run; a new run sees the edit
    edited = converge_trigger(plan, site, Fingerprints.of(tmp_path, "lab"), host_vars)
    assert edited["content_hash"] != base["content_hash"]
    assert {k: v for k, v in edited.items() if k != "content_hash"} == {
        k: v for k, v in base.items() if k != "content_hash"}

    (tmp_path / "stacks").mkdir()
    (tmp_path / "stacks" / "Pulumi.lab.lock.json").write_text('{"packages": []}')
    locked = converge_trigger(plan, site, Fingerprints.of(tmp_path, "lab"), host_vars)
    assert locked["content_hash"] != edited["content_hash"]


def test_mirror_import_reruns_when_the_lock_changes(tmp_path: Path) -> None:
    """The mirror-import trigger carries the lock file's hash ("none" without a lock)."""
    (tmp_path / "stacks").mkdir()
    before = run_program("lab", project=tmp_path).reg("airgap-mirror-import").inputs["triggers"][0]
    (tmp_path / "stacks" / "Pulumi.lab.lock.json").write_text('{"v": 1}')
    after = run_program("lab", project=tmp_path).reg("airgap-mirror-import").inputs["triggers"][0]
    assert before == {"mirror": "lab-mirror", "lock": "none"}
    assert after["mirror"] == "lab-mirror" and len(after["lock"]) == 64


def test_bmc_secret_travels_only_as_secret_environment(stack_run: Run) -> None:
    """config SecretRefs become a secret GPUFLEET_SECRET_* env var; never in strings; logging off."""
    for p in stack_run.plan.nodes:
        bmc = stack_run.reg(f"{p.hostname}-bmc")
        assert bmc.inputs["logging"] == "none"
        assert sorted(bmc.additional_secret_outputs) == ["stderr", "stdout"]
        ref = p.node.bmc.password if p.node.bmc else None
        if ref is not None and ref.config:
            env = commands.secret_env_name(ref.config)
            assert bmc.inputs["environment"] == {env: CANARY}
            assert any(path.startswith("environment") for path in bmc.secret_inputs)
        else:
            assert "environment" not in bmc.inputs  # env/file refs are read by the CLI itself


def _plaintext(value: Any) -> str:
    """JSON of a value with every secret-wrapped part blanked out."""
    if isinstance(value, dict):
        if value.get(mocks.SECRET_SIG) == mocks.SECRET_VALUE_SIG:
            return "<secret>"
        return "{" + ",".join(f"{k}:{_plaintext(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_plaintext(v) for v in value) + "]"
    return json.dumps(value, default=str)


def test_canary_secret_appears_nowhere_in_plaintext(stack_run: Run) -> None:
    """No input, component output or stack output carries the canary except inside a secret."""
    for r in stack_run.rec.resources:
        assert CANARY not in _plaintext(r.raw_inputs), r.name
        assert CANARY not in _plaintext(r.outputs), r.name
    outputs = dict(stack_run.rec.value)
    outputs.pop("bmc_stdout_secret")
    assert CANARY not in json.dumps(outputs, default=str)


def test_bmc_output_is_secret_even_if_the_cli_echoes_it() -> None:
    """A BMC step whose stdout echoes the password still yields only a secret Output."""
    def leaky(typ: str, name: str, inputs: dict[str, Any]) -> str:
        return f"password={CANARY}" if name.endswith("-bmc") else mocks.default_stdout(typ, name, inputs)

    run = run_program("example-prod", stdout_for=leaky)
    assert run.rec.value["bmc_stdout_secret"] and all(run.rec.value["bmc_stdout_secret"].values())


def test_outputs_carry_facts_endpoints_and_mirror_status(stack_run: Run) -> None:
    """Stack outputs: validate-node JSON per node, endpoint per serving node, mirror status per air gap."""
    value = stack_run.rec.value
    assert set(value["nodes"]) == {p.hostname for p in stack_run.plan.nodes}
    for host, facts in value["nodes"].items():
        assert facts["node"] == host and facts["passed"] is True
    site = stack_run.plan.site
    # A service that spans nodes has one endpoint, its head's (the first of its nodes).
    assert value["endpoints"] == {
        s.name: [f"http://{stack_run.plan.node(h).node.address}:{s.port}/v1"
                 for h in (s.nodes[:1] if s.span_nodes else s.nodes)]
        for s in site.services}
    assert set(value["mirrors"]) == {s.name for s in site.segments if s.airgapped}


def test_converge_output_names_each_node_status_from_its_batch() -> None:
    """Stack output `converge`: each node's entry of its batch's `gpufleet converge --json` (a failed one too)."""
    def one_failed(typ: str, name: str, inputs: dict[str, Any]) -> str:
        out = mocks.default_stdout(typ, name, inputs)
        if name.endswith("-converge") and "lab-gpu02" in str(inputs.get("create", "")):
            data = json.loads(out)
            for n in data["nodes"]:
                if n["hostname"] == "lab-gpu02":
                    n.update(status="failed", failures=[{"task": "driver : install", "msg": "E: broken"}])
            out = json.dumps(data)
        return out

    run = run_program("lab", stdout_for=one_failed)
    status = run.rec.value["converge"]
    assert set(status) == {p.hostname for p in run.plan.nodes}
    assert status["lab-gpu02"] == {"status": "failed", "changed": 0, "failures": ["driver : install: E: broken"]}
    assert {h: s["status"] for h, s in status.items() if h != "lab-gpu02"} == {
        p.hostname: "ok" for p in run.plan.nodes if p.hostname != "lab-gpu02"}


def test_a_change_to_one_node_changes_only_that_nodes_converge_trigger() -> None:
    """Two more GPUs on one node: its own converge trigger says so in plain words; every other input stays.

    So the preview replaces that node's converge step (and, through its new id, its batch's step and its own
    validate) and nothing of any other node: no other node is re-validated, and no BMC step changes.
    """
    raw = raw_site("lab")
    before = {r.name: r.raw_inputs for r in run_program("lab", raw).rec.resources}
    changed = copy.deepcopy(raw)
    target = changed["nodes"][0]["hostname"]
    old_count = changed["nodes"][0]["gpu"]["count"]
    changed["nodes"][0]["gpu"]["count"] = old_count + 2
    after = {r.name: r.raw_inputs for r in run_program("lab", changed).rec.resources}
    differs = sorted(n for n in before if before[n] != after[n])
    # (its decommission step carries the node's stack entry: an update that re-runs its dry run, nothing else)
    assert differs == [f"{target}-converge", f"{target}-decommission"]
    old, new = before[differs[0]]["triggers"][0], after[differs[0]]["triggers"][0]
    model = changed["nodes"][0]["gpu"]["model"]
    assert (old["gpus"], new["gpus"]) == (f"{old_count}x {model}", f"{old_count + 2}x {model}")


def test_non_json_validate_output_becomes_an_error_fact() -> None:
    """A validate-node that prints no JSON gives an `error` fact instead of failing the program."""
    run = run_program("lab", stdout_for=lambda t, n, i: "Traceback: boom")
    assert run.rec.value["nodes"]["lab-gpu01"]["error"] == "validate-node did not print JSON"


def test_adding_a_node_keeps_every_other_urn() -> None:
    """A new node adds exactly its own component and five steps (and the guard before its batch); no URN changes."""
    raw = raw_site("lab")
    before = {r.urn for r in run_program("lab", raw).rec.resources}
    grown = copy.deepcopy(raw)
    grown["nodes"].insert(1, {**copy.deepcopy(raw["nodes"][0]), "hostname": "lab-gpu05",
                              "address": "198.18.1.15", "macs": ["02:47:46:01:00:15"], "fabric_ports": []})
    grown["nodes"][1]["bmc"]["system_id"] = "lab-gpu05"
    after = {r.urn for r in run_program("lab", grown).rec.resources}
    assert before <= after
    assert sorted(u.rsplit("::", 1)[1] for u in after - before) == sorted(
        ["lab-gpu05", "lab-gpu05-bmc", "lab-gpu05-wait-ssh", "lab-gpu05-converge", "lab-gpu05-validate",
         "lab-gpu05-decommission", "connected-batch0-guard",
         "connected-batch1-converge"])  # 3 nodes in batches of 2: a second batch


def _main() -> None:
    # As the language host does (`main: infra/`): run the directory, which puts infra/ on sys.path.
    runpy.run_path(str(ROOT / "infra"), run_name="__main__")


def test_invalid_site_stops_the_program_with_config_paths() -> None:
    """`__main__` turns a bad gpufleet:site into a RunError naming the config path, registering nothing."""
    raw = raw_site("lab")
    raw["nodes"][0]["segment"] = "nowhere"
    config = {"gpufleet:site": json.dumps(raw), **SECRET_CONFIG}
    with pytest.raises(pulumi.RunError, match=r"nodes\[0\]\.segment"):
        mocks.run(_main, stack="lab", config=config,
                  secret_keys=list(SECRET_CONFIG))


def test_main_entry_point_builds_the_stack_from_config() -> None:
    """`infra/__main__.py` reads gpufleet:site from Pulumi config and registers the same graph."""
    config = {"gpufleet:site": json.dumps(raw_site("example-airgap")), **SECRET_CONFIG}
    rec = mocks.run(_main, stack="example-airgap",
                    config=config, secret_keys=list(SECRET_CONFIG))
    names = {r.name for r in rec.resources}
    assert {"example-airgap", "isolated", "isolated-mirror-import", "h200-01-converge", "qwen-72b-health"} <= names
    assert rec.named("h200-02-bmc").inputs["environment"] == {"GPUFLEET_SECRET_BMCPASSWORD": CANARY}


def test_preview_mode_registers_the_same_graph() -> None:
    """Under `pulumi preview` (dry run, unknown command outputs) the program registers the same resources."""
    from infra.components.program import ProgramSettings, build

    plan = plan_site(parse_site(raw_site("example-prod")))

    def program() -> None:
        build(plan, ProgramSettings(stack="example-prod", project=ROOT), pulumi.Config("gpufleet").require_secret)

    preview = mocks.run(program, stack="example-prod", config=SECRET_CONFIG, secret_keys=list(SECRET_CONFIG),
                        preview=True)
    full = run_program("example-prod")
    assert sorted(r.urn for r in preview.resources) == sorted(r.urn for r in full.rec.resources)
