"""Pure keep/revert rules. A config's per-pass objective value (higher is better) is
normalised to the reference measurement (the baseline), so a score of 1.0 means "as good
as the baseline"; a config is kept only when it measured, stays above the accuracy floor
(and has an accuracy figure at all when it changed what can alter outputs), meets the
SLO, passes the latency guard, and the interval of its gain over the incumbent (stats.py)
has a lower bound that clears the threshold."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import median
from typing import Literal

from aevyra_forge.core.errors import UsageError
from aevyra_forge.core.recipe import Recipe

# The objectives and the guard's default factor are the settings', defined in core.settings.
from aevyra_forge.core.settings import DEFAULT_MAX_LATENCY_REGRESSION, Objective
from aevyra_forge.core.slo import Slo
from aevyra_forge.core.values import BenchMetrics, Status
from aevyra_forge.decide.stats import Interval
from aevyra_forge.space.registry import REGISTRY

Gate = Literal["status", "identical", "accuracy", "slo", "latency", "improvement"]


# -- objectives --------------------------------------------------------------------------


def objective_value(m: BenchMetrics, objective: Objective = "throughput",
                    slo: Slo | None = None) -> float:
    """One pass's value for the objective, higher is better.

    throughput: output tokens/s. latency: 1000 / p99 E2E in ms, i.e. the reciprocal of
    p99 E2E seconds: a rate, so it is positive and its ratios mean what they say (+10 %
    is p99 divided by 1.1), which the log-scale interval needs; a negated p99 would
    change sign and has no meaningful ratio. goodput: requests/s that met every
    per-request SLO bound (`m.goodput`, aggregated with the SLO)."""
    if objective == "throughput":
        return m.output_throughput
    if objective == "latency":
        return 1000.0 / m.e2e_ms.p99 if m.completed and m.e2e_ms.p99 > 0 else 0.0
    if objective == "goodput":
        if slo is None or not slo.request_limits():
            raise UsageError("--objective goodput needs an --slo with a ttft, tpot or e2e "
                             "bound, e.g. --slo ttft_p99<500ms,tpot_p99<50ms")
        if m.goodput is None:
            raise ValueError("metrics carry no goodput: aggregate them with slo=")
        return m.goodput
    raise ValueError(f"unknown objective {objective!r}")


def pass_values(passes: Sequence[BenchMetrics], objective: Objective = "throughput",
                slo: Slo | None = None) -> list[float]:
    return [objective_value(m, objective, slo) for m in passes]


def score(metrics: BenchMetrics, reference: BenchMetrics, objective: Objective = "throughput",
          slo: Slo | None = None) -> float:
    """The objective relative to the reference (1.0 = as good as the baseline)."""
    ref = objective_value(reference, objective, slo)
    return objective_value(metrics, objective, slo) / ref if ref > 0 else 0.0


# -- changes that can alter outputs ---------------------------------------------------

# Layer-1 knobs that change the numbers the model computes, not only how they are batched.
OUTPUT_ALTERING_CONFIG = frozenset({"dtype"})


def output_changes(reference: Recipe, candidate: Recipe) -> list[str]:
    """What `candidate` changes, relative to the config whose outputs are the accuracy
    reference, that can alter the model's outputs rather than only its speed: the model
    served (a quantized checkpoint), every quantization (layer 2) and kernel (layer 3)
    knob, and the layer-1 knobs in OUTPUT_ALTERING_CONFIG. Such a change is kept only with
    an accuracy figure. Read from each knob's declaration, so a new knob is covered by the
    layer it declares."""
    out = ["model"] if reference.serve_model != candidate.serve_model else []
    for knob in REGISTRY:
        if knob.layer == 1 and knob.name not in OUTPUT_ALTERING_CONFIG:
            continue
        if knob.placement.read(reference, knob) != knob.placement.read(candidate, knob):
            out.append(knob.name)
    return out


# -- latency guard -----------------------------------------------------------------------


def latency_regressions(candidate: BenchMetrics | Sequence[BenchMetrics],
                        incumbent: BenchMetrics | Sequence[BenchMetrics], *,
                        max_factor: float | None = DEFAULT_MAX_LATENCY_REGRESSION
                        ) -> list[str]:
    """Why a candidate's latency is refused, [] when it passes. Rule: the median over
    passes of the candidate's p99 E2E latency, and of its p99 TTFT, must each stay within
    `max_factor` times the incumbent's (1.5: at most 50 % worse); `None` disables the
    guard. It stops a throughput win bought with several times the tail latency, while
    leaving room for the moderate latency cost that bigger batches bring; a factor of 1.5
    is far outside the pass-to-pass noise of a p99."""
    if max_factor is None:
        return []
    cand = [candidate] if isinstance(candidate, BenchMetrics) else list(candidate)
    inc = [incumbent] if isinstance(incumbent, BenchMetrics) else list(incumbent)
    out = []
    for label, field in (("p99 E2E", "e2e_ms"), ("p99 TTFT", "ttft_ms")):
        new = median(getattr(m, field).p99 for m in cand) if cand else 0.0
        old = median(getattr(m, field).p99 for m in inc) if inc else 0.0
        if old > 0 and new > max_factor * old:
            out.append(f"{label} {new:.0f} ms is {new / old:.2f}x the incumbent's {old:.0f} ms "
                       f"(limit {max_factor:g}x)")
    return out


# -- the decision ------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """Keep or revert, why, which gate refused (None when kept) and the interval judged."""

    kept: bool
    reason: str
    gate: Gate | None = None
    interval: Interval | None = None


def decide(status: Status, candidate: float | None, best: float | None,
           accuracy: float | None, *, min_improvement_pct: float, accuracy_floor: float,
           same_settings_as_best: bool = False, interval: Interval | None = None,
           slo_violations: Sequence[str] = (), latency: Sequence[str] = (),
           incumbent_meets_slo: bool = True, reference_note: str = "",
           output_changes: Sequence[str] = ()) -> Decision:
    """Keep a config only when it measured (`status` ok), differs from the incumbent,
    stays at or above the accuracy floor (when accuracy was measured; a config with
    `output_changes` (rules.output_changes) needs the figure), breaks no SLO term,
    passes the latency guard (`latency`: latency_regressions' output) and beats the
    incumbent: the `interval`'s lower bound above +min_improvement_pct, or without an
    interval the point score `candidate` above `best` by that much. The first measured
    config becomes the reference whatever its SLO status (`reference_note` says why it
    is not the baseline, when it is not); a candidate that meets the SLO replaces an
    incumbent that breaks it. A status other than `ok` (a crash, a hang, failed requests)
    is never kept, so it never becomes the reference either."""
    if status != "ok" or candidate is None:
        return Decision(False, f"not measured ({status})", "status")
    if same_settings_as_best:
        return Decision(False, "identical to the incumbent", "identical")
    if accuracy is not None and accuracy < accuracy_floor:
        return Decision(False, f"accuracy {accuracy:.4f} below floor {accuracy_floor}",
                        "accuracy")
    if accuracy is None and output_changes and best is not None:
        return Decision(False, f"no accuracy figure: {', '.join(output_changes)} can alter "
                               "outputs, and accuracy against the baseline was not measured",
                        "accuracy")
    if best is None:
        note = f" (breaks SLO: {'; '.join(slo_violations)})" if slo_violations else ""
        return Decision(True, f"first healthy measurement becomes the reference"
                              f"{reference_note}{note}")
    if slo_violations:
        return Decision(False, f"breaks SLO: {'; '.join(slo_violations)}", "slo", interval)
    if not incumbent_meets_slo:
        return Decision(True, "meets the SLO the incumbent breaks", None, interval)
    if latency:
        return Decision(False, f"latency guard: {'; '.join(latency)}", "latency", interval)
    needed = f"{min_improvement_pct:+.1f}%"
    if interval is not None:
        if interval.low * 100 > min_improvement_pct:
            return Decision(True, f"{interval} > {needed}", None, interval)
        hint = "; one pass each cannot show noise, use 2+ repeats" \
            if math.isinf(interval.high) else ""
        return Decision(False, f"{interval}: lower bound not above {needed}{hint}",
                        "improvement", interval)
    gain_pct = (candidate / best - 1) * 100 if best > 0 else float("inf")
    if candidate > best * (1 + min_improvement_pct / 100):
        return Decision(True, f"{gain_pct:+.1f}% vs best (needs > {needed})")
    return Decision(False, f"{gain_pct:+.1f}% vs best, not above {needed}", "improvement")
