"""The metric names gpufleet's rules read, each from the source that exports it (cited per block).

Nothing here is invented: an engine that does not export a figure gets it from the SLO probe
(`gpufleet_probe_*`, see `infra.observe.probe`), never from a guess.
"""

from __future__ import annotations

from dataclasses import dataclass

from infra.model.site import Engine
from infra.observe.probe import (
    PROBE_FAILURES,
    PROBE_ITL_BUCKET,
    PROBE_PORT,
    PROBE_REQUESTS,
    PROBE_TOKENS_PER_S,
    PROBE_TTFT_BUCKET,
    PROBE_UP,
)

# The SLO probe's own series and port are defined beside the probe (stdlib only, it runs as a zipapp).
__all__ = [
    "DCGM_FIELDS",
    "ENGINE_METRICS",
    "PROBE_FAILURES",
    "PROBE_ITL_BUCKET",
    "PROBE_PORT",
    "PROBE_REQUESTS",
    "PROBE_TOKENS_PER_S",
    "PROBE_TTFT_BUCKET",
    "PROBE_UP",
    "DcgmField",
    "EngineMetrics",
    "dcgm_counters_csv",
]

@dataclass(frozen=True)
class EngineMetrics:
    """PromQL building blocks of one engine's own /metrics (None: the engine does not export it)."""

    ttft_bucket: str | None
    """Histogram of time to first token, seconds (`_bucket` series)."""
    itl_bucket: str | None
    """Histogram of time between output tokens, seconds (`_bucket` series)."""
    generated_tokens: str | None
    """Counter of generated tokens."""
    requests: str | None
    """Counter of all requests (selector)."""
    failed_requests: str | None
    """Counter of failed requests (selector)."""
    running: str | None
    """Gauge of requests being processed (tokens/s is only judged while there are any)."""


ENGINE_METRICS: dict[Engine, EngineMetrics] = {
    # vLLM 0.33: vllm/v1/metrics/loggers.py (vllm:time_to_first_token_seconds, vllm:inter_token_latency_seconds,
    # vllm:generation_tokens, vllm:num_requests_running); HTTP status counters from
    # prometheus-fastapi-instrumentator (vllm/entrypoints/serve/instrumentator/metrics.py), status grouped as 5xx.
    Engine.VLLM: EngineMetrics(
        ttft_bucket="vllm:time_to_first_token_seconds_bucket",
        itl_bucket="vllm:inter_token_latency_seconds_bucket",
        generated_tokens="vllm:generation_tokens_total",
        requests='http_requests_total{handler=~"/v1/.*"}',
        failed_requests='http_requests_total{handler=~"/v1/.*",status="5xx"}',
        running="vllm:num_requests_running",
    ),
    # TGI: https://huggingface.co/docs/text-generation-inference/reference/metrics (no TTFT histogram;
    # tgi_request_mean_time_per_token_duration is the per-request mean time per output token).
    Engine.TGI: EngineMetrics(
        ttft_bucket=None,
        itl_bucket="tgi_request_mean_time_per_token_duration_bucket",
        generated_tokens="tgi_request_generated_tokens_sum",
        requests="tgi_request_count",
        failed_requests="tgi_request_failure",
        running="tgi_batch_current_size",
    ),
    # llama-cpp-python's server exports none of these: the probe measures them.
    Engine.LLAMACPP: EngineMetrics(None, None, None, None, None, None),
}

@dataclass(frozen=True)
class DcgmField:
    """One DCGM field dcgm-exporter exports (its CSV format: field, Prometheus type, help)."""

    name: str
    kind: str
    help: str


# What the GPU alerts read. dcgm-exporter's default list (etc/default-counters.csv) leaves the ECC and
# NVLink CRC counters commented out and its XID gauge only holds the last XID (dcgm-exporter #500),
# so gpufleet ships its own list (rendered by `dcgm_counters_csv`) and alerts on XID *changes*.
DCGM_FIELDS: tuple[DcgmField, ...] = (
    DcgmField("DCGM_FI_DEV_GPU_TEMP", "gauge", "GPU temperature (in C)."),
    DcgmField("DCGM_FI_DEV_POWER_USAGE", "gauge", "Power draw (in W)."),
    DcgmField("DCGM_FI_DEV_GPU_UTIL", "gauge", "GPU utilization (in %)."),
    DcgmField("DCGM_FI_DEV_FB_FREE", "gauge", "Framebuffer memory free (in MiB)."),
    DcgmField("DCGM_FI_DEV_FB_USED", "gauge", "Framebuffer memory used (in MiB)."),
    DcgmField("DCGM_FI_DEV_XID_ERRORS", "gauge", "Value of the last XID error encountered."),
    DcgmField("DCGM_FI_DEV_ECC_SBE_VOL_TOTAL", "counter", "Total number of single-bit volatile ECC errors."),
    DcgmField("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", "counter", "Total number of double-bit volatile ECC errors."),
    DcgmField("DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", "counter", "Remapped rows for uncorrectable errors."),
    DcgmField("DCGM_FI_DEV_ROW_REMAP_FAILURE", "gauge", "Whether remapping of rows has failed."),
    DcgmField("DCGM_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL", "counter", "NVLink flow-control CRC errors."),
    DcgmField("DCGM_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL", "counter", "NVLink data CRC errors."),
)


def dcgm_counters_csv() -> str:
    """dcgm-exporter's counters file (`-f FILE`) with the fields the alerts need."""
    lines = [
        "# Written by gpufleet (infra/observe/metrics.py): the DCGM fields its GPU alerts read.",
        "# DCGM FIELD, Prometheus metric type, help message",
    ]
    lines += [f"{f.name}, {f.kind}, {f.help}" for f in DCGM_FIELDS]
    return "\n".join(lines) + "\n"
