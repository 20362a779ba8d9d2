"""One measurement turned into a keep/revert verdict (SPEC §4 step 5): the score relative
to the reference, a confidence interval of the gain over the incumbent's latest passes
(pass-to-pass noise pooled from earlier configs, between-boot noise from the incumbent's
own re-measurements), the SLO and latency-guard checks, and the accuracy floor."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from aevyra_forge.core.settings import TuneSettings
from aevyra_forge.core.slo import Slo, check_passes
from aevyra_forge.core.values import BenchMetrics, ExperimentRecord, Status
from aevyra_forge.decide.rules import Decision, decide, latency_regressions, pass_values, score
from aevyra_forge.decide.stats import (
    Interval,
    NoiseEstimate,
    between_boot_noise,
    pooled_noise,
    relative_interval,
)


@dataclass(frozen=True)
class Verdict:
    score: float | None
    decision: Decision
    interval: Interval | None
    slo_violations: tuple[str, ...]


def judge(s: TuneSettings, status: Status, passes: Sequence[BenchMetrics],
          median: BenchMetrics | None, accuracy: float | None, *,
          reference: BenchMetrics | None,
          incumbent: Sequence[BenchMetrics], incumbent_id: str, best_score: float | None,
          history: Sequence[ExperimentRecord], identical: bool) -> Verdict:
    """Everything the keep rule needs, from the candidate's passes (and their median,
    computed once by whoever measured them) and the loop's state. With fewer than two
    passes on either side there is no noise estimate and the plain point rule applies
    (the report says so)."""
    slo = s.parsed_slo()
    if status != "ok" or median is None:
        return Verdict(None, decide(status, None, best_score, accuracy,
                                    min_improvement_pct=s.min_improvement_pct,
                                    accuracy_floor=s.accuracy_floor), None, ())
    value = score(median, reference or median, s.objective, slo)
    violations = tuple(check_passes(passes, slo)) if slo else ()
    interval: Interval | None = None
    latency: list[str] = []
    incumbent_ok = True
    if incumbent:
        if len(passes) >= 2 and len(incumbent) >= 2:
            interval = relative_interval(
                pass_values(passes, s.objective, slo), pass_values(incumbent, s.objective, slo),
                confidence=s.confidence, noise=_pass_noise(s, slo, history, incumbent_id),
                boot_cv=_boot_cv(s, slo, history, incumbent_id))
        if s.max_latency_regression is not None:
            latency = latency_regressions(passes, incumbent,
                                          max_factor=s.max_latency_regression)
        incumbent_ok = not (slo and check_passes(incumbent, slo))
    decision = decide(status, value, best_score, accuracy,
                      min_improvement_pct=s.min_improvement_pct,
                      accuracy_floor=s.accuracy_floor, same_settings_as_best=identical,
                      interval=interval, slo_violations=violations, latency=latency,
                      incumbent_meets_slo=incumbent_ok)
    return Verdict(value, decision, interval, violations)


def _pass_noise(s: TuneSettings, slo: Slo | None, history: Sequence[ExperimentRecord],
                incumbent_id: str) -> NoiseEstimate | None:
    """Pass-to-pass spread pooled over earlier configs (not the pair being compared)."""
    groups = [pass_values(r.passes, s.objective, slo) for r in history
              if r.status == "ok" and len(r.passes) >= 2 and r.recipe_id != incumbent_id]
    return pooled_noise(groups) if len(groups) >= 2 else None


def _boot_cv(s: TuneSettings, slo: Slo | None, history: Sequence[ExperimentRecord],
             incumbent_id: str) -> float:
    """Between-boot variation, from the incumbent measured on several boots (drift
    checks), never below the assumption for this device (--boot-noise)."""
    boots = [pass_values(r.passes, s.objective, slo) for r in history
             if r.recipe_id == incumbent_id and r.status == "ok" and len(r.passes) >= 2]
    if len(boots) < 2:
        return s.boot_cv()
    return max(s.boot_cv(), between_boot_noise(boots).cv)
