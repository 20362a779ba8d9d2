"""Tests for aevyra_forge.measure.metrics: aggregation with `vllm bench serve` definitions,
the median pass, and /metrics parsing on text recorded from vLLM 0.32."""

from __future__ import annotations

import pytest

from aevyra_forge.core.values import BenchMetrics
from aevyra_forge.measure.metrics import (
    RequestResult,
    aggregate,
    counter_deltas,
    latency_stats,
    median_pass,
    parse_metrics,
)


def ok(prompt: int, out: int, ttft: float, latency: float, itl: list[float]) -> RequestResult:
    return RequestResult(success=True, prompt_tokens=prompt, output_tokens=out, ttft_s=ttft,
                         latency_s=latency, itl_s=itl)


def failed(error: str) -> RequestResult:
    # Timings a failed request may carry must not leak into the latency statistics.
    return RequestResult(success=False, error=error, prompt_tokens=999, output_tokens=999,
                         ttft_s=50.0, latency_s=60.0, itl_s=[9.0, 9.0])


def test_aggregate_hand_built() -> None:
    results = [
        ok(100, 10, 0.1, 1.0, [0.1] * 9),
        failed("HTTP 500: internal error"),
        ok(200, 1, 0.2, 0.2, []),
        failed(""),
        ok(50, 5, 0.3, 0.9, [0.15] * 4),
        failed("HTTP 500: internal error"),
    ]
    m = aggregate(results, duration_s=2.0, server={"num_preemptions": 3.0})
    assert m.completed == 3
    assert m.failed == 3
    assert m.failure_reasons == {"HTTP 500: internal error": 2, "unknown error": 1}
    assert m.duration_s == 2.0
    assert m.input_tokens == 350
    assert m.output_tokens == 16
    assert m.request_throughput == pytest.approx(1.5)
    assert m.output_throughput == pytest.approx(8.0)
    assert m.total_token_throughput == pytest.approx(183.0)
    # TTFT 100, 200, 300 ms
    assert m.ttft_ms.mean == pytest.approx(200.0)
    assert m.ttft_ms.p50 == pytest.approx(200.0)
    assert m.ttft_ms.p90 == pytest.approx(280.0)
    assert m.ttft_ms.p99 == pytest.approx(298.0)
    # TPOT only for > 1 output token: (1.0-0.1)/9 = 100 ms and (0.9-0.3)/4 = 150 ms
    assert m.tpot_ms.mean == pytest.approx(125.0)
    assert m.tpot_ms.p99 == pytest.approx(149.5)
    # ITL pooled over requests: nine gaps of 100 ms and four of 150 ms
    assert m.itl_ms.mean == pytest.approx((9 * 100 + 4 * 150) / 13)
    assert m.itl_ms.p50 == pytest.approx(100.0)
    assert m.itl_ms.p90 == pytest.approx(150.0)
    assert m.e2e_ms.mean == pytest.approx(700.0)
    assert m.e2e_ms.p50 == pytest.approx(900.0)
    assert m.server == {"num_preemptions": 3.0}


def test_tpot_property() -> None:
    assert ok(0, 1, 0.1, 0.1, []).tpot_s is None
    assert ok(0, 0, 0.0, 0.0, []).tpot_s is None
    assert ok(0, 3, 0.5, 1.5, [0.5, 0.5]).tpot_s == pytest.approx(0.5)


def test_percentiles_interpolate_linearly() -> None:
    stats = latency_stats([float(v) for v in range(1, 101)])  # seconds 1..100
    assert stats.mean == pytest.approx(50_500.0)
    assert stats.p50 == pytest.approx(50_500.0)
    assert stats.p90 == pytest.approx(90_100.0)
    assert stats.p99 == pytest.approx(99_010.0)
    two = latency_stats([0.010, 0.020])
    assert (two.p50, two.p90, two.p99) == pytest.approx((15.0, 19.0, 19.9))


def test_empty_and_all_failed() -> None:
    assert latency_stats([]).p99 == 0.0
    m = aggregate([failed("timeout"), failed("timeout")], duration_s=0.0)
    assert (m.completed, m.failed) == (0, 2)
    assert m.failure_reasons == {"timeout": 2}
    assert m.request_throughput == m.output_throughput == 0.0
    assert m.input_tokens == m.output_tokens == 0
    assert m.ttft_ms.mean == m.itl_ms.p99 == m.e2e_ms.p50 == 0.0
    none = aggregate([], duration_s=1.0)
    assert (none.completed, none.failed, none.failure_reasons) == (0, 0, {})


def test_median_pass() -> None:
    def m(rate: float) -> BenchMetrics:
        return aggregate([ok(1, int(rate), 0.1, 0.2, [])], duration_s=1.0)

    assert median_pass([m(30), m(10), m(20)]).output_throughput == 20.0
    assert median_pass([m(40), m(10), m(30), m(20)]).output_throughput == 20.0  # lower middle
    assert median_pass([m(5)]).output_throughput == 5.0


# -- /metrics --------------------------------------------------------------------------------

# Recorded from vLLM 0.32 (CPU build, a tiny Llama) after four requests; trimmed to the
# families we read and a few neighbours that must not be mixed in.
RECORDED_METRICS = """\
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="tiny"} 0.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="tiny"} 0.0
# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="tiny"} 390.0
vllm:prefix_cache_queries_created{engine="0",model_name="tiny"} 1.7953473637812197e+09
# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of cached tokens.
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{engine="0",model_name="tiny"} 128.0
# TYPE vllm:external_prefix_cache_hits_total counter
vllm:external_prefix_cache_hits_total{engine="0",model_name="tiny"} 0.0
# HELP vllm:num_preemptions_total Cumulative number of preemption from the engine.
# TYPE vllm:num_preemptions_total counter
vllm:num_preemptions_total{engine="0",model_name="tiny"} 0.0
vllm:num_preemptions_created{engine="0",model_name="tiny"} 1.795347363782074e+09
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="tiny"} 390.0
# TYPE vllm:prompt_tokens_by_source_total counter
vllm:prompt_tokens_by_source_total{engine="0",model_name="tiny",source="local_compute"} 262.0
vllm:prompt_tokens_by_source_total{engine="0",model_name="tiny",source="local_cache_hit"} 128.0
# HELP vllm:generation_tokens_total Number of generation tokens processed.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="tiny"} 156.0
# HELP vllm:request_success_total Count of successfully processed requests.
# TYPE vllm:request_success_total counter
vllm:request_success_total{engine="0",finished_reason="stop",model_name="tiny"} 0.0
vllm:request_success_total{engine="0",finished_reason="length",model_name="tiny"} 4.0
vllm:request_success_total{engine="0",finished_reason="abort",model_name="tiny"} 0.0
vllm:request_success_total{engine="0",finished_reason="error",model_name="tiny"} 0.0
vllm:request_success_total{engine="0",finished_reason="repetition",model_name="tiny"} 0.0
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.02",model_name="tiny"} 0.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="tiny"} 4.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="tiny"} 0.5610136985778809
vllm:cache_config_info{block_size="128",cache_dtype="auto",enable_prefix_caching="True",\
engine="0",gpu_memory_utilization="0.3",kv_cache_size_tokens="2023680"} 1.0
"""
# The same server before the last two requests.
RECORDED_BEFORE = (RECORDED_METRICS
                   .replace("queries_total{engine=\"0\",model_name=\"tiny\"} 390.0",
                            "queries_total{engine=\"0\",model_name=\"tiny\"} 28.0")
                   .replace("hits_total{engine=\"0\",model_name=\"tiny\"} 128.0",
                            "hits_total{engine=\"0\",model_name=\"tiny\"} 0.0")
                   .replace("prompt_tokens_total{engine=\"0\",model_name=\"tiny\"} 390.0",
                            "prompt_tokens_total{engine=\"0\",model_name=\"tiny\"} 28.0")
                   .replace("} 156.0", "} 6.0")
                   .replace("finished_reason=\"length\",model_name=\"tiny\"} 4.0",
                            "finished_reason=\"length\",model_name=\"tiny\"} 2.0"))


def test_parse_recorded_metrics() -> None:
    assert parse_metrics(RECORDED_METRICS) == {
        "requests_waiting": 0.0, "kv_cache_usage": 0.0, "prefix_cache_queries": 390.0,
        "prefix_cache_hits": 128.0, "num_preemptions": 0.0, "prompt_tokens": 390.0,
        "generation_tokens": 156.0, "requests_succeeded": 4.0,
        "kv_cache_capacity_tokens": 2023680.0}


def test_counter_deltas_on_recorded_metrics() -> None:
    before, after = parse_metrics(RECORDED_BEFORE), parse_metrics(RECORDED_METRICS)
    assert before["prefix_cache_queries"] == 28.0 and before["requests_succeeded"] == 2.0
    deltas = counter_deltas(before, after)
    assert deltas == {
        "num_preemptions": 0.0, "prefix_cache_queries": 362.0, "prefix_cache_hits": 128.0,
        "prompt_tokens": 362.0, "generation_tokens": 150.0, "requests_succeeded": 2.0,
        "kv_cache_usage": 0.0, "requests_waiting": 0.0,
        "kv_cache_capacity_tokens": 2023680.0,
        "prefix_cache_hit_rate": pytest.approx(128 / 362)}


def test_parse_metrics_sums_engines_and_skips_aborts() -> None:
    text = ('vllm:num_preemptions_total{engine="0",model_name="m"} 3.0\n'
            'vllm:num_preemptions_total{engine="1",model_name="m"} 4.0\n'
            'vllm:request_success_total{engine="0",finished_reason="abort"} 9.0\n'
            'vllm:request_success_total{engine="0",finished_reason="length"} 5.0\n'
            "vllm:generation_tokens_total 12.0 1700000000000\n"  # bare name, timestamp
            "vllm:prompt_tokens_total{engine=\"0\"} not-a-number\n")
    assert parse_metrics(text) == {"num_preemptions": 7.0, "requests_succeeded": 5.0,
                                   "generation_tokens": 12.0}


def test_where_requests_spent_their_time_and_the_cache_size_are_read() -> None:
    """Histogram sums and counts (vLLM 0.32 names) become deltas over a pass; the KV
    cache's size comes from cache_config_info's labels, in blocks when no token count."""
    def scrape(queue: float, steps: int) -> str:
        return (f'vllm:request_queue_time_seconds_sum{{engine="0"}} {queue}\n'
                'vllm:request_queue_time_seconds_count{engine="0"} 4.0\n'
                'vllm:request_prefill_time_seconds_sum{engine="0"} 2.5\n'
                'vllm:request_decode_time_seconds_sum{engine="0"} 7.5\n'
                f'vllm:iteration_tokens_total_sum{{engine="0"}} {steps * 10}\n'
                f'vllm:iteration_tokens_total_count{{engine="0"}} {steps}\n'
                'vllm:cache_config_info{block_size="16",engine="0",num_gpu_blocks="1000"} 1.0\n')
    deltas = counter_deltas(parse_metrics(scrape(1.0, 5)), parse_metrics(scrape(3.5, 25)))
    assert deltas["queue_time_s"] == 2.5 and deltas["iterations"] == 20.0
    assert deltas["iteration_tokens"] == 200.0 and deltas["prefill_time_s"] == 0.0
    assert deltas["kv_cache_capacity_tokens"] == 16000.0


def test_counter_deltas_without_cache_queries() -> None:
    deltas = counter_deltas({"generation_tokens": 5.0}, {"generation_tokens": 9.0,
                                                         "kv_cache_usage": 0.25})
    assert deltas == {"generation_tokens": 4.0, "kv_cache_usage": 0.25}
    assert counter_deltas({}, {}) == {}
