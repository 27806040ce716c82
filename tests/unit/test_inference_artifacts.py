"""The tiny GGUF model matches its catalogue entry and is byte-for-byte reproducible; artifact names and layout."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from infra.inference import publish, tinymodel, wheel
from infra.model.catalogue import resolve
from infra.model.load import load_site

gguf = pytest.importorskip("gguf", reason="the `lab` extra (gguf) writes the tiny model")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tinymodel.ensure_tiny_model(tmp_path_factory.mktemp("models"))


def _field(reader: object, key: str) -> object:
    f = reader.fields[key]  # type: ignore[attr-defined]
    return f.contents()


def test_tiny_model_matches_catalogue(model: Path) -> None:
    """GGUF metadata and tensor sizes equal the catalogue's gpufleet-tiny-lab (layers, heads, vocab, context, size)."""
    entry = resolve().models["gpufleet-tiny-lab"]
    r = gguf.GGUFReader(model)
    assert _field(r, "general.architecture") == "llama"
    assert _field(r, "llama.block_count") == entry.layers
    assert _field(r, "llama.attention.head_count") == entry.heads
    assert _field(r, "llama.attention.head_count_kv") == entry.kv_heads
    assert _field(r, "llama.embedding_length") // entry.heads == entry.head_dim
    assert len(_field(r, "tokenizer.ggml.tokens")) == entry.vocab  # type: ignore[arg-type]
    assert _field(r, "llama.context_length") == entry.max_context
    params = sum(int(t.n_elements) for t in r.tensors)
    assert abs(params - entry.parameters) / entry.parameters < 0.02
    assert params == tinymodel.parameter_count()


def test_tokenizer_covers_bytes_with_specials(model: Path) -> None:
    """Vocabulary: <unk>, <s>, </s>, then byte tokens <0x03>…<0xFF> at id = byte value (SPM byte fallback)."""
    r = gguf.GGUFReader(model)
    tokens = _field(r, "tokenizer.ggml.tokens")
    assert tokens[:3] == ["<unk>", "<s>", "</s>"]  # type: ignore[index]
    assert tokens[0x41] == "<0x41>"  # type: ignore[index]
    assert _field(r, "tokenizer.ggml.model") == "llama"
    assert _field(r, "tokenizer.ggml.eos_token_id") == 2


def test_tiny_model_is_deterministic(model: Path, tmp_path: Path) -> None:
    """A second generation (seeded) writes the same bytes; the cache returns the existing file untouched."""
    again = tinymodel.write_tiny_model(tmp_path / "again.gguf")
    assert hashlib.sha256(again.read_bytes()).digest() == hashlib.sha256(model.read_bytes()).digest()
    mtime = model.stat().st_mtime_ns
    assert tinymodel.ensure_tiny_model(model.parents[2]) == model
    assert model.stat().st_mtime_ns == mtime


def test_output_layer_favours_printable_ascii() -> None:
    """Output rows of control and non-ASCII tokens are zero, so generated text is valid printable UTF-8."""
    out = dict(tinymodel.tensors())["output.weight"]
    assert not out[:0x20].any() and not out[0x7F:].any()
    assert out[0x20:0x7F].any(axis=1).all()


def test_wheel_name_matches_the_lab_stack() -> None:
    """The built wheel's file name is the one the lab stack's service `wheel` URLs name (one pin)."""
    site = load_site(stack="lab")
    names = {s.wheel.rsplit("/", 1)[1] for s in site.services if s.wheel}
    assert names == {wheel.wheel_name()}
    assert wheel.LLAMA_CPP_PYTHON_VERSION in wheel.SERVER_REQUIREMENT


def test_cmake_args_are_cpu_only_and_portable() -> None:
    """The build is CPU-only, not tuned to this machine's CPU, and skips tests/tools/examples."""
    args = set(wheel.CMAKE_ARGS)
    assert {"-DGGML_NATIVE=OFF", "-DGGML_CUDA=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"} <= args


def test_cached_wheel_is_not_rebuilt(tmp_path: Path) -> None:
    """ensure_llama_wheel returns a wheel already in the cache without building (0 s, cached)."""
    (tmp_path / wheel.wheel_name()).write_bytes(b"stand-in")
    (tmp_path / f"{wheel.wheel_name()}.cmake-args").write_text(wheel.build_flags())
    b = wheel.ensure_llama_wheel_build(tmp_path)
    assert b.cached and b.seconds == 0 and b.path == tmp_path / wheel.wheel_name()


def test_wheel_built_with_other_flags_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cached wheel from before a CMake flag change (e.g. without GGML_RPC) is rebuilt, and stamped."""
    target = tmp_path / wheel.wheel_name()
    target.write_bytes(b"old build")
    (tmp_path / f"{wheel.wheel_name()}.cmake-args").write_text("-DGGML_NATIVE=OFF\n")
    built: list[Path] = []

    def fake_build(dest: Path, **_: object) -> Path:
        built.append(dest)
        target.write_bytes(b"new build")
        return target

    monkeypatch.setattr(wheel, "build_llama_wheel", fake_build)
    b = wheel.ensure_llama_wheel_build(tmp_path)
    assert built == [tmp_path] and not b.cached and target.read_bytes() == b"new build"
    assert wheel.wheel_cached(tmp_path)  # stamped with today's flags: the next call builds nothing
    assert "-DGGML_RPC=ON" in wheel.CMAKE_ARGS  # the RPC backend of services spanning nodes


def test_publish_layout_matches_stack_urls(tmp_path: Path, model: Path) -> None:
    """publish_llamacpp_files places wheels/ and models/<name>/<rev>/model.gguf as the stack URLs expect."""
    cache = tmp_path / "wheels"
    house = cache / f"llama-server-{wheel.LLAMA_CPP_PYTHON_VERSION}"
    house.mkdir(parents=True)
    (cache / wheel.wheel_name()).write_bytes(b"w")
    (cache / f"{wheel.wheel_name()}.cmake-args").write_text(wheel.build_flags())
    (house / wheel.wheel_name()).write_bytes(b"w")
    (house / "numpy-2.2.6-cp311-cp311-manylinux_2_17_x86_64.whl").write_bytes(b"n")
    (house / ".complete").write_text(wheel.SERVER_REQUIREMENT + "\n" + wheel.build_flags())
    files = tmp_path / "files"
    placed = publish.publish_llamacpp_files(files, wheel_cache=cache, model_cache=model.parents[2])
    rel = sorted(str(p.relative_to(files)) for p in placed)
    assert rel == ["models/gpufleet-tiny-lab/lab-1/model.gguf", f"wheels/{wheel.wheel_name()}",
                   "wheels/numpy-2.2.6-cp311-cp311-manylinux_2_17_x86_64.whl"]
    for s in load_site(stack="lab").services:
        assert (files / s.model.source.split("/files/", 1)[1]).is_file()
        assert s.wheel and (files / s.wheel.split("/files/", 1)[1]).is_file()
    assert publish.publish_llamacpp_files(files, wheel_cache=cache, model_cache=model.parents[2]) == placed
    # Copies, not hard links: the lab's `cp -a` seeding refuses same-inode source and target.
    assert all(p.stat().st_nlink == 1 for p in placed)


def test_server_dependencies_are_pinned_exactly() -> None:
    """The wheelhouse constraints pin each `[server]` dependency to one version (same wheelhouse everywhere)."""
    lines = [ln for ln in wheel.SERVER_CONSTRAINTS.read_text().splitlines() if ln and not ln.startswith("#")]
    names = {ln.split("==")[0] for ln in lines}
    assert all(ln.count("==") == 1 for ln in lines)
    assert {"uvicorn", "fastapi", "sse-starlette", "starlette-context", "pydantic-settings", "numpy"} <= names


def test_build_without_compiler_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a machine without cc/c++ the build stops before downloading, naming the Debian packages."""
    monkeypatch.setattr(wheel.shutil, "which", lambda _tool: None)
    with pytest.raises(wheel.WheelBuildError, match="apt-get install gcc g\\+\\+"):
        wheel.ensure_llama_wheel(tmp_path)
    assert not list(tmp_path.glob("*.whl"))
