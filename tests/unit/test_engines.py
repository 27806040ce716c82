"""Engine invocations (infra/plan/engines.py) against the engines' own flag definitions and the plan.

- vLLM: every rendered argv is accepted by the flag definitions of the real `vllm` wheel from PyPI
  (tests/unit/vllm_flags.py reads them without importing vLLM), values within literal choices.
- TGI: against the launcher's documented flags (tests/fixtures/engines/tgi_launcher.yaml, source cited).
- Every plan limit is on the command line; a missing one fails here.
- Hostile values forced past validation are refused or placed as exactly one argv word each.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.model.load import SiteError, load_site, parse_site
from infra.model.site import ContainerEngine, DType, Engine, InferenceService, KvCacheDType, Site
from infra.plan import engines
from infra.plan.engines import EngineError
from infra.plan.rolevars import service_vars
from tests.unit import vllm_flags
from tests.unit.factories import make_site
from tests.unit.systemd_syntax import split_command

ROOT = Path(__file__).resolve().parents[2]
TGI = yaml.safe_load((ROOT / "tests/fixtures/engines/tgi_launcher.yaml").read_text())["flags"]
CORPUS = yaml.safe_load((ROOT / "tests/fixtures/injection/corpus.yaml").read_text())
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
PODMAN = (ContainerEngine.PODMAN, "4.3.1+ds1-8+deb12u1+b3")


def _stack_services() -> list[InferenceService]:
    out: dict[str, InferenceService] = {}
    for stack in ("lab", "example-prod", "example-airgap"):
        for s in load_site(stack).services:
            out.setdefault(f"{stack}/{s.name}", s)
    return list(out.values())


def _variants(engine: Engine) -> list[InferenceService]:
    """Each stack service of the engine, and one per dtype and KV cache dtype the engine takes."""
    base = [s for s in _stack_services() if s.engine is engine]
    assert base, engine
    s0 = base[0]
    out = list(base)
    for dt in DType:
        out.append(s0.model_copy(update={"model": s0.model.model_copy(update={"dtype": dt})}))
    for kv in KvCacheDType:
        out.append(s0.model_copy(update={"kv_cache_dtype": kv}))
    return out


def _options(argv: list[str]) -> dict[str, str]:
    """`--flag=value` words → {flag: value}; every option word must carry its value after `=`."""
    out: dict[str, str] = {}
    for w in argv:
        assert w.startswith("--") and "=" in w, f"{w!r} is not one --flag=value word"
        flag, value = w.split("=", 1)
        assert flag not in out, f"{flag} twice"
        out[flag] = value
    return out


@pytest.fixture(scope="module")
def vllm_serve() -> vllm_flags.ServeFlags:
    """The flag definitions of `vllm serve` 0.33.0 from the cached (or now downloaded) wheel."""
    try:
        path = vllm_flags.wheel()
    except vllm_flags.Unavailable as e:
        pytest.skip(f"the vllm wheel is not cached and PyPI is unreachable: {e}")
    return vllm_flags.serve_flags(path)


def test_vllm_parser_is_what_we_think(vllm_serve: vllm_flags.ServeFlags) -> None:
    """The reader found the real parser: the positional model, the frontend and engine options."""
    assert vllm_serve.positionals == ("model_tag",)
    assert {"--host", "--port", "--max-model-len", "--tensor-parallel-size", "--model"} <= vllm_serve.options
    assert "bfloat16" in vllm_serve.choices["--dtype"] and "fp8" in vllm_serve.choices["--quantization"]
    assert "--no-such-flag" not in vllm_serve.options
    assert vllm_serve.model_rewrite  # `--model` is only a deprecated spelling: we pass the positional


def test_vllm_argv_is_accepted_by_vllm(vllm_serve: vllm_flags.ServeFlags) -> None:
    """Every vLLM argv gpufleet renders: one positional model directory, then options vLLM defines."""
    variants = [s for s in _variants(Engine.VLLM) if s.model.dtype is not DType.INT4]
    for svc in variants:
        argv = engines.vllm_args(svc)
        assert argv[0] == engines.CONTAINER_MODEL_DIR and not argv[0].startswith("-")
        for flag, value in _options(argv[1:]).items():
            assert flag in vllm_serve.options, f"vllm serve has no {flag}"
            assert flag != "--model"
            if flag in vllm_serve.choices:
                assert value in vllm_serve.choices[flag], f"{flag}={value} not in vLLM's choices"


def test_vllm_refuses_what_it_cannot_serve() -> None:
    """int4 has no generic vLLM method: a clear error, not a guessed flag."""
    s = _variants(Engine.VLLM)[0]
    with pytest.raises(EngineError, match="int4"):
        engines.vllm_args(s.model_copy(update={"model": s.model.model_copy(update={"dtype": DType.INT4})}))


def test_tgi_argv_is_accepted_by_the_documented_launcher() -> None:
    """Every TGI argv uses documented launcher flags with documented values; usage stats are off."""
    for svc in _variants(Engine.TGI):
        try:
            argv = engines.tgi_args(svc)
        except EngineError as e:
            assert svc.kv_cache_dtype in (KvCacheDType.FP16, KvCacheDType.BF16), e
            continue
        opts = _options(argv)
        for flag, value in opts.items():
            assert flag in TGI, f"text-generation-launcher has no {flag}"
            assert TGI[flag]["value"], flag
            if "choices" in TGI[flag]:
                assert value in TGI[flag]["choices"], f"{flag}={value}"
        assert opts["--usage-stats"] == "off"
        assert not ("--dtype" in opts and "--quantize" in opts)  # the launcher refuses both together


# Plan limit → (engine flag, how the plan's value reads on the command line). Written from the engines'
# documentation, not from infra/plan/engines.py, so a limit dropped from the argv fails here.
VLLM_LIMITS: dict[str, tuple[str, Any]] = {
    "context_length": ("--max-model-len", lambda s: str(s.model.context_length)),
    "max_concurrency": ("--max-num-seqs", lambda s: str(s.max_concurrency)),
    "tensor_parallel": ("--tensor-parallel-size", lambda s: str(s.tensor_parallel)),
    "pipeline_parallel": ("--pipeline-parallel-size", lambda s: str(s.pipeline_parallel)),
    "gpu_memory_utilization": ("--gpu-memory-utilization", lambda s: str(s.gpu_memory_utilization)),
    "kv_cache_dtype": ("--kv-cache-dtype", lambda s: {"auto": "auto", "fp16": "float16", "bf16": "bfloat16",
                                                       "fp8": "fp8"}[s.kv_cache_dtype.value]),
}
VLLM_DTYPE = {"bf16": ("--dtype", "bfloat16"), "fp16": ("--dtype", "float16"), "fp8": ("--quantization", "fp8"),
              "awq": ("--quantization", "awq"), "gptq": ("--quantization", "gptq")}
TGI_LIMITS: dict[str, tuple[str, Any]] = {
    "context_length": ("--max-total-tokens", lambda s: str(s.model.context_length)),
    "max_concurrency": ("--max-concurrent-requests", lambda s: str(s.max_concurrency)),
    "tensor_parallel": ("--num-shard", lambda s: str(s.tensor_parallel)),
    "gpu_memory_utilization": ("--cuda-memory-fraction", lambda s: str(s.gpu_memory_utilization)),
}
TGI_DTYPE = {"bf16": ("--dtype", "bfloat16"), "fp16": ("--dtype", "float16"), "fp8": ("--quantize", "fp8"),
             "awq": ("--quantize", "awq"), "gptq": ("--quantize", "gptq")}


def _changed(s: InferenceService, limit: str) -> InferenceService:
    """The service with one limit set to a value no default has, so the argv must follow the plan."""
    if limit == "context_length":
        return s.model_copy(update={"model": s.model.model_copy(update={"context_length": 12345})})
    values = {"max_concurrency": 77, "tensor_parallel": 4, "pipeline_parallel": 2, "gpu_memory_utilization": 0.83,
              "kv_cache_dtype": KvCacheDType.FP8}
    return s.model_copy(update={limit: values[limit]})


@pytest.mark.parametrize("limit", sorted(VLLM_LIMITS))
def test_every_vllm_plan_limit_is_on_the_command_line(limit: str) -> None:
    """vLLM: each limit of the plan (changed from its default) is passed with the plan's value."""
    s = _changed(_variants(Engine.VLLM)[0], limit)
    flag, expect = VLLM_LIMITS[limit]
    assert _options(engines.vllm_args(s)[1:]).get(flag) == expect(s)


@pytest.mark.parametrize("dtype", sorted(VLLM_DTYPE))
def test_vllm_dtype_is_on_the_command_line(dtype: str) -> None:
    """vLLM: the plan's weight dtype or quantisation is what the engine loads."""
    s0 = _variants(Engine.VLLM)[0]
    s = s0.model_copy(update={"model": s0.model.model_copy(update={"dtype": DType(dtype)})})
    flag, value = VLLM_DTYPE[dtype]
    assert _options(engines.vllm_args(s)[1:]).get(flag) == value


@pytest.mark.parametrize("limit", sorted(TGI_LIMITS))
def test_every_tgi_plan_limit_is_on_the_command_line(limit: str) -> None:
    """TGI: each limit of the plan is passed; the input limit stays below the total."""
    s = _changed(_variants(Engine.TGI)[0], limit)
    opts = _options(engines.tgi_args(s))
    flag, expect = TGI_LIMITS[limit]
    assert opts.get(flag) == expect(s)
    assert int(opts["--max-input-tokens"]) < int(opts["--max-total-tokens"])


@pytest.mark.parametrize("dtype", sorted(TGI_DTYPE))
def test_tgi_dtype_is_on_the_command_line(dtype: str) -> None:
    """TGI: the plan's dtype or quantisation is passed."""
    s0 = _variants(Engine.TGI)[0]
    s = s0.model_copy(update={"model": s0.model.model_copy(update={"dtype": DType(dtype)})})
    flag, value = TGI_DTYPE[dtype]
    assert _options(engines.tgi_args(s)).get(flag) == value


def test_llamacpp_limits_are_on_the_command_line() -> None:
    """llama.cpp: context (per slot × slots for llama-server) and the model alias."""
    s = _variants(Engine.LLAMACPP)[0].model_copy(update={"max_concurrency": 3})
    native = _options(engines.llamacpp_native_args(s, "/m/model.gguf"))
    assert native["--n_ctx"] == str(s.model.context_length) and native["--model_alias"] == s.model.name
    server = _options(engines.llamacpp_server_args(s, "/models/model.gguf"))
    assert server["--parallel"] == "3" and server["--ctx-size"] == str(3 * s.model.context_length)


def test_container_gets_gpus_shared_memory_and_offline_env() -> None:
    """CDI device on podman and docker ≥ 25, NVIDIA runtime on older docker; `--ipc=host` for TP."""
    s = next(x for x in _stack_services() if x.engine is Engine.VLLM and x.tensor_parallel > 1)
    dir_ = engines.model_dir(s)
    podman = engines.container_run(s, *PODMAN, host_model_dir=dir_)
    assert "--device=nvidia.com/gpu=all" in podman and "--ipc=host" in podman
    assert f"--volume={dir_}:/models:ro" in podman and "--env=HF_HUB_OFFLINE=1" in podman
    new = engines.container_run(s, ContainerEngine.DOCKER, "26.1.3-0ubuntu1~22.04.1", host_model_dir=dir_)
    assert "--device=nvidia.com/gpu=all" in new
    old = engines.container_run(s, ContainerEngine.DOCKER, "20.10.24+dfsg1-1+deb12u1+b2", host_model_dir=dir_)
    assert "--runtime=nvidia" in old and "--gpus=all" in old and "--device=nvidia.com/gpu=all" not in old
    with pytest.raises(EngineError, match="ctr"):
        engines.container_run(s, ContainerEngine.CONTAINERD, "1.6.20~ds1-1+deb12u3", host_model_dir=dir_)
    # The image is the first word after the runtime options, the positional model right after it.
    i = podman.index(s.image)
    assert podman[i + 1] == "/models"


# --- second layer: hostile values forced past validation ---------------------------------------------


def _forced(site: Site, path: str, value: str) -> InferenceService | None:
    """services[0] of the lab stack with one field set to `value` without validation (model_copy)."""
    m = re.fullmatch(r"services\[0\]\.(model\.)?(\w+)", path)
    if not m:
        return None
    s = site.services[0]
    if m.group(1):
        return s.model_copy(update={"model": s.model.model_copy(update={m.group(2): value})})
    return s.model_copy(update={m.group(2): value})


def _service_cases() -> list[tuple[str, str, InferenceService]]:
    site = load_site("lab")
    out = []
    for e in CORPUS:
        value = e["value"].replace("@CANARY@", "/tmp/gpufleet-canary-never")
        for image in (False, True):
            svc = _forced(site, e["path"], value)
            if svc is None:
                continue
            if image:
                # The same value in a container service (vLLM under podman), where the image is placed too.
                svc = svc.model_copy(update={"engine": Engine.VLLM, "image": svc.image or (
                    "198.18.1.250:5000/vllm/vllm-openai@sha256:" + "0" * 64)})
            out.append((e["path"], e["attack"], svc))
    return out


SERVICE_CASES = _service_cases()


def test_the_corpus_reaches_services() -> None:
    """Enough of the shared corpus targets services for the cases below to mean something."""
    assert len(SERVICE_CASES) >= 30
    assert {a for _, a, _ in SERVICE_CASES} >= {"jinja", "newline", "option", "path", "shell", "control"}


@pytest.mark.parametrize(("path", "attack", "svc"), SERVICE_CASES, ids=[f"{p}-{a}" for p, a, _ in SERVICE_CASES])
def test_hostile_value_is_refused_or_inert(path: str, attack: str, svc: InferenceService) -> None:
    """Refused with a clear error, or: no new unit line, argv read back exactly, model inside the store."""
    try:
        v = service_vars(svc, *PODMAN)
    except ValueError as e:  # EngineError is a ValueError, as is an unusable wheel URL
        assert str(e)
        return
    for line in [v["description"], v["exec_start"], *v["exec_start_pre"], *v["exec_stop"], *v["environment"]]:
        assert not re.search(r"[\x00-\x1f\x7f]", line), line
    cmds = engines.unit_commands(svc, *PODMAN)
    want = [w if isinstance(w, str) else w.text.replace("%N", "gpufleet-inference-x") for w in cmds.exec_start]
    assert split_command(v["exec_start"], "gpufleet-inference-x.service") == want
    assert v["model_dir"].startswith(engines.MODEL_ROOT + "/") and "/../" not in v["model_dir"] + "/"
    if svc.image:
        # The image is one word; nothing before it that the stack gave can be an option.
        assert want.count(svc.image) == 1


@pytest.mark.parametrize("value", sorted({e["value"] for e in CORPUS}))
def test_systemd_word_reads_back_as_one_argument(value: str) -> None:
    """Any value quoted by `systemd_word` is exactly one argv word as systemd reads it."""
    if "\x00" in value:
        with pytest.raises(EngineError):
            engines.systemd_word(value)
        return
    line = engines.systemd_command_line(["/bin/echo", value, "--end"])
    assert "\n" not in line
    assert split_command(line) == ["/bin/echo", value, "--end"]


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_systemd_accepts_every_quoted_corpus_value(tmp_path: Path) -> None:
    """systemd-analyze verify reads a unit with every corpus value quoted: one ExecStart, no warning.

    And the same values placed raw do add lines systemd reads (the check can fail).
    """
    values = [e["value"] for e in CORPUS if "\x00" not in e["value"]]
    quoted = "\n".join(f"ExecStartPre={engines.systemd_command_line(['/bin/echo', v])}" for v in values)
    raw = "\n".join(f"ExecStartPre=/bin/echo {v}" for v in values)
    results = []
    for name, body in (("quoted", quoted), ("raw", raw)):
        unit = tmp_path / f"{name}.service"
        unit.write_text(f"[Unit]\nDescription=t\n[Service]\nType=oneshot\n{body}\nExecStart=/bin/true\n")
        p = subprocess.run([SYSTEMD_ANALYZE, "verify", str(unit)], capture_output=True, text=True, timeout=60,
                           check=False)
        results.append((p.returncode, [ln for ln in (p.stdout + p.stderr).splitlines() if str(unit) in ln]))
    assert results[0] == (0, []), results[0]
    assert results[1][1], "placing the values raw should have produced warnings"
    text = (tmp_path / "quoted.service").read_text()
    assert len([ln for ln in text.splitlines() if ln.startswith("ExecStartPre=")]) == len(values)


@pytest.mark.parametrize(
    ("name", "revision"),
    [("..", "x"), ("m", "../../../../root/.ssh"), ("a/b", "r"), ("m", "r\nExecStart=/bin/sh"), ("", "r"), ("m", ".")],
)
def test_model_dir_never_leaves_the_store(name: str, revision: str) -> None:
    """Traversal in a model name or revision is refused with an error naming the value."""
    s = load_site("lab").services[0]
    bad = s.model_copy(update={"model": s.model.model_copy(update={"name": name, "revision": revision})})
    with pytest.raises(EngineError, match=r"model store|outside"):
        engines.model_dir(bad)


# --- what validation refuses before any invocation is built -------------------------------------------


def _problems(mutate: Any) -> list[str]:
    raw = make_site()
    parse_site(raw)  # the base is valid
    mutate(raw)
    with pytest.raises(SiteError) as exc:
        parse_site(raw)
    return [f"{p.path}: {p.message} Fix: {p.fix}" for p in exc.value.problems]


def test_triton_is_not_offered() -> None:
    """A Triton service is refused with why and what to use instead (not a bare enum error)."""
    (msg,) = _problems(lambda r: r["services"][0].update(engine="triton"))
    assert msg.startswith("services[0].engine: triton is not offered") and "vllm" in msg


def test_containerd_cannot_serve_containers() -> None:
    """An image service on a containerd node is refused at the service, naming the profile to change."""
    (msg,) = _problems(lambda r: r["profiles"]["hgx"]["container_runtime"].update(engine="containerd"))
    assert msg.startswith("services[0].nodes: gpu01 runs containerd") and "profiles.hgx" in msg


@pytest.mark.parametrize(
    ("update", "path"),
    [
        ({"model": {"dtype": "int4"}}, "services[0].model.dtype"),
        ({"engine": "tgi", "pipeline_parallel": 2, "tensor_parallel": 1}, "services[0].pipeline_parallel"),
        ({"engine": "tgi", "kv_cache_dtype": "fp16"}, "services[0].kv_cache_dtype"),
    ],
)
def test_engine_limits_are_validated(update: dict[str, Any], path: str) -> None:
    """What an engine cannot do is a validation problem at its config path, not a failed start."""

    def mutate(raw: dict[str, Any]) -> None:
        svc = raw["services"][0]
        for k, v in update.items():
            if isinstance(v, dict):
                svc[k].update(v)
            else:
                svc[k] = v

    assert any(m.startswith(path + ":") for m in _problems(mutate))


@pytest.mark.parametrize("value", ["a\x85b", "x\u202ey", "tab\there", "é ü 漢 ", "100%", "$$x", "-", ";", ""])
def test_systemd_word_keeps_unicode_and_edge_words(value: str) -> None:
    """C1 controls and bidi overrides are spelt as code points, printable Unicode stays; empty stays a word."""
    line = engines.systemd_command_line(["/bin/echo", value])
    assert split_command(line) == ["/bin/echo", value]
    assert line.isprintable()
