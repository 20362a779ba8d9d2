"""Aggregation the way `vllm bench serve` defines it: the per-request record, one pass's
BenchMetrics (kept apart from sending, so the simulator and the real client share one
definition of every metric), the median pass, and the server's own /metrics counters."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from aevyra_forge.core.slo import Slo
from aevyra_forge.core.values import BenchMetrics, LatencyStats


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
              server: Mapping[str, float] | None = None, slo: Slo | None = None
              ) -> BenchMetrics:
    """BenchMetrics over one pass. Failed requests are counted, never dropped. With an
    `slo`, goodput is the rate of successful requests that met its per-request bounds."""
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
        goodput=None if slo is None else sum(
            slo.meets(r.ttft_s * 1000, None if (t := r.tpot_s) is None else t * 1000,
                      r.latency_s * 1000) for r in ok) / duration_s,
    )


def median_pass(passes: Sequence[BenchMetrics]) -> BenchMetrics:
    """The pass with the median output throughput (the lower middle for an even count)."""
    ordered = sorted(passes, key=lambda m: m.output_throughput)
    return ordered[(len(ordered) - 1) // 2]



# -- server counters ------------------------------------------------------------------------

COUNTERS = {  # /metrics name -> our key; counters are reported as deltas over a pass
    "vllm:num_preemptions_total": "num_preemptions",
    "vllm:prefix_cache_queries_total": "prefix_cache_queries",
    "vllm:prefix_cache_hits_total": "prefix_cache_hits",
    "vllm:prompt_tokens_total": "prompt_tokens",
    "vllm:generation_tokens_total": "generation_tokens",
    "vllm:request_success_total": "requests_succeeded",
    # histogram sums and counts: where requests spent their time, tokens per engine step
    "vllm:request_queue_time_seconds_sum": "queue_time_s",
    "vllm:request_prefill_time_seconds_sum": "prefill_time_s",
    "vllm:request_decode_time_seconds_sum": "decode_time_s",
    "vllm:iteration_tokens_total_sum": "iteration_tokens",
    "vllm:iteration_tokens_total_count": "iterations",
}
GAUGES = {"vllm:kv_cache_usage_perc": "kv_cache_usage", "vllm:num_requests_waiting":
          "requests_waiting"}
# vllm:request_success_total also counts aborted and failed requests under these labels
_NOT_SUCCESS = re.compile(r'finished_reason="(abort|error)"')
# the KV cache's size in tokens, from the labels of vllm:cache_config_info (a gauge fixed
# at 1 whose labels are the engine's CacheConfig): kv_cache_size_tokens, else blocks x size
CACHE_INFO, KV_CAPACITY = "vllm:cache_config_info", "kv_cache_capacity_tokens"
_SIZE_TOKENS = re.compile(r'kv_cache_size_tokens="(\d+)"')
_BLOCKS = re.compile(r'num_gpu_blocks="(\d+)"')
_BLOCK_SIZE = re.compile(r'block_size="(\d+)"')


def parse_metrics(text: str) -> dict[str, float]:
    """Sum every sample of the counters and gauges we track over their label sets."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, rest = line.partition("{") if "{" in line.split(" ", 1)[0] else (
            line.split(" ", 1)[0], "", line.split(" ", 1)[1] if " " in line else "")
        if name == CACHE_INFO:
            tokens, blocks, size = (p.search(rest) for p in (_SIZE_TOKENS, _BLOCKS,
                                                              _BLOCK_SIZE))
            if tokens:
                out[KV_CAPACITY] = float(tokens[1])
            elif blocks and size:
                out[KV_CAPACITY] = float(int(blocks[1]) * int(size[1]))
            continue
        key = COUNTERS.get(name) or GAUGES.get(name)
        if key is None or _NOT_SUCCESS.search(rest):
            continue
        value = rest.rsplit("}", 1)[-1].split()
        try:
            out[key] = out.get(key, 0.0) + float(value[0])
        except (IndexError, ValueError):
            continue
    return out


def counter_deltas(before: Mapping[str, float], after: Mapping[str, float]
                   ) -> dict[str, float]:
    """Counter increases over a pass, gauges as read after it, and the prefix-cache hit
    rate of the pass."""
    out = {key: after[key] - before.get(key, 0.0) for key in COUNTERS.values()
           if key in after}
    out.update({key: after[key] for key in (*GAUGES.values(), KV_CAPACITY) if key in after})
    queries = out.get("prefix_cache_queries", 0.0)
    if queries > 0:
        out["prefix_cache_hit_rate"] = out.get("prefix_cache_hits", 0.0) / queries
    return out
