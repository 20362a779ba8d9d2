"""What the loop tells its observer (the CLI's progress printer, a test), as typed events
rather than a kind string and keyword arguments, plus the typed summary a finished run
hands back."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from aevyra_forge.core.recipe import Recipe
from aevyra_forge.core.trial import Trial
from aevyra_forge.core.values import ExperimentRecord, Layer
from aevyra_forge.loop.plan import Plan


@dataclass(frozen=True)
class Note:
    """Something the user should know that is not an experiment (a default chosen, a
    cache read, a resume)."""

    text: str


@dataclass(frozen=True)
class RunStarted:
    recorded: int  # experiments already in the log (0 for a new run)
    spent_s: float = 0.0  # their measured time, which the time budget counts


@dataclass(frozen=True)
class TrialStarted:
    trial: Trial


@dataclass(frozen=True)
class Planned:
    """How long an experiment is expected to take and how many fit: from the trace
    before the first boot, from measurement once the baseline has run."""

    plan: Plan


@dataclass(frozen=True)
class TrialPhase:
    """Where a running trial is: "boot", "bench" (detail: "pass k/n" when the bench
    reports passes) or "accuracy"."""

    exp: int
    phase: str
    detail: str = ""


@dataclass(frozen=True)
class TrialFinished:
    record: ExperimentRecord


@dataclass(frozen=True)
class ProposalRefused:
    exp: int
    reason: str


@dataclass(frozen=True)
class LayerEscalated:
    layer: Layer
    why: str


@dataclass(frozen=True)
class RunOutcome:
    """How a run ended: why it stopped and what it found. `best` is the incumbent (the
    baseline when nothing was kept); `best_record` is the experiment that made it the
    incumbent, None when no configuration could be measured."""

    reason: str
    run_dir: Path
    experiments: int
    best: Recipe
    best_record: ExperimentRecord | None
    llm_cost_usd: float

    @property
    def best_score(self) -> float | None:
        return self.best_record.score if self.best_record is not None else None


@dataclass(frozen=True)
class RunFinished:
    outcome: RunOutcome


Event = (Note | RunStarted | Planned | TrialStarted | TrialPhase | TrialFinished
         | ProposalRefused | LayerEscalated | RunFinished)


class Observer(Protocol):
    def notify(self, event: Event) -> None: ...


class Silent:
    """An observer that ignores everything."""

    def notify(self, event: Event) -> None:
        del event
