"""One measurement turned into a keep/revert verdict (SPEC §4 step 5): the score relative
to the reference, a confidence interval of the gain over the incumbent's latest passes
(pass-to-pass noise pooled from earlier configs, between-boot noise from the incumbent's
own re-measurements), the SLO and latency-guard checks, and the accuracy floor."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from aevyra_forge.core.settings import TuneSettings
from aevyra_forge.core.slo import Slo, check_passes, parse_slo
from aevyra_forge.core.trial import PassStop
from aevyra_forge.core.values import (
    MAX_FAILED_REQUEST_SHARE,
    BenchMetrics,
    ExperimentRecord,
    Status,
    failed_request_share,
    healthy,
)
from aevyra_forge.decide.rules import Decision, decide, latency_regressions, pass_values, score
from aevyra_forge.decide.stats import (
    Interval,
    NoiseEstimate,
    between_boot_noise,
    pooled_noise,
    relative_interval,
    sequential_look,
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
          history: Sequence[ExperimentRecord], identical: bool,
          output_changes: Sequence[str] = (), worker: str | None = None) -> Verdict:
    """Everything the keep rule needs, from the candidate's passes (and their median,
    computed once by whoever measured them) and the loop's state. With fewer than two
    passes on either side there is no noise estimate and the plain point rule applies
    (the report says so). A measurement is judged only when it is `ok` and healthy (at
    most MAX_FAILED_REQUEST_SHARE of its requests failed), whatever its adapter said; a
    baseline that is not says so, and the first healthy config becomes the reference.
    `output_changes` (rules.output_changes against the accuracy reference's config) are
    kept only with an accuracy figure. `worker` is the one that measured the candidate:
    the between-boot noise is that of its own instrument (see `_boot_cv`)."""
    slo = s.parsed_slo()
    measured = tuple(passes) or ((median,) if median is not None else ())
    if status != "ok" or median is None or not healthy(measured):
        return Verdict(None, _unmeasured(s, status, measured, best_score, accuracy,
                                         baseline=not history), None, ())
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
                boot_cv=_boot_cv(s, slo, history, incumbent_id, worker))
        if s.max_latency_regression is not None:
            latency = latency_regressions(passes, incumbent,
                                          max_factor=s.max_latency_regression)
        incumbent_ok = not (slo and check_passes(incumbent, slo))
    decision = decide(status, value, best_score, accuracy,
                      min_improvement_pct=s.min_improvement_pct,
                      accuracy_floor=s.accuracy_floor, same_settings_as_best=identical,
                      interval=interval, slo_violations=violations, latency=latency,
                      incumbent_meets_slo=incumbent_ok,
                      reference_note=_why_not_the_baseline(history),
                      output_changes=output_changes)
    if interval is not None and len(passes) < s.repeats:  # the sequential test ended it
        decision = replace(decision, reason=f"{decision.reason} (decided on {len(passes)} "
                                            f"of {s.repeats} passes)")
    return Verdict(value, decision, interval, violations)


def pass_stop(s: TuneSettings, incumbent: Sequence[BenchMetrics], incumbent_id: str,
              history: Sequence[ExperimentRecord], worker: str | None = None
              ) -> PassStop | None:
    """The early-stop rule for a candidate judged against `incumbent`'s passes, with the
    same noise figures `judge` will use; None when there is nothing to compare with yet
    (the baseline), or too few passes for a look before the last one."""
    if s.repeats <= 2 or len(incumbent) < 2:
        return None
    slo = s.parsed_slo()
    noise = _pass_noise(s, slo, history, incumbent_id)
    return PassStop(incumbent=tuple(pass_values(incumbent, s.objective, slo)),
                    objective=s.objective, slo=s.slo,
                    threshold=s.min_improvement_pct / 100, confidence=s.confidence,
                    boot_cv=_boot_cv(s, slo, history, incumbent_id, worker),
                    noise_variance=noise.variance if noise else 0.0,
                    noise_df=noise.df if noise else 0.0, max_passes=s.repeats)


def should_stop(rule: PassStop, passes: Sequence[BenchMetrics]) -> bool:
    """Whether the candidate's passes so far already decide its verdict, so the bench may
    end here: a drop no later pass is likely to turn, or a keep that clears the bar by
    the early-keep margin on at least stats.MIN_KEEP_PASSES passes (kept, its passes are
    the yardstick of every later candidate: on two the next intervals were too wide to
    keep anything). The verdict then judges the passes run, as it would all of them."""
    slo = parse_slo(rule.slo) if rule.slo else None
    noise = NoiseEstimate(rule.noise_variance, rule.noise_df) if rule.noise_df else None
    look = sequential_look(pass_values(passes, rule.objective, slo), rule.incumbent,
                           threshold=rule.threshold, max_passes=rule.max_passes,
                           confidence=rule.confidence, noise=noise, boot_cv=rule.boot_cv)
    return look is not None


def _unmeasured(s: TuneSettings, status: Status, passes: Sequence[BenchMetrics],
                best_score: float | None, accuracy: float | None, *, baseline: bool
                ) -> Decision:
    """The refusal of a measurement that does not count."""
    if status == "ok":  # an adapter's `ok` with too many failed requests: still refused
        share = failed_request_share(passes)
        decision = Decision(False, f"{share:.0%} of requests failed (at most "
                                   f"{MAX_FAILED_REQUEST_SHARE:.0%} allowed)", "status")
    else:
        decision = decide(status, None, best_score, accuracy,
                          min_improvement_pct=s.min_improvement_pct,
                          accuracy_floor=s.accuracy_floor)
    if baseline:
        return Decision(False, f"{decision.reason}: vLLM's defaults cannot serve this "
                               "workload here; the run continues from the first healthy "
                               "config", decision.gate)
    return decision


def _why_not_the_baseline(history: Sequence[ExperimentRecord]) -> str:
    """Why the reference is not experiment 0, when it is not (its record comes first)."""
    if not history:
        return ""
    first = history[0]
    what = first.status if first.status != "ok" else "failed requests"
    return f" (the baseline, vLLM's defaults, was not healthy: experiment {first.exp} {what})"


def _pass_noise(s: TuneSettings, slo: Slo | None, history: Sequence[ExperimentRecord],
                incumbent_id: str) -> NoiseEstimate | None:
    """Pass-to-pass spread pooled over earlier configs (not the pair being compared)."""
    groups = [pass_values(r.passes, s.objective, slo) for r in history
              if r.status == "ok" and len(r.passes) >= 2 and r.recipe_id != incumbent_id]
    return pooled_noise(groups) if len(groups) >= 2 else None


def _boot_cv(s: TuneSettings, slo: Slo | None, history: Sequence[ExperimentRecord],
             incumbent_id: str, worker: str | None = None) -> float:
    """Between-boot variation, from the incumbent measured on several boots (drift
    checks), never below the assumption for this device (--boot-noise). With several
    workers only `worker`'s own boots of it count: two GPUs are two instruments, and the
    gap between them is no boot's noise (a candidate is judged against the incumbent's
    passes from its own worker, so that gap is never in the comparison either)."""
    boots = [pass_values(r.passes, s.objective, slo) for r in history
             if r.recipe_id == incumbent_id and r.status == "ok" and len(r.passes) >= 2
             and (worker is None or r.worker == worker)]
    if len(boots) < 2:
        return s.boot_cv()
    return max(s.boot_cv(), between_boot_noise(boots).cv)
