"""VRAM planner against figures vLLM printed for real deployments, and the `gpufleet vram` CLI.

Published figures (vLLM's "GB" in "Loading model weights took" is GiB: it divides by 2**30):
- vllm-project/vllm#10511 (maintainer's sanity check, `vllm serve meta-llama/Meta-Llama-3-8B` on H100):
  total_gpu_memory 79.22GiB, utilisation 0.90 → 71.29GiB; model weights take 14.96GiB; PyTorch
  activation peak memory 1.26GiB; available_kv_cache_memory 53.29GiB (non_torch 1.79GiB on that box).
  Same with `-tp 2`: model weights take 7.48GiB per GPU.
- vllm-project/vllm-ascend#2235 (DeepSeek-R1-Distill-Llama-70B = Llama-3 70B architecture, `-tp=8`):
  "Loading model weights took 16.4610 GB" on every rank.
- vllm-project/vllm#21348 (Qwen3-235B-A22B-FP8, 4×H100, TP 4): "Available KV cache memory: 8.11 GiB",
  "GPU KV cache size: 178,880 tokens" (94 layers, 4 KV heads, head_dim 128, fp16 cache).
- vllm-project/vllm#6746 (Meta-Llama-3.1-405B-Instruct-FP8, 8×H100): "Loading model weights took
  57.7520 GB" per GPU. Meta's FP8 checkpoint keeps attention and the first/last layers in bf16, so a
  plain "1 byte per parameter" estimate is a lower bound; the test pins exactly that.
Tolerance: 5 % on memory figures (the planner's activation term is a calibrated allowance, and
vLLM's non-torch memory varies by machine), exact on KV bytes per token and on error wording.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import replace

import pytest

from infra.cli import main
from infra.model import sizing
from infra.model.catalogue import resolve
from infra.model.site import DType, KvCacheDType

TOL = 0.05
CAT = resolve()


def arch(name: str) -> sizing.Architecture:
    m = CAT.models[name]
    return sizing.Architecture(parameters=m.parameters, layers=m.layers, heads=m.heads, kv_heads=m.kv_heads,
                             head_dim=m.head_dim, vocab=m.vocab)


def dep(gpu: str = "H100", tp: int = 1, count: int | None = None, **kw: object) -> sizing.Deployment:
    return sizing.Deployment(gpu=gpu, gpu_usable_gib=CAT.gpus[gpu].usable_gib, gpu_count=count or tp,
                           tensor_parallel=tp, **kw)  # type: ignore[arg-type]


def close(actual: float, published: float, tol: float = TOL) -> bool:
    return abs(actual - published) <= tol * published


def test_llama3_8b_h100_matches_vllm_startup_log() -> None:
    """Llama-3-8B bf16 on one H100 at 0.90: weights ≈ 14.96 GiB, KV ≈ 53.3 GiB, 128 KiB/token (#10511)."""
    p = sizing.plan(arch("llama-3.1-8b"), dep())
    assert close(p.weights_gib, 14.96)
    assert close(p.kv_cache_gib, 53.29)
    assert close(p.activation_gib, 1.26, tol=0.15)  # an allowance, checked loosely on purpose
    assert p.kv_bytes_per_token == 128 * 1024
    assert p.fits


def test_llama3_8b_tp2_weights_per_gpu() -> None:
    """With tensor parallel 2 each H100 holds half the weights: 7.48 GiB in vLLM's log (#10511)."""
    p = sizing.plan(arch("llama-3.1-8b"), dep(tp=2))
    assert close(p.weights_gib, 7.48)
    assert p.kv_bytes_per_token_per_gpu == p.kv_bytes_per_token // 2


def test_llama_70b_tp8_weights_per_gpu() -> None:
    """Llama-3 70B at TP 8: 16.46 GiB of weights per rank (vllm-ascend#2235)."""
    p = sizing.plan(arch("llama-3.1-70b"), dep(tp=8))
    assert close(p.weights_gib, 16.461)
    assert p.fits


def test_llama_70b_needs_tensor_parallel_on_h100() -> None:
    """70B bf16 (≈131 GiB) cannot fit one H100; TP 4 fits 8k context with room for many sequences."""
    one = sizing.plan(arch("llama-3.1-70b"), dep(tp=1))
    assert not one.fits and one.kv_cache_gib < 0
    four = sizing.plan(arch("llama-3.1-70b"), dep(tp=4))
    assert four.fits
    assert close(four.weights_gib, 70.55e9 * 2 / 4 / sizing.GIB, tol=0.001)
    # 80 layers × 8 KV heads × 128 × 2 (K,V) × 2 bytes = 320 KiB per token; TP 4 splits the heads.
    assert four.kv_bytes_per_token == 320 * 1024
    assert four.kv_bytes_per_token_per_gpu == 80 * 1024
    assert four.max_sequences >= 10


def test_kv_tokens_per_gib_matches_qwen3_235b_tp4() -> None:
    """KV tokens per GiB under TP 4 with 4 KV heads match vLLM's 8.11 GiB → 178,880 tokens (#21348)."""
    qwen3 = sizing.Architecture(parameters=235e9, layers=94, heads=64, kv_heads=4, head_dim=128, vocab=151936)
    p = sizing.plan(qwen3, dep(tp=4, dtype=DType.FP8))
    tokens_in_8_11_gib = int(8.11 * sizing.GIB // p.kv_bytes_per_token_per_gpu)
    assert close(tokens_in_8_11_gib, 178_880, tol=0.02)


def test_405b_bf16_does_not_fit_8_h100_and_fp8_is_a_lower_bound() -> None:
    """405B bf16 exceeds 8×H100; our FP8 weights stay below vLLM's 57.75 GiB for Meta's mixed FP8 (#6746)."""
    bf16 = sizing.plan(arch("llama-3.1-405b"), dep(tp=8))
    assert not bf16.fits
    assert bf16.weights_gib > bf16.budget_gib
    assert "tensor_parallel 16 (16 GPUs)" in [s.change for s in bf16.suggestions]
    fp8 = sizing.plan(arch("llama-3.1-405b"), dep(tp=8, dtype=DType.FP8))
    assert 0.75 * 57.752 < fp8.weights_gib < 57.752


def test_mixtral_8x7b_bf16_weights() -> None:
    """Mixtral 8x7B (46.7 B parameters) bf16 is ≈87 GiB: not one H100, fits TP 2 with 32 KiB/token/GPU."""
    one = sizing.plan(arch("mixtral-8x7b"), dep())
    assert not one.fits
    two = sizing.plan(arch("mixtral-8x7b"), dep(tp=2))
    assert close(two.weights_gib, 46.7e9 * 2 / 2 / sizing.GIB, tol=0.001)
    assert two.fits
    assert two.kv_bytes_per_token_per_gpu == 2 * 32 * 4 * 128 * 2


@pytest.mark.parametrize(
    ("dtype", "low", "high"),
    [
        # fp8/int8: one byte per weight except embeddings + LM head (2 × 128256 × 4096, kept in 16 bits).
        (DType.FP8, 7.48, 8.5),
        (DType.INT8, 7.48, 8.5),
        # 4-bit: half a byte plus group scales; public AWQ/GPTQ Llama-3-8B checkpoints load as 5.3–5.7 GiB.
        (DType.AWQ, 4.5, 5.8),
        (DType.GPTQ, 4.5, 5.8),
        (DType.INT4, 4.5, 5.8),
    ],
)
def test_quantised_weights(dtype: DType, low: float, high: float) -> None:
    """Quantised Llama-3-8B weights land between the pure-bit count and published checkpoint sizes."""
    p = sizing.plan(arch("llama-3.1-8b"), dep(dtype=dtype))
    assert low <= p.weights_gib <= high
    bf16 = sizing.plan(arch("llama-3.1-8b"), dep())
    assert p.kv_cache_gib > bf16.kv_cache_gib


def test_fp8_kv_cache_halves_bytes_per_token_and_doubles_tokens() -> None:
    """kv_cache_dtype fp8 halves KV bytes per token, so max tokens roughly doubles at the same budget."""
    auto = sizing.plan(arch("llama-3.1-8b"), dep())
    fp8 = sizing.plan(arch("llama-3.1-8b"), dep(kv_cache_dtype=KvCacheDType.FP8))
    assert fp8.kv_bytes_per_token * 2 == auto.kv_bytes_per_token
    assert fp8.max_tokens == pytest.approx(2 * auto.max_tokens, rel=0.001)


def test_tp_divisibility_error_uses_vllm_wording() -> None:
    """TP 3 on a 32-head model fails with vLLM's own sentence (vllm/config.py verify_with_parallel_config)."""
    p = sizing.plan(arch("llama-3.1-8b"), dep(tp=3))
    assert not p.fits
    assert "Total number of attention heads (32) must be divisible by tensor parallel size (3)." in p.errors
    assert p.suggestions == []
    assert p.verdict().startswith("Total number of attention heads (32)")


def test_kv_heads_replicated_or_split() -> None:
    """TP 16 with 8 KV heads replicates (allowed); 6 KV heads with TP 4 is neither split nor replicated."""
    assert sizing.tp_errors(arch("llama-3.1-405b"), 16) == []
    odd = sizing.Architecture(parameters=1e9, layers=24, heads=24, kv_heads=6, head_dim=64, vocab=32000)
    errs = sizing.tp_errors(odd, 4)
    assert any("key/value heads (6)" in e for e in errs)


def test_tp_times_pp_beyond_gpu_count_is_an_error() -> None:
    """Asking for more GPUs than the node has is reported, not silently planned."""
    p = sizing.plan(arch("llama-3.1-70b"), dep(tp=8, count=4))
    assert any("exceeds the node's 4 GPUs" in e for e in p.errors)


_FIELD = {"tensor_parallel": "tensor_parallel", "kv_cache_dtype": "kv_cache_dtype", "dtype": "dtype",
          "gpu_memory_utilization": "utilization", "context_length": "context_length",
          "max_concurrency": "concurrency"}


def apply(d: sizing.Deployment, s: sizing.Suggestion) -> sizing.Deployment:
    """Apply a suggestion as an admin would edit the stack."""
    value: object = s.value
    if s.field == "kv_cache_dtype":
        value = KvCacheDType(s.value)
    elif s.field == "dtype":
        value = DType(s.value)
    out = replace(d, **{_FIELD[s.field]: value})
    if s.field == "tensor_parallel":
        out = replace(out, gpu_count=max(d.gpu_count, s.value * d.pipeline_parallel))
    return out


def test_every_suggestion_makes_the_plan_fit() -> None:
    """Property: over a grid of failing deployments, applying any one suggestion gives a plan that fits."""
    checked = 0
    grid = itertools.product(
        ["llama-3.1-8b", "llama-3.1-70b", "mixtral-8x7b", "qwen2.5-72b", "llama-3.1-405b"],
        ["L4", "A100-40", "H100"],
        [DType.BF16, DType.FP8],
        [1, 2, 4],
        [8192, 32768, 131072],
        [1, 8, 64],
    )
    for model, gpu, dtype, tp, ctx, conc in grid:
        d = dep(gpu=gpu, tp=tp, count=8, dtype=dtype, context_length=ctx, concurrency=conc)
        p = sizing.plan(arch(model), d)
        if p.fits or p.errors:
            continue
        for s in p.suggestions:
            after = sizing.plan(arch(model), apply(d, s), suggest=False)
            assert after.fits, f"{model} on {gpu} {dtype} tp{tp} ctx{ctx}×{conc}: {s.change} does not fit"
            checked += 1
    assert checked > 100  # the grid really exercised suggestions


def test_no_suggestion_when_nothing_single_fits() -> None:
    """405B bf16 at 128k×64 on 8 L4 has no single fix; the verdict says to use a larger GPU."""
    p = sizing.plan(arch("llama-3.1-405b"), dep(gpu="L4", tp=8, context_length=131072, concurrency=64))
    assert not p.fits
    assert p.suggestions == []
    assert "no single change found, use a larger GPU" in p.verdict()


def test_tiny_lab_model_fits_anything() -> None:
    """The lab's tiny model (catalogue entry) needs a few MiB: it fits an L4 trivially."""
    p = sizing.plan(arch("gpufleet-tiny-lab"), dep(gpu="L4", context_length=512))
    assert p.fits
    assert p.kv_bytes_per_token == 2 * 2 * 2 * 16 * 2
    assert p.weights_gib < 0.01


REQUIRED_JSON = {"weights_gib", "kv_cache_gib", "kv_bytes_per_token", "max_tokens", "fits"}


def test_cli_vram_json_catalogue_model(capsys: pytest.CaptureFixture[str]) -> None:
    """`gpufleet vram --model llama-3.1-8b --json` prints the plan's figures and exits 0 when it fits."""
    assert main(["vram", "--model", "llama-3.1-8b", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data.keys() >= REQUIRED_JSON
    expected = sizing.plan(arch("llama-3.1-8b"), dep()).as_dict()
    for key in REQUIRED_JSON:
        assert data[key] == expected[key]
    assert data["kv_bytes_per_token"] == 131072


def test_cli_vram_explicit_architecture_equals_catalogue(capsys: pytest.CaptureFixture[str]) -> None:
    """An explicit architecture equal to Llama-3.1-8B gives the same JSON as the catalogue entry."""
    args = ["--params", "8.03e9", "--layers", "32", "--heads", "32", "--kv-heads", "8", "--head-dim", "128",
            "--vocab", "128256"]
    assert main(["vram", *args, "--json"]) == 0
    explicit = json.loads(capsys.readouterr().out)
    assert main(["vram", "--model", "llama-3.1-8b", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == explicit


def test_cli_vram_table_does_not_fit(capsys: pytest.CaptureFixture[str]) -> None:
    """The table names figures for people and exits 1 with the suggestions when it does not fit."""
    assert main(["vram", "--model", "llama-3.1-70b", "--gpu", "H100", "--tp", "1"]) == 1
    out = capsys.readouterr().out
    for label in ("weights per GPU", "KV cache per GPU", "KV bytes per token", "max tokens", "verdict"):
        assert label in out
    assert "does not fit" in out and "tensor_parallel 2" in out


def test_cli_vram_tp_error_and_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    """TP 3 on 32 heads exits 1 with vLLM's wording; an unknown model or missing figures exit 2."""
    assert main(["vram", "--model", "llama-3.1-8b", "--tp", "3", "--json"]) == 1
    assert "must be divisible by tensor parallel size (3)" in json.loads(capsys.readouterr().out)["verdict"]
    assert main(["vram", "--model", "no-such-model"]) == 2
    assert main(["vram", "--params", "1e9", "--layers", "2"]) == 2
    assert "missing" in capsys.readouterr().err


def test_cli_vram_quantised_dtype(capsys: pytest.CaptureFixture[str]) -> None:
    """`--dtype awq --kv-dtype fp8` lowers weights and per-token KV in the JSON output."""
    assert main(["vram", "--model", "llama-3.1-70b", "--dtype", "awq", "--kv-dtype", "fp8", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["kv_bytes_per_token"] == 160 * 1024
    assert 33 < data["weights_gib"] < 40
