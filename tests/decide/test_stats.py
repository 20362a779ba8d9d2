"""Tests for aevyra_forge.decide.stats: the t quantile, the confidence interval on log
ratios (Welch and bootstrap) and the noise estimates."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from aevyra_forge.decide.stats import (
    MAX_RATIO,
    NoiseEstimate,
    between_boot_noise,
    pooled_noise,
    relative_interval,
    sequential_look,
    t_quantile,
)


@pytest.mark.parametrize(("p", "df", "expected"), [
    (0.975, 1, 12.7062047), (0.975, 2, 4.3026527), (0.975, 4, 2.7764451),
    (0.975, 10, 2.2281389), (0.95, 3, 2.3533634), (0.995, 1, 63.6567412),
    (0.975, 1000, 1.9623391), (0.975, math.inf, 1.9599640)])
def test_t_quantile_matches_tables(p: float, df: float, expected: float) -> None:
    assert t_quantile(p, df) == pytest.approx(expected, abs=2e-6)
    assert t_quantile(1 - p, df) == pytest.approx(-expected, abs=2e-6)


def test_welch_interval_on_log_ratios_by_hand() -> None:
    cand, inc = [110.0, 112.0, 108.0], [100.0, 101.0, 99.0]
    x, y = np.log(cand), np.log(inc)
    diff = x.mean() - y.mean()
    vx, vy = x.var(ddof=1) / 3, y.var(ddof=1) / 3
    df = (vx + vy) ** 2 / (vx ** 2 / 2 + vy ** 2 / 2)
    half = t_quantile(0.975, math.floor(df * 100) / 100) * math.sqrt(vx + vy)
    iv = relative_interval(cand, inc, boot_cv=0.0, confidence=0.95)
    assert iv.point == pytest.approx(math.expm1(diff))
    assert (iv.low, iv.high) == pytest.approx((math.expm1(diff - half), math.expm1(diff + half)))
    assert str(iv) == "+10.0% [+5.9%, +14.2%]" and iv.confidence == 0.95
    # the default is 90 %: the lower bound is a 95 % one-sided test
    default = relative_interval(cand, inc, boot_cv=0.0)
    half90 = t_quantile(0.95, math.floor(df * 100) / 100) * math.sqrt(vx + vy)
    assert default.confidence == 0.90
    assert default.low == pytest.approx(math.expm1(diff - half90))


def test_between_boot_noise_widens_and_history_narrows() -> None:
    cand, inc = [110.0, 104.0, 108.0], [100.0, 103.0, 98.0]
    plain = relative_interval(cand, inc, boot_cv=0.0)
    booted = relative_interval(cand, inc, boot_cv=0.02)
    history = relative_interval(cand, inc, boot_cv=0.0,
                                noise=NoiseEstimate(variance=0.03 ** 2, df=30))
    assert booted.low < plain.low and booted.high > plain.high
    assert history.high - history.low < plain.high - plain.low
    assert plain.point == booted.point == history.point
    wider = relative_interval(cand, inc, confidence=0.99)
    assert wider.high - wider.low > relative_interval(cand, inc).high - plain.low - 1


def test_single_passes_give_an_unbounded_interval_unless_history_helps() -> None:
    lone = relative_interval([120.0], [100.0])
    assert lone.low == -1.0 and math.isinf(lone.high)
    assert math.isfinite(relative_interval([120.0], [100.0],
                                           noise=NoiseEstimate(0.0009, 12)).high)


def test_zero_and_bad_values() -> None:
    assert relative_interval([0.0, 0.0], [0.0, 0.0]).point == 0.0
    starved = relative_interval([0.0, 5.0, 5.0], [5.0, 5.1, 4.9])
    # a pass with nothing widens the interval to its bound, no crash
    assert starved.low == pytest.approx(1 / MAX_RATIO - 1) and starved.clipped
    with pytest.raises(ValueError):
        relative_interval([], [1.0])
    with pytest.raises(ValueError):
        relative_interval([-1.0, 1.0], [1.0, 1.0])


def test_bootstrap_is_deterministic_for_a_seed() -> None:
    cand, inc = [110.0, 104.0, 108.0, 111.0], [100.0, 103.0, 98.0, 99.0]
    a = relative_interval(cand, inc, method="bootstrap", seed=7)
    assert a == relative_interval(cand, inc, method="bootstrap", seed=7)
    assert a != relative_interval(cand, inc, method="bootstrap", seed=8)
    assert a.low < a.point < a.high


_passes = st.lists(st.floats(min_value=50.0, max_value=150.0), min_size=2, max_size=6)


@given(_passes, _passes, st.floats(min_value=0.01, max_value=100.0))
def test_interval_is_ordered_and_scale_free(cand: list[float], inc: list[float],
                                            scale: float) -> None:
    iv = relative_interval(cand, inc)
    assert iv.low <= iv.point <= iv.high
    scaled = relative_interval([v * scale for v in cand], [v * scale for v in inc])
    assert scaled.point == pytest.approx(iv.point, rel=1e-6, abs=1e-9)
    assert scaled.low == pytest.approx(iv.low, rel=1e-6, abs=1e-9)
    swapped = relative_interval(inc, cand)  # the same interval seen from the other side
    assert 1 + swapped.high == pytest.approx(1 / (1 + iv.low), rel=1e-6)


def test_noise_estimates_recover_the_simulated_cvs() -> None:
    rng = np.random.default_rng(3)
    boots = [list(math.exp(rng.normal(0, 0.03)) * np.exp(rng.normal(0, 0.05, 5)))
             for _ in range(300)]
    assert pooled_noise(boots).cv == pytest.approx(0.05, rel=0.1)
    assert pooled_noise(boots).df == 300 * 4
    assert between_boot_noise(boots).cv == pytest.approx(0.03, rel=0.15)
    assert between_boot_noise(boots[:1]).df == 0
    assert pooled_noise([[1.0], [2.0, 0.0]]).df == 0  # nothing usable


_PASS_VALUE = st.one_of(st.just(0.0), st.floats(0.0, 1e-6), st.floats(1e-6, 1e12))


@given(st.lists(_PASS_VALUE, min_size=1, max_size=6),
       st.lists(_PASS_VALUE, min_size=1, max_size=6),
       st.sampled_from(["welch", "bootstrap"]))
def test_interval_figures_stay_bounded_whatever_the_passes(
        candidate: list[float], incumbent: list[float], method: str) -> None:
    """Zero or near-zero throughput, one pass, spreads of many orders of magnitude: every
    finite figure stays within MAX_RATIO, says so when clipped, and prints as a plain
    percentage (never +6.3e55%)."""
    iv = relative_interval(candidate, incumbent, resamples=200,
                           method="welch" if method == "welch" else "bootstrap")
    low_limit, high_limit = 1 / MAX_RATIO - 1, MAX_RATIO - 1
    unbounded = math.isinf(iv.high)  # one pass each, no noise estimate: [-100%, +inf]
    assert not unbounded or (iv.low == -1.0 and min(len(candidate), len(incumbent)) == 1)
    for figure in (iv.point, iv.low, iv.high):
        assert not math.isnan(figure)
        if not unbounded or figure == iv.point:
            assert low_limit - 1e-9 <= figure <= high_limit + 1e-9
    assert iv.low <= iv.high
    if method == "welch":
        assert iv.low <= iv.point + 1e-12 and iv.point <= iv.high + 1e-12
    text = str(iv)
    assert "e+" not in text and "e-" not in text and "nan" not in text
    assert ("clipped" in text) == iv.clipped


def test_a_zero_throughput_incumbent_gives_a_clipped_interval_with_its_reason() -> None:
    """A runtime OOM judged against a pass that produced nothing: the figure that was
    printed as +6.3e55% is now the bound, and the interval says why."""
    iv = relative_interval([3400.0, 3390.0, 3420.0], [0.0, 0.0, 1.0])
    assert iv.clipped and iv.high == pytest.approx(MAX_RATIO - 1)
    assert str(iv).endswith("(clipped at 100x: a pass at or near zero, or a huge spread)")
    healthy = relative_interval([1050.0, 1040.0, 1060.0], [1000.0, 1010.0, 990.0])
    assert not healthy.clipped and "clipped" not in str(healthy)


# -- the sequential test ----------------------------------------------------------------------

HISTORY = NoiseEstimate(variance=math.log1p(0.03 ** 2), df=32.0)  # 3 % CV per pass
INCUMBENT = [100.0, 103.0, 97.0, 101.0, 99.0]


def _look(candidate: list[float], **kwargs: object) -> str | None:
    return sequential_look(candidate, INCUMBENT, threshold=0.01, max_passes=5,
                           noise=HISTORY, boot_cv=0.01, **kwargs)  # type: ignore[arg-type]


def test_a_clearly_worse_candidate_stops_after_two_passes_a_better_one_after_four() -> None:
    assert _look([85.0, 86.0]) == "drop"
    assert _look([100.0, 101.0]) == "drop"  # clearly within: +1 % cannot be reached
    assert _look([104.0, 106.0]) is None  # maybe: run another pass
    # clearly better: kept only on MIN_KEEP_PASSES passes, the next candidates' yardstick
    assert _look([120.0, 121.0]) is None and _look([120.0, 121.0, 119.0]) is None
    assert _look([120.0, 121.0, 119.0, 120.0]) == "keep"
    assert _look([120.0, 121.0, 119.0], min_keep_passes=3) == "keep"
    # +4 %: not clearly better at the early-keep margin, not clearly within either
    assert _look([104.0, 104.5, 103.5, 104.0]) is None


def test_no_decision_before_the_minimum_or_at_the_maximum() -> None:
    assert _look([150.0]) is None
    assert _look([150.0, 151.0], min_passes=3) is None
    assert _look([150.0] * 5) is None  # the bench ends there anyway; the verdict decides
    assert sequential_look([150.0, 151.0], [100.0], threshold=0.01, max_passes=5) is None


@given(st.lists(st.floats(min_value=60.0, max_value=160.0), min_size=2, max_size=4))
def test_an_early_stop_never_contradicts_the_verdict_on_the_same_passes(
        candidate: list[float]) -> None:
    """An early keep clears the threshold at the verdict's confidence too, and an early
    drop is a config the verdict would not keep on these passes."""
    look = _look(candidate)
    low = relative_interval(candidate, INCUMBENT, noise=HISTORY, boot_cv=0.01).low
    if look == "keep":
        assert low > 0.01
    if look == "drop":
        assert low <= 0.01
