"""The simulated engine's /metrics: vLLM 0.26's metric names, labels and bucket boundaries.

Names, help texts and buckets are copied from vllm/v1/metrics/loggers.py
(PrometheusStatLogger) and, for NIXL, from
vllm/distributed/kv_transfer/kv_connector/v1/nixl/stats.py; labels are `engine="0"` and
`model_name=...` as in ../shared/fixtures/vllm-0.26/metrics/nixl-decode.txt. One extra
family, `labkit:sim_info{kind="sim", gpu_type=...}`, tells a reader the engine is simulated.

`SimMetrics.update(engine)` runs after every engine step: gauges are set, counters advance
by what the engine's cumulative counts grew, histogram samples are drained and observed.
Times are simulated seconds (what the modelled GPU would take).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    gc_collector,
    generate_latest,
    platform_collector,
    process_collector,
)

if TYPE_CHECKING:
    from labkit.engines.sim.connector import TransferRecord
    from labkit.engines.sim.engine import SimEngine

LABELS = ["engine", "model_name"]

TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0]
REQUEST_LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                           50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]
ITERATION_TOKENS_BUCKETS = [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]
_NIXL_TIME = [0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 5.0]
NIXL_XFER_TIME_BUCKETS = _NIXL_TIME[1:]
NIXL_POST_TIME_BUCKETS = _NIXL_TIME
NIXL_BYTES_BUCKETS = [2 ** (10 + i) for i in range(1, 25, 2)]  # 2 KiB .. 8 GiB
NIXL_DESCRIPTORS_BUCKETS = [10, 20, 30, 50, 75, 100, 200, 400, 1000, 2000, 4000, 10000, 20000,
                            50000]
# vLLM's KV offload (distributed/kv_transfer/kv_connector/v1/offloading/metrics.py,
# v1/kv_offload/cpu/spec.py): bytes per transfer, CPU blocks per prepare_store.
OFFLOAD_SIZE_BUCKETS = [1e6, 5e6, 10e6, 20e6, 40e6, 60e6, 80e6, 100e6, 150e6, 200e6]
OFFLOAD_ALLOCATION_BUCKETS = [1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144]
PROMPT_SOURCES = ("local_compute", "local_cache_hit", "external_kv_transfer")
FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")


def build_1_2_5_buckets(max_value: int) -> list[int]:
    """loggers.py build_1_2_5_buckets: 1, 2, 5, 10, 20, 50, ... up to `max_value`."""
    buckets: list[int] = []
    exponent = 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > max_value:
                return buckets
            buckets.append(value)
        exponent += 1


def cache_config_labels(engine: SimEngine, cache_dtype: str, gpu_memory_utilization: float,
                        num_gpu_blocks_override: int | None) -> dict[str, str]:
    """vllm:cache_config_info labels, named as in fixtures/vllm-0.26/metrics/nixl-decode.txt."""
    tokens = engine.num_gpu_blocks * engine.block_size
    caching = engine.kv_cache_manager.block_pool.enable_caching
    return {
        "_block_size_resolved": "True", "block_size": str(engine.block_size),
        "cache_dtype": cache_dtype, "calculate_kv_scales": "False",
        "enable_prefix_caching": str(bool(caching)),
        "gpu_memory_utilization": f"{gpu_memory_utilization:g}",
        "is_attention_free": "False", "kv_cache_dtype_skip_layers": "[]",
        "kv_cache_max_concurrency": str(tokens / engine.max_model_len),
        "kv_cache_memory_bytes": "None", "kv_cache_size_tokens": str(tokens),
        "kv_offloading_backend": "native",
        "kv_offloading_size": str(float(size)) if (size := getattr(engine, "kv_offloading_size", None)) else "None",
        "kv_sharing_fast_prefill": "False", "num_cpu_blocks": "None",
        "num_gpu_blocks": str(engine.num_gpu_blocks),
        "num_gpu_blocks_override": str(num_gpu_blocks_override),
        "prefix_caching_hash_algo": "builtin", "sliding_window": "None",
        "user_specified_block_size": "True",
    }


# EngineStats.samples key -> (vLLM name, help, buckets or None for 1-2-5 of max_model_len)
_HISTOGRAMS: dict[str, tuple[str, str, list[float] | None]] = {
    "time_to_first_token_seconds": ("vllm:time_to_first_token_seconds",
                                    "Histogram of time to first token in seconds.", TTFT_BUCKETS),
    "inter_token_latency_seconds": ("vllm:inter_token_latency_seconds",
                                    "Histogram of inter-token latency in seconds.", ITL_BUCKETS),
    "e2e_request_latency_seconds": ("vllm:e2e_request_latency_seconds",
                                    "Histogram of e2e request latency in seconds.",
                                    REQUEST_LATENCY_BUCKETS),
    "request_queue_time_seconds": ("vllm:request_queue_time_seconds",
                                   "Histogram of time spent in WAITING phase for request.",
                                   REQUEST_LATENCY_BUCKETS),
    "request_inference_time_seconds": ("vllm:request_inference_time_seconds",
                                       "Histogram of time spent in RUNNING phase for request.",
                                       REQUEST_LATENCY_BUCKETS),
    "request_prefill_time_seconds": ("vllm:request_prefill_time_seconds",
                                     "Histogram of time spent in PREFILL phase for request.",
                                     REQUEST_LATENCY_BUCKETS),
    "request_decode_time_seconds": ("vllm:request_decode_time_seconds",
                                    "Histogram of time spent in DECODE phase for request.",
                                    REQUEST_LATENCY_BUCKETS),
    "request_prompt_tokens": ("vllm:request_prompt_tokens",
                              "Number of prefill tokens processed.", None),
    "request_generation_tokens": ("vllm:request_generation_tokens",
                                  "Number of generation tokens processed.", None),
    "iteration_tokens_total": ("vllm:iteration_tokens_total",
                               "Histogram of number of tokens per engine_step.",
                               ITERATION_TOKENS_BUCKETS),
}


class SimMetrics:
    """A Prometheus registry with vLLM's metric families for one simulated engine.

    Args:
        model_name: the served model name (label `model_name`).
        max_model_len: bounds the 1-2-5 token-count buckets, as in vLLM.
        cache_info: labels of `vllm:cache_config_info` (block_size, num_gpu_blocks, ...).
        gpu_type: a labkit.hardware.GPU_TYPES key, for `labkit:sim_info`.
        connector: "nixl" adds vLLM's NIXL transfer metrics.
        offload: True adds vLLM's KV-offload metrics (vllm:kv_offload_*).
        engine: the `engine` label (vLLM's engine index).
    """

    def __init__(self, model_name: str, *, max_model_len: int, cache_info: dict[str, str],
                 gpu_type: str, connector: str | None = None, engine: str = "0",
                 speed: str = "1", offload: bool = False) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        for collector in (process_collector.ProcessCollector, platform_collector.PlatformCollector,
                          gc_collector.GCCollector):
            collector(registry=self.registry)
        self.labels = {"engine": engine, "model_name": model_name}
        r = self.registry

        def gauge(name: str, doc: str) -> Any:
            return Gauge(name, doc, LABELS, registry=r).labels(**self.labels)

        def counter(name: str, doc: str) -> Any:
            return Counter(name, doc, LABELS, registry=r).labels(**self.labels)

        self.running = gauge("vllm:num_requests_running",
                             "Number of requests in model execution batches.")
        self.waiting = gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.")
        by_reason = Gauge("vllm:num_requests_waiting_by_reason",
                          "Number of waiting requests by reason.", [*LABELS, "reason"], registry=r)
        self.waiting_capacity = by_reason.labels(**self.labels, reason="capacity")
        self.waiting_deferred = by_reason.labels(**self.labels, reason="deferred")
        sleep = Gauge("vllm:engine_sleep_state", "Engine sleep state.", [*LABELS, "sleep_state"],
                      registry=r)
        for state, value in (("awake", 1), ("weights_offloaded", 0), ("discard_all", 0)):
            sleep.labels(**self.labels, sleep_state=state).set(value)
        self.kv_usage = gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.")
        self.counters: dict[str, Any] = {
            "prefix_queries": counter("vllm:prefix_cache_queries",
                                      "Prefix cache queries, in terms of number of queried tokens."),
            "prefix_hits": counter("vllm:prefix_cache_hits",
                                   "Prefix cache hits, in terms of number of cached tokens."),
            "external_queries": counter(
                "vllm:external_prefix_cache_queries",
                "External prefix cache queries from KV connector cross-instance cache sharing, "
                "in terms of number of queried tokens."),
            "external_hits": counter(
                "vllm:external_prefix_cache_hits",
                "External prefix cache hits from KV connector cross-instance cache sharing, "
                "in terms of number of cached tokens."),
            "preemptions": counter("vllm:num_preemptions",
                                   "Cumulative number of preemption from the engine."),
            "prompt_tokens": counter("vllm:prompt_tokens", "Number of prefill tokens processed."),
            "prompt_tokens_cached": counter("vllm:prompt_tokens_cached",
                                            "Number of cached prompt tokens (local + external)."),
            "generation_tokens": counter("vllm:generation_tokens",
                                         "Number of generation tokens processed."),
        }
        by_source = Counter("vllm:prompt_tokens_by_source", "Number of prompt tokens by source.",
                            [*LABELS, "source"], registry=r)
        for source in PROMPT_SOURCES:
            self.counters[f"source:{source}"] = by_source.labels(**self.labels, source=source)
        success = Counter("vllm:request_success", "Count of successfully processed requests.",
                          [*LABELS, "finished_reason"], registry=r)
        for reason in FINISH_REASONS:
            self.counters[f"success:{reason}"] = success.labels(**self.labels,
                                                                finished_reason=reason)
        self.histograms: dict[str, Any] = {}
        for key, (name, doc, buckets) in _HISTOGRAMS.items():
            b = buckets if buckets is not None else build_1_2_5_buckets(max_model_len)
            self.histograms[key] = Histogram(name, doc, LABELS, buckets=b,
                                             registry=r).labels(**self.labels)
        info = Gauge("vllm:cache_config_info", "Information of the LLMEngine CacheConfig",
                     sorted(set(cache_info) | {"engine"}), registry=r)
        info.labels(**{**cache_info, "engine": engine}).set(1)
        Gauge("labkit:sim_info", "This engine is SIMULATED by labkit (no GPU, no model weights).",
              ["kind", "gpu_type", "model_name", "speed"], registry=r).labels(
            kind="sim", gpu_type=gpu_type, model_name=model_name, speed=speed).set(1)
        self.nixl: dict[str, Any] = {}
        if connector == "nixl":
            self._add_nixl()
        self.offload: dict[str, Any] = {}
        if offload:
            self._add_offload()
        self._last: dict[str, int] = {}

    def _add_nixl(self) -> None:
        r, lab = self.registry, self.labels
        for key, name, doc, buckets in (
            ("xfer_time", "vllm:nixl_xfer_time_seconds",
             "Histogram of transfer duration for NIXL KV Cache transfers.", NIXL_XFER_TIME_BUCKETS),
            ("post_time", "vllm:nixl_post_time_seconds",
             "Histogram of transfer post time for NIXL KV Cache transfers.", NIXL_POST_TIME_BUCKETS),
            ("bytes", "vllm:nixl_bytes_transferred",
             "Histogram of bytes transferred per NIXL KV Cache transfers.", NIXL_BYTES_BUCKETS),
            ("descriptors", "vllm:nixl_num_descriptors",
             "Histogram of number of descriptors per NIXL  KV Cache transfers.",
             NIXL_DESCRIPTORS_BUCKETS),
        ):
            self.nixl[key] = Histogram(name, doc, LABELS, buckets=buckets, registry=r).labels(**lab)
        for key, name, doc in (
            ("failed_transfers", "vllm:nixl_num_failed_transfers",
             "Number of failed NIXL KV Cache transfers."),
            ("failed_notifications", "vllm:nixl_num_failed_notifications",
             "Number of failed NIXL KV Cache notifications."),
            ("expired", "vllm:nixl_num_kv_expired_reqs",
             "Number of requests that had their KV expire. NOTE: This metric is tracked on the "
             "P instance."),
        ):
            self.nixl[key] = Counter(name, doc, LABELS, registry=r).labels(**lab)

    def _add_offload(self) -> None:
        r, lab, o = self.registry, self.labels, self.offload
        typed = [*LABELS, "transfer_type"]
        total_bytes = Counter("vllm:kv_offload_total_bytes", "Number of bytes offloaded by KV connector",
                              typed, registry=r)
        total_time = Counter("vllm:kv_offload_total_time",
                             "Total time measured by all KV offloading operations", typed, registry=r)
        size = Histogram("vllm:kv_offload_size", "Histogram of KV offload transfer size, in bytes.",
                         typed, buckets=OFFLOAD_SIZE_BUCKETS, registry=r)
        for tt, op, word in (("CPU_to_GPU", "load", "loaded from offload storage to GPU"),
                             ("GPU_to_CPU", "store", "stored from GPU to offload storage")):
            o[f"total_bytes:{tt}"] = total_bytes.labels(**lab, transfer_type=tt)
            o[f"total_time:{tt}"] = total_time.labels(**lab, transfer_type=tt)
            o[f"size:{tt}"] = size.labels(**lab, transfer_type=tt)
            where = "from offload storage to GPU" if op == "load" else "from GPU to offload storage"
            o[f"{op}_bytes"] = Counter(f"vllm:kv_offload_{op}_bytes", f"Total bytes {word}.", LABELS,
                                       registry=r).labels(**lab)
            o[f"{op}_time"] = Counter(f"vllm:kv_offload_{op}_time",
                                      f"Total {op} time {where}, in seconds.", LABELS,
                                      registry=r).labels(**lab)
            o[f"{op}_size"] = Histogram(f"vllm:kv_offload_{op}_size",
                                        f"Histogram of KV offload {op} operation size, in bytes.",
                                        LABELS, buckets=OFFLOAD_SIZE_BUCKETS, registry=r).labels(**lab)
        for key, doc in (
            ("cpu_cache_usage_perc", "Fraction of CPU KV-cache space currently pinned by active "
             "transfers (0.0 = idle, 1.0 = saturated)."),
            ("cpu_cache_write_usage_perc", "Fraction of CPU KV-cache space currently pinned by "
             "in-flight stores that have not yet completed (0.0 = idle, 1.0 = saturated)."),
            ("cpu_cache_read_usage_perc", "Fraction of CPU KV-cache space currently pinned by "
             "in-flight loads that have not yet completed (0.0 = idle, 1.0 = saturated)."),
        ):
            o[key] = Gauge(f"vllm:kv_offload_{key}", doc, LABELS, registry=r).labels(**lab)
        o["allocation_size"] = Histogram(
            "vllm:kv_offload_cpu_allocation_size", "Histogram of the number of CPU blocks requested "
            "by each KV offload prepare_store call.", LABELS, buckets=OFFLOAD_ALLOCATION_BUCKETS,
            registry=r).labels(**lab)
        o["allocation_failure"] = Counter(
            "vllm:kv_offload_allocation_failure",
            "Number of KV offload store allocation attempts that failed.", LABELS,
            registry=r).labels(**lab)
        self._offload_seen = {"CPU_to_GPU": 0, "GPU_to_CPU": 0, "failures": 0}

    def update_offload(self, conn: Any) -> None:
        """The offload connector's finished jobs and CPU pool (engine.offload) -> metrics."""
        o = self.offload
        if not o or conn is None:
            return
        seen = self._offload_seen
        for tt, op in (("CPU_to_GPU", "load"), ("GPU_to_CPU", "store")):
            nbytes, seconds, sizes = conn.stats[tt]
            new = sizes[seen[tt]:]
            if not new:
                continue
            seen[tt] = len(sizes)
            # per-job bytes/time since the last update (the stats keep running totals)
            delta_bytes = sum(new)
            delta_time = seconds - getattr(self, f"_offload_time_{op}", 0.0)
            setattr(self, f"_offload_time_{op}", seconds)
            for counter in (o[f"total_bytes:{tt}"], o[f"{op}_bytes"]):
                counter.inc(delta_bytes)
            for counter in (o[f"total_time:{tt}"], o[f"{op}_time"]):
                counter.inc(max(0.0, delta_time))
            for b in new:
                o[f"size:{tt}"].observe(b)
                o[f"{op}_size"].observe(b)
        mgr = conn.manager
        for n in mgr.allocation_sizes:
            o["allocation_size"].observe(n)
        mgr.allocation_sizes.clear()
        if mgr.num_allocation_failures > seen["failures"]:
            o["allocation_failure"].inc(mgr.num_allocation_failures - seen["failures"])
            seen["failures"] = mgr.num_allocation_failures
        usage, write, read = mgr.usage()
        o["cpu_cache_usage_perc"].set(usage)
        o["cpu_cache_write_usage_perc"].set(write)
        o["cpu_cache_read_usage_perc"].set(read)

    # ----------------------------------------------------------------- updates
    def _advance(self, key: str, total: int | float) -> None:
        """Counters follow the engine's cumulative totals."""
        delta = total - self._last.get(key, 0)
        if delta > 0:
            self.counters[key].inc(delta)
            self._last[key] = total  # type: ignore[assignment]

    def update(self, engine: SimEngine) -> None:
        """Read the engine after a step: gauges, counters, histogram samples."""
        self.running.set(engine.num_running)
        waiting = engine.num_waiting
        self.waiting.set(waiting)
        deferred = sum(1 for r in engine.scheduler.skipped_waiting)
        self.waiting_deferred.set(min(deferred, waiting))
        self.waiting_capacity.set(max(0, waiting - deferred))
        self.kv_usage.set(engine.kv_cache_usage)
        queries, hits = engine.prefix_cache_stats
        self._advance("prefix_queries", queries)
        self._advance("prefix_hits", hits)
        ext_queries, ext_hits = engine.external_prefix_cache_stats
        self._advance("external_queries", ext_queries)
        self._advance("external_hits", ext_hits)
        self._advance("preemptions", engine.num_preemptions)
        stats = engine.stats
        self._advance("prompt_tokens", stats.prompt_tokens)
        self._advance("generation_tokens", stats.generation_tokens)
        by = stats.prompt_tokens_by_source
        for source in PROMPT_SOURCES:
            self._advance(f"source:{source}", by.get(source, 0))
        self._advance("prompt_tokens_cached",
                      by.get("local_cache_hit", 0) + by.get("external_kv_transfer", 0))
        for reason, n in stats.request_success.items():
            if f"success:{reason}" in self.counters:
                self._advance(f"success:{reason}", n)
        for key, values in stats.take_samples().items():
            hist = self.histograms.get(key)
            if hist is not None:
                for v in values:
                    hist.observe(v)

    def record_transfer(self, rec: TransferRecord, block_size: int) -> None:
        """One NIXL read done on this (decode) engine: vLLM observes it on the reader side."""
        if not self.nixl or rec.direction != "recv" or rec.connector != "nixl":
            return
        self.nixl["xfer_time"].observe(max(0.0, rec.end - rec.start))
        self.nixl["post_time"].observe(0.0)
        self.nixl["bytes"].observe(rec.num_bytes)
        # one descriptor per block and layer-group region; the sim counts blocks
        self.nixl["descriptors"].observe(-(-rec.num_tokens // max(1, block_size)))

    def failed_notification(self) -> None:
        if self.nixl:
            self.nixl["failed_notifications"].inc()

    def kv_expired(self, n: int = 1) -> None:
        """Requests whose held blocks a NIXL prefill freed at lease expiry (base_worker.py
        get_finished -> xfer_stats.record_kv_expired_req; counted on the P instance)."""
        if self.nixl and n > 0:
            self.nixl["expired"].inc(n)

    def render(self) -> bytes:
        """Prometheus text exposition of everything."""
        return generate_latest(self.registry)
