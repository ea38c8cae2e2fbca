"""Reading vLLM 0.26's real /metrics text, and scraping it from a real HTTP server."""

from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from labfixtures import FIXTURES

from labkit.telemetry.metrics import MetricsScraper, MetricsSnapshot, scrape

METRICS = FIXTURES / "metrics"
pytestmark = pytest.mark.skipif(not METRICS.exists(), reason="vLLM 0.26 fixtures absent")

# The fixtures' model: 16 layers x (K, V) x 8 KV heads x head_dim 128 x 2 bytes (fixtures README)
KV_BYTES_PER_TOKEN = 16 * 2 * 8 * 128 * 2


def text(name: str) -> str:
    return (METRICS / f"{name}.txt").read_text()


def raw_value(body: str, line_prefix: str) -> float:
    """The value of the one line starting with `line_prefix`, read without any parser."""
    (line,) = [ln for ln in body.splitlines() if ln.startswith(line_prefix)]
    return float(line.rsplit(" ", 1)[1])


@pytest.fixture(scope="module")
def decode() -> MetricsSnapshot:
    return MetricsSnapshot.parse(text("nixl-decode"))


@pytest.fixture(scope="module")
def offload() -> MetricsSnapshot:
    return MetricsSnapshot.parse(text("offload-small"))


def test_counter_with_total_and_colon_name(decode: MetricsSnapshot) -> None:
    ext = decode.get("vllm:prompt_tokens_by_source_total", source="external_kv_transfer")
    assert ext == 1100
    # the parser's family name (no `_total`) works too
    assert decode.get("vllm:prompt_tokens_by_source", source="external_kv_transfer") == 1100
    # prompt tokens by source add up to all prompt tokens
    assert decode.sum("vllm:prompt_tokens_by_source_total") == decode.get(
        "vllm:prompt_tokens_total"
    )
    assert decode.get("vllm:prompt_tokens_by_source_total", source="nope") is None
    with pytest.raises(ValueError):
        decode.get("vllm:prompt_tokens_by_source_total")  # three sources: ambiguous


def test_cache_config_info(decode: MetricsSnapshot, offload: MetricsSnapshot) -> None:
    info = decode.info("vllm:cache_config_info")
    assert info["num_gpu_blocks"] == "13307" and int(info["block_size"]) == 16
    assert info["cache_dtype"] == "auto" and info["enable_prefix_caching"] == "True"
    off = offload.info("vllm:cache_config_info")
    assert off["num_gpu_blocks"] == off["num_gpu_blocks_override"] == "80"
    assert decode.info("vllm:no_such_info") is None


def test_gauges_and_ttft_histogram(decode: MetricsSnapshot) -> None:
    body = text("nixl-decode")
    assert decode.get("vllm:kv_cache_usage_perc") == 0.0
    assert decode.get("vllm:num_requests_running") == 0.0
    assert decode.get("vllm:num_requests_running", engine="0") == 0.0
    ttft = decode.histogram("vllm:time_to_first_token_seconds")
    assert ttft.count == raw_value(body, "vllm:time_to_first_token_seconds_count") == 2
    assert ttft.sum == raw_value(body, "vllm:time_to_first_token_seconds_sum")
    assert ttft.buckets[-1] == (math.inf, ttft.count)
    les = [le for le, _ in ttft.buckets]
    counts = [c for _, c in ttft.buckets]
    assert les == sorted(les) and counts == sorted(counts)  # cumulative
    assert 0 < ttft.quantile(0.5) <= ttft.quantile(0.99) < math.inf
    # a histogram named *_total (not a counter): the parser keeps the name
    iters = decode.histogram("vllm:iteration_tokens_total")
    assert iters.count == decode.get("vllm:generation_tokens_total") == 13


def test_nixl_bytes_are_whole_blocks_of_the_external_tokens(decode: MetricsSnapshot) -> None:
    block = int(decode.info("vllm:cache_config_info")["block_size"])
    ext = decode.get("vllm:prompt_tokens_by_source_total", source="external_kv_transfer")
    nixl = decode.histogram("vllm:nixl_bytes_transferred")
    assert nixl.sum == decode.get("vllm:nixl_bytes_transferred_sum") == 72_351_744
    assert nixl.sum == math.ceil(ext / block) * block * KV_BYTES_PER_TOKEN
    assert nixl.count == 2


def test_offload_metrics_by_transfer_type(offload: MetricsSnapshot) -> None:
    out = offload.get("vllm:kv_offload_total_bytes_total", transfer_type="GPU_to_CPU")
    back = offload.get("vllm:kv_offload_total_bytes", transfer_type="CPU_to_GPU")
    assert out > back > 0
    assert offload.get("vllm:kv_offload_store_bytes_total") == out
    assert offload.get("vllm:kv_offload_load_bytes_total") == back
    # bytes offloaded == CPU blocks asked for x block size x KV bytes per token
    blocks = offload.histogram("vllm:kv_offload_cpu_allocation_size").sum
    assert out == blocks * 16 * KV_BYTES_PER_TOKEN
    times = offload.series("vllm:kv_offload_total_time_total")
    assert {lab["transfer_type"] for lab, _ in times} == {"CPU_to_GPU", "GPU_to_CPU"}
    assert all(v > 0 for _, v in times)


# --- scraping a real HTTP server ---------------------------------------------------------


class _Metrics(BaseHTTPRequestHandler):
    body = b""

    def do_GET(self) -> None:  # noqa: N802
        if self.path != "/metrics":
            self.send_error(404)
            return
        body = type(self).body
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def server() -> Iterator[tuple[str, type[_Metrics]]]:
    handler = type("Handler", (_Metrics,), {"body": text("nixl-prefill").encode()})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", handler
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def test_scrape_once(server) -> None:
    url, _ = server
    snap = scrape(url)
    assert snap.get("vllm:prompt_tokens_by_source_total", source="local_compute") == raw_value(
        text("nixl-prefill"),
        'vllm:prompt_tokens_by_source_total{engine="0",model_name=".carry/labmodel",source="local_compute"}',
    )
    with pytest.raises(httpx.HTTPStatusError):
        scrape(url + "/nothing/here")


def test_scraper_hands_on_each_snapshot_and_follows_changes(server) -> None:
    url, handler = server
    seen: list[MetricsSnapshot] = []

    def received() -> list[float]:
        return [s.get("vllm:prompt_tokens_by_source_total", source="external_kv_transfer")
                for s in list(seen)]

    with MetricsScraper(url, interval=0.05, on_snapshot=seen.append) as scraper:
        deadline = time.monotonic() + 10
        while len(seen) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert received()[-1] == 0.0  # the prefill engine's numbers
        handler.body = text("nixl-decode").encode()  # the engine's counters move on
        while received()[-1] != 1100:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    assert not scraper.is_alive
    assert scraper.latest is seen[-1]
    assert scraper.num_errors == 0 and scraper.num_scrapes == len(seen) >= 3
    ts = [s.ts for s in seen]
    assert ts == sorted(ts) and received()[0] == 0.0 and received()[-1] == 1100


def test_scraper_survives_an_engine_that_is_down() -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with MetricsScraper(f"http://127.0.0.1:{port}", interval=0.02, timeout=0.5) as scraper:
        deadline = time.monotonic() + 10
        while scraper.num_errors < 3:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert scraper.is_alive and scraper.latest is None
        assert re.match(r"Connect", scraper.last_error)


def test_histogram_quantile_interpolates_like_promql() -> None:
    from labkit.telemetry.metrics import Histogram

    h = Histogram(buckets=[(1.0, 2.0), (2.0, 6.0), (math.inf, 8.0)], count=8.0, sum=10.0)
    assert h.quantile(0.5) == pytest.approx(1.5)  # rank 4: halfway through (1, 2]
    assert h.quantile(0.125) == pytest.approx(0.5)  # rank 1 in the first bucket from 0
    assert h.quantile(0.99) == 2.0  # in +Inf: the last finite bound
    assert h.mean == 1.25
