"""The Benchmarker for a live `vllm serve`: replays the workload with the streaming bench
client while watching that the server stays alive, so a server that dies mid-bench makes
the experiment a crash (or oom) with the reason read from its log tail."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import Callable

import httpx

from aevyra_forge.core.slo import Slo
from aevyra_forge.core.values import BenchMetrics, BenchOutcome
from aevyra_forge.core.workload import Workload
from aevyra_forge.engine.failures import classify
from aevyra_forge.engine.launcher import HEALTH_POLL_S, VllmServer
from aevyra_forge.measure.client import BenchConfig, bench_passes
from aevyra_forge.measure.metrics import median_pass, parse_metrics

WARMUP_SLOTS = 8  # most untimed warm-up requests sent before the first timed pass
DEATH_GRACE_S = 2.0  # a server refusing connections is given this long to be reaped


class VllmBenchmarker:
    """Replays the workload against a live server, watching that it stays alive: a server
    that dies mid-bench makes the experiment a crash (or oom) with its log tail."""

    def __init__(self, *, request_timeout_s: float = 600.0, bench_timeout_s: float = 3600.0,
                 warmup_requests: int | None = None,
                 clock: Callable[[], float] = time.perf_counter
                 ) -> None:
        self.request_timeout_s = request_timeout_s
        self.bench_timeout_s = bench_timeout_s
        self.warmup_requests = warmup_requests
        self.clock = clock

    def bench(self, server: VllmServer, workload: Workload, concurrency: int,
              passes: int = 1, slo: Slo | None = None) -> BenchOutcome:
        config = BenchConfig(concurrency=concurrency, passes=passes, slo=slo,
                             request_timeout_s=self.request_timeout_s,
                             bench_timeout_s=self.bench_timeout_s,
                             warmup_requests=self._warmup(concurrency))
        start = self.clock()
        try:
            result = asyncio.run(self._watched(server, workload, config))
        except TimeoutError:
            return BenchOutcome(status="timeout", bench_s=self.clock() - start,
                                reason=f"bench did not finish within "
                                       f"{self.bench_timeout_s:.0f} s")
        elapsed = self.clock() - start
        if result is None:
            status, reason, _ = classify(server.process.poll(), server.log_tail())
            return BenchOutcome(status="oom" if status == "oom" else "crash",
                                bench_s=elapsed,
                                reason=f"server died during the bench: {reason}")
        metrics = median_pass(result)
        reason = ""
        if metrics.completed == 0 and metrics.failure_reasons:
            top = max(metrics.failure_reasons.items(), key=lambda kv: kv[1])[0]
            reason = f"all {metrics.failed} requests failed: {top}"
        return BenchOutcome(status="ok", metrics=metrics, passes=tuple(result),
                            bench_s=elapsed, reason=reason)

    def _warmup(self, concurrency: int) -> int:
        """Untimed requests before the first pass: one per slot up to 8 (by default), so
        the batch sizes the bench will use have run once on the fresh server (a first pass
        after two tiny warm-ups measured several times the TTFT of later passes)."""
        if self.warmup_requests is not None:
            return self.warmup_requests
        return min(max(2, concurrency), WARMUP_SLOTS)

    async def _watched(self, server: VllmServer, workload: Workload, config: BenchConfig
                       ) -> list[BenchMetrics] | None:
        async with httpx.AsyncClient(timeout=10.0) as client:
            async def scrape() -> dict[str, float]:
                try:
                    resp = await client.get(server.url + "/metrics")
                except httpx.HTTPError:
                    return {}
                return parse_metrics(resp.text) if resp.status_code == 200 else {}

            task = asyncio.create_task(bench_passes(
                server.url, server.served_model, workload, config, self.clock,
                scrape=scrape))
            while True:
                done, _ = await asyncio.wait({task}, timeout=HEALTH_POLL_S)
                if done:
                    passes = task.result()
                    # Requests to a dead server fail at once, so the bench can finish
                    # before this watch notices the death: refused connections are a
                    # crash when the server is gone, not a pass full of failures.
                    if _refused(passes) and _dies_within(server, DEATH_GRACE_S):
                        return None
                    return passes
                if not server.alive():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
                    return None


def _refused(passes: list[BenchMetrics]) -> bool:
    return any(reason.startswith("connection error") for m in passes
               for reason in m.failure_reasons)


def _dies_within(server: VllmServer, grace_s: float) -> bool:
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.process.wait(timeout=grace_s)
    return not server.alive()
