"""One experiment as a unit of work (STYLE habit 11, optuna's ask/tell): the loop asks
for a `Trial` (its experiment id assigned there and then), an executor runs it and hands
back a `Measurement` of everything the engine observed, and the loop judges and records
it. Both cross process boundaries (a GPU pool, Ray), so they are plain frozen models."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from aevyra_forge.core.settings import Objective
from aevyra_forge.core.values import (
    SCHEMA_VERSION,
    BenchMetrics,
    Frozen,
    Layer,
    LLMUsage,
    PassIsolation,
    Proposal,
    QualityScore,
    Status,
)


class PassStop(Frozen):
    """When a candidate's bench may end before its last pass (decide.stats.sequential_look):
    the incumbent's per-pass objective values and the interval's settings, as data so a
    trial can cross to another worker. The executor asks decide.verdict.should_stop."""

    incumbent: tuple[float, ...]  # per-pass objective values, higher is better
    objective: Objective
    slo: str | None  # as --slo spells it: goodput is counted against it
    threshold: float  # --min-improvement-pct as a fraction
    confidence: float
    boot_cv: float
    noise_variance: float = 0.0  # pass-to-pass variance pooled from earlier configs
    noise_df: float = 0.0
    max_passes: int


class Trial(Frozen):
    """What to run: experiment `exp` deploys `recipe` (a full Recipe.to_dict()). The
    accuracy side is part of the work: the first healthy config captures the reference
    outputs, every later one is scored against them."""

    schema_version: int = SCHEMA_VERSION
    exp: int
    recipe: dict[str, Any]
    recipe_id: str
    layer: Layer
    proposal: Proposal | None = None
    raw_reply: str | None = None
    llm: LLMUsage = LLMUsage()  # what asking for this trial cost
    remeasure: bool = False  # a drift check of the incumbent, not a proposal
    capture_reference: bool = False  # no reference yet: this config's outputs become it
    quality_reference: dict[str, Any] | None = Field(default=None, repr=False)
    started_at: str = ""
    # With several workers: the round it was asked in (its incumbent is the one it is
    # judged against) and the worker it runs on. None for trials run one at a time.
    round: int | None = None
    worker: str | None = None
    stop: PassStop | None = None  # may stop its bench early (None: run every pass)


class Measurement(Frozen):
    """Everything the engine observed for one trial. A failure is data here (a status and
    a reason), never an exception; `metrics` is the median pass, computed once by the
    executor and read by everyone after it."""

    status: Status
    reason: str = ""
    passes: tuple[BenchMetrics, ...] = ()
    pass_isolation: PassIsolation | None = None  # how the passes were kept independent
    metrics: BenchMetrics | None = None
    quality: QualityScore | None = None
    quality_reference: dict[str, Any] | None = Field(default=None, repr=False)
    prepare_s: float | None = None  # e.g. quantization calibration before the boot
    boot_s: float | None = None
    bench_s: float | None = None
    log: str | None = None  # the server log, relative to the run folder
    suggested_max_model_len: int | None = None  # vLLM named the largest context that fits
    worker: str | None = None  # where it ran, when more than one place can run trials
