"""GPU memory planning: does a model fit, how much KV cache is left, and what would make it fit.

The budget rule is vLLM V1's (`gpu_worker.determine_available_memory`): per GPU,

    kv_cache = total_memory × gpu_memory_utilization − weights − activation peak − non-torch memory

with `total_memory` the device memory CUDA reports (not the marketing size). Each term is modelled
the way the engine produces it:

- **weights** from the model's config.json shapes (embeddings, LM head, attention, dense MLP or MoE
  experts + shared expert), each part in its own dtype: a quantised checkpoint keeps the parts named in
  its catalogue entry (`bf16_parts`) in 16 bits; tensor parallel splits everything except replicated
  KV heads (TP > KV heads);
- **activation peak** of the profile run: vLLM runs one dummy batch of `max_num_batched_tokens` tokens
  and one dummy sampler step of `max_num_seqs` rows. The peak is the larger of the attention and the
  MLP/MoE live tensors per token (16-bit), plus the fp32 logits of the sampler step;
- **non-torch memory** (CUDA context, cuBLAS workspaces, NCCL and custom all-reduce buffers) per GPU
  model and TP, from the catalogue where a vLLM log published it, else a stated default.

tests/fixtures/vram/vllm_logs.yaml holds real vLLM start-up logs (cited); tests/unit/test_vram_logs.py
checks weights within 5 % and KV cache within 10 % of every row that states them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from infra.model.catalogue import ResolvedCatalogue
from infra.model.site import DType, GpuCatalogueEntry, InferenceService, KvCacheDType, ModelArch, Node

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
# Activations are 16-bit; the sampler's logits are fp32.
_ACT_BYTES = 2
_LOGIT_BYTES = 4

# vLLM V1's profile sizes (vllm/engine/arg_utils.py `_set_default_args`, OpenAI server): GPUs with at least
# 70 GiB that are not A100s get max_num_batched_tokens 8192 and max_num_seqs 1024, the others 2048 and 256.
_BIG_GPU_GIB = 70
_PROFILE_BIG = (8192, 1024)
_PROFILE_SMALL = (2048, 256)
# Non-torch memory when the catalogue has no published figure for the GPU (an assumption, stated in
# docs/inference.md): CUDA context and workspaces, plus NCCL buffers when tensor parallel.
DEFAULT_NON_TORCH_GIB = 0.5
DEFAULT_NON_TORCH_TP_GIB = 0.5
_DEFAULT_BF16_PARTS = ("embeddings", "lm_head")


@dataclass(frozen=True)
class Architecture:
    """Size figures of a transformer model (config.json names in the comments)."""

    parameters: float
    layers: int  # num_hidden_layers
    heads: int  # num_attention_heads
    kv_heads: int  # num_key_value_heads
    head_dim: int  # head_dim (not hidden_size / heads: they differ for some models)
    vocab: int  # vocab_size
    hidden_size: int | None = None  # hidden_size; unset: heads × head_dim
    intermediate_size: int | None = None  # dense MLP; unset: derived from the parameter count
    experts: int = 0  # num_experts / num_local_experts
    experts_per_token: int = 0  # num_experts_per_tok
    moe_intermediate_size: int | None = None  # one expert's intermediate size
    shared_expert_intermediate_size: int = 0
    tie_word_embeddings: bool = False
    bf16_parts: tuple[str, ...] = _DEFAULT_BF16_PARTS

    @property
    def hidden(self) -> int:
        """Hidden size: config.json's `hidden_size`, else attention heads × head dim."""
        return self.hidden_size or self.heads * self.head_dim

    @property
    def embedding_params(self) -> int:
        """Parameters of the token embedding."""
        return self.vocab * self.hidden

    @property
    def lm_head_params(self) -> int:
        """Parameters of the LM head (0 when tied to the embedding)."""
        return 0 if self.tie_word_embeddings else self.vocab * self.hidden

    @property
    def attention_params(self) -> int:
        """Parameters of one layer's attention: q, k, v and o projections."""
        q = self.heads * self.head_dim
        return self.hidden * (q + 2 * self.kv_heads * self.head_dim) + q * self.hidden

    def _mlp_budget(self) -> float:
        """Parameters per layer left for the MLP by the published total (used when sizes are unset)."""
        rest = self.parameters - self.embedding_params - self.lm_head_params - self.layers * self.attention_params
        return max(rest / self.layers, 0.0)

    @property
    def expert_intermediate(self) -> float:
        """One expert's intermediate size (derived from the total when config values are missing)."""
        if self.moe_intermediate_size is not None:
            return float(self.moe_intermediate_size)
        shared = 3 * self.hidden * self.shared_expert_intermediate_size
        return max(self._mlp_budget() - shared, 0.0) / (3 * self.hidden * max(self.experts, 1))

    @property
    def dense_intermediate(self) -> float:
        """Dense MLP intermediate size (derived from the total when config.json's is missing)."""
        if self.intermediate_size is not None:
            return float(self.intermediate_size)
        return self._mlp_budget() / (3 * self.hidden)

    @property
    def mlp_params(self) -> float:
        """Parameters of one layer's MLP: gate, up and down projections of the dense MLP or all experts."""
        if self.experts:
            routed = self.experts * 3 * self.hidden * self.expert_intermediate
            return routed + 3 * self.hidden * self.shared_expert_intermediate_size + self.hidden * self.experts
        return 3 * self.hidden * self.dense_intermediate

    @property
    def computed_parameters(self) -> float:
        """Parameter count from the shapes (norms and biases left out: < 0.1 %)."""
        return self.embedding_params + self.lm_head_params + self.layers * (self.attention_params + self.mlp_params)


@dataclass(frozen=True)
class Deployment:
    """How a model is deployed: precision, GPUs, parallelism, load and the engine's profile sizes."""

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
    # Profile run sizes; unset: vLLM V1's defaults for the GPU (batched tokens) and `concurrency`
    # (gpufleet passes max_concurrency as --max-num-seqs).
    max_num_batched_tokens: int | None = None
    max_num_seqs: int | None = None
    non_torch_gib: float = DEFAULT_NON_TORCH_GIB
    non_torch_tp_gib: float = DEFAULT_NON_TORCH_TP_GIB
    nodes: int = 1
    """Nodes the pipeline stages are spread over: 1, or a service spanning nodes (one stage per node, vLLM's
    multi-node mode), where each node holds `tensor_parallel` GPUs of the instance, not TP × PP."""

    @property
    def gpus_per_node(self) -> int:
        """GPUs of one instance on each of its nodes: TP × the pipeline stages that node runs."""
        return self.tensor_parallel * math.ceil(self.pipeline_parallel / max(self.nodes, 1))


def non_torch(gpu: GpuCatalogueEntry | None) -> tuple[float, float]:
    """(non_torch_gib, non_torch_tp_gib) of a GPU: the catalogue's published figures, else the defaults."""
    base = gpu.non_torch_gib if gpu is not None and gpu.non_torch_gib is not None else DEFAULT_NON_TORCH_GIB
    tp = gpu.non_torch_tp_gib if gpu is not None and gpu.non_torch_tp_gib is not None else DEFAULT_NON_TORCH_TP_GIB
    return base, tp


def profile_defaults(gpu: str, gpu_usable_gib: float) -> tuple[int, int]:
    """Default (max_num_batched_tokens, max_num_seqs) of vLLM V1's OpenAI server on this GPU."""
    if gpu_usable_gib >= _BIG_GPU_GIB and "a100" not in gpu.lower():
        return _PROFILE_BIG
    return _PROFILE_SMALL


@dataclass(frozen=True)
class Suggestion:
    """A single change to the deployment that makes the model fit."""

    change: str
    field: str
    value: Any


@dataclass(frozen=True)
class VramPlan:
    """The result of planning one deployment (all memory figures per GPU, GiB)."""

    gpu: str
    gpus_used: int
    total_gib: float
    utilization: float
    budget_gib: float
    weights_gib: float
    activation_gib: float
    non_torch_gib: float
    kv_cache_gib: float
    over_budget_gib: float
    profile_tokens: int
    profile_seqs: int
    kv_bytes_per_token: int
    kv_bytes_per_token_per_gpu: int
    max_tokens: int
    max_sequences: int
    required_tokens: int
    fits: bool
    errors: list[str] = field(default_factory=list)
    suggestions: list[Suggestion] = field(default_factory=list)
    nodes: int = 1
    """Nodes of one instance (a service spanning nodes); every figure above is still per GPU."""
    gpus_per_node: int = 0
    """GPUs of one instance on each node (TP × its pipeline stages); `gpus_used` is the whole instance's."""

    @property
    def weights_per_node_gib(self) -> float:
        """The weights one node holds: its share of the layers over its GPUs (the per-node share)."""
        return self.weights_gib * self.gpus_per_node

    @property
    def shortfall_gib(self) -> float:
        """KV cache missing for the required tokens, GiB per GPU (0 when it fits)."""
        need = self.required_tokens * self.kv_bytes_per_token_per_gpu / GIB
        return max(0.0, need - self.kv_cache_gib)

    def verdict(self) -> str:
        """One sentence for people: fits, or by how much not, why, and what would fit."""
        if self.errors:
            return "; ".join(self.errors)
        if self.fits:
            return (
                f"fits: {self.kv_cache_gib:.1f} GiB KV cache per GPU holds {self.max_tokens} tokens "
                f"({self.max_sequences} sequences at full context)"
            )
        if self.over_budget_gib > 0:
            gap = (
                f"no room for a KV cache: weights {self.weights_gib:.1f} + activation {self.activation_gib:.1f} "
                f"+ non-torch {self.non_torch_gib:.1f} GiB exceed the budget of {self.budget_gib:.1f} GiB per GPU "
                f"by {self.over_budget_gib:.1f} GiB"
            )
        else:
            gap = (
                f"KV cache holds {self.max_tokens} tokens but {self.required_tokens} are needed "
                f"(short by {self.shortfall_gib:.1f} GiB per GPU)"
            )
        if self.suggestions:
            return f"does not fit: {gap}; would fit with " + " or ".join(s.change for s in self.suggestions)
        return f"does not fit: {gap}; no single change found, use a larger GPU"

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict (GiB figures rounded to 3 decimals)."""
        data = asdict(self)
        for key in ("total_gib", "budget_gib", "weights_gib", "activation_gib", "non_torch_gib", "kv_cache_gib",
                    "over_budget_gib"):
            data[key] = round(data[key], 3)
        data["shortfall_gib"] = round(self.shortfall_gib, 3)
        data["weights_per_node_gib"] = round(self.weights_per_node_gib, 3)
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


def _part_bytes(arch: Architecture, dtype: DType, part: str) -> float:
    """Bytes per parameter of one checkpoint part: 16 bits for the parts the checkpoint keeps in bf16."""
    per = WEIGHT_BYTES[dtype]
    if per >= 2 or part in arch.bf16_parts:
        return 2.0
    return per * _QUANT_OVERHEAD.get(dtype, 1.0)


def weight_bytes(arch: Architecture, dtype: DType, tensor_parallel: int = 1, pipeline_parallel: int = 1) -> float:
    """Weight bytes on one GPU: every part in its own dtype, split by TP (KV heads replicated when TP > them)."""
    tp, pp = tensor_parallel, pipeline_parallel
    total = arch.embedding_params * _part_bytes(arch, dtype, "embeddings")
    total += arch.lm_head_params * _part_bytes(arch, dtype, "lm_head")
    attn = _part_bytes(arch, dtype, "attention")
    q_o = 2 * arch.hidden * arch.heads * arch.head_dim
    k_v = 2 * arch.hidden * arch.kv_heads * arch.head_dim
    # vLLM's QKVParallelLinear replicates KV heads when TP exceeds them: each GPU holds at least one.
    kv_per_gpu = max(arch.kv_heads / tp, 1.0) / arch.kv_heads
    per_gpu = total / tp
    per_gpu += arch.layers * (q_o / tp + k_v * kv_per_gpu) * attn
    # MLP layers kept in 16 bits are named one by one (`mlp.<layer>`); the others share the deployment's dtype.
    kept_layers = {int(p[4:]) for p in arch.bf16_parts if p.startswith("mlp.") and int(p[4:]) < arch.layers}
    kept = len(kept_layers) if WEIGHT_BYTES[dtype] < 2 else 0
    mlp = kept * 2.0 + (arch.layers - kept) * _part_bytes(arch, dtype, "mlp")
    per_gpu += arch.mlp_params * mlp / tp
    return per_gpu / pp


def activation_bytes(arch: Architecture, tokens: int, seqs: int, tensor_parallel: int = 1) -> float:
    """Peak activation of vLLM's profile run on one GPU: one batch of `tokens`, one sampler step of `seqs`.

    The peak is the larger of two phases, per token: attention (residual, normed input, q/k/v and the
    attention output) and MLP (residual, normed input, gate+up and the activated half; for MoE the fused
    kernel's caches of `experts_per_token` copies of gate+up, activated and down outputs). The sampler adds
    `seqs` rows of fp32 logits over the whole vocabulary (gathered, not split by TP).
    """
    tp, h = tensor_parallel, arch.hidden
    q = arch.heads * arch.head_dim / tp
    kv = max(arch.kv_heads / tp, 1.0) * arch.head_dim
    attention = 2 * h + q + 2 * kv + q
    if arch.experts:
        per_expert = 3 * arch.expert_intermediate / tp + h
        mlp = 2 * h + arch.experts_per_token * per_expert + 3 * arch.shared_expert_intermediate_size / tp
    else:
        mlp = 2 * h + 3 * arch.dense_intermediate / tp
    return tokens * max(attention, mlp) * _ACT_BYTES + seqs * arch.vocab * _LOGIT_BYTES


def plan(arch: Architecture, dep: Deployment, *, suggest: bool = True) -> VramPlan:
    """Plan one deployment; with `suggest`, also search the smallest changes that make it fit."""
    tp, pp = dep.tensor_parallel, dep.pipeline_parallel
    gpus_used = tp * pp
    errors = tp_errors(arch, tp, pp)
    if dep.nodes > 1 and dep.gpus_per_node > dep.gpu_count:
        errors.append(
            f"tensor_parallel × pipeline stages per node = {dep.gpus_per_node} exceeds the node's "
            f"{dep.gpu_count} GPUs (pipeline_parallel {pp} over {dep.nodes} nodes)."
        )
    elif dep.nodes <= 1 and gpus_used > dep.gpu_count:
        errors.append(f"tensor_parallel × pipeline_parallel = {gpus_used} exceeds the node's {dep.gpu_count} GPUs.")
    kv_el = kv_dtype_bytes(dep.dtype, dep.kv_cache_dtype)
    kv_token = int(2 * arch.layers * arch.kv_heads * arch.head_dim * kv_el)
    kv_heads_per_gpu = max(arch.kv_heads / tp, 1.0)
    kv_token_gpu = int(2 * math.ceil(arch.layers / pp) * kv_heads_per_gpu * arch.head_dim * kv_el)
    default_tokens, _ = profile_defaults(dep.gpu, dep.gpu_usable_gib)
    tokens = dep.max_num_batched_tokens or default_tokens
    seqs = dep.max_num_seqs or dep.concurrency
    weights = weight_bytes(arch, dep.dtype, tp, pp) / GIB
    activation = activation_bytes(arch, tokens, seqs, tp) / GIB
    non_torch = dep.non_torch_gib + (dep.non_torch_tp_gib if gpus_used > 1 else 0.0)
    budget = dep.gpu_usable_gib * dep.utilization
    left = budget - weights - activation - non_torch
    kv_cache = max(left, 0.0)
    max_tokens = int(kv_cache * GIB // kv_token_gpu)
    required = dep.context_length * dep.concurrency
    fits = not errors and max_tokens >= required
    result = VramPlan(
        gpu=dep.gpu,
        gpus_used=gpus_used,
        total_gib=dep.gpu_usable_gib,
        utilization=dep.utilization,
        budget_gib=budget,
        weights_gib=weights,
        activation_gib=activation,
        non_torch_gib=non_torch,
        kv_cache_gib=kv_cache,
        over_budget_gib=max(-left, 0.0),
        profile_tokens=tokens,
        profile_seqs=seqs,
        kv_bytes_per_token=kv_token,
        kv_bytes_per_token_per_gpu=kv_token_gpu,
        max_tokens=max_tokens,
        max_sequences=max_tokens // dep.context_length if dep.context_length else 0,
        required_tokens=required,
        fits=fits,
        errors=errors,
        nodes=dep.nodes,
        gpus_per_node=dep.gpus_per_node,
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
        per_node = replace(dep, tensor_parallel=tp).gpus_per_node  # TP × PP on one node, TP × stages when spanning
        if tp_errors(arch, tp) or per_node > max(dep.gpu_count, 16):
            continue
        trial = replace(dep, tensor_parallel=tp, gpu_count=max(dep.gpu_count, per_node))
        if _fits(arch, trial):
            more = "" if per_node <= dep.gpu_count else f" ({tp} GPUs)"
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


def architecture(m: ModelArch) -> Architecture:
    """The planner's architecture of a catalogue entry."""
    return Architecture(
        parameters=m.parameters, layers=m.layers, heads=m.heads, kv_heads=m.kv_heads, head_dim=m.head_dim,
        vocab=m.vocab, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size, experts=m.experts,
        experts_per_token=m.experts_per_token, moe_intermediate_size=m.moe_intermediate_size,
        shared_expert_intermediate_size=m.shared_expert_intermediate_size,
        tie_word_embeddings=m.tie_word_embeddings,
        bf16_parts=tuple(m.bf16_parts) if m.bf16_parts is not None else _DEFAULT_BF16_PARTS,
    )


def model_arch(svc: InferenceService, cat: ResolvedCatalogue) -> Architecture | None:
    """The served model's architecture: explicit fields over the catalogue entry of its name.

    Shapes beyond the six basic figures (hidden size, MLP and expert sizes, bf16 parts) come only from the
    catalogue entry, and only when no basic figure is overridden (they would describe another model).
    """
    base = cat.models.get(svc.model.name)
    fields = ("parameters", "layers", "heads", "kv_heads", "head_dim", "vocab")
    explicit = {f: getattr(svc.model, f) for f in fields if getattr(svc.model, f) is not None}
    if base is not None and not explicit:
        return architecture(base)
    values = {f: explicit.get(f, getattr(base, f) if base is not None else None) for f in fields}
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
        non_torch_gib=non_torch(gpu)[0],
        non_torch_tp_gib=non_torch(gpu)[1],
        # A spanning service: its pipeline stages are its nodes (validation holds vLLM to one stage per node).
        nodes=len(dict.fromkeys(svc.nodes)) if svc.span_nodes else 1,
    )
