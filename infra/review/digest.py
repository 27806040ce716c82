"""Read `pulumi preview --json` output (Pulumi's PreviewDigest) into typed steps.

Format (pulumi/pulumi `sdk/go/common/display` PreviewDigest): `steps[]` with `op`, `urn`,
`oldState`/`newState` (apitype.ResourceV3: `type`, `inputs`, `outputs`, `parent`, …), `diffReasons`,
`replaceReasons`, `detailedDiff` (path → `{kind, inputDiff}`); `changeSummary` (op → count);
`diagnostics[]` (`urn`, `message`, `severity`). Secrets arrive as the string "[secret]" and unknown
values as Pulumi's unknown sentinel.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

UNKNOWN = "04da6b54-80e4-46f7-96ec-b56ff0331ba9"  # plugin.UnknownStringValue: "known after apply"

# What a URN's steps mean taken together: a replacement may show as `replace` or as the pair
# `create-replacement` / `delete-replaced` (with --show-replacement-steps).
_OP_RANK = {
    "same": 0, "read": 0, "refresh": 0, "discard": 0,
    "update": 1, "import": 1,
    "create": 2,
    "delete": 3, "discard-replaced": 3, "remove-pending-replace": 3,
    "replace": 4, "create-replacement": 4, "delete-replaced": 4, "read-replacement": 4,
    "import-replacement": 4,
}
_CANONICAL = {"create-replacement": "replace", "delete-replaced": "replace", "read-replacement": "replace",
              "import-replacement": "replace", "discard-replaced": "delete", "remove-pending-replace": "delete",
              "read": "same", "refresh": "same", "discard": "same", "import": "create"}


class DigestError(ValueError):
    """The input is not a `pulumi preview --json` document."""


@dataclass
class Step:
    """Everything the preview says about one resource (URN), merged over its steps."""

    urn: str
    op: str
    type: str
    name: str
    old_inputs: dict[str, Any] = field(default_factory=dict)
    new_inputs: dict[str, Any] = field(default_factory=dict)
    detailed_diff: dict[str, str] = field(default_factory=dict)
    diff_reasons: list[str] = field(default_factory=list)
    replace_reasons: list[str] = field(default_factory=list)

    @property
    def type_chain(self) -> list[str]:
        """Parent types then own type, from the URN (`gpufleet:site:Site$...$command:local:Command`)."""
        parts = self.urn.split("::")
        return parts[2].split("$") if len(parts) >= 4 else [self.type]

    def trigger(self, index: int, *, new: bool = True) -> Any:
        """`triggers[index]` of the new (or old) inputs, None when absent."""
        triggers = (self.new_inputs if new else self.old_inputs).get("triggers") or []
        return triggers[index] if isinstance(triggers, list) and len(triggers) > index else None


@dataclass
class Diagnostic:
    """A warning or error the preview printed."""

    severity: str
    message: str
    urn: str = ""


@dataclass
class Digest:
    """A parsed preview: steps by URN (in preview order), the engine's counts, diagnostics."""

    steps: list[Step]
    change_summary: dict[str, int]
    diagnostics: list[Diagnostic]


def _name(urn: str) -> str:
    return urn.rsplit("::", 1)[-1]


def parse(text: str) -> Digest:
    """Parse the JSON text of `pulumi preview --json`; DigestError says what is wrong."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DigestError(f"not JSON ({exc}); pass the output of `pulumi preview --json`") from None
    if not isinstance(data, dict) or not ({"steps", "changeSummary"} & data.keys()):
        raise DigestError("no `steps` or `changeSummary`: this is not `pulumi preview --json` output")
    merged: dict[str, Step] = {}
    for raw in data.get("steps") or []:
        if not isinstance(raw, dict) or "urn" not in raw or "op" not in raw:
            raise DigestError("a step without `urn`/`op`: this is not `pulumi preview --json` output")
        urn, op = str(raw["urn"]), str(raw["op"])
        old, new = raw.get("oldState") or {}, raw.get("newState") or {}
        step = merged.get(urn)
        if step is None:
            step = merged[urn] = Step(urn=urn, op=_CANONICAL.get(op, op),
                                      type=str(new.get("type") or old.get("type") or ""), name=_name(urn))
        elif _OP_RANK.get(op, 1) > _OP_RANK.get(step.op, 1):
            step.op = _CANONICAL.get(op, op)
        step.old_inputs = old.get("inputs") or step.old_inputs
        step.new_inputs = new.get("inputs") or step.new_inputs
        for path, d in (raw.get("detailedDiff") or {}).items():
            step.detailed_diff[path] = str((d or {}).get("kind", "update"))
        step.diff_reasons += [r for r in raw.get("diffReasons") or [] if r not in step.diff_reasons]
        step.replace_reasons += [r for r in raw.get("replaceReasons") or [] if r not in step.replace_reasons]
    diagnostics = [Diagnostic(str(d.get("severity", "info")), str(d.get("message", "")).strip(), str(d.get("urn", "")))
                   for d in data.get("diagnostics") or [] if isinstance(d, dict)]
    summary = {str(k): int(v) for k, v in (data.get("changeSummary") or {}).items()}
    return Digest(list(merged.values()), summary, diagnostics)
