"""The tuning loop: its ports, its state replayed from the log, the tuner (ask, vet, run,
judge, record) and the assembly of a session for tune and tune resume."""

from __future__ import annotations

from aevyra_forge.loop.events import (
    Event,
    LayerEscalated,
    Note,
    Observer,
    ProposalRefused,
    RunFinished,
    RunOutcome,
    RunStarted,
    TrialFinished,
    TrialStarted,
)
from aevyra_forge.loop.ports import Executor, RunLog
from aevyra_forge.loop.state import LoopState
from aevyra_forge.loop.tuner import Tuner

__all__ = [
    "Event", "Executor", "LayerEscalated", "LoopState", "Note", "Observer",
    "ProposalRefused", "RunFinished", "RunLog", "RunOutcome", "RunStarted",
    "TrialFinished", "TrialStarted", "Tuner",
]
