"""What to deploy and why: the best recipe (core.values.best_record) against the baseline,
as the settings that differ (core.recipe.diff), the gain on the run's objective with its
interval, the latency change, each SLO term's verdict and the command that serves it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from aevyra_forge.core.errors import ForgeError, RecipeError
from aevyra_forge.core.recipe import Recipe, diff, recipe_from_dict
from aevyra_forge.core.settings import TuneSettings
from aevyra_forge.core.slo import Slo, check_passes
from aevyra_forge.core.values import ExperimentRecord, best_record, takes_the_lead
from aevyra_forge.decide.rules import pass_values
from aevyra_forge.decide.stats import relative_interval
from aevyra_forge.report.export import for_recipe, render_cmd


class Model(BaseModel):
    model_config = ConfigDict(frozen=True)


class Change(Model):
    """One setting that differs between the baseline and the best recipe."""

    setting: str  # dotted path, e.g. config.max_num_seqs
    baseline: Any
    best: Any


class SloVerdict(Model):
    term: str  # canonical form, e.g. ttft_p99<500ms
    baseline: str  # "met" or the violation line
    best: str


class BestVsBaseline(Model):
    """What to deploy and why: the best recipe against the baseline. `gain` is the
    objective's relative change (0.12 = +12 %) with its interval at `confidence` from the
    two configs' bench passes; latency changes are relative (p99 best / baseline - 1)."""

    exp: int
    recipe_id: str
    generation: int
    recipe_yaml: str
    changes: list[Change]
    objective: str
    gain: float | None
    gain_interval: tuple[float, float] | None
    confidence: float
    accuracy: float | None
    baseline_throughput: float | None
    best_throughput: float | None
    ttft_p99_ms: tuple[float, float] | None  # (baseline, best)
    e2e_p99_ms: tuple[float, float] | None
    slo: list[SloVerdict]
    deploy_command: str
    deploy_caveat: str | None = None  # what deploying needs first (a dry run's simulation)


# -- best against baseline --------------------------------------------------------------


def best_vs_baseline(path: Path, records: Sequence[ExperimentRecord],
                     s: TuneSettings | None) -> BestVsBaseline | None:
    best = best_record(records)
    if best is None or best.metrics is None:
        return None
    baseline = baseline_record(records)
    recipe = _recipe(best)
    base_recipe = _recipe(baseline) if baseline is not None else None
    changes = ([Change(setting=k, baseline=a, best=b)
                for k, (a, b) in diff(base_recipe, recipe).items()]
               if base_recipe is not None and recipe is not None else [])
    slo = s.parsed_slo() if s is not None else None
    objective = s.objective if s is not None else "throughput"
    gain, interval = _gain(best, baseline, s, slo)
    bm = baseline.metrics if baseline is not None else None
    deployment = for_recipe(path, recipe, best) if recipe is not None else None
    return BestVsBaseline(
        exp=best.exp, recipe_id=best.recipe_id, generation=best.generation,
        recipe_yaml=recipe.to_yaml() if recipe is not None else "",
        changes=changes, objective=objective, gain=gain, gain_interval=interval,
        confidence=s.confidence if s is not None else 0.95,
        accuracy=best.accuracy,
        baseline_throughput=bm.output_throughput if bm else None,
        best_throughput=best.metrics.output_throughput,
        ttft_p99_ms=(bm.ttft_ms.p99, best.metrics.ttft_ms.p99) if bm else None,
        e2e_p99_ms=(bm.e2e_ms.p99, best.metrics.e2e_ms.p99) if bm else None,
        slo=_slo_verdicts(slo, baseline, best),
        # the deploy export's own line, so the report shows exactly what deploy.sh runs
        deploy_command=render_cmd(deployment).strip() if deployment is not None else "",
        deploy_caveat=deployment.caveat if deployment is not None else None,
    )


def baseline_record(records: Sequence[ExperimentRecord]) -> ExperimentRecord | None:
    """Experiment 0, when it was measured healthy and so became the reference."""
    first = next((r for r in records if r.exp == 0), None)
    return first if first is not None and takes_the_lead(first) else None


def _recipe(record: ExperimentRecord) -> Recipe | None:
    try:
        return recipe_from_dict(record.recipe, source=f"experiment {record.exp}")
    except RecipeError:
        return None


def _gain(best: ExperimentRecord, baseline: ExperimentRecord | None, s: TuneSettings | None,
          slo: Slo | None) -> tuple[float | None, tuple[float, float] | None]:
    """The best's gain over the baseline on the run's objective: the score (already
    relative to the baseline) and, with two passes on each side, the Welch interval the
    keep rule uses, at the run's confidence and between-boot noise."""
    if baseline is None or best.score is None:
        return None, None
    if best.exp == baseline.exp:
        return 0.0, None
    gain = best.score - 1.0
    if s is None or len(best.passes) < 2 or len(baseline.passes) < 2:
        return gain, None
    try:
        iv = relative_interval(pass_values(best.passes, s.objective, slo),
                               pass_values(baseline.passes, s.objective, slo),
                               confidence=s.confidence, boot_cv=s.boot_cv())
    except (ValueError, ForgeError):  # a pass without the objective's figure
        return gain, None
    return gain, (iv.low, iv.high)


def _slo_verdicts(slo: Slo | None, baseline: ExperimentRecord | None,
                  best: ExperimentRecord) -> list[SloVerdict]:
    """Each SLO term, tested as the keep rule tests it (median over passes)."""
    if slo is None:
        return []

    def verdict(rec: ExperimentRecord | None, term: Slo) -> str:
        if rec is None:
            return "not measured"
        broken = check_passes(rec.passes or ((rec.metrics,) if rec.metrics else ()), term)
        return broken[0] if broken else "met"

    out = []
    for t in slo.terms:
        one = Slo(terms=(t,))
        out.append(SloVerdict(term=str(t), baseline=verdict(baseline, one),
                              best=verdict(best, one)))
    return out
