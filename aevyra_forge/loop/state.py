"""What the loop knows, derived from the run's records alone: the incumbent and its
latest passes, the reference measurement and outputs, what was tried and spent, and which
layer is active. `tune` and `tune resume` build it the same way, by replay. Refusal rows
(a proposal refused before booting) stay in the log for the audit trail but count toward
no budget and no layer's patience: they spent no GPU time."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aevyra_forge.core.recipe import Recipe, recipe_from_dict
from aevyra_forge.core.settings import TuneSettings
from aevyra_forge.core.values import (
    BenchMetrics,
    ExperimentRecord,
    Layer,
    Status,
    healthy,
    takes_the_lead,
)

REFUSED: frozenset[Status] = frozenset({"invalid", "duplicate"})


def refused(rec: ExperimentRecord) -> bool:
    """Whether `rec` records a proposal refused before booting, not an experiment."""
    return rec.status in REFUSED


@dataclass(frozen=True)
class Incumbent:
    """What a trial is judged against, fixed when it was asked: the trials of a round are
    all judged against the incumbent the round started from."""

    recipe: Recipe
    score: float | None
    passes: tuple[BenchMetrics, ...]
    passes_on: dict[str, tuple[BenchMetrics, ...]]
    history: tuple[ExperimentRecord, ...]

    def passes_for(self, worker: str | None) -> tuple[BenchMetrics, ...]:
        """The incumbent's passes as `worker` measured them when it has, else its
        latest passes anywhere."""
        return self.passes_on.get(worker, self.passes) if worker else self.passes


@dataclass
class LoopState:
    """The records, folded into what the next decision needs."""

    records: list[ExperimentRecord]
    baseline: Recipe
    best: Recipe = field(init=False)
    best_record: ExperimentRecord | None = field(init=False, default=None)
    reference: BenchMetrics | None = field(init=False, default=None)
    quality_reference: dict[str, Any] | None = field(init=False, default=None)
    # whose outputs accuracy is measured against: the config that captured the quality
    # reference, else (capture failed) the reference measurement's; None: the baseline
    accuracy_base: Recipe | None = field(init=False, default=None)
    best_passes: tuple[BenchMetrics, ...] = field(init=False, default=())
    best_measured_exp: int = field(init=False, default=0)  # the incumbent's latest boot
    # the incumbent's latest passes on each worker (several workers: two GPUs are two
    # instruments, so a trial is judged against the incumbent as its own GPU measured it)
    passes_on: dict[str, tuple[BenchMetrics, ...]] = field(init=False, default_factory=dict)
    measured_on: dict[str, int] = field(init=False, default_factory=dict)  # worker -> exp

    def __post_init__(self) -> None:
        self.best = self.baseline
        for rec in self.records:
            self._absorb(rec)

    @property
    def best_score(self) -> float | None:
        return self.best_record.score if self.best_record is not None else None

    def _absorb(self, rec: ExperimentRecord) -> None:
        if rec.quality_reference is not None and self.quality_reference is None:
            self.quality_reference = rec.quality_reference
            self.accuracy_base = recipe_from_dict(rec.recipe, source=f"experiment {rec.exp}")
        if takes_the_lead(rec):
            if self.reference is None:
                self.reference = rec.metrics
                self.accuracy_base = self.accuracy_base or recipe_from_dict(
                    rec.recipe, source=f"experiment {rec.exp}")
            if rec.recipe_id != self.best.id:
                self.passes_on, self.measured_on = {}, {}
            self.best = recipe_from_dict(rec.recipe, source=f"experiment {rec.exp}")
            self.best_record = rec
        if rec.recipe_id == self.best.id and (rec.kept or rec.remeasure):
            self.best_measured_exp = max(self.best_measured_exp, rec.exp)
            if rec.status == "ok" and healthy(rec.passes):  # failed requests never judge
                self.best_passes = rec.passes
                if rec.worker is not None:
                    self.passes_on[rec.worker] = rec.passes
                    self.measured_on[rec.worker] = max(self.measured_on.get(rec.worker, 0),
                                                       rec.exp)

    def add(self, rec: ExperimentRecord) -> None:
        self.records.append(rec)
        self._absorb(rec)

    @property
    def next_exp(self) -> int:
        """The next row's id: refusal rows take one too, so ids stay contiguous."""
        return len(self.records)

    @property
    def experiments(self) -> int:
        """Experiments run (booted or tried to), what --max-experiments counts."""
        return sum(1 for r in self.records if not refused(r))

    def experiments_since(self, exp: int) -> int:
        """Experiments run after row `exp` (by id: trials of a round are recorded in the
        order they finish)."""
        return sum(1 for r in self.records if r.exp > exp and not refused(r))

    def incumbent(self) -> Incumbent:
        return Incumbent(recipe=self.best, score=self.best_score, passes=self.best_passes,
                         passes_on=dict(self.passes_on), history=tuple(self.records))

    @property
    def next_round(self) -> int:
        return max((r.round for r in self.records if r.round is not None), default=0) + 1

    @property
    def tried_ids(self) -> frozenset[str]:
        return frozenset(r.recipe_id for r in self.records if not refused(r))

    def spent_s(self) -> float:
        """Time the experiments took, as the run's clock saw it: the trials of a round ran
        at once, so a round takes as long as its longest trial."""
        rounds: dict[int, float] = {}
        alone = 0.0
        for r in self.records:
            took = (r.prepare_s or 0.0) + (r.boot_s or 0.0) + (r.bench_s or 0.0)
            if r.round is None:
                alone += took
            else:
                rounds[r.round] = max(rounds.get(r.round, 0.0), took)
        return alone + sum(rounds.values())

    def spent_usd(self) -> float:
        return sum(r.llm.cost_usd for r in self.records)

    def active_layer(self, settings: TuneSettings, exhausted: set[int]) -> Layer | None:
        """The layer to work on: the latest one reached, unless it has converged (patience
        or its cap spent) or its proposer ran out of ideas; then the next enabled one.
        Refusal rows count toward neither patience nor the cap."""
        run = [r for r in self.records[1:] if not refused(r)]
        reached = max((r.layer for r in run), default=0)
        for layer in settings.layers():
            if layer < reached or layer in exhausted:
                continue
            rows = [r for r in run if r.layer == layer]
            cap = settings.layer_cap(layer)
            if cap is not None and len(rows) >= cap:
                continue
            if _trailing(rows) >= settings.patience:
                continue
            return layer
        return None


def _trailing(rows: list[ExperimentRecord]) -> int:
    """Experiments since the last kept one: patience spent without a gain. A trial of the
    kept one's own round is not among them, whatever order they finished in: it was
    judged against the incumbent before that gain, so it explored nothing from the new
    one (else a round whose winner finished first would end the layer at once)."""
    trailing = 0
    for r in reversed(rows):
        if r.kept:
            return trailing - sum(1 for x in rows[len(rows) - trailing:]
                                  if x.round is not None and x.round == r.round)
        trailing += 1
    return trailing
