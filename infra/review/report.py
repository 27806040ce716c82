"""Turn a parsed preview (and the stack's plan) into a per-node change review (Markdown or JSON).

Resources are recognised from their URNs, not from how our program happens to nest them: a
`gpufleet:node:GpuNode` is named after its host; a resource with a GpuNode among its parent types is
one of that node's steps, named `<host>-<step>` (`bmc`, `wait-ssh`, `converge`, `validate`, …); its
host is the name of the GpuNode its state names as parent. Creating or replacing a node's `bmc` step
runs its `create` command — a PXE reinstall when that command calls `bmc reimage`.

Every value that came from the preview or the stack goes through `escape()` before it reaches the
Markdown, so no value can become a heading, a link, HTML or a table cell of its own.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from infra.plan.desired import REBOOT_KEYS, DesiredState
from infra.plan.node import NodePlan, SitePlan
from infra.review.digest import SECRET, UNKNOWN, Digest, Step, Urn

NODE_TYPE = "gpufleet:node:GpuNode"
STACK_TYPE = "pulumi:pulumi:Stack"
PROVIDER_PREFIX = "pulumi:providers:"
BMC, CONVERGE = "bmc", "converge"
# Step names of a GpuNode (infra/components/node.py STEPS), used only when a step's state names no parent.
NODE_STEPS = ("bmc", "wait-ssh", "converge", "validate")
REIMAGE = "bmc reimage"  # what a BMC step's create command runs to PXE-reinstall (infra/components/commands.py)
CHANGED = ("create", "update", "replace", "delete")
FAIL_ON = ("reinstall", "reboot", "remove")
_MAX_CELL = 240  # longer values are cut: a review row is not the place for a 10 kB string
_HEX = re.compile(r"[0-9a-f]{40,}")
# Characters that mean something in GitHub-flavoured Markdown *inside* a line (values never start a
# line: newlines are removed first): emphasis, code, links/images, tables, strikethrough, math,
# @mentions, #references, `http:` autolinks and emoji shortcodes. Each is backslash-escaped;
# `<`, `>`, `&` become entities so no HTML (or entity) survives; `www.` autolinks are broken too.
_MD_PUNCT = frozenset("\\`*_[]#|~!:@$")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u2028\u2029\u200b-\u200f\u202a-\u202e\u2066-\u2069]")
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-Z\\-_]")


def plain(value: Any, limit: int = _MAX_CELL) -> str:
    """A value as one line of plain text: secrets masked, unknowns named, controls gone, length capped."""
    if value is None:
        text = "—"
    elif value == UNKNOWN:
        text = "(known after apply)"
    elif isinstance(value, (dict, list)):
        text = "(structured value)"
    else:
        text = str(value)
    text = text.encode("utf-8", "replace").decode("utf-8")  # lone surrogates from JSON → "?"
    text = _ANSI.sub("", text)
    text = re.sub(r"[\r\n\t]+", " ", text)
    text = _CONTROL.sub("", text).strip()
    if _HEX.fullmatch(text):
        text = text[:12] + "…"
    return text if len(text) <= limit else text[:limit] + "…"


def escape(value: Any, limit: int = _MAX_CELL) -> str:
    """`plain(value)` made inert for a Markdown table cell or inline text (the one escaping function)."""
    out = []
    for ch in plain(value, limit):
        if ch == "<":
            out.append("&lt;")
        elif ch == ">":
            out.append("&gt;")
        elif ch == "&":
            out.append("&amp;")
        elif ch in _MD_PUNCT:
            out.append("\\" + ch)
        else:
            out.append(ch)
    return re.sub(r"(?i)(www)\.", r"\1\\.", "".join(out))


@dataclass
class Change:
    """One readable property of a node's desired state, old → new."""

    key: str
    old: str
    new: str


@dataclass
class Row:
    """One resource's change and why it happens."""

    resource: str
    type: str
    op: str
    why: str
    urn: str = ""


@dataclass
class NodeReview:
    """What the preview does to one node."""

    hostname: str
    action: str  # added | moved | rebuilt | re-converged | updated | removed
    segment: str = ""
    reinstall: str = ""  # why the node is PXE-reinstalled, "" when it is not
    reboot: str = ""  # "" | "reboot" | "reboot needed, not performed (policy never)"
    removal: str = ""  # what removing it does to the machine
    serving: list[str] = field(default_factory=list)
    changes: list[Change] = field(default_factory=list)
    steps: list[Row] = field(default_factory=list)


@dataclass
class Review:
    """The whole change review."""

    stack: str
    complete: bool
    failed: bool
    summary: str
    nodes: list[NodeReview]
    reinstalls: list[dict[str, str]]
    providers: list[Row]
    other: list[Row]
    unknown: list[dict[str, str]]
    notes: list[str]
    attention: list[str]  # which of FAIL_ON this review contains
    change_summary: dict[str, int]
    diagnostics: list[dict[str, str]]

    def as_dict(self) -> dict[str, Any]:
        """JSON form (`gpufleet review --json`)."""
        return asdict(self)


# --- reading values out of steps -------------------------------------------------------------

def _path(path: str) -> list[str | int] | None:
    """`triggers[0].driver` / `a["b.c"][2]` → tokens; None when it is not a property path."""
    tokens: list[str | int] = []
    for m in re.finditer(r'\[(\d+)\]|\["((?:[^"\\]|\\.)*)"\]|\.?([^.\[\]"]+)|(.)', path):
        if m.group(4) is not None:
            return None
        tokens.append(int(m.group(1)) if m.group(1) is not None else (m.group(2) or m.group(3) or ""))
    return tokens or None


def _get(value: Any, tokens: list[str | int]) -> Any:
    for t in tokens:
        if isinstance(t, int) and isinstance(value, list) and t < len(value):
            value = value[t]
        elif isinstance(t, str) and isinstance(value, dict):
            value = value.get(t)
        else:
            return None
    return value


def _inputs(step: Step | None, new: bool) -> dict[str, Any]:
    state = (step.new if new else step.old) if step is not None else None
    return state.inputs if state is not None else {}


def _desired(step: Step | None, new: bool) -> DesiredState | None:
    """The converge step's desired state (its first trigger, `DesiredState.as_trigger`), None without one."""
    value = _get(_inputs(step, new), ["triggers", 0])
    return DesiredState.from_trigger(value) if isinstance(value, dict) else None


def _readable(state: DesiredState | None) -> dict[str, str]:
    return state.summary() if state is not None else {}


def _segment_of(steps: dict[str, Step]) -> str:
    """Segment of a node's created (or deleted) steps: the GpuNode's parent name, else the parent type."""
    node = steps.get("node")
    parent = node.parent if node is not None else None
    if parent is not None:
        return parent.name
    for s in steps.values():
        # No GpuNode step (e.g. kept by an alias): the URN still names the segment's type.
        seg = next((t for t in s.urn.types if t.split(":")[1] == "segment"), None)
        if seg is not None:
            return seg.rsplit(":", 1)[-1]
    return ""


def _why_path(step: Step, path: str) -> str:
    """Why one detailed-diff path changes, in words; values only where they are safe to show."""
    tokens = _path(path)
    old_in, new_in = _inputs(step, False), _inputs(step, True)
    if not tokens or not isinstance(tokens[0], str):
        return f"{plain(path)} changed"
    head = tokens[0]
    if head == "triggers" and len(tokens) >= 3:
        key = ".".join(str(t) for t in tokens[2:])
        return f"{key} {plain(_get(old_in, tokens))} → {plain(_get(new_in, tokens))}"
    if head == "triggers":
        if _get(new_in, tokens) == UNKNOWN:
            return "re-runs because a step it depends on is re-created (its id is known after apply)"
        return f"trigger {plain(path)} changed"
    if head == "dir":
        return (f"dir {plain(old_in.get('dir'))} → {plain(new_in.get('dir'))} "
                "(run from another checkout: the command re-runs, nothing else changed)")
    if head == "environment":
        # Environment carries secrets (GPUFLEET_SECRET_*): name the variable, never a value.
        name = str(tokens[1]) if len(tokens) > 1 else "environment"
        return f"environment {plain(name)} changed ({SECRET})"
    if head in ("create", "update", "delete"):
        return f"its {head} command changed"
    return f"{plain(path)} changed"


def _why(step: Step) -> str:
    """Why a replace or update happens: the trigger key old → new, `dir`, `--replace`, a provider."""
    parts: list[str] = []
    if "id" in step.replace_reasons and not step.detailed_diff:
        parts.append("replacement requested (`--replace`)")
    if "provider" in step.replace_reasons:
        parts.append("its provider changed and the new one requires replacement")
    for path in sorted(step.detailed_diff or {}):
        text = _why_path(step, path)
        if text not in parts:
            parts.append(text)
    if not step.detailed_diff:
        parts += [f"{plain(r)} changed" for r in step.diff_reasons if r not in ("id", "provider")]
    if not parts:
        parts.append("changed (the preview gives no reason)")
    return "; ".join(parts)


def _runs_reimage(step: Step) -> bool:
    """Whether creating this BMC step runs `bmc reimage` (unknown or hidden commands count as yes)."""
    cmd = _inputs(step, True).get("create")
    if not isinstance(cmd, str) or cmd in (UNKNOWN, SECRET):
        return True
    return REIMAGE in cmd


def _update_runs_reimage(step: Step) -> bool:
    """Whether updating this BMC step reimages: without an `update` command pulumi-command runs `create`."""
    cmd = _inputs(step, True).get("update")
    if isinstance(cmd, str) and cmd and cmd not in (UNKNOWN, SECRET):
        return REIMAGE in cmd
    return _runs_reimage(step)


def _removal(steps: list[Step]) -> str:
    """What deleting a node's steps does to the machine, read from their `delete` commands."""
    cmds = [c for s in steps for c in [_inputs(s, False).get("delete")] if isinstance(c, str) and c]
    if not cmds:
        return "forgotten: no power-off, no wipe (no delete command; the machine keeps running as it is)"
    text = " && ".join(cmds)
    lowered = text.lower()
    if "keep-running" in lowered or "keep_running" in lowered:
        what = "keeps running; decommission recorded"
    elif "--state off" in lowered or "power-off" in lowered or "poweroff" in lowered:
        what = "powered off via its BMC; decommission recorded"
    else:
        what = "runs its delete command"
    return f"{what} (runs: {plain(text)})"


# --- grouping ------------------------------------------------------------------------------

def _host_of(step: Step, hosts: set[str]) -> tuple[str, str] | None:
    """(hostname, step kind) for a GpuNode or one of its steps; None for anything else."""
    if step.type == NODE_TYPE:
        return step.name, "node"
    if NODE_TYPE not in step.urn.types[:-1]:
        return None
    parent = step.parent
    host = parent.name if parent is not None and parent.type == NODE_TYPE else None
    if host is None:
        host = max((h for h in hosts if step.name.startswith(f"{h}-")), key=len, default=None)
    if host is None:
        host = next((step.name.removesuffix(f"-{s}") for s in NODE_STEPS if step.name.endswith(f"-{s}")),
                    step.name)
    kind = step.name.removeprefix(f"{host}-") if step.name.startswith(f"{host}-") else step.name
    return host, kind


def _summary_changes(old_state: DesiredState | None, new_state: DesiredState | None) -> list[Change]:
    old, new = _readable(old_state), _readable(new_state)
    out = [Change(k, plain(old.get(k)), plain(new.get(k))) for k in sorted(set(old) | set(new))
           if old.get(k) != new.get(k)]
    if not out and old_state and new_state and old_state.content_hash != new_state.content_hash:
        out.append(Change("content", "role files, host variables or lock", "changed (content hash)"))
    return out


def _review_node(host: str, entries: list[tuple[str, Step]], node_plan: NodePlan | None) -> NodeReview:
    by_op: dict[str, dict[str, Step]] = {}
    for kind, s in entries:
        by_op.setdefault(s.op, {})[kind] = s
    created, deleted = by_op.get("create", {}), by_op.get("delete", {})
    replaced, updated = by_op.get("replace", {}), by_op.get("update", {})
    moved = bool(set(created) & set(deleted))
    nr = NodeReview(hostname=host, action="updated")
    if node_plan is not None:
        nr.serving = [s.name for s in node_plan.services]

    old_seg = _segment_of(deleted)
    new_seg = _segment_of(created)
    if moved:
        src = old_seg or "its old segment"
        dst = new_seg or (node_plan.segment.name if node_plan else "its new segment")
        nr.segment = f"{src} → {dst}"
    else:
        nr.segment = node_plan.segment.name if node_plan else (new_seg or old_seg)

    bmc_new = created.get(BMC) or replaced.get(BMC)
    bmc_upd = updated.get(BMC)
    conv_old = replaced.get(CONVERGE) or updated.get(CONVERGE) or deleted.get(CONVERGE)
    conv_new = replaced.get(CONVERGE) or updated.get(CONVERGE) or created.get(CONVERGE)
    if not (created or replaced or updated):
        nr.action = "removed"
        nr.removal = _removal([s for _, s in entries])
    elif moved:
        nr.action = "moved"
        olds = list(deleted.values())
        if any(isinstance(_inputs(s, False).get("delete"), str) for s in olds):
            # Deleting the old URNs runs their delete commands too (e.g. a decommission power-off).
            nr.removal = "the old steps' delete command runs first: " + _removal(olds)
    elif BMC in created and not deleted:
        nr.action = "added"
    elif BMC in replaced:
        nr.action = "rebuilt"
    elif conv_new is not None:
        nr.action = "re-converged"

    if bmc_new is not None and _runs_reimage(bmc_new):
        if moved:
            nr.reinstall = (f"moved from segment {plain(old_seg or '?')} to {plain(new_seg or '?')}: the node's "
                            "URNs changed (no alias keeps them), so Pulumi deletes its old steps and creates "
                            "new ones — the new BMC step runs `bmc reimage`")
        elif nr.action == "added":
            nr.reinstall = ("new node: creating its BMC step PXE-installs it "
                            "(`gpufleet:reimageOnCreate: false` adopts it as it is)")
        else:
            nr.reinstall = f"BMC step replaced: {_why(bmc_new)}"
    elif bmc_upd is not None and _update_runs_reimage(bmc_upd):
        nr.reinstall = (f"BMC step updated ({_why(bmc_upd)}) and its update command runs `bmc reimage` "
                        "(with no `update` command pulumi-command runs `create`)")

    # Desired-state changes: the converge trigger, old (deleted or replaced) against new.
    if nr.action == "added":
        nr.changes = [Change(k, "—", plain(v)) for k, v in sorted(_readable(_desired(conv_new, True)).items())]
    elif nr.action != "removed":
        nr.changes = _summary_changes(_desired(conv_old, False), _desired(conv_new, True))

    new_state = _desired(conv_new, True)
    policy = new_state.reboot_policy if new_state is not None else None
    if nr.reinstall:
        nr.reboot = "reboot (reinstall)"
    elif nr.action in ("re-converged", "moved") and any(c.key in REBOOT_KEYS for c in nr.changes):
        nr.reboot = "reboot needed, not performed (policy never)" if policy == "never" else "reboot"
    if not nr.serving:
        old_state = _desired(conv_old, False)
        nr.serving = (old_state.services if old_state else []) or (new_state.services if new_state else [])

    for kind, s in entries:
        if s.op not in CHANGED:
            continue
        if s.op == "create":
            why = (f"created under segment {plain(new_seg or '?')} (new URN)" if moved else "new")
        elif s.op == "delete":
            why = (f"deleted under segment {plain(old_seg or '?')} (old URN)" if moved else "removed from the stack")
        else:
            why = _why(s)
            if kind == BMC and s.op == "update":
                why += (" — its update runs `bmc reimage`: a reinstall" if _update_runs_reimage(s)
                        else " — the BMC step's update runs power-on only, no reinstall")
        nr.steps.append(Row(kind, s.type, s.op, why, _urn_text(s.urn)))
    return nr


def _urn_text(urn: Urn) -> str:
    return f"urn:pulumi:{urn.stack}::{urn.project}::{'$'.join(urn.types)}::{urn.name}"


def _providers(steps: list[Step]) -> list[Row]:
    """Default-provider changes, paired per package: `default_1_2_1 → default_1_3_0` is a plugin upgrade."""
    rows: list[Row] = []
    by_pkg: dict[str, dict[str, list[Step]]] = {}
    for s in steps:
        if s.type.startswith(PROVIDER_PREFIX) and s.op in CHANGED:
            by_pkg.setdefault(s.type.removeprefix(PROVIDER_PREFIX), {}).setdefault(s.op, []).append(s)
    for pkg, ops in sorted(by_pkg.items()):
        news, olds = ops.get("create", []), ops.get("delete", [])
        for new, old in zip(news, olds, strict=False):
            vo, vn = _inputs(old, False).get("version"), _inputs(new, True).get("version")
            why = f"plugin upgrade {plain(vo)} → {plain(vn)}" if vo or vn else "provider changed"
            rows.append(Row(f"{old.name} → {new.name}", f"{PROVIDER_PREFIX}{pkg}", "upgrade",
                            f"{why}; resources move to the new provider, none is touched by this alone"))
        for new in news[len(olds):]:
            rows.append(Row(new.name, new.type, "create", f"new provider {plain(_inputs(new, True).get('version'))}"))
        for old in olds[len(news):]:
            rows.append(Row(old.name, old.type, "delete", "provider no longer used"))
        for s in ops.get("replace", []) + ops.get("update", []):
            rows.append(Row(s.name, s.type, s.op, _why(s)))
    return rows


_BATCH = re.compile(r"-batch\d+-converge$")


def _batch_nodes(s: Step) -> list[str]:
    """The `--node`s of a segment batch's converge step (`infra.components.commands.batch_converge`)."""
    create = _inputs(s, s.op != "delete").get("create")
    words = create.split() if isinstance(create, str) else []
    return [words[i + 1] for i, w in enumerate(words[:-1]) if w == "--node"]


def _batch_why(s: Step) -> str:
    """A batch step: which nodes it converges, and the nodes whose own converge step made it re-run.

    Its triggers are the ids of its nodes' converge steps in `--node` order, so `triggers[i]` changing
    means the i-th node's step is re-created — that node's row says why in plain words.
    """
    nodes = _batch_nodes(s)
    which = sorted({int(m.group(1)) for p in (s.detailed_diff or {}) if (m := re.match(r"triggers\[(\d+)\]", p))})
    named = [nodes[i] for i in which if i < len(nodes)]
    head = f"one `gpufleet converge` (one Ansible job) over {', '.join(plain(n) for n in nodes) or '?'}"
    if s.op == "create":
        return f"new: {head}"
    if s.op == "delete":
        return f"removed: {head} (nothing runs on delete)"
    if named:
        rest = [n for n in nodes if n not in named]
        return (f"{head}: re-runs for {', '.join(plain(n) for n in named)} (its converge step is re-created: "
                "see its node row)" + ("; converging the others again changes nothing on them" if rest else ""))
    return f"{head}: {_why(s)}"


def _other_why(s: Step) -> str:
    if _BATCH.search(s.name) and _batch_nodes(s):
        return _batch_why(s)
    if s.op == "create":
        return "new"
    if s.op == "delete":
        return "removed from the stack"
    why = _why(s)
    if s.name.endswith("-mirror-import"):
        why += "; the mirror re-imports its bundle and every node of the segment installs from the new content"
    return why


def review(digest: Digest, plan: SitePlan | None, stack: str) -> Review:
    """Build the change review of one preview. `plan` is the stack as the change leaves it."""
    by_host = {n.hostname: n for n in plan.nodes} if plan else {}
    hosts = set(by_host)
    per_host: dict[str, list[tuple[str, Step]]] = {}
    claimed: set[int] = set()
    for i, s in enumerate(digest.steps):
        hit = _host_of(s, hosts)
        if hit is not None:
            per_host.setdefault(hit[0], []).append((hit[1], s))
            claimed.add(i)

    nodes: list[NodeReview] = []
    unknown: list[dict[str, str]] = []
    order = [n.hostname for n in plan.nodes] if plan else []
    order += sorted(h for h in per_host if h not in order)
    for host in order:
        entries = [(k, s) for k, s in per_host.get(host, []) if s.op in CHANGED]
        if not entries:
            continue
        only_deletes = all(s.op == "delete" for _, s in entries)
        ops = ", ".join(sorted({s.op for _, s in entries}))
        if plan is not None and host not in hosts and not only_deletes:
            unknown.append({"host": host, "ops": ops, "why": "not a node of this stack: the preview and the "
                            "stack file disagree (wrong stack, or a stale preview)"})
            continue
        if plan is not None and host in hosts and only_deletes:
            unknown.append({"host": host, "ops": ops, "why": "the stack keeps this node but the preview deletes "
                            "it: the preview and the stack file disagree"})
            continue
        nodes.append(_review_node(host, entries, by_host.get(host)))

    rest = [s for i, s in enumerate(digest.steps) if i not in claimed and s.type != STACK_TYPE]
    providers = _providers(rest)
    other = [Row(s.name, s.type, s.op, _other_why(s), _urn_text(s.urn)) for s in rest
             if s.op in CHANGED and not s.type.startswith(PROVIDER_PREFIX)]
    reinstalls = [{"host": n.hostname, "reason": n.reinstall} for n in nodes if n.reinstall]

    notes: list[str] = []
    failed = not digest.complete or bool(digest.errors)
    if not digest.complete:
        notes.append("the preview did not finish (no change summary): steps are missing from this review")
    if digest.errors:
        notes.append(f"the preview reported {len(digest.errors)} error(s): it failed and this review is incomplete")
    if digest.maybe_corrupt:
        notes.append("Pulumi reports the state may be corrupt (maybeCorrupt)")
    changed = [s for s in digest.steps if s.op in ("update", "replace")]
    if changed and all(set(s.detailed_diff or {}) == {"dir"} for s in changed):
        notes.append("every changed step differs only in `dir`: the preview ran from another checkout, and "
                     "each of these steps re-runs its command (converge included) for nothing else")
    for n in nodes:
        if n.action == "moved" and not n.reinstall:
            notes.append(f"{plain(n.hostname)} moves between segments: its steps are re-created; its BMC step "
                         "powers it on only (no reinstall), then it re-converges")

    attention = []
    if reinstalls:
        attention.append("reinstall")
    if any(n.reboot.startswith("reboot") and "not performed" not in n.reboot for n in nodes):
        attention.append("reboot")
    if any(n.action == "removed" for n in nodes):
        attention.append("remove")

    counts: dict[str, int] = {}
    for n in nodes:
        counts[n.action] = counts.get(n.action, 0) + 1
    actions = ("added", "moved", "rebuilt", "re-converged", "updated", "removed")
    summary = ", ".join(f"{counts[a]} {a}" for a in actions if counts.get(a)) or "no nodes affected"
    reboots = sum(1 for n in nodes if n.reboot.startswith("reboot") and "not performed" not in n.reboot)
    summary += f" · {len(reinstalls)} reinstall(s) · {reboots} reboot(s)"
    if digest.change_summary:
        summary += " · Pulumi: " + ", ".join(
            f"{v} {'unchanged' if k == 'same' else 'to ' + k}" for k, v in sorted(digest.change_summary.items()) if v)
    if failed:
        summary = "PREVIEW FAILED — " + summary

    diagnostics = [{"severity": d.severity, "message": d.message, "urn": d.urn} for d in digest.diagnostics
                   if d.severity in ("error", "warning", "info#err")]
    return Review(stack=stack, complete=digest.complete, failed=failed, summary=summary, nodes=nodes,
                  reinstalls=reinstalls, providers=providers, other=other, unknown=unknown, notes=notes,
                  attention=attention, change_summary=digest.change_summary or {}, diagnostics=diagnostics)


# --- Markdown ------------------------------------------------------------------------------

def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table; `rows` are already escaped, headers are ours."""
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return [*out, ""]


def markdown(r: Review) -> str:
    """The review as Markdown for a pull request comment."""
    e = escape
    # No value from outside ever sits in a heading (a forged "approved" heading needs one).
    lines = ["## gpufleet change review", "", f"**Stack:** {e(r.stack)}", ""]
    if r.failed:
        lines += ["> ❌ **The preview failed or did not finish.** This review is incomplete: do not approve from it.",
                  ""]
    lines += [f"**Summary:** {e(r.summary)}", ""]
    if r.notes:
        lines += [*[f"- {e(n)}" for n in r.notes], ""]
    if r.reinstalls:
        lines += ["### ⚠️ reinstalls", "",
                  "Each of these runs `bmc reimage`: the machine is PXE-reinstalled and its disks are wiped.", ""]
        lines += [f"- **{e(x['host'])}**: **{e(x['reason'])}**" for x in r.reinstalls]
        lines.append("")
    if r.nodes:
        rows = []
        for n in r.nodes:
            action = f"**{e(n.action)} (reinstall)**" if n.reinstall else e(n.action)
            if n.action == "removed":
                what = n.removal
            elif n.action == "moved":
                what = "; ".join([f"segment: {n.segment}",
                                  *(f"{c.key}: {c.old} → {c.new}" for c in n.changes if c.key != "roles"),
                                  *([n.removal] if n.removal else [])])
            else:
                what = "; ".join(f"{c.key}: {c.old} → {c.new}" for c in n.changes if c.key != "roles")
                what = what or next((s.why for s in n.steps if s.resource in (BMC, CONVERGE)), "") or \
                    next((s.why for s in n.steps), "—")
            serving = ", ".join(n.serving) if n.serving else "—"
            rows.append([e(n.hostname), e(n.segment or "—"), action, e(n.reboot or "—"), e(serving), e(what)])
        lines += ["### Nodes", "", *_table(["node", "segment", "action", "reboot", "serving", "what changes"], rows)]
        for n in r.nodes:
            # A bold line, not a heading: no value from the preview ever sits in a heading.
            lines += [f"**{e(n.hostname)}** steps:", ""]
            roles = next((c for c in n.changes if c.key == "roles"), None)
            if roles is not None and n.action != "added":
                lines += [f"- roles: {e(roles.old)} → {e(roles.new)}", ""]
            lines += _table(["step", "operation", "why"], [[e(s.resource), e(s.op), e(s.why)] for s in n.steps])
    if r.providers:
        lines += ["### Providers", "",
                  *_table(["provider", "type", "change", "why"],
                          [[e(p.resource), e(p.type), e(p.op), e(p.why)] for p in r.providers])]
    if r.other:
        lines += ["### Other resources", "",
                  *_table(["resource", "type", "operation", "why"],
                          [[e(o.resource), e(o.type), e(o.op), e(o.why)] for o in r.other])]
    if r.unknown:
        lines += ["### Unknown to this stack", "",
                  *_table(["host", "operations", "why"], [[e(u["host"]), e(u["ops"]), e(u["why"])] for u in r.unknown])]
    if r.diagnostics:
        lines += ["### Preview diagnostics", "",
                  *_table(["severity", "message"],
                          [[e(d["severity"]), e(d["message"], 2000)] for d in r.diagnostics])]
    if not (r.nodes or r.providers or r.other or r.unknown):
        lines += ["No resource changes.", ""]
    return "\n".join(lines).rstrip() + "\n"
