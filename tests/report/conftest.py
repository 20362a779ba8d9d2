"""A small, realistic run for the report tests: a baseline, two kept changes, an OOM with
its server log, an accuracy loss, and a rationale written by a hostile LLM."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from aevyra_forge.core.recipe import QuantSettings, Recipe
from aevyra_forge.core.values import (
    BenchMetrics,
    ExperimentRecord,
    LatencyStats,
    LLMUsage,
    Proposal,
)
from aevyra_forge.store.run_store import Run, RunStore

MODEL = "meta-llama/Llama-3.2-1B-Instruct"
HOSTILE = '<script>alert("x")</script> see https://evil.example/a?b=1&c=<img src=x>'
SETTINGS = {"model": MODEL, "workload": "examples/chat.jsonl", "objective": "throughput",
            "slo": "ttft_p99<300ms,e2e_p99<750ms", "accuracy_floor": 0.99, "repeats": 3,
            "confidence": 0.95, "llm": "anthropic/claude-sonnet-4-6", "dry_run": True}
CONFIG = {"model": MODEL, "hardware": "1x NVIDIA H100 80GB HBM3 (80 GiB each)",
          "workload": {"path": "examples/chat.jsonl", "requests": 50, "sha256": "0" * 64},
          "settings": SETTINGS}
BASE = Recipe(model=MODEL)
SEQS = BASE.child(config={"max_num_seqs": 512})
OOM = SEQS.child(config={"max_num_seqs": 512, "gpu_memory_utilization": 0.98})
AWQ = SEQS.child(quant=QuantSettings(method="awq"))
FP8 = SEQS.child(quant=QuantSettings(kv_cache_dtype="fp8"))


def clock() -> datetime:
    return datetime(2026, 11, 22, 11, 5, 1, tzinfo=UTC)


def bench(tp: float, p99: float, ttft: float = 200.0) -> BenchMetrics:
    return BenchMetrics(
        completed=50, duration_s=10.0, input_tokens=5000, output_tokens=6400,
        request_throughput=5.0, output_throughput=tp, total_token_throughput=tp * 1.8,
        ttft_ms=LatencyStats(mean=ttft / 2, p50=ttft / 3, p90=ttft * 0.8, p99=ttft),
        tpot_ms=LatencyStats(mean=9.0, p50=8.5, p90=11.0, p99=14.0),
        itl_ms=LatencyStats(mean=9.5, p50=8.0, p90=12.0, p99=16.0),
        e2e_ms=LatencyStats(mean=p99 / 2, p50=p99 / 3, p90=p99 * 0.8, p99=p99),
        server={"num_preemptions": 2.0, "kv_cache_usage_peak": 0.61,
                "prefix_cache_hit_rate": 0.42})


def passes(tp: float, p99: float, ttft: float = 200.0) -> tuple[BenchMetrics, ...]:
    return tuple(bench(tp * f, p99, ttft) for f in (0.99, 1.0, 1.01))


def rec(exp: int, recipe: Recipe, *, status: str = "ok", tp: float = 1000.0,
        p99: float = 800.0, ttft: float = 200.0, score: float | None = None,
        kept: bool = False, layer: int = 1, rationale: str | None = None,
        changes: dict[str, Any] | None = None, reason: str = "", accuracy: float = 1.0,
        interval: tuple[float, float] | None = None, decision: str = "",
        cost: float = 0.0) -> ExperimentRecord:
    ok = status == "ok"
    return ExperimentRecord(
        exp=exp, recipe=recipe.to_dict(), recipe_id=recipe.id, parent_id=recipe.parent_id,
        generation=recipe.generation, layer=layer,  # type: ignore[arg-type]
        proposal=(Proposal(rationale=rationale, layer=layer,  # type: ignore[arg-type]
                           changes=changes or {}) if rationale else None),
        status=status, reason=reason,  # type: ignore[arg-type]
        metrics=bench(tp, p99, ttft) if ok else None,
        passes=passes(tp, p99, ttft) if ok else (),
        accuracy=accuracy if ok else None, score=score if ok else None, kept=kept,
        interval=interval, decision=decision,
        started_at=f"2026-11-22T11:{exp:02d}:00Z", finished_at=f"2026-11-22T11:{exp:02d}:50Z",
        boot_s=30.0 + exp, bench_s=60.0, prepare_s=120.0 if layer == 2 and ok else None,
        log=f"logs/exp_{exp:03d}.log",
        llm=LLMUsage(input_tokens=1000 * exp, output_tokens=100 * exp, cost_usd=cost))


HISTORY = [
    rec(0, BASE, score=1.0, kept=True, reason="baseline: vLLM's defaults on this hardware"),
    rec(1, SEQS, tp=1210.0, p99=700.0, ttft=180.0, score=1.21, kept=True,
        rationale="Raise max_num_seqs so more decodes share each step",
        changes={"max_num_seqs": 512}, interval=(0.15, 0.27), decision="kept", cost=0.01),
    rec(2, OOM, status="oom", rationale="Push gpu_memory_utilization to 0.98",
        changes={"gpu_memory_utilization": 0.98}, cost=0.02,
        reason="CUDA out of memory while allocating KV cache"),
    rec(3, AWQ, tp=1400.0, p99=650.0, score=1.40, layer=2, accuracy=0.95,
        rationale="Try the AWQ checkpoint", changes={"quant_method": "awq"},
        interval=(0.1, 0.22), decision="accuracy 0.950 below the floor 0.99", cost=0.01),
    rec(4, FP8, tp=1350.0, p99=650.25, ttft=150.0, score=1.35, kept=True, layer=2,
        accuracy=0.995, rationale=HOSTILE, changes={"kv_cache_dtype": "fp8"},
        interval=(0.05, 0.18), decision="kept", cost=0.013),
]


def make_run(root: Path, records: Sequence[ExperimentRecord],
             config: dict[str, Any] | None = None) -> Run:
    run = RunStore(root / ".forge", clock=clock).create_run(config or CONFIG)
    for r in records:
        run.append(r)
    return run


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A finished run of HISTORY, with the OOM's server log."""
    with make_run(tmp_path, HISTORY) as run:
        run.log_path(2).write_text("INFO loading\n" * 10 + "torch.OutOfMemoryError: CUDA out "
                                   "of memory. Tried to allocate 2.00 GiB\n")
        run.complete({"reason": "every layer converged"})
    return run.path
