"""The agent interface: what a proposer is shown (AgentContext) and what it returns
(ProposalReply). A new strategy or LLM provider is one class implementing Proposer plus
a registration in agent/__init__.py; the loop never asks which one it has."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from aevyra_forge.core.recipe import Recipe
from aevyra_forge.core.settings import Objective
from aevyra_forge.core.slo import Slo
from aevyra_forge.core.values import ExperimentRecord, Hardware, Layer, LLMUsage, Proposal
from aevyra_forge.core.workload import WorkloadStats
from aevyra_forge.space.knob_space import KnobSpace
from aevyra_forge.space.playbook import Playbook


@dataclass(frozen=True)
class Budget:
    experiments_left: int
    hours_left: float
    dollars_left: float | None


@dataclass(frozen=True)
class AgentContext:
    """Everything a proposer may use to choose the next mutation."""

    hardware: Hardware
    workload: WorkloadStats
    layer: Layer
    space: KnobSpace
    best: Recipe
    best_score: float | None
    history: Sequence[ExperimentRecord]
    playbook: Playbook
    budget: Budget
    tried_ids: frozenset[str]
    feedback: str | None = None  # why the previous proposal was refused, for a re-ask
    attempt: int = 0  # 0 on the first ask for this experiment, then 1, 2... on re-asks
    objective: Objective = "throughput"  # what the score measures (--objective)
    slo: Slo | None = None  # the bounds every kept config must meet (--slo)
    # Several workers: proposals wanted from this ask (an LLM gives them in one reply; a
    # strategy may give fewer and be asked again), and the trials already chosen for this
    # round (their proposals and recipe ids), which must not be proposed again.
    want: int = 1
    pending: tuple[Proposal, ...] = ()
    pending_ids: frozenset[str] = frozenset()
    accuracy_floor: float = 0.99  # --accuracy-floor: a candidate's agreement must clear it
    min_improvement: float = 0.01  # --min-improvement-pct as a fraction: the keep threshold
    concurrency: int | None = None  # --concurrency: requests in flight (None: unknown)


@dataclass(frozen=True)
class ProposalReply:
    """A proposal, or None when the proposer has nothing left to try in this layer.
    `raw` is the LLM's reply text, kept for the audit trail."""

    proposal: Proposal | None
    raw: str | None = None
    usage: LLMUsage = field(default_factory=LLMUsage)
    error: str | None = None  # the reply could not be used (invalid after re-asks)
    more: tuple[Proposal, ...] = ()  # further proposals, when ctx.want asked for several
    # with no proposal: why the layer hands over (shown on the progress line instead of
    # a bare "nothing left to try")
    reason: str | None = None

    @property
    def proposals(self) -> tuple[Proposal, ...]:
        return ((self.proposal,) if self.proposal is not None else ()) + self.more


class BudgetExceeded(Exception):
    """Raised by a proposer when its next call would cross --max-dollars; the loop stops
    cleanly with this message as the reason."""


class Proposer(Protocol):
    name: str

    def propose(self, ctx: AgentContext) -> ProposalReply: ...
