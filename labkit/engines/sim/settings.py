"""What a simulated engine settles at start (vLLM's serve defaults and chunk rules) and the
counters it keeps for /metrics. Used by labkit/engines/sim/engine.py (which re-exports them)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EngineStats:
    """Counters and histogram samples behind vLLM's /metrics names (vllm/v1/metrics/loggers.py)."""

    prompt_tokens_by_source: dict[str, int] = field(default_factory=lambda: {
        "local_compute": 0, "local_cache_hit": 0, "external_kv_transfer": 0})
    prompt_tokens: int = 0
    generation_tokens: int = 0
    request_success: dict[str, int] = field(default_factory=dict)
    num_steps: int = 0
    busy_time: float = 0.0
    # histogram samples, drained by take_samples()
    samples: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in (
        "time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
        "request_queue_time_seconds", "request_prefill_time_seconds", "request_decode_time_seconds",
        "request_inference_time_seconds", "request_prompt_tokens", "request_generation_tokens",
        "iteration_tokens_total")})

    def take_samples(self) -> dict[str, list[float]]:
        out = self.samples
        self.samples = {k: [] for k in out}
        return out


def serve_defaults(gpu_key: str, memory_bytes: int) -> tuple[int, int]:
    """vLLM's `vllm serve` defaults (engine/arg_utils.py): (max_num_batched_tokens, max_num_seqs)."""
    if memory_bytes >= 70 * 2**30 and gpu_key != "a100":
        return 8192, 1024
    return 2048, 256


def _chunk(requested: int | None, default: int, max_model_len: int, chunked: bool) -> int:
    """max_num_batched_tokens as vLLM settles it: without chunked prefill the default grows
    to max_model_len (engine/arg_utils.py) and a smaller explicit chunk is an error
    (config/scheduler.py verify_max_model_len)."""
    if chunked:
        return requested or default
    if requested is None:
        return max(max_model_len, default)
    if requested < max_model_len:
        raise ValueError(f"max_num_batched_tokens ({requested}) is smaller than max_model_len "
                         f"({max_model_len}) with chunked prefill off: enable chunked prefill, "
                         "raise max_num_batched_tokens or lower max_model_len")
    return requested
