"""Keep or revert, as pure functions: interval statistics over bench passes, objectives and
SLO scoring, the keep rule, and the verdict for one measurement."""

from __future__ import annotations

from aevyra_forge.decide.rules import Decision, decide, score
from aevyra_forge.decide.stats import Interval, relative_interval
from aevyra_forge.decide.verdict import Verdict, judge

__all__ = [
    "Decision", "Interval", "Verdict", "decide", "judge", "relative_interval", "score",
]
