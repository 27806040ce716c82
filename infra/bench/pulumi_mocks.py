"""Run the Pulumi program under `pulumi.runtime.set_mocks` and record what it registered.

Used by tests/pulumi and the benchmark (no Pulumi CLI or engine needed). The recording monitor keeps
what `MockResourceArgs` lacks: parent, dependencies and `additionalSecretOutputs` of every resource.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pulumi
from pulumi.runtime import mocks as pmocks
from pulumi.runtime import rpc
from pulumi.runtime import settings as psettings
from pulumi.runtime.stack import run_pulumi_func
from pulumi.runtime.sync_await import _sync_await

SECRET_SIG = rpc._special_sig_key  # "4dabf18193072939515e22adb298388d"
SECRET_VALUE_SIG = rpc._special_secret_sig  # marks a wrapped secret value

StdoutFor = Callable[[str, str, dict[str, Any]], str]


def unwrap(value: Any) -> Any:
    """Strip the SDK's secret wrappers from a deserialized property value."""
    if isinstance(value, dict):
        if value.get(SECRET_SIG) == SECRET_VALUE_SIG:
            return unwrap(value.get("value"))
        return {k: unwrap(v) for k, v in value.items()}
    if isinstance(value, list):
        return [unwrap(v) for v in value]
    return value


def secret_paths(value: Any, path: str = "") -> list[str]:
    """Property paths whose value arrived wrapped as a secret."""
    if isinstance(value, dict):
        if value.get(SECRET_SIG) == SECRET_VALUE_SIG:
            return [path]
        return [p for k, v in value.items() for p in secret_paths(v, f"{path}.{k}" if path else k)]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in secret_paths(v, f"{path}[{i}]")]
    return []


@dataclass(frozen=True)
class AliasSpec:
    """One alias of a registration (pulumi alias.proto `Alias.Spec`, or a plain URN)."""

    urn: str = ""
    name: str = ""
    type: str = ""
    parent_urn: str = ""
    no_parent: bool = False


def _type_chain(urn: str) -> str:
    return urn.split("::")[2]


def create_urn(stack: str, project: str, parent: str, type_: str, name: str) -> str:
    """URN as the engine builds it (pulumi sdk/go/common/resource/urn.go CreateURN): parent type chain + type."""
    qualified = type_
    if parent and _type_chain(parent) != "pulumi:pulumi:Stack":
        qualified = f"{_type_chain(parent)}${type_}"
    return "urn:pulumi:" + "::".join([stack, project, qualified, name])


def match_olds(olds: set[str], registrations: list[Registration]) -> dict[str, str | None]:
    """Which old URN each new registration takes over, as the engine's step generator decides.

    A faithful subset of pulumi pkg/resource/deploy/step_generator.go (v3.19x): `getOldResource`
    looks the URN up first, then each alias from `generateAliases` — the resource's own aliases
    (`collapseAliasToUrn`: unset name/type/parent default to the resource's own) and the alias its
    parent matched, inherited by the child (`inheritedChildAlias`). Unmatched → None (a create).
    """
    matched: dict[str, str] = {}  # new URN → old URN it was found under (the engine's sg.aliases)
    out: dict[str, str | None] = {}
    for reg in registrations:
        stack, project = reg.urn.split("::")[0].removeprefix("urn:pulumi:"), reg.urn.split("::")[1]
        candidates = [reg.urn]
        for a in reg.aliases:
            if a.urn:
                candidates.append(a.urn)
                continue
            parent = a.parent_urn or reg.parent
            parent = matched.get(parent, parent)
            candidates.append(create_urn(stack, project, "" if a.no_parent else parent,
                                         a.type or reg.type, a.name or reg.name))
        if reg.parent in matched:
            parent_alias = matched[reg.parent]
            parent_name = reg.parent.rsplit("::", 1)[1]
            name = reg.name
            if name.startswith(parent_name):
                name = parent_alias.rsplit("::", 1)[1] + name[len(parent_name):]
            candidates.append("urn:pulumi:" + "::".join(
                [stack, project, f"{_type_chain(parent_alias)}${reg.type}", name]))
        found = next((c for c in candidates if c in olds), None)
        if found is not None and found != reg.urn:
            matched[reg.urn] = found
        out[reg.urn] = found
    return out


@dataclass
class Registration:
    """One registered resource as the engine would see it."""

    type: str
    name: str
    urn: str
    parent: str
    dependencies: list[str]
    custom: bool
    raw_inputs: dict[str, Any]
    additional_secret_outputs: list[str]
    outputs: dict[str, Any] = field(default_factory=dict)
    aliases: list[AliasSpec] = field(default_factory=list)
    """`aliases` resource option as the SDK sends it to a monitor supporting alias specs."""

    @property
    def inputs(self) -> dict[str, Any]:
        """Inputs with secret wrappers removed."""
        return dict(unwrap(self.raw_inputs))

    @property
    def secret_inputs(self) -> list[str]:
        """Input paths marked secret."""
        return secret_paths(self.raw_inputs)


def default_stdout(typ: str, name: str, inputs: dict[str, Any]) -> str:
    """Fake stdout of a command: plausible JSON for the steps whose output becomes stack outputs."""
    create = str(inputs.get("create", ""))
    if " validate-node " in create:
        # The shape `gpufleet validate-node --json` prints (ROLES).
        return json.dumps({"node": name.removesuffix("-validate"), "passed": True, "reachable": True,
                           "facts": {"reboot_required": False}, "failures": []})
    if " converge " in create and " --record" in create:
        # The shape `gpufleet converge --json` prints (infra.ansible.rollout.RolloutResult.as_dict), one
        # entry per `--node` of the batch step.
        words = create.split()
        hosts = [words[i + 1] for i, w in enumerate(words[:-1]) if w == "--node"]
        return json.dumps({"succeeded": True, "stopped_segments": {}, "runs": [],
                           "nodes": [{"hostname": h, "segment": "", "batch": 0, "status": "ok", "changed": 0}
                                     for h in hosts]})
    if " mirror status " in create:
        return json.dumps({"mirror": "ok"})
    return "ok"


class _Mocks(pulumi.runtime.Mocks):
    def __init__(self, stdout_for: StdoutFor) -> None:
        self.stdout_for = stdout_for

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str | None, dict[Any, Any]]:
        state = dict(args.inputs)
        if args.typ == "command:local:Command":
            state["stdout"] = self.stdout_for(args.typ, args.name, unwrap(args.inputs))
            state["stderr"] = ""
        return f"{args.name}-id", state

    def call(self, args: pulumi.runtime.MockCallArgs) -> tuple[dict[Any, Any], list[tuple[str, str]] | None]:
        return {}, None


class RecordingMonitor(pmocks.MockMonitor):
    """A MockMonitor that keeps every registration's parent, dependencies and secret markings."""

    def __init__(self, mocks: pulumi.runtime.Mocks) -> None:
        super().__init__(mocks)
        self.registrations: list[Registration] = []
        self.by_urn: dict[str, Registration] = {}

    def make_urn(self, parent: str, type_: str, name: str) -> str:
        """URNs as the engine builds them: the parent's whole type chain, without the root stack.

        The stock mock keeps only the parent's own type, which hides URN changes a real engine would
        make (e.g. a node moving under another segment type).
        """
        return create_urn(pulumi.get_stack(), pulumi.get_project(), parent, type_, name)

    def RegisterResource(self, request: Any) -> Any:  # gRPC method name
        """Record, then let the stock mock monitor answer."""
        response = super().RegisterResource(request)  # type: ignore[no-untyped-call]
        if request.additionalSecretOutputs and response.object:
            # Do what the engine does and the stock mock does not: return these outputs as secrets.
            state = rpc.deserialize_properties(response.object)
            for key in request.additionalSecretOutputs:
                if key in state:
                    state[key] = {SECRET_SIG: SECRET_VALUE_SIG, "value": state[key]}
            response.object.CopyFrom(_sync_await(rpc.serialize_properties(state, {})))
        if request.type != "pulumi:pulumi:Stack":
            reg = Registration(
                type=request.type, name=request.name, urn=response.urn, parent=request.parent,
                dependencies=list(request.dependencies), custom=bool(request.custom),
                raw_inputs=rpc.deserialize_properties(request.object) if request.object else {},
                additional_secret_outputs=list(request.additionalSecretOutputs),
                aliases=[_alias(a) for a in request.aliases],
            )
            self.registrations.append(reg)
            self.by_urn[reg.urn] = reg
        return response

    def RegisterResourceOutputs(self, request: Any) -> Any:  # gRPC method name
        """Keep component outputs (to check no plaintext secret is among them)."""
        reg = self.by_urn.get(request.urn)
        if reg is not None and request.outputs:
            reg.outputs = rpc.deserialize_properties(request.outputs)
        return super().RegisterResourceOutputs(request)  # type: ignore[no-untyped-call]


def _alias(a: Any) -> AliasSpec:
    if a.HasField("spec"):
        spec = a.spec
        return AliasSpec(name=spec.name, type=spec.type, parent_urn=spec.parentUrn, no_parent=spec.noParent)
    return AliasSpec(urn=a.urn)


@dataclass
class Recording:
    """What one mocked program run registered, and the value the program function returned."""

    monitor: RecordingMonitor
    value: Any
    value_is_secret: bool

    @property
    def resources(self) -> list[Registration]:
        """Every registration, in order."""
        return self.monitor.registrations

    def named(self, name: str) -> Registration:
        """The registration with this Pulumi name (names are unique per type in gpufleet)."""
        found = [r for r in self.resources if r.name == name]
        if len(found) != 1:
            raise KeyError(f"{len(found)} resources named {name!r}")
        return found[0]


def run(
    program: Callable[[], pulumi.Input[Any]],
    *,
    project: str = "gpufleet",
    stack: str = "lab",
    config: dict[str, str] | None = None,
    secret_keys: list[str] | None = None,
    stdout_for: StdoutFor = default_stdout,
    preview: bool = False,
) -> Recording:
    """Run `program` under mocks (preview=False so apply callbacks run) and return the recording."""
    mocks = _Mocks(stdout_for)
    monitor = RecordingMonitor(mocks)
    psettings.ROOT.set(None)  # a fresh root stack per run, named after this project/stack
    pulumi.runtime.set_all_config(dict(config or {}), list(secret_keys or []))
    pulumi.runtime.set_mocks(mocks, project=project, stack=stack, preview=preview, monitor=monitor)
    psettings.SETTINGS.rpc_manager.clear()
    psettings.SETTINGS.outputs.clear()
    box: dict[str, Any] = {}

    def body() -> None:
        out = pulumi.Output.from_input(program())
        box["value"] = _sync_await(out.future())
        box["secret"] = _sync_await(out.is_secret())

    _sync_await(run_pulumi_func(body))
    return Recording(monitor, box.get("value"), bool(box.get("secret")))
