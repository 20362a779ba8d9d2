"""Measuring a server the way `vllm bench serve` does. This part holds the per-request
record and the aggregation into BenchMetrics (kept apart from sending, so the simulator
and the real client share one definition of every metric)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from aevyra_forge.models import BenchMetrics, LatencyStats


@dataclass
class RequestResult:
    """One request. Failure is data: `success=False` with `error` set."""

    success: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    start_s: float = 0.0  # send time relative to the bench start
    ttft_s: float = 0.0  # send -> first token-bearing chunk
    latency_s: float = 0.0  # send -> last token-bearing chunk (E2E)
    itl_s: list[float] = field(default_factory=list)  # gaps between token chunks

    @property
    def tpot_s(self) -> float | None:
        if self.output_tokens <= 1:
            return None
        return (self.latency_s - self.ttft_s) / (self.output_tokens - 1)


def latency_stats(values_s: Sequence[float]) -> LatencyStats:
    """Mean and percentiles in milliseconds, linear interpolation (numpy's default)."""
    if len(values_s) == 0:
        return LatencyStats()
    arr = np.asarray(values_s, dtype=float) * 1000.0
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    return LatencyStats(mean=float(arr.mean()), p50=float(p50), p90=float(p90),
                        p99=float(p99))


def aggregate(results: Sequence[RequestResult], duration_s: float,
              server: Mapping[str, float] | None = None) -> BenchMetrics:
    """BenchMetrics over one pass. Failed requests are counted, never dropped."""
    ok = [r for r in results if r.success]
    duration_s = max(duration_s, 1e-9)
    input_tokens = sum(r.prompt_tokens for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    reasons = Counter(r.error or "unknown error" for r in results if not r.success)
    tpots = [t for r in ok if (t := r.tpot_s) is not None]
    return BenchMetrics(
        completed=len(ok),
        failed=len(results) - len(ok),
        duration_s=duration_s,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        request_throughput=len(ok) / duration_s,
        output_throughput=output_tokens / duration_s,
        total_token_throughput=(input_tokens + output_tokens) / duration_s,
        ttft_ms=latency_stats([r.ttft_s for r in ok]),
        tpot_ms=latency_stats(tpots),
        itl_ms=latency_stats([gap for r in ok for gap in r.itl_s]),
        e2e_ms=latency_stats([r.latency_s for r in ok]),
        failure_reasons=dict(reasons),
        server=dict(server or {}),
    )
