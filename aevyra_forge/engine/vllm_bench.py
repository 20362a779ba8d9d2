"""The Benchmarker for a live `vllm serve`: replays the workload with the streaming bench
client while watching that the server stays alive and keeps producing tokens, then
classifies the measurement: a server that dies mid-bench or answers 5xx is a crash (or
oom, with the root cause read from its log), one that stops producing tokens is hung, and
too many requests refused as the client's fault are a request error."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import httpx

from aevyra_forge.core.slo import Slo
from aevyra_forge.core.values import BenchMetrics, BenchOutcome, PassIsolation, Status
from aevyra_forge.core.workload import Workload
from aevyra_forge.engine.failures import classify, log_cause, request_failures
from aevyra_forge.engine.launcher import HEALTH_POLL_S, VllmServer
from aevyra_forge.measure.client import BenchConfig, BenchRun, Progress, auth_headers, bench_run
from aevyra_forge.measure.metrics import median_pass, parse_metrics

WARMUP_SLOTS = 8  # most untimed warm-up requests sent before the first timed pass
DEATH_GRACE_S = 2.0  # a server refusing connections is given this long to be reaped
STALL_TIMEOUT_S = 120.0
"""Seconds without a token, while requests are in flight, after which the server counts as
hung and the bench stops. Any running request yields a token every engine step, and a step
is bounded by max_num_batched_tokens (seconds even on the CPU build); only a prefill of a
very long prompt on a slow device goes tokenless longer, and not for minutes. Without the
watchdog a hung engine costs the request timeout (600 s) per request in flight."""


@dataclass
class _Watched:
    """How a watched bench ended: its passes, or the server died, or it stalled."""

    passes: list[BenchMetrics] = field(default_factory=list)
    isolation: PassIsolation | None = None
    died: bool = False
    stalled: str = ""  # why the watchdog stopped the bench


class VllmBenchmarker:
    """Replays the workload against a live server, watching that it stays alive (a server
    that dies mid-bench makes the experiment a crash or oom with the cause from its log)
    and that it keeps producing tokens (`stall_timeout_s`, checked every
    `watch_interval_s`; a stalled bench is `hung`)."""

    def __init__(self, *, request_timeout_s: float = 600.0, bench_timeout_s: float = 3600.0,
                 warmup_requests: int | None = None,
                 stall_timeout_s: float = STALL_TIMEOUT_S,
                 watch_interval_s: float = HEALTH_POLL_S,
                 clock: Callable[[], float] = time.perf_counter,
                 on_pass: Callable[[int, int], None] | None = None
                 ) -> None:
        self.request_timeout_s = request_timeout_s
        self.bench_timeout_s = bench_timeout_s
        self.warmup_requests = warmup_requests
        self.stall_timeout_s = stall_timeout_s
        self.watch_interval_s = watch_interval_s
        self.clock = clock
        self.on_pass = on_pass  # told (k, n) as timed pass k of n begins

    def bench(self, server: VllmServer, workload: Workload, concurrency: int,
              passes: int = 1, slo: Slo | None = None,
              stop: Callable[[Sequence[BenchMetrics]], bool] | None = None
              ) -> BenchOutcome:
        config = BenchConfig(concurrency=concurrency, passes=passes, slo=slo, stop=stop,
                             request_timeout_s=self.request_timeout_s,
                             bench_timeout_s=self.bench_timeout_s,
                             warmup_requests=self._warmup(concurrency))
        start = self.clock()
        try:
            watched = asyncio.run(self._watched(server, workload, config))
        except TimeoutError:
            return BenchOutcome(status="timeout", bench_s=self.clock() - start,
                                reason=f"bench did not finish within "
                                       f"{self.bench_timeout_s:.0f} s")
        elapsed = self.clock() - start
        if watched.died:
            status, reason, _ = classify(server.process.poll(), server.log_tail())
            return BenchOutcome(status="oom" if status == "oom" else "crash",
                                bench_s=elapsed,
                                reason=f"server died during the bench: {reason}")
        if watched.stalled:
            return BenchOutcome(status="hung", bench_s=elapsed, reason=watched.stalled)
        result = watched.passes
        metrics = median_pass(result)
        status, reason = self._classify(server, result)
        isolation = watched.isolation
        if isolation is not None and isolation.method in ("reset", "warm_pass"):
            # a fallback changed how this config was measured: said where people look
            reason = "; ".join(filter(None, (reason, isolation.note)))
        return BenchOutcome(status=status, metrics=metrics, passes=tuple(result),
                            pass_isolation=watched.isolation, bench_s=elapsed,
                            reason=reason)

    @staticmethod
    def _classify(server: VllmServer, passes: list[BenchMetrics]) -> tuple[Status, str]:
        """`ok`, or why the requests failed; a server answering 5xx is a crash, an oom
        when its log shows a runtime out-of-memory (the same patterns as at boot)."""
        failure = request_failures(passes)
        if failure is None:
            failed = sum(m.failed for m in passes)
            return "ok", (f"{failed} failed request(s), within the share allowed"
                          if failed else "")
        status, reason = failure
        if status == "crash":
            cause = log_cause(server.log_tail())
            if cause is not None:
                status = "oom" if cause[0] == "oom" else "crash"
                reason = f"{reason}; log: {cause[1]}"
        return status, reason

    def _warmup(self, concurrency: int) -> int:
        """Untimed requests before the first pass: one per slot up to 8 (by default), so
        the batch sizes the bench will use have run once on the fresh server (a first pass
        after two tiny warm-ups measured several times the TTFT of later passes)."""
        if self.warmup_requests is not None:
            return self.warmup_requests
        return min(max(2, concurrency), WARMUP_SLOTS)

    async def _watched(self, server: VllmServer, workload: Workload, config: BenchConfig
                       ) -> _Watched:
        progress = Progress(last_token_s=self.clock(), on_pass=self.on_pass)
        async with httpx.AsyncClient(timeout=10.0) as client:
            async def scrape() -> dict[str, float]:
                try:
                    resp = await client.get(server.url + "/metrics")
                except httpx.HTTPError:
                    return {}
                return parse_metrics(resp.text) if resp.status_code == 200 else {}

            async def reset_cache() -> bool:
                # vLLM serves this only with VLLM_SERVER_DEV_MODE=1 (404 otherwise);
                # it answers success false while blocks are held
                try:
                    resp = await client.post(server.url + "/reset_prefix_cache",
                                             headers=auth_headers(server.api_key))
                    return resp.status_code == 200 and resp.json().get("success") is True
                except (httpx.HTTPError, ValueError, AttributeError):
                    return False

            task: asyncio.Task[BenchRun] = asyncio.create_task(bench_run(
                server.url, server.served_model, workload, config, self.clock,
                scrape=scrape, api_key=server.api_key, progress=progress,
                reset_cache=reset_cache))
            while True:
                done, _ = await asyncio.wait({task}, timeout=self.watch_interval_s)
                if done:
                    run = task.result()
                    # Requests to a dead server fail at once, so the bench can finish
                    # before this watch notices the death: refused connections are a
                    # crash when the server is gone, not a pass full of failures.
                    if _refused(run.passes) and _dies_within(server, DEATH_GRACE_S):
                        return _Watched(died=True)
                    return _Watched(passes=run.passes, isolation=run.isolation)
                idle_s = self.clock() - progress.last_token_s
                stalled = progress.in_flight > 0 and idle_s > self.stall_timeout_s
                if stalled or not server.alive():
                    in_flight = progress.in_flight
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
                    if not stalled:
                        return _Watched(died=True)
                    return _Watched(stalled=f"server stopped producing tokens: none for "
                                            f"{idle_s:.0f} s with {in_flight} request(s) "
                                            f"in flight (stall limit "
                                            f"{self.stall_timeout_s:g} s)")


def _refused(passes: list[BenchMetrics]) -> bool:
    return any(reason.startswith("connection error") for m in passes
               for reason in m.failure_reasons)


def _dies_within(server: VllmServer, grace_s: float) -> bool:
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.process.wait(timeout=grace_s)
    return not server.alive()
