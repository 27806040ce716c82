"""GPU memory planning: does a model fit, how much KV cache is left, and what would make it fit.

The budget rule is vLLM's (worker `determine_available_memory`): per GPU,

    kv_cache = usable_memory × gpu_memory_utilization − weights − activation peak − non-torch memory

with `usable_memory` the device memory CUDA reports (not the marketing size). The activation
allowance is calibrated on vLLM's own start-up logs (Llama-3-8B bf16, one H100, 0.90:
weights ≈ 15 GiB, activation ≈ 1.2 GiB, KV cache ≈ 55 GiB, 128 KiB per token); the unit tests pin
these published figures within 5 %.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from infra.model.catalogue import ResolvedCatalogue
from infra.model.site import DType, InferenceService, KvCacheDType, Node

GIB = 1024**3

WEIGHT_BYTES: dict[DType, float] = {
    DType.BF16: 2.0,
    DType.FP16: 2.0,
    DType.FP8: 1.0,
    DType.INT8: 1.0,
    DType.INT4: 0.5,
    DType.AWQ: 0.5,
    DType.GPTQ: 0.5,
}
# Group-wise scales and zero points of 4-bit formats (group size 128, fp16 scale + packed zero).
_QUANT_OVERHEAD: dict[DType, float] = {DType.INT4: 1.03, DType.AWQ: 1.03, DType.GPTQ: 1.03}
_KV_BYTES: dict[KvCacheDType, float] = {KvCacheDType.FP16: 2, KvCacheDType.BF16: 2, KvCacheDType.FP8: 1}

# vLLM's default chunked-prefill token budget: the activation peak is profiled at this many tokens.
MAX_BATCHED_TOKENS = 8192
# Bytes of peak activation per batched token per hidden unit, calibrated on vLLM's logs (see above).
_ACTIVATION_BYTES_PER_TOKEN_HIDDEN = 34
# CUDA context / allocator memory outside PyTorch, plus NCCL buffers when tensor parallel.
_NON_TORCH_GIB = 0.10
_NCCL_GIB = 0.25


@dataclass(frozen=True)
class Architecture:
    """Size figures of a transformer model."""

    parameters: float
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @property
    def hidden(self) -> int:
        """Hidden size (attention heads × head dim)."""
        return self.heads * self.head_dim


@dataclass(frozen=True)
class Deployment:
    """How a model is deployed: precision, GPUs, parallelism and load."""

    gpu: str
    gpu_usable_gib: float
    gpu_count: int
    dtype: DType = DType.BF16
    kv_cache_dtype: KvCacheDType = KvCacheDType.AUTO
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    utilization: float = 0.9
    context_length: int = 8192
    concurrency: int = 1


@dataclass(frozen=True)
class Suggestion:
    """A single change to the deployment that makes the model fit."""

    change: str
    field: str
    value: Any


@dataclass(frozen=True)
class VramPlan:
    """The result of planning one deployment (all memory figures per GPU)."""

    gpu: str
    gpus_used: int
    weights_gib: float
    activation_gib: float
    budget_gib: float
    kv_cache_gib: float
    kv_bytes_per_token: int
    kv_bytes_per_token_per_gpu: int
    max_tokens: int
    max_sequences: int
    required_tokens: int
    fits: bool
    errors: list[str] = field(default_factory=list)
    suggestions: list[Suggestion] = field(default_factory=list)

    @property
    def shortfall_gib(self) -> float:
        """KV cache missing for the required tokens, GiB per GPU (0 when it fits)."""
        need = self.required_tokens * self.kv_bytes_per_token_per_gpu / GIB
        return max(0.0, need - max(self.kv_cache_gib, 0.0))

    def verdict(self) -> str:
        """One sentence for people: fits, or by how much not and what would fit."""
        if self.errors:
            return "; ".join(self.errors)
        if self.fits:
            return (
                f"fits: {self.kv_cache_gib:.1f} GiB KV cache per GPU holds {self.max_tokens} tokens "
                f"({self.max_sequences} sequences at full context)"
            )
        if self.kv_cache_gib <= 0:
            gap = f"weights and activations exceed the budget by {-self.kv_cache_gib:.1f} GiB per GPU"
        else:
            gap = (
                f"KV cache holds {self.max_tokens} tokens but {self.required_tokens} are needed "
                f"(short by {self.shortfall_gib:.1f} GiB per GPU)"
            )
        if self.suggestions:
            return f"does not fit: {gap}; would fit with " + " or ".join(s.change for s in self.suggestions)
        return f"does not fit: {gap}; no single change found, use a larger GPU"

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict (rounded to 3 decimals for GiB figures)."""
        data = asdict(self)
        for key in ("weights_gib", "activation_gib", "budget_gib", "kv_cache_gib"):
            data[key] = round(data[key], 3)
        data["shortfall_gib"] = round(self.shortfall_gib, 3)
        data["verdict"] = self.verdict()
        return data


def tp_errors(arch: Architecture, tensor_parallel: int, pipeline_parallel: int = 1) -> list[str]:
    """Tensor/pipeline parallel divisibility errors, worded as vLLM words them."""
    errors = []
    if arch.heads % tensor_parallel:
        errors.append(
            f"Total number of attention heads ({arch.heads}) must be divisible by tensor parallel "
            f"size ({tensor_parallel})."
        )
    kv_ok = (
        tensor_parallel % arch.kv_heads == 0
        if tensor_parallel >= arch.kv_heads
        else arch.kv_heads % tensor_parallel == 0
    )
    if not kv_ok:
        errors.append(
            f"Total number of key/value heads ({arch.kv_heads}) must be divisible by tensor parallel "
            f"size ({tensor_parallel}), or tensor parallel size by it."
        )
    if pipeline_parallel > arch.layers:
        errors.append(f"Pipeline parallel size ({pipeline_parallel}) exceeds the number of layers ({arch.layers}).")
    return errors


def kv_dtype_bytes(dtype: DType, kv_cache_dtype: KvCacheDType) -> float:
    """KV cache bytes per element: `auto` keeps 16 bits (quantised weights keep an fp16 cache)."""
    if kv_cache_dtype is KvCacheDType.AUTO:
        return 2.0
    return _KV_BYTES[kv_cache_dtype]


def weight_bytes(arch: Architecture, dtype: DType) -> float:
    """Total weight bytes; 4/8-bit formats keep embeddings and LM head in 16 bits."""
    per = WEIGHT_BYTES[dtype]
    if per >= 2:
        return arch.parameters * per
    embed = min(2 * arch.vocab * arch.hidden, arch.parameters)
    return (arch.parameters - embed) * per * _QUANT_OVERHEAD.get(dtype, 1.0) + embed * 2


def plan(arch: Architecture, dep: Deployment, *, suggest: bool = True) -> VramPlan:
    """Plan one deployment; with `suggest`, also search the smallest changes that make it fit."""
    tp, pp = dep.tensor_parallel, dep.pipeline_parallel
    gpus_used = tp * pp
    errors = tp_errors(arch, tp, pp)
    if gpus_used > dep.gpu_count:
        errors.append(f"tensor_parallel × pipeline_parallel = {gpus_used} exceeds the node's {dep.gpu_count} GPUs.")
    kv_el = kv_dtype_bytes(dep.dtype, dep.kv_cache_dtype)
    kv_token = int(2 * arch.layers * arch.kv_heads * arch.head_dim * kv_el)
    kv_heads_per_gpu = max(arch.kv_heads / tp, 1.0)
    kv_token_gpu = int(2 * math.ceil(arch.layers / pp) * kv_heads_per_gpu * arch.head_dim * kv_el)
    weights = weight_bytes(arch, dep.dtype) / gpus_used / GIB
    activation = MAX_BATCHED_TOKENS * arch.hidden * _ACTIVATION_BYTES_PER_TOKEN_HIDDEN / tp / GIB
    overhead = _NON_TORCH_GIB + (_NCCL_GIB if gpus_used > 1 else 0.0)
    budget = dep.gpu_usable_gib * dep.utilization
    kv_cache = budget - weights - activation - overhead
    max_tokens = max(0, int(kv_cache * GIB // kv_token_gpu)) if kv_cache > 0 else 0
    required = dep.context_length * dep.concurrency
    fits = not errors and max_tokens >= required
    result = VramPlan(
        gpu=dep.gpu,
        gpus_used=gpus_used,
        weights_gib=weights,
        activation_gib=activation + overhead,
        budget_gib=budget,
        kv_cache_gib=kv_cache,
        kv_bytes_per_token=kv_token,
        kv_bytes_per_token_per_gpu=kv_token_gpu,
        max_tokens=max_tokens,
        max_sequences=max_tokens // dep.context_length if dep.context_length else 0,
        required_tokens=required,
        fits=fits,
        errors=errors,
    )
    if fits or errors or not suggest:
        return result
    return replace(result, suggestions=_suggest(arch, dep, max_tokens))


def _fits(arch: Architecture, dep: Deployment) -> bool:
    return plan(arch, dep, suggest=False).fits


def _suggest(arch: Architecture, dep: Deployment, max_tokens: int) -> list[Suggestion]:
    """Smallest single changes that fit, most preferable first."""
    out: list[Suggestion] = []
    for tp in range(dep.tensor_parallel + 1, 17):
        if tp_errors(arch, tp) or tp * dep.pipeline_parallel > max(dep.gpu_count, 16):
            continue
        trial = replace(dep, tensor_parallel=tp, gpu_count=max(dep.gpu_count, tp * dep.pipeline_parallel))
        if _fits(arch, trial):
            more = "" if tp * dep.pipeline_parallel <= dep.gpu_count else f" ({tp} GPUs)"
            out.append(Suggestion(f"tensor_parallel {tp}{more}", "tensor_parallel", tp))
            break
    if dep.kv_cache_dtype is not KvCacheDType.FP8 and _fits(arch, replace(dep, kv_cache_dtype=KvCacheDType.FP8)):
        out.append(Suggestion("kv_cache_dtype fp8", "kv_cache_dtype", "fp8"))
    for dtype in (DType.FP8, DType.AWQ):
        if WEIGHT_BYTES[dtype] < WEIGHT_BYTES[dep.dtype] and _fits(arch, replace(dep, dtype=dtype)):
            out.append(Suggestion(f"dtype {dtype.value}", "dtype", dtype.value))
            break
    if dep.utilization < 0.95 and _fits(arch, replace(dep, utilization=0.95)):
        out.append(Suggestion("gpu_memory_utilization 0.95", "gpu_memory_utilization", 0.95))
    if max_tokens >= 128 * dep.concurrency:
        ctx = max_tokens // dep.concurrency
        out.append(Suggestion(f"context_length ≤ {ctx}", "context_length", ctx))
    if dep.concurrency > 1 and max_tokens >= dep.context_length:
        conc = max_tokens // dep.context_length
        out.append(Suggestion(f"max_concurrency ≤ {conc}", "max_concurrency", conc))
    return out


def model_arch(svc: InferenceService, cat: ResolvedCatalogue) -> Architecture | None:
    """The served model's architecture: explicit fields over the catalogue entry of its name."""
    base = cat.models.get(svc.model.name)
    fields = ("parameters", "layers", "heads", "kv_heads", "head_dim", "vocab")
    values = {
        f: getattr(svc.model, f)
        if getattr(svc.model, f) is not None
        else (getattr(base, f) if base is not None else None)
        for f in fields
    }
    if any(v is None for v in values.values()):
        return None
    return Architecture(**values)  # type: ignore[arg-type]


def deployment(svc: InferenceService, node: Node, cat: ResolvedCatalogue) -> Deployment:
    """The VRAM deployment of a service on one node."""
    gpu = cat.gpus[node.gpu.model]
    return Deployment(
        gpu=node.gpu.model,
        gpu_usable_gib=gpu.usable_gib,
        gpu_count=node.gpu.count,
        dtype=svc.model.dtype,
        kv_cache_dtype=svc.kv_cache_dtype,
        tensor_parallel=svc.tensor_parallel,
        pipeline_parallel=svc.pipeline_parallel,
        utilization=svc.gpu_memory_utilization,
        context_length=svc.model.context_length,
        concurrency=svc.max_concurrency,
    )
