"""Tests for aevyra_forge.bench: aggregation of per-request results into BenchMetrics with
`vllm bench serve` definitions."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aevyra_forge.bench import RequestResult, aggregate, latency_stats


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


# -- results built from a scripted stream --------------------------------------------------------

class ScriptedClock:
    """Returns the scripted times in order, as the bench's injected clock would."""

    def __init__(self, times: list[float]) -> None:
        self._times = iter(times)

    def __call__(self) -> float:
        return next(self._times)


def replay(clock: ScriptedClock, tokens_per_chunk: list[int]) -> RequestResult:
    """Consume a stream the way `vllm bench serve` times one: TTFT at the first
    token-bearing chunk, one ITL gap per later token-bearing chunk, E2E at the last one;
    chunks without tokens (the role chunk, the trailing usage chunk) do not count."""
    sent = clock()
    first: float | None = None
    last = sent
    itl: list[float] = []
    for n in tokens_per_chunk:
        now = clock()
        if n == 0:
            continue
        if first is None:
            first = now
        else:
            itl.append(now - last)
        last = now
    assert first is not None
    return ok(10, sum(tokens_per_chunk), first - sent, last - sent, itl)


@given(st.lists(st.tuples(st.floats(min_value=0.0, max_value=2.0),
                          st.integers(min_value=0, max_value=3)), min_size=1, max_size=40)
       .filter(lambda chunks: any(n for _, n in chunks)),
       st.floats(min_value=0.0, max_value=1e5))
@settings(max_examples=200, deadline=None)
def test_e2e_minus_ttft_is_sum_of_itl(chunks: list[tuple[float, int]], t0: float) -> None:
    times = list(np.cumsum([t0] + [gap for gap, _ in chunks]))
    result = replay(ScriptedClock(times), [n for _, n in chunks])
    assert result.latency_s - result.ttft_s == pytest.approx(sum(result.itl_s), abs=1e-6)
    m = aggregate([result], duration_s=1.0)
    assert m.e2e_ms.mean - m.ttft_ms.mean == pytest.approx(sum(result.itl_s) * 1000,
                                                           abs=1e-3)
    assert m.output_tokens == sum(n for _, n in chunks)
    if result.output_tokens > 1 and result.itl_s:
        chunked = result.output_tokens - 1
        assert result.tpot_s == pytest.approx(sum(result.itl_s) / chunked, abs=1e-9)


def test_scripted_stream_with_role_and_usage_chunks() -> None:
    # send at 10.0; role chunk 10.05 (no token); tokens at 10.3, 10.4, 10.6 (2 tokens);
    # usage chunk at 11.0 (no token) must not extend E2E.
    result = replay(ScriptedClock([10.0, 10.05, 10.3, 10.4, 10.6, 11.0]), [0, 1, 1, 2, 0])
    assert result.ttft_s == pytest.approx(0.3)
    assert result.latency_s == pytest.approx(0.6)
    assert result.itl_s == pytest.approx([0.1, 0.2])
    assert result.output_tokens == 4
    assert result.tpot_s == pytest.approx(0.1)
    m = aggregate([result, result], duration_s=2.0)
    assert m.itl_ms.mean == pytest.approx(150.0)
    assert m.e2e_ms.mean - m.ttft_ms.mean == pytest.approx(300.0)
