"""vLLM's own flag definitions, read from the real wheel on PyPI without importing it (no torch).

`vllm serve` builds its parser in `vllm/entrypoints/common/cli_args.py` (`make_arg_parser`: the
positional `model_tag`, a few explicit flags, then `FrontendArgs.add_cli_args`, whose flags are the
dataclass fields as `--kebab-case`, and `AsyncEngineArgs.add_cli_args`) and
`vllm/engine/arg_utils.py` (`EngineArgs.add_cli_args`: explicit `add_argument("--flag", ...)` calls
whose kwargs come from the config dataclasses). Choices of literal-typed options are the `Literal`
aliases in `vllm/config/*.py` and the quantization package. This module parses those files with `ast`.

The wheel (336 MB) is downloaded once with pip into a cache and checked by sha256 (the hash PyPI
lists for the file); CI keeps the cache between runs or downloads it once per run.
"""

from __future__ import annotations

import ast
import hashlib
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

VERSION = "0.33.0"
WHEEL = f"vllm-{VERSION}-cp38-abi3-manylinux_2_28_x86_64.whl"
# sha256 of the file as PyPI serves it (pip verifies it against the index on download as well).
SHA256 = "4b6bdec4ab269990bf70d45a3c1e94c3760a27064513760193b26d6f0da883aa"
CACHE = Path(os.environ.get("GPUFLEET_VLLM_CACHE", Path.home() / ".cache" / "gpufleet" / "vllm"))

_SOURCES = (
    "vllm/engine/arg_utils.py",
    "vllm/entrypoints/common/cli_args.py",
    "vllm/entrypoints/cli/serve.py",
    "vllm/utils/argparse_utils.py",
    "vllm/config/model.py",
    "vllm/config/cache.py",
    "vllm/config/parallel.py",
    "vllm/model_executor/layers/quantization/__init__.py",
)


class Unavailable(RuntimeError):
    """The wheel is not cached and the registry could not be reached."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def wheel() -> Path:
    """The cached wheel; downloaded with pip when absent or not the expected bytes."""
    path = CACHE / WHEEL
    if path.is_file() and _sha256(path) == SHA256:
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    p = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--platform",
         "manylinux_2_28_x86_64", "--python-version", "3.11", f"vllm=={VERSION}", "-d", str(CACHE)],
        capture_output=True, text=True, timeout=1200, check=False,
    )
    if p.returncode != 0 or not path.is_file():
        raise Unavailable(f"pip download vllm=={VERSION} failed: {p.stderr.strip()[-400:]}")
    got = _sha256(path)
    if got != SHA256:
        raise AssertionError(f"{path}: sha256 {got}, expected {SHA256}")
    return path


@dataclass(frozen=True)
class ServeFlags:
    """What `vllm serve` accepts: option strings, positionals, and literal choices of some options."""

    options: frozenset[str]
    positionals: tuple[str, ...]
    choices: dict[str, frozenset[str]]
    model_rewrite: bool
    """argparse_utils rewrites a `--model` option into the positional (deprecated spelling)."""
    switches: frozenset[str] = frozenset()
    """Options declared with `action="store_true"`: given alone, never as `--flag=value`."""


def _literal(tree: ast.Module, name: str) -> frozenset[str]:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            sub = node.value
            assert isinstance(sub, ast.Subscript) and isinstance(sub.value, ast.Name) and sub.value.id == "Literal"
            elts = sub.slice.elts if isinstance(sub.slice, ast.Tuple) else [sub.slice]
            return frozenset(e.value for e in elts if isinstance(e, ast.Constant) and isinstance(e.value, str))
    raise AssertionError(f"no Literal alias {name}")


def _field_annotation(tree: ast.Module, cls: str, field: str) -> str:
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == cls:
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name) and item.target.id == field:
                    return ast.unparse(item.annotation)
    raise AssertionError(f"no field {cls}.{field}")


def _add_argument_calls(tree: ast.Module) -> list[ast.Call]:
    return [
        n for n in ast.walk(tree)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "add_argument"
    ]


def _kwargs_key(call: ast.Call) -> str:
    """`**model_kwargs["dtype"]` → `dtype` (the config field an option is generated from)."""
    for kw in call.keywords:
        if kw.arg is None and isinstance(kw.value, ast.Subscript) and isinstance(kw.value.slice, ast.Constant):
            return str(kw.value.slice.value)
    return ""


def serve_flags(wheel_path: Path) -> ServeFlags:
    """Parse the flag definitions of `vllm serve` out of the wheel."""
    with zipfile.ZipFile(wheel_path) as z:
        trees = {name: ast.parse(z.read(name).decode("utf-8"), name) for name in _SOURCES}
    options: set[str] = set()
    positionals: list[str] = []
    keys: dict[str, str] = {}
    switches: set[str] = set()
    for name in ("vllm/engine/arg_utils.py", "vllm/entrypoints/common/cli_args.py", "vllm/entrypoints/cli/serve.py"):
        for call in _add_argument_calls(trees[name]):
            strings = [a.value for a in call.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            for s in strings:
                if s.startswith("-"):
                    options.add(s)
                else:
                    positionals.append(s)
                keys.setdefault(s, _kwargs_key(call))
                if any(k.arg == "action" and isinstance(k.value, ast.Constant) and k.value.value == "store_true"
                       for k in call.keywords):
                    switches.add(s)
    # FrontendArgs.add_cli_args: every dataclass field of the frontend classes is `--field-name`.
    cli = trees["vllm/entrypoints/common/cli_args.py"]
    for node in ast.walk(cli):
        if isinstance(node, ast.ClassDef) and node.name in ("BaseFrontendArgs", "FrontendArgs"):
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    options.add("--" + item.target.id.replace("_", "-"))
    model_tree, cache_tree = trees["vllm/config/model.py"], trees["vllm/config/cache.py"]
    quant_tree = trees["vllm/model_executor/layers/quantization/__init__.py"]
    par_tree = trees["vllm/config/parallel.py"]
    # Each literal-typed option: the field it is generated from must be annotated with that alias.
    literal_options = {
        "--dtype": (model_tree, "ModelConfig", "ModelDType", model_tree),
        "--kv-cache-dtype": (cache_tree, "CacheConfig", "CacheDType", cache_tree),
        "--quantization": (model_tree, "ModelConfig", "QuantizationMethods", quant_tree),
        "--distributed-executor-backend": (par_tree, "ParallelConfig", "DistributedExecutorBackend", par_tree),
    }
    choices: dict[str, frozenset[str]] = {}
    for flag, (tree, cls, alias, alias_tree) in literal_options.items():
        assert flag in options, flag
        annotation = _field_annotation(tree, cls, keys[flag])
        assert alias in annotation, f"{flag}: {cls}.{keys[flag]} is {annotation}, not {alias}"
        choices[flag] = _literal(alias_tree, alias)
    rewrite = "--model" in ast.unparse(trees["vllm/utils/argparse_utils.py"])
    return ServeFlags(frozenset(options), tuple(positionals), choices, rewrite, frozenset(switches))
