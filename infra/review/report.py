"""Turn a parsed preview and the stack's plan into a per-node change review (Markdown or JSON).

Resources are recognised by how `infra.components` names them: a GpuNode is named after the host,
its steps `<host>-bmc|wait-ssh|converge|validate`; an air-gapped segment's steps
`<segment>-mirror-import|status`; a service's `<service>-health`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from infra.components.node import STEPS
from infra.plan.node import SitePlan
from infra.review.digest import UNKNOWN, Digest, Step

NODE_TYPE = "gpufleet:node:GpuNode"
SERVICE_TYPE = "gpufleet:inference:InferenceService"
SEGMENT_TYPES = ("gpufleet:segment:Segment", "gpufleet:segment:AirGappedSegment")
AIRGAPPED_TYPE = "gpufleet:segment:AirGappedSegment"
# Summary keys whose change means a reboot (new kernel modules / fabric manager at the driver version).
REBOOT_KEYS = ("driver", "fabric_manager")
CHANGED_OPS = ("create", "update", "replace", "delete")


def _show(value: Any) -> str:
    if value is None:
        return "—"
    if value == UNKNOWN:
        return "(known after apply)"
    return str(value)


@dataclass
class Change:
    """One readable property of a node's desired state, old → new."""

    key: str
    old: str
    new: str


@dataclass
class NodeReview:
    """What the preview does to one node."""

    hostname: str
    action: str  # added | removed | rebuilt | re-converged | updated | unchanged
    segment: str = ""
    airgapped: bool = False
    steps: dict[str, str] = field(default_factory=dict)
    changes: list[Change] = field(default_factory=list)
    reboot: str = ""  # "" | "reboot" | "reboot required, not performed (policy never)"
    serving: list[str] = field(default_factory=list)


@dataclass
class Review:
    """The whole change review."""

    stack: str
    summary: str
    nodes: list[NodeReview]
    warnings: list[str]
    other: list[dict[str, str]]
    change_summary: dict[str, int]
    diagnostics: list[dict[str, str]]

    def as_dict(self) -> dict[str, Any]:
        """JSON form (`gpufleet review --json`)."""
        return asdict(self)


def _node_of(step: Step, hosts: set[str]) -> tuple[str, str] | None:
    """(hostname, step) for a GpuNode or one of its steps."""
    chain = step.type_chain
    if chain[-1] == NODE_TYPE:
        return step.name, "node"
    if NODE_TYPE in chain[:-1]:
        for s in STEPS:
            if step.name.endswith(f"-{s}"):
                return step.name.removesuffix(f"-{s}"), s
    if step.name in hosts:
        return step.name, "node"
    return None


def _overall(ops: dict[str, str]) -> str:
    if ops.get("node") == "create" or ops.get("bmc") == "create":
        return "added"
    if ops.get("node") == "delete" or (ops and all(o == "delete" for o in ops.values())):
        return "removed"
    if ops.get("bmc") == "replace":
        return "rebuilt"
    if ops.get("converge") in ("replace", "update"):
        return "re-converged"
    if any(o in CHANGED_OPS for o in ops.values()):
        return "updated"
    return "unchanged"


def _summary_changes(old: Any, new: Any) -> list[Change]:
    old = old if isinstance(old, dict) else {}
    new = new if isinstance(new, dict) else {}
    out = []
    for key in sorted(set(old) | set(new)):
        if key == "content_hash" or old.get(key) == new.get(key):
            continue
        out.append(Change(key, _show(old.get(key)), _show(new.get(key))))
    if not out and old.get("content_hash") != new.get("content_hash") and old and new:
        out.append(Change("content", "role files, host variables or lock", "changed (content hash)"))
    return out


def _review_node(host: str, steps: dict[str, Step], plan: SitePlan | None) -> NodeReview:
    ops = {k: s.op for k, s in steps.items()}
    nr = NodeReview(hostname=host, action=_overall(ops), steps={k: v for k, v in ops.items() if k != "node"})
    node_plan = next((n for n in plan.nodes if n.hostname == host), None) if plan else None
    if node_plan is not None:
        nr.segment, nr.airgapped = node_plan.segment.name, node_plan.segment.airgapped
        nr.serving = [s.name for s in node_plan.services]
    conv, bmc = steps.get("converge"), steps.get("bmc")
    new_summary = conv.trigger(0) if conv else None
    old_summary = conv.trigger(0, new=False) if conv else None
    if not nr.serving and isinstance(old_summary, dict) and old_summary.get("inference"):
        nr.serving = [s.split("=", 1)[0] for s in str(old_summary["inference"]).split(";")]
    if nr.action == "added" and isinstance(new_summary, dict):
        nr.changes = [Change(k, "—", _show(v)) for k, v in sorted(new_summary.items()) if k != "content_hash"]
    elif nr.action != "removed" and conv and conv.op in ("replace", "update"):
        nr.changes = _summary_changes(old_summary, new_summary)
    for name, st in steps.items():
        if st.op == "update" and name != "converge":
            # Not a trigger change: pulumi-command runs the step's `update` (for bmc: power on only).
            what = "power-on only, no reinstall" if name == "bmc" else "step re-runs"
            nr.changes.append(Change(f"{name} step", "", f"{', '.join(st.diff_reasons) or 'inputs'} changed ({what})"))
    if nr.action == "rebuilt" and bmc is not None:
        reinstall = _summary_changes(bmc.trigger(0, new=False), bmc.trigger(0))
        nr.changes = reinstall + nr.changes if reinstall else [
            Change("rebuild", "installed", "reinstalled (requested with --replace)"), *nr.changes]
    policy = (new_summary or {}).get("reboot_policy") if isinstance(new_summary, dict) else None
    needs_reboot = nr.action == "rebuilt" or (
        nr.action == "re-converged" and any(c.key in REBOOT_KEYS for c in nr.changes))
    if needs_reboot:
        nr.reboot = "reboot required, not performed (policy never)" if policy == "never" else "reboot"
    return nr


def _warnings(nodes: list[NodeReview], steps: list[Step], claimed: set[str], digest: Digest) -> list[str]:
    out = []
    for n in nodes:
        serving = f" while serving {', '.join(n.serving)}" if n.serving else ""
        if n.action == "rebuilt":
            why = "; ".join(f"{c.key} {c.old} → {c.new}" for c in n.changes[:2])
            out.append(f"**{n.hostname}** is REBUILT (PXE reinstall wipes its disks){serving}: {why}")
        elif n.action == "added" and "bmc reimage" in _bmc_create(steps, n.hostname):
            out.append(f"**{n.hostname}** is new: creating it PXE-reinstalls the machine "
                       "(set `gpufleet:reimageOnCreate: false` to adopt an installed node as it is)")
        elif n.action == "removed":
            out.append(f"**{n.hostname}** leaves the stack: Pulumi forgets it (no power-off, no wipe)"
                       + (f"; {', '.join(n.serving)} lose this endpoint" if n.serving else ""))
        if n.reboot == "reboot" and n.action != "rebuilt":
            drv = next((c for c in n.changes if c.key == "driver"), None)
            what = f"driver {drv.old} → {drv.new}" if drv else "fabric manager change"
            out.append(f"**{n.hostname}** reboots for {what}{serving}")
        elif n.reboot.startswith("reboot required"):
            out.append(f"**{n.hostname}** needs a reboot that policy `never` will not do: "
                       "the new driver is inactive until the node is rebooted")
    for s in steps:
        if s.urn in claimed or s.op not in CHANGED_OPS or s.type in ("pulumi:pulumi:Stack",):
            continue
        if s.name.endswith("-mirror-import") and s.op in ("replace", "update"):
            old, new = s.trigger(0, new=False) or {}, s.trigger(0) or {}
            lock = f" (lock {str(old.get('lock', '?'))[:12]} → {str(new.get('lock', '?'))[:12]})" \
                if isinstance(old, dict) and isinstance(new, dict) else ""
            seg = s.name.removesuffix("-mirror-import")
            out.append(f"air-gapped segment **{seg}**: mirror re-imports its bundle{lock}; "
                       "every node of the segment installs from the new content")
        elif s.op == "delete" and s.type_chain[-1] in (*SEGMENT_TYPES, SERVICE_TYPE):
            out.append(f"{s.type_chain[-1].rsplit(':', 1)[-1]} **{s.name}** is deleted")
        elif s.op in ("delete", "replace") and s.type_chain[-1] not in (*SEGMENT_TYPES, SERVICE_TYPE) \
                and not s.name.endswith(("-mirror-status", "-health")):
            out.append(f"{s.type} **{s.name}** is {s.op}d")
    errors = [d for d in digest.diagnostics if d.severity == "error"]
    if errors:
        out.append(f"the preview reported {len(errors)} error(s): it may be incomplete")
    return out


def _bmc_create(steps: list[Step], host: str) -> str:
    for s in steps:
        if s.name == f"{host}-bmc":
            return str(s.new_inputs.get("create", ""))
    return ""


def review(digest: Digest, plan: SitePlan | None, stack: str) -> Review:
    """Build the change review of one preview."""
    hosts = {n.hostname for n in plan.nodes} if plan else set()
    per_node: dict[str, dict[str, Step]] = {}
    claimed: set[str] = set()
    for s in digest.steps:
        hit = _node_of(s, hosts)
        if hit is not None:
            per_node.setdefault(hit[0], {})[hit[1]] = s
            claimed.add(s.urn)
    order = [n.hostname for n in plan.nodes] if plan else []
    order += sorted(h for h in per_node if h not in order)
    nodes = [_review_node(h, per_node[h], plan) for h in order if h in per_node]
    warnings = _warnings(nodes, digest.steps, claimed, digest)
    other = [{"name": s.name, "type": s.type, "op": s.op} for s in digest.steps
             if s.urn not in claimed and s.op in CHANGED_OPS and s.type != "pulumi:pulumi:Stack"]
    counts: dict[str, int] = {}
    for n in nodes:
        counts[n.action] = counts.get(n.action, 0) + 1
    order_actions = ("added", "rebuilt", "re-converged", "updated", "removed", "unchanged")
    reboots = sum(1 for n in nodes if n.reboot == "reboot")
    engine = ", ".join(f"{v} to {k}" for k, v in sorted(digest.change_summary.items()) if v)
    summary = (", ".join(f"{counts[a]} {a}" for a in order_actions if counts.get(a)) or "no nodes affected")
    summary += f" · {reboots} reboot(s) · {len(warnings)} warning(s)"
    if engine:
        summary += f" · Pulumi: {engine}"
    return Review(stack=stack, summary=summary, nodes=nodes, warnings=warnings, other=other,
                  change_summary=digest.change_summary,
                  diagnostics=[{"severity": d.severity, "message": d.message} for d in digest.diagnostics
                               if d.severity in ("error", "warning")])


def markdown(r: Review) -> str:
    """The review as Markdown for a pull request comment."""
    lines = [f"## gpufleet change review — stack `{r.stack}`", "", f"**Summary:** {r.summary}", ""]
    if r.warnings:
        lines += ["### ⚠️ Warnings", "", *[f"- {w}" for w in r.warnings], ""]
    changed = [n for n in r.nodes if n.action != "unchanged"]
    if changed:
        lines += ["### Nodes", "", "| node | segment | action | reboot | what changes |", "|---|---|---|---|---|"]
        for n in changed:
            seg = n.segment + (" (air-gapped)" if n.airgapped else "") if n.segment else "—"
            what = "; ".join(f"{c.key}: {c.old} → {c.new}" if c.old else f"{c.key}: {c.new}"
                             for c in n.changes if c.key != "roles")
            if n.action == "added":
                what = "; ".join(f"{c.key}: {c.new}" for c in n.changes if c.key in ("driver", "cuda", "gpus",
                                                                                     "inference"))
            if n.action == "removed":
                what = "removed from the stack"
            lines.append(f"| {n.hostname} | {seg} | {n.action} | {n.reboot or '—'} | {what or '—'} |")
        lines.append("")
        for n in changed:
            roles = next((c for c in n.changes if c.key == "roles"), None)
            steps = ", ".join(f"{k} {v}" for k, v in n.steps.items() if v != "same")
            extra = [f"  - roles: {roles.old} → {roles.new}"] if roles and n.action != "added" else []
            if steps or extra:
                lines += [f"- **{n.hostname}** — steps: {steps or 'none'}", *extra]
        lines.append("")
    unchanged = [n.hostname for n in r.nodes if n.action == "unchanged"]
    if unchanged:
        lines += [f"Unchanged nodes: {', '.join(unchanged)}", ""]
    if r.other:
        lines += ["### Other resources", "", *[f"- {o['name']} ({o['type']}): {o['op']}" for o in r.other], ""]
    if r.diagnostics:
        lines += ["### Preview diagnostics", "", *[f"- {d['severity']}: {d['message']}" for d in r.diagnostics], ""]
    return "\n".join(lines).rstrip() + "\n"
