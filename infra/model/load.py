"""Find and read stack files, and turn their `gpufleet:site` object into a validated `Site`."""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from infra.model.rules import Problem, check
from infra.model.site import Site

CONFIG_KEY = "gpufleet:site"
PROJECT_ENV = "GPUFLEET_PROJECT_DIR"


class SiteError(Exception):
    """A stack file that cannot be used; carries every problem found, not just the first."""

    def __init__(self, source: str, problems: list[Problem]) -> None:
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s):\n{lines}")


def project_dir(start: Path | None = None) -> Path:
    """The directory holding Pulumi.yaml (env GPUFLEET_PROJECT_DIR, else upward from cwd, else the package's)."""
    if env := os.environ.get(PROJECT_ENV):
        return Path(env).resolve()
    for d in [(start or Path.cwd()).resolve(), *(start or Path.cwd()).resolve().parents]:
        if (d / "Pulumi.yaml").is_file() and (d / "infra").is_dir():
            return d
    return Path(__file__).resolve().parents[2]


def stack_path(stack: str, root: Path | None = None) -> Path:
    """`stacks/Pulumi.<stack>.yaml` of the project."""
    return (root or project_dir()) / "stacks" / f"Pulumi.{stack}.yaml"


MAX_STACK_BYTES = 4 * 1024 * 1024
"""Largest stack file read. A 1000-node site is about 400 KiB; anything far bigger is a mistake or an attack."""

MAX_DEPTH = 32
"""Deepest nesting of mappings and sequences. The site model is 8 levels deep; the composer recurses."""

_MERGE_TAG = "tag:yaml.org,2002:merge"
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_.:-]+")


class _Refused(Exception):
    """A YAML construct the stack loader does not accept, with where it is."""

    def __init__(self, path: str, message: str, fix: str) -> None:
        super().__init__(message)
        self.problem = Problem(path, message, fix)


class _StackLoader(yaml.SafeLoader):
    """SafeLoader that refuses anchors, aliases and deep nesting while composing.

    Anchors and aliases are refused because Pulumi rewrites the file on any `pulumi config set` and
    expands them (pulumi/pulumi#6480), so what a reviewer approved is not what the next commit holds;
    refusing them also rules out alias bombs ("billion laughs").
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        event = self.peek_event()  # type: ignore[no-untyped-call]
        line = event.start_mark.line + 1 if event.start_mark else 0
        if isinstance(event, yaml.AliasEvent):
            raise _Refused(
                f"(line {line})",
                f"alias *{event.anchor} is not allowed",
                "write the values out in full: Pulumi expands anchors and aliases when it rewrites the file "
                "(pulumi/pulumi#6480)",
            )
        anchor = getattr(event, "anchor", None)
        if anchor is not None:
            raise _Refused(
                f"(line {line})",
                f"anchor &{anchor} is not allowed",
                "remove the anchor and write repeated values out in full: Pulumi expands anchors and aliases "
                "when it rewrites the file (pulumi/pulumi#6480)",
            )
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Refused(
                    f"(line {line})",
                    f"nesting deeper than {MAX_DEPTH} levels",
                    "a stack file is a few levels deep; fix the brackets or indentation",
                )
            node: yaml.Node | None = super().compose_node(parent, index)
            return node
        finally:
            self._depth -= 1


def _key_text(key: object) -> str:
    return key if isinstance(key, str) else repr(key)


def _join(path: str, key: object) -> str:
    """`path.key`, or `path["…"]` JSON-quoted for a key that is not a plain name (no raw control characters)."""
    if isinstance(key, str) and _PLAIN_KEY.fullmatch(key):
        return f"{path}.{key}" if path else key
    return f"{path}[{json.dumps(_key_text(key))}]"


def _check_tree(loader: _StackLoader, node: yaml.Node, path: str) -> Iterator[Problem]:
    """Duplicate keys, merge keys and non-scalar keys anywhere in the composed tree (iterative: no recursion)."""
    stack: list[tuple[yaml.Node, str]] = [(node, path)]
    while stack:
        current, where = stack.pop()
        if isinstance(current, yaml.SequenceNode):
            stack.extend((child, f"{where}[{i}]") for i, child in enumerate(current.value))
            continue
        if not isinstance(current, yaml.MappingNode):
            continue
        seen: dict[object, int] = {}
        for key_node, value_node in current.value:
            line = key_node.start_mark.line + 1
            if key_node.tag == _MERGE_TAG:
                yield Problem(
                    f"{where or '(root)'} (line {line})",
                    "merge key '<<' is not allowed",
                    "write the merged keys out in full: Pulumi expands merges when it rewrites the file "
                    "(pulumi/pulumi#6480)",
                )
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                yield Problem(
                    f"{where or '(root)'} (line {line})",
                    "a mapping key is itself a list or mapping",
                    "use a plain name as the key",
                )
                continue
            key = loader.construct_object(key_node)
            if key in seen:
                yield Problem(
                    _join(where, key),
                    f"key {_key_text(key)!r} appears twice, on line {seen[key]} and line {line} "
                    "(YAML keeps the last one, a reviewer reads the first)",
                    "keep one of them",
                )
            else:
                seen[key] = line
            stack.append((value_node, _join(where, key)))


def _describe(value: object) -> str:
    if value is None:
        return "empty"
    return {list: "a list", str: "a text", int: "a number", float: "a number", bool: "a boolean"}.get(
        type(value), f"a {type(value).__name__}"
    )


def parse_stack_text(text: str, source: str) -> Any:
    """Parse a stack file's text: one YAML document, no anchors, aliases, merge or duplicate keys.

    Raises:
        SiteError: the text is not such a document, with every problem found.

    """
    try:
        loader = _StackLoader(text)  # the reader checks the whole text for forbidden characters here
    except yaml.YAMLError as exc:
        raise _yaml_error(source, text, exc) from None
    try:
        node = loader.get_single_node()
        if node is None:
            raise SiteError(source, [Problem("(file)", "the file is empty", "write the stack as `config: {...}`")])
        problems = list(_check_tree(loader, node, ""))
        if problems:
            raise SiteError(source, problems)
        return loader.construct_document(node)
    except _Refused as exc:
        raise SiteError(source, [exc.problem]) from None
    except yaml.YAMLError as exc:
        raise _yaml_error(source, text, exc) from None
    finally:
        loader.dispose()


def _yaml_error(source: str, text: str, exc: yaml.YAMLError) -> SiteError:
    """A PyYAML error as one problem on one line, with the line number in the path."""
    if isinstance(exc, yaml.MarkedYAMLError):
        where = f"(file) (line {exc.problem_mark.line + 1})" if exc.problem_mark else "(file)"
        what = " ".join(str(x) for x in (exc.context, exc.problem) if x)
    elif isinstance(exc, yaml.reader.ReaderError):
        where = f"(file) (line {text.count(chr(10), 0, exc.position) + 1})"
        char = exc.character
        what = f"character U+{char:04X} is not allowed in YAML" if isinstance(char, int) else exc.reason
    else:
        where, what = "(file)", str(exc)
    message = " ".join(f"not valid YAML: {what}".split())
    return SiteError(source, [Problem(where, message, "fix the YAML syntax (write control characters as escapes)")])


def read_stack_text(path: Path) -> str:
    """A stack file's text: a regular UTF-8 text file of at most MAX_STACK_BYTES.

    Raises:
        SiteError: missing, a directory or other non-file, unreadable, too large, binary or not UTF-8.

    """
    source = str(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise SiteError(
            source,
            [Problem("(file)", "stack file not found", "create it, or pass --stack with an existing stack name")],
        ) from None
    except OSError as exc:
        raise SiteError(source, [Problem("(file)", f"cannot read it: {exc.strerror}", "check the path")]) from None
    if stat.S_ISDIR(st.st_mode):
        raise SiteError(source, [Problem("(file)", "is a directory", "give the path of a stack file")])
    if not stat.S_ISREG(st.st_mode):
        # A FIFO or device would block or never end; only regular files are read.
        raise SiteError(source, [Problem("(file)", "is not a regular file", "give the path of a stack file")])
    if st.st_size > MAX_STACK_BYTES:
        raise SiteError(
            source,
            [
                Problem(
                    "(file)",
                    f"is {st.st_size} bytes; stack files are at most {MAX_STACK_BYTES} bytes",
                    "check that this is the stack file you mean",
                )
            ],
        )
    try:
        with path.open("rb") as f:
            data = f.read(MAX_STACK_BYTES + 1)
    except OSError as exc:
        raise SiteError(source, [Problem("(file)", f"cannot read it: {exc.strerror}", "check the path")]) from None
    if len(data) > MAX_STACK_BYTES:
        raise SiteError(
            source,
            [Problem("(file)", f"is larger than {MAX_STACK_BYTES} bytes", "check that this is the stack file")],
        )
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise SiteError(source, [Problem("(file)", "is UTF-16 or UTF-32 text, not UTF-8", "save the file as UTF-8")])
    if b"\x00" in data:
        raise SiteError(
            source, [Problem("(file)", "contains NUL bytes: a binary file", "give the path of a YAML stack file")]
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SiteError(
            source,
            [
                Problem(
                    "(file)",
                    f"is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})",
                    "save the file as UTF-8",
                )
            ],
        ) from None


def read_stack_config(path: Path) -> dict[str, Any]:
    """The `config:` mapping of a stack file.

    Raises:
        SiteError: the file cannot be read or parsed, or is not a mapping with a `config:` mapping.

    """
    data = parse_stack_text(read_stack_text(path), str(path))
    if not isinstance(data, dict):
        raise SiteError(
            str(path),
            [Problem("(root)", f"the file is {_describe(data)}, not a mapping", "write the stack as `config: {...}`")],
        )
    if "config" not in data:
        return {}
    config = data["config"]
    if not isinstance(config, dict):
        raise SiteError(
            str(path),
            [Problem("config", f"is {_describe(config)}, not a mapping", "write config: as a YAML mapping of keys")],
        )
    return config


def _loc_to_path(loc: tuple[int | str, ...]) -> str:
    r"""A pydantic error location as a config path (`nodes[0].bmc.endpoint`).

    Dict keys come from the stack file: one that is not a plain name is shown JSON-quoted
    (`profiles["a\nb"]`), so a message never carries a raw newline or control character.
    """
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part == "[key]":
            continue  # the error is about the key itself, which is already the last part
        elif part.startswith(("function-after", "function-")) or part in ("str", "int"):
            continue
        elif not _PLAIN_KEY.fullmatch(part):
            out += f"[{json.dumps(part)}]"
        else:
            out += f".{part}" if out else part
    return out or "(root)"


_FIXES = {
    "extra_forbidden": "remove the key or fix its spelling (see `gpufleet schema`)",
    "missing": "add the field",
    "enum": "use one of the allowed values",
    "literal_error": "use one of the allowed values",
    "value_error": "see the message",
    "string_type": "write it as text; quote it if YAML reads it as a number or date (version: '12.8')",
}


def _fix(error: ErrorDetails) -> str:
    ctx = error.get("ctx") or {}
    if error["type"] == "grammar" and isinstance(ctx.get("fix"), str):
        return str(ctx["fix"])
    return _FIXES.get(error["type"], "correct the value")


def _message(error: ErrorDetails) -> str:
    message = error["msg"].removeprefix("Value error, ")
    if error["loc"] and error["loc"][-1] == "[key]":
        return f"key {message}"
    return message


def parse_site(raw: Any, source: str = "gpufleet:site") -> Site:
    """Validate a raw `gpufleet:site` object: field types first, then every cross-field rule."""
    try:
        site = Site.model_validate(raw)
    except ValidationError as exc:
        problems = [
            Problem(
                _loc_to_path(e["loc"]),
                _message(e),
                _fix(e),
            )
            for e in exc.errors(include_url=False)
        ]
        raise SiteError(source, problems) from None
    problems = check(site)
    if problems:
        raise SiteError(source, problems)
    return site


def load_site(stack: str | None = None, path: Path | None = None) -> Site:
    """Load and validate the site of a stack (by name, or by stack file path)."""
    if path is None:
        if stack is None:
            raise ValueError("give a stack name or a stack file path")
        path = stack_path(stack)
    config = read_stack_config(path)
    if CONFIG_KEY not in config:
        raise SiteError(
            str(path), [Problem(f"config.{CONFIG_KEY}", "missing", f"put the site object under config: {CONFIG_KEY}:")]
        )
    raw = config[CONFIG_KEY]
    if not isinstance(raw, dict):
        raise SiteError(
            str(path),
            [
                Problem(
                    f"config.{CONFIG_KEY}",
                    f"is {_describe(raw)}, not a mapping",
                    "write the site as a mapping (name:, profiles:, segments:, ...)",
                )
            ],
        )
    return parse_site(raw, source=f"{path} ({CONFIG_KEY})")
