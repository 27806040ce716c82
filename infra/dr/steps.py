"""The other engineers' steps a rebuild and a drift check run, called through their CLI contract.

`gpufleet converge`, `gpufleet validate-node` and `gpufleet check` (ROLES) are the exact commands a
Pulumi resource runs, so calling them as commands keeps one code path for `pulumi up`, tests and
break-glass operation. Each runs as `python -m infra.cli ...` with this interpreter.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra import procs
from infra.ansible.converge import check_report
from infra.ansible.converge import converge as ansible_converge
from infra.dr.drift import CheckFn, CheckOutcome
from infra.plan.node import NodePlan, SitePlan


@dataclass(frozen=True)
class StackRef:
    """How the user named the stack; passed on unchanged to the commands we run."""

    stack: str | None
    stack_file: Path | None

    def argv(self) -> list[str]:
        """`--stack NAME` or `--stack-file PATH`."""
        return ["--stack-file", str(self.stack_file)] if self.stack_file else ["--stack", str(self.stack or "lab")]

    @property
    def name(self) -> str:
        """Stack name for records (the file stem's last part for a stack file)."""
        if self.stack_file:
            return self.stack_file.stem.removeprefix("Pulumi.")
        return str(self.stack or "lab")


@dataclass(frozen=True)
class StepResult:
    """Outcome of one step."""

    ok: bool
    seconds: float
    code: int
    data: Any = None
    output: str = ""


def gpufleet(args: list[str], *, timeout: float) -> StepResult:
    """Run a `gpufleet` command; JSON stdout parsed when there is one."""
    t0 = time.monotonic()
    argv = [sys.executable, "-m", "infra.cli", *args]
    try:
        # A step's converge must not go on without us (issue 21): SIGTERM when we die, which it forwards
        # to its Ansible run before it exits.
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False,
                           preexec_fn=procs.die_with_parent())
    except subprocess.TimeoutExpired:
        return StepResult(False, time.monotonic() - t0, 124, output=f"timed out after {timeout:.0f} s")
    out = p.stdout or ""
    data: Any = None
    if out.strip().startswith(("{", "[")):
        try:
            data = json.loads(out)
        except ValueError:
            data = None
    tail = _failures(data) or "\n".join(((p.stderr or "") + out).strip().splitlines()[-20:])
    return StepResult(p.returncode == 0, time.monotonic() - t0, p.returncode, data, tail)


def _failures(data: Any) -> str:
    """`node: task: message` lines from a converge/validate JSON answer (what a person needs to act)."""
    if not isinstance(data, dict):
        return ""
    lines = []
    nodes = data.get("nodes")
    entries = nodes if isinstance(nodes, list) else [data]
    for n in entries:
        if not isinstance(n, dict):
            continue
        name = n.get("hostname") or n.get("node") or "?"
        for f in n.get("failures") or []:
            if isinstance(f, dict):
                lines.append(f"{name}: {f.get('task')}: {str(f.get('msg'))[:300]}")
        facts = n.get("facts")
        if isinstance(facts, dict):
            lines += [f"{name}: {p}" for p in facts.get("problems") or []]
    return "\n".join(lines)


def converge(ref: StackRef, hostname: str, *, timeout: float = 3600) -> StepResult:
    """`gpufleet converge --node N --json` (ROLES)."""
    return gpufleet(["converge", *ref.argv(), "--node", hostname, "--json"], timeout=timeout)


def validate(ref: StackRef, hostname: str, *, timeout: float = 600) -> StepResult:
    """`gpufleet validate-node --node N --json` (ROLES); ok when it exits 0."""
    return gpufleet(["validate-node", *ref.argv(), "--node", hostname, "--json"], timeout=timeout)


def check_with_roles(plan: SitePlan) -> CheckFn:
    """A drift `CheckFn` on ROLES' Python API: one check+diff run over the nodes, read like `gpufleet check`."""

    def run(plans: list[NodePlan]) -> dict[str, CheckOutcome]:
        report = check_report(ansible_converge(plan, plans, check=True))
        res = StepResult(True, 0.0, 0, report)
        return {p.hostname: parse_check(res, p.hostname) for p in plans}

    return run


def check_via_cli(ref: StackRef, *, timeout: float = 3600) -> CheckFn:
    """A drift `CheckFn` running `gpufleet check --json` per node (ROLES' check + diff, no change)."""

    def run(plans: list[NodePlan]) -> dict[str, CheckOutcome]:
        out: dict[str, CheckOutcome] = {}
        for p in plans:
            res = gpufleet(["check", *ref.argv(), "--node", p.hostname, "--json"], timeout=timeout)
            out[p.hostname] = parse_check(res, p.hostname)
        return out

    return run


def parse_check(res: StepResult, hostname: str) -> CheckOutcome:
    """Read one node's `gpufleet check --json` answer into would-change tasks and changed files."""
    data = res.data
    if not isinstance(data, dict):
        return CheckOutcome(failed=f"check gave no JSON (exit {res.code}): {res.output[-300:]}")
    node = _node_entry(data, hostname)
    if node is None:
        return CheckOutcome(failed=f"check output has no entry for {hostname}")
    if node.get("failed") or node.get("unreachable") or node.get("status") in ("failed", "unreachable"):
        why = "; ".join(
            f"{f.get('task')}: {str(f.get('msg'))[:120]}" for f in node.get("failures") or [] if isinstance(f, dict)
        )
        return CheckOutcome(failed=str(node.get("error") or why or node.get("status") or "check failed"))
    tasks = [
        str(t if isinstance(t, str) else t.get("name", t))
        for t in node.get("changed_tasks", []) or node.get("would_change", [])
    ]
    files = [str(f if isinstance(f, str) else f.get("path") or f.get("dest") or f) for f in node.get("files", [])]
    for d in node.get("diffs", []):
        path = d.get("path") or d.get("dest") or (d.get("after_header") if isinstance(d, dict) else None)
        if path and str(path) not in files:
            files.append(str(path))
    reboot = node.get("reboot_required")
    return CheckOutcome(
        would_change=tuple(tasks),
        files=tuple(files),
        holds=tuple(str(h) for h in node.get("holds", [])),
        reboot_required=bool(reboot) if reboot is not None else None,
    )


def _node_entry(data: dict[str, Any], hostname: str) -> dict[str, Any] | None:
    nodes = data.get("nodes", data.get("hosts"))
    if isinstance(nodes, dict):
        entry = nodes.get(hostname)
        return entry if isinstance(entry, dict) else None
    if isinstance(nodes, list):
        for n in nodes:
            if isinstance(n, dict) and hostname in (n.get("hostname"), n.get("host"), n.get("node")):
                return n
    if data.get("hostname") == hostname:
        return data
    return None
