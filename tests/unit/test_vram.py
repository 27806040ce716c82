"""VRAM planner behaviour and the `gpufleet vram` CLI.

The planner against real vLLM start-up logs (weights ±5 %, KV cache ±10 %) is tests/unit/test_vram_logs.py
with its cited table tests/fixtures/vram/vllm_logs.yaml; the tests here pin behaviour: TP splits, quantised
parts, errors in vLLM's words, suggestions that really fit, and the CLI.
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
    return sizing.architecture(CAT.models[name])


def dep(gpu: str = "H100", tp: int = 1, count: int | None = None, **kw: object) -> sizing.Deployment:
    base, extra = sizing.non_torch(CAT.gpus[gpu])
    return sizing.Deployment(gpu=gpu, gpu_usable_gib=CAT.gpus[gpu].usable_gib, gpu_count=count or tp,
                             tensor_parallel=tp, non_torch_gib=base, non_torch_tp_gib=extra,
                             **kw)  # type: ignore[arg-type]


def close(actual: float, published: float, tol: float = TOL) -> bool:
    return abs(actual - published) <= tol * published


def test_every_term_is_reported_and_adds_up() -> None:
    """KV cache = budget − weights − activation − non-torch, each term in the plan (vLLM V1's rule)."""
    p = sizing.plan(arch("llama-3.1-8b"), dep())
    assert p.budget_gib == pytest.approx(CAT.gpus["H100"].usable_gib * 0.9)
    assert p.kv_cache_gib == pytest.approx(p.budget_gib - p.weights_gib - p.activation_gib - p.non_torch_gib)
    assert p.non_torch_gib == CAT.gpus["H100"].non_torch_gib  # TP 1: no NCCL share
    assert p.kv_bytes_per_token == 128 * 1024
    assert (p.profile_tokens, p.profile_seqs) == (8192, 1)  # V1 default on an 80 GB GPU; --max-num-seqs 1
    assert p.fits


def test_profile_defaults_follow_vllm_by_gpu_memory() -> None:
    """vLLM V1 profiles 8192 tokens on >= 70 GiB GPUs (not A100), 2048 elsewhere; more tokens, more activation."""
    assert sizing.profile_defaults("H100", 79.22) == (8192, 1024)
    assert sizing.profile_defaults("A100-80", 79.15) == (2048, 256)
    assert sizing.profile_defaults("L4", 22.05) == (2048, 256)
    small = sizing.plan(arch("llama-3.1-8b"), dep(max_num_batched_tokens=2048))
    big = sizing.plan(arch("llama-3.1-8b"), dep(max_num_batched_tokens=32768))
    assert big.activation_gib > 10 * small.activation_gib / 2
    assert big.kv_cache_gib < small.kv_cache_gib


def test_non_torch_grows_with_tensor_parallel() -> None:
    """TP > 1 adds the GPU's NCCL share (H100: 1.79 GiB published by vLLM at TP 2)."""
    one = sizing.plan(arch("llama-3.1-8b"), dep())
    two = sizing.plan(arch("llama-3.1-8b"), dep(tp=2))
    assert two.non_torch_gib == pytest.approx(one.non_torch_gib + CAT.gpus["H100"].non_torch_tp_gib)


def test_head_dim_and_hidden_come_from_config() -> None:
    """Qwen3-235B: head_dim 128 while hidden 4096 / 64 heads = 64; KV per token uses 128, weights hidden 4096."""
    q = arch("qwen3-235b-a22b")
    assert q.hidden == 4096 and q.head_dim == 128
    p = sizing.plan(q, dep(tp=4, dtype=DType.FP8))
    assert p.kv_bytes_per_token == 2 * 94 * 4 * 128 * 2
    # TP 4 with 4 KV heads: one head per GPU.
    assert p.kv_bytes_per_token_per_gpu == 2 * 94 * 1 * 128 * 2


def test_moe_activation_counts_routed_experts_not_all() -> None:
    """A MoE layer's profile peak follows experts_per_token, not the number of experts."""
    moe = arch("qwen3-coder-30b-a3b")
    few = sizing.activation_bytes(moe, 2048, 1)
    many = sizing.activation_bytes(replace(moe, experts=512), 2048, 1)
    assert many == few
    more_routed = sizing.activation_bytes(replace(moe, experts_per_token=16), 2048, 1)
    assert more_routed > few


def test_kv_replicated_heads_add_weight_per_gpu() -> None:
    """TP 8 over 4 KV heads replicates K/V projections: more than an eighth of the weights on each GPU."""
    a = arch("qwen3-coder-30b-a3b")
    one = sizing.weight_bytes(a, DType.BF16, 1)
    eight = sizing.weight_bytes(a, DType.BF16, 8)
    assert eight > one / 8


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
    assert not one.fits and one.kv_cache_gib == 0 and one.over_budget_gib > 50
    assert "no room for a KV cache: weights 131.4" in one.verdict()
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


def test_405b_bf16_does_not_fit_8_h100_and_bf16_parts_weigh_more() -> None:
    """405B bf16 exceeds 8×H100; Meta's FP8 checkpoint (bf16 attention, first/last MLP) weighs more than 1 B/param."""
    bf16 = sizing.plan(arch("llama-3.1-405b"), dep(tp=8))
    assert not bf16.fits
    assert bf16.weights_gib > bf16.budget_gib
    assert "tensor_parallel 16 (16 GPUs)" in [s.change for s in bf16.suggestions]
    plain = sizing.plan(arch("llama-3.1-405b"), dep(tp=8, dtype=DType.FP8))
    meta = sizing.plan(arch("llama-3.1-405b-fp8"), dep(tp=8, dtype=DType.FP8))
    assert meta.weights_gib > plain.weights_gib + 8  # 72 B attention parameters stay 2 bytes: +8.4 GiB per GPU
    assert sizing.plan(arch("llama-3.1-405b-fp8"), dep(tp=8)).weights_gib == pytest.approx(bf16.weights_gib)


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
    for label in ("weights per GPU", "activation peak", "non-torch memory", "KV cache per GPU", "KV bytes per token",
                  "max tokens", "verdict"):
        assert label in out
    # TP 2 leaves 1.1 GiB for KV after 3.58 GiB non-torch: short of 8192 × 160 KiB, so TP 4 is the change.
    assert "does not fit" in out and "tensor_parallel 4" in out


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


def test_cli_vram_gpu_outside_the_catalogue(capsys: pytest.CaptureFixture[str]) -> None:
    """`--gpu-memory-gib` plans a GPU the catalogue lacks, with the default non-torch figures."""
    assert main(["vram", "--model", "llama-3.1-8b", "--gpu", "RTX-3090", "--gpu-memory-gib", "23.58",
                 "--context", "20000", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["total_gib"] == 23.58
    assert data["non_torch_gib"] == sizing.DEFAULT_NON_TORCH_GIB
    assert data["profile_tokens"] == 2048  # a < 70 GiB GPU: vLLM V1 profiles 2048 tokens
    assert data["kv_cache_gib"] == pytest.approx(
        data["budget_gib"] - data["weights_gib"] - data["activation_gib"] - data["non_torch_gib"], abs=0.01)
    assert main(["vram", "--model", "llama-3.1-8b", "--gpu", "RTX-3090"]) == 2
    assert "--gpu-memory-gib" in capsys.readouterr().err


def test_cli_vram_never_prints_a_negative_kv_cache(capsys: pytest.CaptureFixture[str]) -> None:
    """When the terms exceed the budget the KV line says so and why; JSON keeps kv_cache_gib at 0."""
    assert main(["vram", "--model", "llama-3.1-70b", "--gpu", "L4", "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["kv_cache_gib"] == 0 and data["over_budget_gib"] > 100
    assert main(["vram", "--model", "llama-3.1-70b", "--gpu", "L4"]) == 1
    out = capsys.readouterr().out
    assert "none: the terms above exceed the budget by" in out and "-1" not in out.split("KV cache per GPU")[1][:30]
