"""Tests for aevyra_forge.decide.rules: objectives and scores, the keep rule with and
without an interval, the latency guard, and the rule's decision rates on simulated noise."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from aevyra_forge.core.errors import UsageError
from aevyra_forge.core.recipe import QuantSettings, Recipe
from aevyra_forge.core.settings import DEFAULT_BOOT_CV
from aevyra_forge.core.slo import parse_slo
from aevyra_forge.core.values import BenchMetrics, LatencyStats, Status
from aevyra_forge.decide.rules import (
    Decision,
    decide,
    latency_regressions,
    objective_value,
    output_changes,
    pass_values,
    score,
)
from aevyra_forge.decide.stats import Interval, relative_interval


def _metrics(tps: float, e2e_p99: float = 1000.0, ttft_p99: float = 100.0,
             goodput: float | None = None) -> BenchMetrics:
    return BenchMetrics(completed=10, duration_s=10.0, input_tokens=100,
                        output_tokens=int(tps * 10), request_throughput=1.0,
                        output_throughput=tps, total_token_throughput=tps + 10,
                        e2e_ms=LatencyStats(p99=e2e_p99), ttft_ms=LatencyStats(p99=ttft_p99),
                        goodput=goodput)


def _decide(status: Status, candidate: float | None, best: float | None,
            accuracy: float | None, **kw: Any) -> Decision:
    return decide(status, candidate, best, accuracy, min_improvement_pct=1.0,
                  accuracy_floor=0.99, **kw)


# -- the point-score rule, as the loop still calls it ------------------------------------


def test_score_is_relative_to_the_reference() -> None:
    assert score(_metrics(150), _metrics(100)) == 1.5
    assert score(_metrics(100), _metrics(0)) == 0.0


def test_keep_needs_more_than_the_threshold() -> None:
    assert _decide("ok", 1.02, 1.0, 1.0).kept
    assert not _decide("ok", 1.01, 1.0, 1.0).kept
    assert not _decide("ok", 0.9, 1.0, None).kept


def test_failures_accuracy_and_identity_are_never_kept() -> None:
    crash = _decide("crash", None, 1.0, None)
    assert not crash.kept and crash.gate == "status"
    low = _decide("ok", 2.0, 1.0, 0.98)
    assert not low.kept and "floor" in low.reason and low.gate == "accuracy"
    same = _decide("ok", 2.0, 1.0, 1.0, same_settings_as_best=True)
    assert not same.kept and same.gate == "identical"


def test_first_measurement_becomes_the_reference() -> None:
    first = _decide("ok", 1.0, None, None)
    assert first.kept and "reference" in first.reason and first.gate is None


def test_a_change_that_can_alter_outputs_needs_an_accuracy_figure() -> None:
    blind = _decide("ok", 2.0, 1.0, None, output_changes=["quant_method"])
    assert not blind.kept and blind.gate == "accuracy"
    assert blind.reason.startswith("no accuracy figure: quant_method can alter outputs")
    assert _decide("ok", 2.0, 1.0, 0.995, output_changes=["quant_method"]).kept
    assert _decide("ok", 2.0, 1.0, None).kept  # a serving change needs no figure
    # the first healthy config is the reference: its outputs are what accuracy means
    assert _decide("ok", 1.0, None, None, output_changes=["dtype"]).kept


BASE = Recipe(model="org/model")


@pytest.mark.parametrize(("candidate", "expected"), [
    (Recipe(model="org/model", config={"max_num_seqs": 64, "max_model_len": 4096,
                                       "block_size": 32}), []),
    (Recipe(model="org/model", config={"dtype": "float16"}), ["dtype"]),
    (Recipe(model="org/model", quant=QuantSettings(method="fp8")), ["quant_method"]),
    (Recipe(model="org/model", quant=QuantSettings(kv_cache_dtype="fp8")),
     ["kv_cache_dtype"]),
    (Recipe(model="org/model", config={"enforce_eager": True}), ["enforce_eager"]),
    (Recipe(model="org/model", kernel={"attention_backend": "FLASHINFER",
                                       "compilation_config": {"cudagraph_mode": "NONE"}}),
     ["attention_backend", "cudagraph_mode"]),
    (Recipe(model="org/model", quant=QuantSettings(method="awq",
                                                   checkpoint="org/model-awq")),
     ["model", "quant_method"]),
])
def test_output_changes_follow_the_knobs_layer_and_declaration(
        candidate: Recipe, expected: list[str]) -> None:
    assert output_changes(BASE, candidate) == expected
    assert output_changes(candidate, candidate) == []


# -- decisions with an interval ----------------------------------------------------------


def test_an_unbounded_interval_is_refused_asking_for_repeats() -> None:
    lone = relative_interval([120.0], [100.0])
    refused = _decide("ok", 1.2, 1.0, None, interval=lone)
    assert not refused.kept and "2+ repeats" in refused.reason


def test_interval_decision_states_the_interval() -> None:
    win = Interval(point=0.123, low=0.041, high=0.209, confidence=0.95)
    kept = _decide("ok", 1.12, 1.0, 1.0, interval=win)
    assert kept.kept and kept.reason == "+12.3% [+4.1%, +20.9%] > +1.0%"
    assert kept.interval == win and kept.gate is None
    unsure = Interval(point=0.08, low=0.005, high=0.16, confidence=0.95)
    refused = _decide("ok", 1.08, 1.0, 1.0, interval=unsure)
    assert not refused.kept and refused.gate == "improvement"
    assert refused.reason == "+8.0% [+0.5%, +16.0%]: lower bound not above +1.0%"


def test_slo_and_latency_gates_refuse_a_win() -> None:
    win = Interval(point=0.3, low=0.2, high=0.4, confidence=0.95)
    slo = _decide("ok", 1.3, 1.0, 1.0, interval=win,
                  slo_violations=["ttft_p99 612 ms, needs <500 ms"])
    assert not slo.kept and slo.gate == "slo" and "612 ms" in slo.reason
    slow = _decide("ok", 1.3, 1.0, 1.0, interval=win, latency=["p99 E2E ..."])
    assert not slow.kept and slow.gate == "latency"
    fixes = _decide("ok", 0.8, 1.0, 1.0, interval=Interval(-0.2, -0.3, -0.1, 0.95),
                    incumbent_meets_slo=False)
    assert fixes.kept and "SLO" in fixes.reason
    baseline = _decide("ok", 1.0, None, 1.0, slo_violations=["e2e_p99 ..."])
    assert baseline.kept and "breaks SLO" in baseline.reason


def test_identical_candidate_is_never_kept_even_when_it_measured_better() -> None:
    lucky = relative_interval([130.0, 131.0, 129.0], [100.0, 101.0, 99.0])
    assert not _decide("ok", 1.3, 1.0, 1.0, interval=lucky, same_settings_as_best=True).kept


def test_latency_guard_rule() -> None:
    inc = [_metrics(100, e2e_p99=1000.0, ttft_p99=100.0)] * 3
    assert latency_regressions([_metrics(130, e2e_p99=1490.0, ttft_p99=149.0)] * 3, inc) == []
    slow = latency_regressions([_metrics(130, e2e_p99=6600.0)], inc)
    assert slow == ["p99 E2E 6600 ms is 6.60x the incumbent's 1000 ms (limit 1.5x)"]
    ttft = latency_regressions(_metrics(130, ttft_p99=400.0), inc[0], max_factor=2.0)
    assert len(ttft) == 1 and ttft[0].startswith("p99 TTFT 400 ms is 4.00x")
    assert latency_regressions([_metrics(130, e2e_p99=1e6)], inc, max_factor=None) == []
    # the median pass decides: one slow pass of three does not trip the guard
    mixed = [_metrics(130, e2e_p99=1100.0), _metrics(130, e2e_p99=9000.0),
             _metrics(130, e2e_p99=1200.0)]
    assert latency_regressions(mixed, inc) == []


# -- objectives --------------------------------------------------------------------------


def test_objectives_are_higher_is_better_and_normalised() -> None:
    slo = parse_slo("ttft_p99<500ms,e2e_p99<2s")
    fast = _metrics(200, e2e_p99=500.0, goodput=4.0)
    base = _metrics(100, e2e_p99=1000.0, goodput=2.0)
    assert objective_value(fast) == 200.0
    assert objective_value(fast, "latency") == 2.0  # 1 / 0.5 s
    assert score(fast, base, "latency") == 2.0  # p99 halved
    assert score(fast, base, "goodput", slo) == 2.0
    assert pass_values([fast, base], "goodput", slo) == [4.0, 2.0]
    with pytest.raises(UsageError, match="--slo"):
        objective_value(fast, "goodput", None)
    with pytest.raises(UsageError, match="--slo"):
        objective_value(fast, "goodput", parse_slo("itl_p99<10ms"))
    with pytest.raises(ValueError, match="slo="):
        objective_value(_metrics(1), "goodput", slo)


# -- proof: decision rates on simulated noisy passes --------------------------------------

TRIALS = 2000


def _keep_rate(effect: float, n: int, cv: float, boot_cv: float, seed: int,
               method: str = "interval") -> float:
    """Fraction of trials kept. Each config is one boot (a lognormal factor shared by its
    passes) and n passes (a lognormal factor each); both CVs as stated."""
    rng = np.random.default_rng(seed)
    sp, sb = math.sqrt(math.log1p(cv ** 2)), math.sqrt(math.log1p(boot_cv ** 2))
    kept = 0
    for _ in range(TRIALS):
        cand = (1 + effect) * math.exp(rng.normal(0, sb)) * np.exp(rng.normal(0, sp, n))
        inc = math.exp(rng.normal(0, sb)) * np.exp(rng.normal(0, sp, n))
        if method == "single":  # the reference tool: one run each, keep above +1 %
            kept += cand[0] / inc[0] > 1.01
            continue
        iv = relative_interval(list(cand), list(inc))
        kept += _decide("ok", float(cand.mean()), float(inc.mean()), None, interval=iv).kept
    return kept / TRIALS


@pytest.mark.parametrize("n", [3, 5])
@pytest.mark.parametrize("cv", [0.03, 0.05, 0.08])
def test_a_comparison_with_itself_is_rarely_kept(cv: float, n: int) -> None:
    assert _keep_rate(0.0, n, cv, DEFAULT_BOOT_CV, seed=11) <= 0.05


def test_a_true_ten_percent_gain_is_found() -> None:
    # n=5 passes at 3 % per-pass CV with 1 % between boots (the assumed default).
    assert _keep_rate(0.10, 5, 0.03, DEFAULT_BOOT_CV, seed=12) >= 0.90


def test_the_single_run_rule_keeps_noise() -> None:
    assert _keep_rate(0.0, 1, 0.05, DEFAULT_BOOT_CV, seed=13, method="single") > 0.35
