"""Tests for aevyra_forge.measure.isolation and the bench's fallback when salted passes are
not independent: the check itself on built passes, then whole benches against the fake
vLLM server honouring or ignoring cache_salt, with and without its dev-mode
/reset_prefix_cache."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from aevyra_forge.core.values import BenchMetrics, LatencyStats
from aevyra_forge.core.workload import Request, Workload
from aevyra_forge.measure.client import BenchConfig, BenchRun, bench_run
from aevyra_forge.measure.isolation import (
    FIRST_PASS_SLOW,
    HIT_RATE_RISE,
    check_passes,
    first_pass_speed,
    isolation,
)
from aevyra_forge.measure.metrics import parse_metrics
from tests.fake_vllm import BLOCK_TOKENS, FakeConfig, FakeVllm

MODEL = "fake-model"


def bench_pass(throughput: float, hit_rate: float | None = None,
               e2e_ms: float = 100.0) -> BenchMetrics:
    server = {} if hit_rate is None else {"prefix_cache_hit_rate": hit_rate}
    return BenchMetrics(completed=10, duration_s=1.0, input_tokens=100,
                        output_tokens=int(throughput), request_throughput=10.0,
                        output_throughput=throughput, total_token_throughput=throughput,
                        e2e_ms=LatencyStats(mean=e2e_ms), server=server)


# -- the check ---------------------------------------------------------------------------------

def test_equal_passes_are_isolated() -> None:
    found = check_passes([bench_pass(100, 0.3), bench_pass(104, 0.31), bench_pass(98, 0.3)])
    assert found.isolated
    assert found.note == ("prefix-cache hit rate per pass 30%/31%/30%, "
                          "pass 1 at 99% of the rest")  # 100 against the median, 101


def test_a_later_pass_hitting_the_first_ones_cache_is_a_leak() -> None:
    found = check_passes([bench_pass(100, 0.3), bench_pass(101, 0.3 + HIT_RATE_RISE + 0.01)])
    assert found.leaked and not found.slow_first and not found.isolated
    assert not check_passes([bench_pass(100, 0.3),
                             bench_pass(100, 0.3 + HIT_RATE_RISE - 0.01)]).leaked


def test_a_markedly_slow_first_pass_is_caught_by_throughput_or_latency() -> None:
    slow = FIRST_PASS_SLOW * 100 - 1
    assert check_passes([bench_pass(slow), bench_pass(100), bench_pass(100)]).slow_first
    assert not check_passes([bench_pass(FIRST_PASS_SLOW * 100 + 1),
                             bench_pass(100)]).slow_first
    # open loop: throughput is the offered load, latency tells the cold pass apart
    assert check_passes([bench_pass(100, e2e_ms=200.0), bench_pass(100)]).slow_first
    assert "no prefix-cache counters" in check_passes([bench_pass(1), bench_pass(1)]).note


@given(st.lists(st.floats(1.0, 1e5), min_size=2, max_size=6), st.floats(0.01, 100.0))
def test_the_speed_ratio_ignores_the_scale(throughputs: list[float], scale: float) -> None:
    passes = [bench_pass(t) for t in throughputs]
    scaled = [bench_pass(t * scale) for t in throughputs]
    a, b = first_pass_speed(passes), first_pass_speed(scaled)
    assert a is not None and b is not None
    assert a == pytest.approx(b, rel=1e-9)
    assert check_passes(passes).slow_first == (a < FIRST_PASS_SLOW)


def test_the_record_says_what_was_done_and_why() -> None:
    assert isolation("unchecked", [bench_pass(1)]).note == "one pass: nothing to compare"
    found = check_passes([bench_pass(40, 0.1), bench_pass(100, 0.95)])
    note = isolation("reset", [bench_pass(40, 0.1), bench_pass(41, 0.1)], found).note
    assert note.startswith("salted passes not independent: later passes hit the prefix "
                           "cache pass 1 filled (cache_salt ignored)")
    assert "reset the prefix cache before each pass" in note
    assert note.endswith("kept passes: prefix-cache hit rate per pass 10%/10%, pass 1 at "
                         "98% of the rest")


# -- whole benches against the fake -------------------------------------------------------

PROMPT_BLOCKS = 4  # each prompt: this many full cache blocks of its own words


def _workload() -> Workload:
    reqs = [Request(line=i, prompt=" ".join(f"q{i}w{j}" for j in range(
        PROMPT_BLOCKS * BLOCK_TOKENS)), expected_output_tokens=4) for i in range(8)]
    return Workload(path="mem.jsonl", sha256="0" * 64, requests=tuple(reqs))


def _bench(fake: FakeVllm, passes: int = 3, fallback: bool = True) -> BenchRun:
    """A bench with the same /metrics scrape and /reset_prefix_cache call the vLLM
    benchmarker makes."""

    async def go() -> BenchRun:
        async with httpx.AsyncClient() as client:
            async def scrape() -> dict[str, float]:
                return parse_metrics((await client.get(fake.url + "/metrics")).text)

            async def reset() -> bool:
                resp = await client.post(fake.url + "/reset_prefix_cache")
                return resp.status_code == 200 and resp.json()["success"] is True

            config = BenchConfig(concurrency=2, warmup_requests=2, passes=passes,
                                 isolation_fallback=fallback)
            return await bench_run(fake.url, MODEL, _workload(), config, scrape=scrape,
                                   reset_cache=reset)

    return asyncio.run(go())


def _fake(slow: bool = False, **kwargs: object) -> FakeVllm:
    """Uncached prompt tokens cost time: a pass served from the cache is ~4x faster. `slow`
    scales every delay up 2.5x, so that scheduling jitter on a busy machine stays small
    against the passes it compares."""
    scale = 2.5 if slow else 1.0
    return FakeVllm(FakeConfig(model=MODEL, prefill_s_per_token=0.001 * scale,
                               token_delay_s=0.005 * scale, **kwargs))  # type: ignore[arg-type]


def _rates(run: BenchRun) -> list[float]:
    return [m.server["prefix_cache_hit_rate"] for m in run.passes]


def _spread(run: BenchRun) -> float:
    speeds = [m.output_throughput for m in run.passes]
    return max(speeds) / min(speeds)


def test_an_honoured_salt_is_checked_and_kept() -> None:
    with _fake(dev_mode=True) as fake:
        run = _bench(fake)
        resets = fake.cache_resets
    assert run.isolation.method == "salt"
    assert run.isolation.note.startswith("passes independent: prefix-cache hit rate per "
                                         "pass 0%/0%/0%")
    assert _rates(run) == [0.0, 0.0, 0.0]
    assert len(run.passes) == 3 and resets == 0  # no fallback, no extra pass


def test_an_ignored_salt_falls_back_to_resetting_the_cache() -> None:
    with _fake(ignore_cache_salt=True, dev_mode=True) as fake:
        run = _bench(fake)
        sent = sum(1 for r in fake.requests if r.path == "/v1/completions") - 2
        resets = fake.cache_resets
    assert run.isolation.method == "reset"
    assert "cache_salt ignored" in run.isolation.note
    assert "hit rate per pass 0%/100%" in run.isolation.note  # what the salted passes showed
    assert _rates(run) == [0.0, 0.0, 0.0]  # every kept pass ran on a cold cache
    assert sent == 4 * 8  # pass 2 was measured again after a reset
    assert resets >= 2


def test_an_ignored_salt_without_a_reset_gets_a_warm_pass() -> None:
    with _fake(ignore_cache_salt=True) as fake:
        run = _bench(fake)
        sent = sum(1 for r in fake.requests if r.path == "/v1/completions") - 2
    assert run.isolation.method == "warm_pass"
    assert "pass 1 set aside as an untimed warm pass" in run.isolation.note
    assert _rates(run) == [1.0, 1.0, 1.0]  # every kept pass saw the same (warm) cache
    assert sent == 4 * 8


def test_the_fallback_removes_the_spread_a_leaking_cache_adds() -> None:
    with _fake(slow=True, ignore_cache_salt=True) as fake:
        without = _bench(fake, fallback=False)
    with _fake(slow=True, ignore_cache_salt=True) as fake:
        warm = _bench(fake)
    with _fake(slow=True, ignore_cache_salt=True, dev_mode=True) as fake:
        reset = _bench(fake)
    assert without.isolation.method == "salt"  # measured as is, and said so
    assert without.isolation.note.startswith("salted passes not independent")
    assert _rates(without) == [0.0, 1.0, 1.0]
    # a cold pass 1 against cached passes: ~4x apart; with either fallback, alike
    assert _spread(without) > 2.0
    assert _spread(warm) < 1.5 and _spread(reset) < 1.5


def test_one_pass_is_unchecked() -> None:
    with _fake(ignore_cache_salt=True) as fake:
        run = _bench(fake, passes=1)
    assert run.isolation.method == "unchecked" and len(run.passes) == 1
