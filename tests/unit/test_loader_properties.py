"""Property tests of the stack loader and validator (issue 16): any input ends in a Site or a SiteError.

Thousands of generated stack files — random bytes, YAML-ish text, random JSON-like data under
`config: gpufleet:site:`, and mutations of the lab stack's site (a leaf replaced by a random value or
another leaf's value, keys deleted, unknown keys inserted) — go through the real loader and every
cross-field rule. Any other exception is a traceback a user would see, and fails the test.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from infra.model.load import SiteError, load_site, parse_site
from infra.model.site import Site

# Real emulators or thousands of generated inputs: run by scripts/test.sh, not in the fast unit loop.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
LAB = yaml.safe_load((ROOT / "stacks/Pulumi.lab.yaml").read_text(encoding="utf-8"))
LAB_SITE: dict[str, Any] = LAB["config"]["gpufleet:site"]
CORPUS = yaml.safe_load((ROOT / "tests/fixtures/injection/corpus.yaml").read_text(encoding="utf-8"))


def examples(n: int) -> settings:
    """`n` examples, no deadline, no example database (nothing is written into the checkout).

    About 4000 examples in all; the whole file runs in well under 20 s on one core.
    """
    return settings(max_examples=n, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


Step = str | int


def _leaves(node: Any, path: tuple[Step, ...] = ()) -> Iterator[tuple[tuple[Step, ...], Any]]:
    """Every (path, value) of a nested dict/list, containers included (so a whole subtree can be replaced)."""
    yield path, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _leaves(v, (*path, i))


LAB_PATHS = [p for p, _ in _leaves(LAB_SITE) if p]
LAB_VALUES = [v for p, v in _leaves(LAB_SITE) if p]
LAB_MAPPINGS = [p for p, v in _leaves(LAB_SITE) if isinstance(v, dict)]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**64), max_value=2**64),
    st.sampled_from([0, -1, 1, 2, 7, 8, 65535, 65536, 4094, 4095]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.sampled_from([e["value"] for e in CORPUS]),
    st.sampled_from([v for v in LAB_VALUES if not isinstance(v, dict | list)]),
)
json_like = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)


def _set(root: Any, path: tuple[Step, ...], value: Any) -> None:
    for step in path[:-1]:
        root = root[step]
    root[path[-1]] = value


def _delete(root: Any, path: tuple[Step, ...]) -> None:
    for step in path[:-1]:
        root = root[step]
    del root[path[-1]]


def _load_text(text: str | bytes) -> Site | None:
    """Write a stack file and load it the way every command does; a SiteError is a clean rejection."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "Pulumi.prop.yaml"
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text, encoding="utf-8", errors="surrogatepass")
        return _outcome(lambda: load_site(path=path))


def _parse(raw: Any) -> Site | None:
    return _outcome(lambda: parse_site(raw))


def _outcome(run: Callable[[], Site]) -> Site | None:
    """A Site, or None for a SiteError with complete problems; any other exception propagates and fails."""
    try:
        site = run()
    except SiteError as exc:
        assert exc.problems and all(p.path and p.message and p.fix for p in exc.problems)
        event("rejected")
        return None
    event("valid site")
    return site


@examples(1000)
@given(st.binary(max_size=2048))
def test_random_bytes(data: bytes) -> None:
    """Arbitrary bytes as a stack file: a Site or a SiteError, never anything else."""
    _load_text(data)


yamlish = st.text(
    alphabet=st.sampled_from(list("config:gpufleet-site_ab01 \n\t-[]{},&*!|>'\"%@`#?<=~.\\\x00\u202e")), max_size=300
)


@examples(1000)
@given(st.sampled_from(["", "config:\n  gpufleet:site:\n    ", "config:\n  gpufleet:site: ", "config: "]), yamlish)
def test_random_yamlish_text(prefix: str, text: str) -> None:
    """Text made of YAML's syntax characters, alone or under `config: gpufleet:site:`."""
    _load_text(prefix + text)


@examples(500)
@given(json_like)
def test_random_structures_under_site(value: Any) -> None:
    """Random JSON-like data as the site, through a real file (dumped by PyYAML) and directly."""
    _load_text(yaml.safe_dump({"config": {"gpufleet:site": value}}, allow_unicode=True))
    _parse(value)


@examples(800)
@given(st.data())
def test_lab_site_mutations(data: st.DataObject) -> None:
    """The lab site with 1-3 mutations: a leaf or subtree replaced, a key deleted, an unknown key inserted."""
    site = copy.deepcopy(LAB_SITE)
    for _ in range(data.draw(st.integers(min_value=1, max_value=3))):
        kind = data.draw(st.sampled_from(["replace", "swap", "delete", "insert"]))
        paths = [p for p, _ in _leaves(site) if p]
        if kind == "insert":
            mappings = [p for p, v in _leaves(site) if isinstance(v, dict)]
            where = data.draw(st.sampled_from(mappings))
            target = site
            for step in where:
                target = target[step]
            target[data.draw(st.text(max_size=12))] = data.draw(json_like)
        elif not paths:
            break
        elif kind == "delete":
            _delete(site, data.draw(st.sampled_from(paths)))
        else:
            value = data.draw(json_like if kind == "replace" else st.sampled_from(LAB_VALUES))
            _set(site, data.draw(st.sampled_from(paths)), copy.deepcopy(value))
    _parse(site)


@examples(100)
@given(st.data())
def test_lab_site_mutations_through_files(data: st.DataObject) -> None:
    """A few mutated lab sites go through the file loader too (dumped as YAML, as a reviewer would see them)."""
    site = copy.deepcopy(LAB_SITE)
    _set(site, data.draw(st.sampled_from(LAB_PATHS)), data.draw(json_like))
    stack = copy.deepcopy(LAB)
    stack["config"]["gpufleet:site"] = site
    _load_text(yaml.safe_dump(stack, allow_unicode=True))


BASES = [
    yaml.safe_load(path.read_text(encoding="utf-8"))["config"]["gpufleet:site"]
    for path in sorted((ROOT / "stacks").glob("Pulumi.*.yaml"))
]
BASE_STRINGS = sorted({v for base in BASES for _, v in _leaves(base) if isinstance(v, str)})


@st.composite
def same_type(draw: st.DrawFn, old: Any) -> Any:
    """A value of the same type as `old`, mostly one the model accepts, so the cross-field rules run."""
    if isinstance(old, bool):
        return draw(st.booleans())
    if isinstance(old, int):
        return draw(st.one_of(st.integers(min_value=-2, max_value=70000), st.sampled_from([old * 2, old + 1, 0])))
    if isinstance(old, float):
        return draw(st.floats(min_value=-1, max_value=2))
    if isinstance(old, str):
        return draw(st.sampled_from(BASE_STRINGS))
    if isinstance(old, list) and old:
        items = list(old)
        action = draw(st.sampled_from(["duplicate", "drop", "reverse"]))
        if action == "duplicate":
            items.append(copy.deepcopy(draw(st.sampled_from(items))))
        elif action == "drop":
            items.pop(draw(st.integers(min_value=0, max_value=len(items) - 1)))
        else:
            items.reverse()
        return items
    return old


@examples(1200)
@given(st.data())
def test_type_preserving_mutations_reach_the_rules(data: st.DataObject) -> None:
    """Every example stack with 1-4 well-typed changes (values swapped, list items duplicated or dropped):
    the sites mostly pass the field grammars, so every cross-field rule meets odd but typed sites."""
    site = copy.deepcopy(data.draw(st.sampled_from(BASES)))
    for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
        paths = [p for p, _ in _leaves(site) if p]
        path = data.draw(st.sampled_from(paths))
        target = site
        for step in path:
            target = target[step]
        _set(site, path, data.draw(same_type(target)))
    try:
        Site.model_validate(site)
        event("passes the field grammars")
    except ValidationError:
        pass
    _parse(site)


def test_unmutated_bases_are_sites() -> None:
    """The bases of the mutations are valid, so the mutation tests start from accepted sites."""
    for base in BASES:
        assert isinstance(parse_site(copy.deepcopy(base)), Site)
