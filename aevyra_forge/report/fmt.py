"""Plain-text phrasing shared by the Markdown and HTML reports, so both say the same thing
the same way: percentages, intervals, one experiment's change, and the headline of what to
deploy and why. Returns unescaped text; each renderer escapes it for its format."""

from __future__ import annotations

import math
from collections.abc import Mapping

from aevyra_forge.core.values import Scalar
from aevyra_forge.report.best import BestVsBaseline
from aevyra_forge.report.model import ExperimentRow, Report

OBJECTIVE_UNITS = {"throughput": "output tokens/s", "latency": "1 / p99 E2E",
                   "goodput": "requests/s within the SLO"}


def num(value: float | None, decimals: int = 1, unit: str = "") -> str:
    """A figure with fixed decimals, `-` when missing."""
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:,.{decimals}f}{unit}"


def pct(x: float | None, decimals: int = 1) -> str:
    """A relative change as a signed percentage: 0.123 -> +12.3%."""
    if x is None:
        return "-"
    if math.isinf(x):
        return "+inf" if x > 0 else "-inf"
    return f"{x * 100:+.{decimals}f}%"


def interval(iv: tuple[float, float] | None) -> str:
    return "-" if iv is None else f"[{pct(iv[0])}, {pct(iv[1])}]"


def change(row: ExperimentRow) -> str:
    """What an experiment tried, in one line."""
    if row.remeasure:
        return "incumbent again (drift check)"
    if not row.changes:
        return "baseline" if row.exp == 0 else "-"
    return changes_text(row.changes)


def changes_text(changes: Mapping[str, Scalar]) -> str:
    return ", ".join(f"{k}={v}" for k, v in changes.items())


def relative(pair: tuple[float, float] | None) -> float | None:
    """best / baseline - 1 of a (baseline, best) pair."""
    if pair is None or pair[0] <= 0:
        return None
    return pair[1] / pair[0] - 1


def latency_change(name: str, pair: tuple[float, float] | None) -> str:
    if pair is None:
        return f"{name} -"
    return f"{name} {num(pair[0], 0)} -> {num(pair[1], 0)} ms ({pct(relative(pair))})"


def gain_text(best: BestVsBaseline) -> str:
    """`+12.3% [+8.1%, +16.4%] output tokens/s over the baseline (95% interval)`."""
    unit = OBJECTIVE_UNITS.get(best.objective, best.objective)
    if best.gain is None:
        return f"{unit}: gain over the baseline not measured"
    if best.exp == 0:
        return "the baseline itself: no change beat vLLM's defaults"
    iv = (f" {interval(best.gain_interval)} ({best.confidence:.0%} interval)"
          if best.gain_interval else " (no interval: fewer than two passes)")
    return f"{pct(best.gain)}{iv} {unit} over the baseline"


def headline(report: Report) -> str:
    """One sentence: what to deploy and why, or why there is nothing to deploy."""
    best = report.best
    if best is None:
        return f"Nothing to deploy yet: {report.summary.note}."
    if best.exp == 0:
        return ("Deploy vLLM's defaults: no change beat the baseline by more than the "
                "noise and the minimum improvement.")
    acc = f"accuracy {num(best.accuracy, 4)}" if best.accuracy is not None else "accuracy -"
    return (f"Deploy recipe {best.recipe_id} (experiment {best.exp}): {gain_text(best)}; "
            f"{acc}; {latency_change('p99 TTFT', best.ttft_p99_ms)}; "
            f"{latency_change('p99 E2E', best.e2e_p99_ms)}.")


def state(report: Report) -> str:
    if report.summary.completed:
        return f"finished: {report.stop_reason or 'completed'}"
    return "not finished (running, or interrupted and resumable)"


def duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.0f} s"


def dollars(usd: float) -> str:
    return f"${usd:.{2 if usd >= 1 else 4}f}"
