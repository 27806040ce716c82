"""A node's desired state as a typed contract between the Pulumi program and the change review.

`infra/components` writes it as the converge step's trigger (`as_trigger`); `infra/review` reads the
trigger of `pulumi preview --json` back (`from_trigger`) instead of guessing meaning from key names or
re-parsing `name=engine:model@rev` strings. One class, both directions, so the two can never drift apart.

The trigger's keys and strings are what Pulumi stores in state: changing them re-runs every converge,
so `as_trigger` must stay byte-for-byte what it was (tests/pulumi pins the program's triggers).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from infra.plan.node import NodePlan
from infra.plan.packages import Component

CONTENT_HASH = "content_hash"
# Keys whose change means a reboot (new kernel modules / fabric manager).
REBOOT_KEYS = ("driver", "fabric_manager")
_INFERENCE = "inference"


@dataclass(frozen=True)
class Serving:
    """One inference service a node serves: `name=engine:model@revision` in the trigger."""

    name: str
    engine: str = ""
    model: str = ""
    revision: str = ""

    def as_text(self) -> str:
        """The trigger's form."""
        return f"{self.name}={self.engine}:{self.model}@{self.revision}"

    @classmethod
    def from_text(cls, text: str) -> Serving:
        """Parse the trigger's form; a part that is missing stays empty (a state written by another version)."""
        name, _, rest = text.partition("=")
        engine, _, model_rev = rest.partition(":")
        model, _, revision = model_rev.rpartition("@") if "@" in model_rev else (model_rev, "", "")
        return cls(name, engine, model, revision)


def _fabric_text(plan: NodePlan) -> str | None:
    """Per fabric `ib-compute 8x400G` (+ ` sm:<fabrics>`): a port added, removed or renegotiated shows."""
    if not plan.fabric_ports:
        return None
    counts: dict[tuple[str, int], int] = {}
    for pp in plan.fabric_ports:
        key = (pp.fabric.name, pp.port.speed_gbps)
        counts[key] = counts.get(key, 0) + 1
    text = ",".join(f"{name} {n}x{speed}G" for (name, speed), n in counts.items())
    return text + (" sm:" + "+".join(plan.subnet_manager_for) if plan.subnet_manager_for else "")


@dataclass(frozen=True)
class DesiredState:
    """What a reviewer needs to see change about a node, plus the hash of everything else.

    Every field is the text shown in a preview (`570.133.20 (open)`, `8x H100-SXM`); `fabric_manager` is
    None on nodes without one and `content_hash` is "" before it is computed.
    """

    driver: str
    cuda: str
    runtime: str
    container_toolkit: str
    gpus: str
    roles: tuple[str, ...]
    reboot_policy: str
    fabric_manager: str | None = None
    fabric: str | None = None
    """RDMA ports per fabric (`ib-compute 8x400G`, `sm:` the fabrics it runs opensm for); None off-fabric."""
    inference: tuple[Serving, ...] = ()
    content_hash: str = ""

    @classmethod
    def of(cls, plan: NodePlan, content_hash: str = "") -> DesiredState:
        """A node's desired state from its plan."""
        p = plan.profile
        return cls(
            driver=f"{p.driver.version} ({'open' if p.driver.open_modules else 'proprietary'})",
            cuda=p.cuda.version,
            runtime=f"{p.container_runtime.engine.value} {p.container_runtime.version}",
            container_toolkit=p.container_toolkit.version,
            gpus=f"{plan.node.gpu.count}x {plan.node.gpu.model}",
            roles=plan.roles,
            reboot_policy=plan.reboot_policy.value,
            fabric_manager=(p.fabric_manager.version or "") if plan.packages_of(Component.FABRIC_MANAGER) else None,
            fabric=_fabric_text(plan),
            inference=tuple(
                Serving(s.name, s.service.engine.value, s.service.model.name, s.service.model.revision)
                for s in plan.services
            ),
            content_hash=content_hash,
        )

    def summary(self) -> dict[str, str]:
        """The readable part (the trigger without the content hash), in the trigger's key order."""
        out = {
            "driver": self.driver,
            "cuda": self.cuda,
            "runtime": self.runtime,
            "container_toolkit": self.container_toolkit,
            "gpus": self.gpus,
            "roles": ",".join(self.roles),
            "reboot_policy": self.reboot_policy,
        }
        if self.fabric_manager is not None:
            out["fabric_manager"] = self.fabric_manager
        if self.fabric is not None:
            out["fabric"] = self.fabric
        if self.inference:
            out[_INFERENCE] = ";".join(s.as_text() for s in self.inference)
        return out

    def as_trigger(self) -> dict[str, str]:
        """The converge step's trigger: the summary, then `content_hash` when there is one."""
        out = self.summary()
        if self.content_hash:
            out[CONTENT_HASH] = self.content_hash
        return out

    @classmethod
    def from_trigger(cls, trigger: Mapping[str, Any]) -> DesiredState:
        """Read a trigger back (from Pulumi state or a preview). Missing keys are empty; values are text."""

        def text(key: str) -> str:
            v = trigger.get(key)
            return "" if v is None else str(v)

        inference = text(_INFERENCE)
        return cls(
            driver=text("driver"),
            cuda=text("cuda"),
            runtime=text("runtime"),
            container_toolkit=text("container_toolkit"),
            gpus=text("gpus"),
            roles=tuple(r for r in text("roles").split(",") if r),
            reboot_policy=text("reboot_policy"),
            fabric_manager=text("fabric_manager") if "fabric_manager" in trigger else None,
            fabric=text("fabric") if "fabric" in trigger else None,
            inference=tuple(Serving.from_text(s) for s in inference.split(";") if s),
            content_hash=text(CONTENT_HASH),
        )

    @property
    def services(self) -> list[str]:
        """Names of the inference services the node serves."""
        return [s.name for s in self.inference]
