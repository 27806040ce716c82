"""Read `pulumi preview --json` output (the engine's PreviewDigest) into typed steps — strictly.

Format (pulumi/pulumi `pkg/display/json.go`, filled by `pkg/backend/display/json.go`
`ShowPreviewDigest`): `steps[]` with `op`, `urn`, `provider`, `oldState`/`newState`
(`apitype.ResourceV3`: `type`, `inputs`, `outputs`, `parent`, `id`, …), `diffReasons`,
`replaceReasons`, `detailedDiff` (path → `{kind, inputDiff}`, null when the step has none);
`changeSummary` (op → count, written only when the engine finished); `diagnostics[]` (`urn`,
`prefix`, `message` — the prefix is already inside the message —, `severity`); `duration`, `config`,
`maybeCorrupt`. Secrets arrive as "[secret]", unknown values as the unknown sentinel.

Every document is untrusted: anything that is not this shape is a `DigestError` (one line), never a
traceback. Keys this module does not know are ignored, so a newer engine's extra fields still parse.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

UNKNOWN = "04da6b54-80e4-46f7-96ec-b56ff0331ba9"  # plugin.UnknownStringValue: "known after apply"
SECRET = "[secret]"  # what ShowPreviewDigest prints for a secret (massagePropertyValue)
# apitype.SecretV1 as state serialises it: {SigKey: SecretSig, "ciphertext"|"plaintext": …}.
SIG_KEY = "4dabf18193072939515e22adb298388d"
SECRET_SIG = "1b47061264138c4ac30d75fd1eb44270"
MAX_BYTES = 64 * 1024 * 1024  # a 5,000-node preview is ~100 MB only with --show-sames; 64 MiB is plenty
MAX_DEPTH = 64  # nesting deeper than any state we register; deeper input is refused, not recursed

# deploy.StepOp values (pkg/resource/deploy/step.go).
OPS = frozenset({
    "same", "create", "update", "delete", "replace", "create-replacement", "delete-replaced", "read",
    "read-replacement", "refresh", "discard", "discard-replaced", "remove-pending-replace", "import",
    "import-replacement", "diff", "extend-parameterize",
})
# What a URN's steps mean taken together (with --show-replacement-steps a replacement also shows
# as create-replacement / delete-replaced next to its logical `replace`).
_CANONICAL = {"create-replacement": "replace", "delete-replaced": "replace", "read-replacement": "replace",
              "import-replacement": "replace", "discard-replaced": "delete", "remove-pending-replace": "delete",
              "read": "same", "refresh": "same", "discard": "same", "diff": "same",
              "extend-parameterize": "same", "import": "create"}
_RANK = {"same": 0, "update": 1, "create": 2, "delete": 3, "replace": 4}
DIFF_KINDS = frozenset({"add", "add-replace", "delete", "delete-replace", "update", "update-replace"})
SEVERITIES = frozenset({"debug", "info", "info#err", "warning", "error"})
# A type token: package:module:member (module may hold `/`, e.g. aws:s3/bucket:Bucket).
_TYPE = re.compile(r"[A-Za-z0-9_.\-]+:[A-Za-z0-9_.\-/]*:[A-Za-z0-9_.\-]+")
# ANSI escapes (CSI, OSC, two-byte) and Pulumi's raw colour directives `<{%fg 3%}>`.
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-Z\\-_]|<\{%[^%]*%\}>")


class DigestError(ValueError):
    """The input is not a `pulumi preview --json` document."""


@dataclass(frozen=True)
class Urn:
    """`urn:pulumi:<stack>::<project>::<parent types $ … $ type>::<name>`."""

    stack: str
    project: str
    types: tuple[str, ...]
    name: str

    @property
    def type(self) -> str:
        """The resource's own type token."""
        return self.types[-1]


def parse_urn(text: str) -> Urn:
    """Split a URN; DigestError when it is not one."""
    if not text.startswith("urn:pulumi:"):
        raise DigestError(f"{_clip(text)!r} is not a URN (urn:pulumi:<stack>::<project>::<type>::<name>)")
    parts = text.removeprefix("urn:pulumi:").split("::", 3)
    if len(parts) != 4 or not all(parts):
        raise DigestError(f"{_clip(text)!r} is not a URN (urn:pulumi:<stack>::<project>::<type>::<name>)")
    types = tuple(parts[2].split("$"))
    if not all(_TYPE.fullmatch(t) for t in types):
        raise DigestError(f"{_clip(text)!r} is not a URN: bad type token in {_clip(parts[2])!r}")
    return Urn(parts[0], parts[1], types, parts[3])


@dataclass
class State:
    """The parts of an `apitype.ResourceV3` the review reads (secrets already masked)."""

    type: str
    inputs: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)
    parent: Urn | None = None
    id: str = ""
    custom: bool = False


@dataclass
class Step:
    """Everything the preview says about one resource (URN), merged over its steps."""

    urn: Urn
    op: str
    ops: list[str]
    provider: str = ""
    old: State | None = None
    new: State | None = None
    detailed_diff: dict[str, str] | None = None
    diff_reasons: list[str] = field(default_factory=list)
    replace_reasons: list[str] = field(default_factory=list)

    @property
    def type(self) -> str:
        """The resource's type token."""
        return self.urn.type

    @property
    def name(self) -> str:
        """The resource's name (last URN part)."""
        return self.urn.name

    @property
    def parent(self) -> Urn | None:
        """Parent URN from the new state, else the old one."""
        for s in (self.new, self.old):
            if s is not None and s.parent is not None:
                return s.parent
        return None


@dataclass
class Diagnostic:
    """A message the preview printed, prefix and colours removed."""

    severity: str
    message: str
    urn: str = ""


@dataclass
class Digest:
    """A parsed preview."""

    steps: list[Step]
    change_summary: dict[str, int] | None  # None: the engine did not finish (no summary event)
    diagnostics: list[Diagnostic]
    maybe_corrupt: bool = False

    @property
    def complete(self) -> bool:
        """The engine reached its summary: every step it planned is in `steps`."""
        return self.change_summary is not None

    @property
    def errors(self) -> list[Diagnostic]:
        """Error diagnostics: the preview failed."""
        return [d for d in self.diagnostics if d.severity == "error"]


def _clip(text: str, n: int = 80) -> str:
    return text if len(text) <= n else text[:n] + "…"


def _where(path: str) -> str:
    return f"`{path}`"


def _depth_ok(value: Any, depth: int = 0) -> bool:
    # Iterative enough for MAX_DEPTH levels; the JSON decoder itself bounds recursion.
    if depth > MAX_DEPTH:
        return False
    if isinstance(value, dict):
        return all(_depth_ok(v, depth + 1) for v in value.values())
    if isinstance(value, list):
        return all(_depth_ok(v, depth + 1) for v in value)
    return True


def mask_secrets(value: Any) -> Any:
    """A copy with every Pulumi secret object replaced by "[secret]".

    Conservative on purpose: an object that carries the signature key (whatever its value) or a
    `plaintext`/`ciphertext` field is treated as a secret, so a damaged or hand-edited envelope
    (signature missing or changed) still never reaches the review. Our own inputs have no such keys.
    """
    if isinstance(value, dict):
        if SIG_KEY in value or "plaintext" in value or "ciphertext" in value:
            return SECRET
        return {k: mask_secrets(v) for k, v in value.items()}
    if isinstance(value, list):
        return [mask_secrets(v) for v in value]
    return value


def clean_message(message: str, severity: str, prefix: str = "") -> str:
    """A diagnostic's text without ANSI/colour codes and without its `error: `/`warning: ` prefix."""
    text = _ANSI.sub("", prefix + message)
    for p in (prefix.strip(), f"{severity}:", "error:", "warning:", "info:", "debug:"):
        p = _ANSI.sub("", p).strip()
        while p and text.lstrip().startswith(p):
            text = text.lstrip()[len(p):]
    return text.strip()


def _opt(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], path: str) -> Any:
    value = obj.get(key)
    if value is not None and (not isinstance(value, kind) or (isinstance(value, bool) and kind is int)):
        name = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise DigestError(f"{_where(f'{path}.{key}')} must be {name}, not {type(value).__name__}")
    return value


def _str_list(obj: dict[str, Any], key: str, path: str) -> list[str]:
    value = _opt(obj, key, list, path) or []
    if not all(isinstance(v, str) for v in value):
        raise DigestError(f"{_where(f'{path}.{key}')} must be a list of strings")
    return list(value)


def _state(raw: Any, path: str, urn: Urn) -> State | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise DigestError(f"{_where(path)} must be an object (apitype.ResourceV3), not {type(raw).__name__}")
    rtype = _opt(raw, "type", str, path)
    if rtype is not None and rtype != urn.type:
        raise DigestError(f"{_where(f'{path}.type')} {_clip(rtype)!r} does not match its URN's type {urn.type!r}")
    inputs = _opt(raw, "inputs", dict, path) or {}
    outputs = _opt(raw, "outputs", dict, path) or {}
    parent = _opt(raw, "parent", str, path)
    try:
        parent_urn = parse_urn(parent) if parent else None
    except DigestError as exc:
        raise DigestError(f"{_where(f'{path}.parent')}: {exc}") from None
    rid = _opt(raw, "id", str, path) or ""
    custom = _opt(raw, "custom", bool, path) or False
    _opt(raw, "urn", str, path)
    # A whole property map that is one secret masks to a string: nothing in it can be read.
    masked_in, masked_out = mask_secrets(inputs), mask_secrets(outputs)
    return State(urn.type, masked_in if isinstance(masked_in, dict) else {},
                 masked_out if isinstance(masked_out, dict) else {}, parent_urn, rid, custom)


def _detailed(raw: Any, path: str) -> dict[str, str] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise DigestError(f"{_where(path)} must be an object or null, not {type(raw).__name__}")
    out = {}
    for k, v in raw.items():
        if not isinstance(v, dict):
            raise DigestError(f"{_where(f'{path}[{_clip(k)!r}]')} must be an object {{kind, inputDiff}}")
        kind = v.get("kind")
        if not isinstance(kind, str) or kind not in DIFF_KINDS:
            raise DigestError(f"{_where(f'{path}[{_clip(k)!r}].kind')} {_clip(str(kind))!r} is not one of "
                              + ", ".join(sorted(DIFF_KINDS)))
        _opt(v, "inputDiff", bool, f"{path}[{k!r}]")
        out[k] = kind
    return out


def _step(raw: Any, i: int) -> Step:
    path = f"steps[{i}]"
    if not isinstance(raw, dict):
        raise DigestError(f"{_where(path)} must be an object, not {type(raw).__name__}")
    op, urn_text = raw.get("op"), raw.get("urn")
    if not isinstance(op, str) or op not in OPS:
        raise DigestError(f"{_where(f'{path}.op')} {_clip(str(op))!r} is not a Pulumi step operation")
    if not isinstance(urn_text, str):
        raise DigestError(f"{_where(f'{path}.urn')} must be a URN string")
    urn = parse_urn(urn_text)
    provider = _opt(raw, "provider", str, path) or ""
    return Step(
        urn=urn, op=_CANONICAL.get(op, op), ops=[op], provider=provider,
        old=_state(raw.get("oldState"), f"{path}.oldState", urn),
        new=_state(raw.get("newState"), f"{path}.newState", urn),
        detailed_diff=_detailed(raw.get("detailedDiff"), f"{path}.detailedDiff"),
        diff_reasons=_str_list(raw, "diffReasons", path),
        replace_reasons=_str_list(raw, "replaceReasons", path),
    )


def _merge(into: Step, step: Step) -> None:
    into.ops.append(step.ops[0])
    if _RANK[step.op] > _RANK[into.op]:
        into.op = step.op
    into.old = into.old or step.old
    into.new = step.new or into.new
    if step.detailed_diff is not None:
        into.detailed_diff = {**(into.detailed_diff or {}), **step.detailed_diff}
    into.diff_reasons += [r for r in step.diff_reasons if r not in into.diff_reasons]
    into.replace_reasons += [r for r in step.replace_reasons if r not in into.replace_reasons]
    into.provider = into.provider or step.provider


def _diagnostic(raw: Any, i: int) -> Diagnostic:
    path = f"diagnostics[{i}]"
    if not isinstance(raw, dict):
        raise DigestError(f"{_where(path)} must be an object, not {type(raw).__name__}")
    severity = raw.get("severity", "info")
    if not isinstance(severity, str) or severity not in SEVERITIES:
        raise DigestError(f"{_where(f'{path}.severity')} {_clip(str(severity))!r} is not one of "
                          + ", ".join(sorted(SEVERITIES)))
    message = _opt(raw, "message", str, path) or ""
    prefix = _opt(raw, "prefix", str, path) or ""
    urn = _opt(raw, "urn", str, path) or ""
    return Diagnostic(severity, clean_message(message, severity, prefix), urn)


def _summary(raw: Any) -> dict[str, int] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise DigestError(f"`changeSummary` must be an object of counts, not {type(raw).__name__}")
    for k, v in raw.items():
        if k not in OPS or not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise DigestError(f"`changeSummary[{_clip(k)!r}]` must be a step operation with a count ≥ 0")
    return dict(raw)


def parse(text: str | bytes) -> Digest:
    """Parse the output of `pulumi preview --json`; DigestError says in one line what is wrong."""
    if len(text) > MAX_BYTES:
        raise DigestError(f"input is larger than {MAX_BYTES // (1024 * 1024)} MiB; not a preview digest")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DigestError(f"not UTF-8 (byte {exc.start}); pass the output of `pulumi preview --json`") from None
    try:
        data = json.loads(text)
    except RecursionError:
        raise DigestError(f"JSON nested deeper than {MAX_DEPTH} levels; not a preview digest") from None
    except ValueError as exc:  # JSONDecodeError, and over-long integer literals
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DigestError(f"not JSON ({_clip(msg)}); pass the output of `pulumi preview --json`") from None
    if not isinstance(data, dict):
        raise DigestError(f"the document is a JSON {type(data).__name__}, not a preview digest object")
    if not ({"steps", "changeSummary", "diagnostics"} & data.keys()):
        raise DigestError("no `steps`, `changeSummary` or `diagnostics`: this is not `pulumi preview --json` output")
    if not _depth_ok(data):
        raise DigestError(f"JSON nested deeper than {MAX_DEPTH} levels; not a preview digest")
    raw_steps = data.get("steps")
    if raw_steps is not None and not isinstance(raw_steps, list):
        raise DigestError(f"`steps` must be a list, not {type(raw_steps).__name__}")
    raw_diags = data.get("diagnostics")
    if raw_diags is not None and not isinstance(raw_diags, list):
        raise DigestError(f"`diagnostics` must be a list, not {type(raw_diags).__name__}")
    for key, kind in (("config", dict), ("duration", int), ("maybeCorrupt", bool)):
        _opt(data, key, kind, "$")
    merged: dict[str, Step] = {}
    for i, raw in enumerate(raw_steps or []):
        step = _step(raw, i)
        key = "::".join((step.urn.stack, step.urn.project, "$".join(step.urn.types), step.urn.name))
        if key in merged:
            _merge(merged[key], step)
        else:
            merged[key] = step
    diagnostics = [_diagnostic(d, i) for i, d in enumerate(raw_diags or [])]
    return Digest(list(merged.values()), _summary(data.get("changeSummary")), diagnostics,
                  bool(data.get("maybeCorrupt")))
