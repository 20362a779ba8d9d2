"""Interval statistics for comparing configs measured over repeated bench passes: a
confidence interval on the relative difference of a higher-is-better per-pass value
(Welch t on log values, or a percentile bootstrap), with pass-to-pass noise pooled from
earlier configs and between-boot noise estimated from re-measurements."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from statistics import NormalDist
from typing import Literal

import numpy as np

# The interval's defaults are the settings' defaults, defined once in core.settings.
from aevyra_forge.core.settings import DEFAULT_BOOT_CV, DEFAULT_CONFIDENCE

Method = Literal["welch", "bootstrap"]

ZERO_FLOOR = 1e-9  # a zero per-pass value counts as this fraction of the largest value
MAX_RATIO = 100.0
"""The widest candidate/incumbent ratio an interval reports: its bounds stay within
[1/100, 100], i.e. -99 % to +9,900 %. Beyond that the figures describe a broken
measurement (a pass at or near zero, a spread of orders of magnitude), not a tuning
change; a runtime OOM against a zero-throughput incumbent once printed +6.3e55 %.
Such bounds are clipped and the interval says so. No keep decision changes: a bound at
+9,900 % or -99 % is already far outside any --min-improvement-pct."""
_DF_STEP = 0.01  # Welch df is rounded down to this step: conservative, and caches quantiles


@dataclass(frozen=True)
class Interval:
    """Relative difference candidate / incumbent - 1 (0.05 means +5 %) with a two-sided
    confidence interval [low, high] at `confidence`."""

    point: float
    low: float
    high: float
    confidence: float
    clipped: bool = False  # a figure went beyond MAX_RATIO and was clipped to it

    def __str__(self) -> str:
        note = (f" (clipped at {MAX_RATIO:g}x: a pass at or near zero, or a huge spread)"
                if self.clipped else "")
        return f"{_pct(self.point)} [{_pct(self.low)}, {_pct(self.high)}]{note}"


@dataclass(frozen=True)
class NoiseEstimate:
    """Pass-to-pass variance of log values within one boot, pooled over earlier configs of
    the same run, with its degrees of freedom."""

    variance: float
    df: float

    @property
    def cv(self) -> float:
        return math.sqrt(math.expm1(self.variance))


def pooled_noise(groups: Iterable[Sequence[float]]) -> NoiseEstimate:
    """Pool the within-config spread of earlier configs (each group: one config's per-pass
    values from one boot). Groups of fewer than two passes, or with a non-positive value,
    carry no information."""
    ss, df = 0.0, 0
    for group in groups:
        if len(group) >= 2 and all(v > 0 and math.isfinite(v) for v in group):
            ss += _sum_squares([math.log(v) for v in group])
            df += len(group) - 1
    return NoiseEstimate(variance=ss / df if df else 0.0, df=float(df))


def between_boot_noise(boots: Sequence[Sequence[float]]) -> NoiseEstimate:
    """Between-boot variance of one config's log mean, from two or more boots of it (each
    a list of that boot's per-pass values): the spread of the boot means less what the
    pass-to-pass noise alone explains (method of moments, floored at 0), with df = boots - 1.
    Re-measuring the incumbent on a fresh boot adds a boot; `.cv` feeds `boot_cv`."""
    logs = [[math.log(v) for v in boot] for boot in boots
            if boot and all(v > 0 and math.isfinite(v) for v in boot)]
    if len(logs) < 2:
        return NoiseEstimate(variance=0.0, df=0.0)
    means = [sum(g) / len(g) for g in logs]
    spread = _sum_squares(means) / (len(means) - 1)
    within = [_sum_squares(g) / (len(g) - 1) / len(g) for g in logs if len(g) > 1]
    explained = sum(within) / len(within) if within else 0.0
    return NoiseEstimate(variance=max(0.0, spread - explained), df=float(len(logs) - 1))


def relative_interval(candidate: Sequence[float], incumbent: Sequence[float], *,
                      confidence: float = DEFAULT_CONFIDENCE, resamples: int = 2000,
                      seed: int = 0, method: Method = "welch",
                      noise: NoiseEstimate | None = None,
                      boot_cv: float = DEFAULT_BOOT_CV) -> Interval:
    """Confidence interval on candidate/incumbent - 1 for a higher-is-better per-pass value,
    from independent passes of each config (each config's passes from one boot).

    Default method `welch`: a t-interval on the difference of mean log values with Welch–
    Satterthwaite degrees of freedom. Logs because noise is multiplicative and the ratio is
    what we judge; a t-interval because with 2–5 passes the sample spread is itself noisy,
    and the t quantile (4.30 at 2 df, 2.78 at 4) pays for it where a percentile bootstrap
    does not (it only sees n^n resamples and underestimates the spread by (n-1)/n): at n=3
    the bootstrap keeps 3–9 % of A/A comparisons against the t-interval's 1–4 %
    (benchmarks/decision_rates.py). `bootstrap` is that percentile bootstrap, for
    comparison and for large n; `resamples` and `seed` apply to it only (`noise` and the
    single-pass rule below to `welch` only), and both methods are deterministic.

    `boot_cv` adds the between-boot variation that passes on one server cannot show (two
    boots of one config differ by about this CV in their means), once per side.
    `noise`, when given, pools earlier configs' pass-to-pass spread with this pair's
    (equal variance on the log scale), which narrows the interval a lot at n=3.
    With one pass on each side and no `noise`, the interval is unbounded; finite figures
    beyond MAX_RATIO either way are clipped to it (`clipped`)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if method not in ("welch", "bootstrap"):
        raise ValueError(f"unknown method {method!r}: welch or bootstrap")
    x, y = _logs(candidate, incumbent)
    diff = sum(x) / len(x) - sum(y) / len(y)
    boot_var = 2 * math.log1p(boot_cv ** 2)  # lognormal sigma^2 of a CV, once per side
    alpha = 1 - confidence
    if method == "bootstrap":
        rng = np.random.default_rng(seed)
        xa, ya = np.array(x), np.array(y)
        draws = (xa[rng.integers(0, len(x), (resamples, len(x)))].mean(axis=1)
                 - ya[rng.integers(0, len(y), (resamples, len(y)))].mean(axis=1))
        if boot_var > 0:
            draws = draws + rng.normal(0.0, math.sqrt(boot_var), resamples)
        low, high = (float(q) for q in np.quantile(draws, [alpha / 2, 1 - alpha / 2]))
    else:
        half = _welch_half_width(x, y, 1 - alpha / 2, noise, boot_var)
        low, high = diff - half, diff + half
    limit = math.log(MAX_RATIO)
    clipped = any(math.isfinite(v) and abs(v) > limit for v in (diff, low, high))

    def bounded(v: float) -> float:  # infinite stays infinite: no noise estimate at all
        return math.expm1(max(-limit, min(limit, v)) if math.isfinite(v) else v)

    return Interval(point=bounded(diff), low=bounded(low), high=bounded(high),
                    confidence=confidence, clipped=clipped)


def _logs(candidate: Sequence[float], incumbent: Sequence[float]
          ) -> tuple[list[float], list[float]]:
    c, b = [float(v) for v in candidate], [float(v) for v in incumbent]
    if not c or not b:
        raise ValueError("each side needs at least one measured pass")
    if not all(math.isfinite(v) and v >= 0 for v in c + b):
        raise ValueError("per-pass values must be finite and non-negative")
    top = max(c + b)
    if top == 0:  # nothing measured anywhere: equal
        return [0.0] * len(c), [0.0] * len(b)
    # A pass that produced nothing (zero goodput) becomes a huge outlier on the log scale:
    # the interval widens instead of the log failing.
    floor = max(ZERO_FLOOR * top, sys.float_info.min)  # a subnormal top would floor at 0
    return [math.log(max(v, floor)) for v in c], [math.log(max(v, floor)) for v in b]


def _sum_squares(values: Sequence[float]) -> float:
    mean = sum(values) / len(values)
    return sum((v - mean) ** 2 for v in values)


def _welch_half_width(x: Sequence[float], y: Sequence[float], p: float,
                      noise: NoiseEstimate | None, boot_var: float) -> float:
    n, m = len(x), len(y)
    vx = _sum_squares(x) / (n - 1) if n > 1 else 0.0
    vy = _sum_squares(y) / (m - 1) if m > 1 else 0.0
    # Estimated components of the variance of the difference, each with its df.
    if noise is None and n > 1 and m > 1:
        parts = [(vx / n, n - 1.0), (vy / m, m - 1.0)]
    else:  # one shared variance: from history and/or whichever side has repeats
        prior_df = noise.df if noise else 0.0
        df = prior_df + (n - 1) + (m - 1)
        if df == 0:
            return math.inf  # one pass each and no history: no noise estimate at all
        ss = (noise.variance * noise.df if noise else 0.0) + vx * (n - 1) + vy * (m - 1)
        parts = [(ss / df * (1 / n + 1 / m), df)]
    total = sum(v for v, _ in parts) + boot_var
    if total == 0:
        return 0.0
    spread = sum(v * v / d for v, d in parts if v > 0)
    dof = total * total / spread if spread > 0 else math.inf
    if math.isfinite(dof):
        dof = max(1.0, math.floor(dof / _DF_STEP) * _DF_STEP)
    return t_quantile(p, dof) * math.sqrt(total)


Look = Literal["keep", "drop"]
INTERIM_CONFIDENCE = 0.99
"""The confidence of the interval that may stop a bench early with a keep. Every look at
the data is another chance for noise to clear the threshold, so an early keep must clear
it by more than the final one (a Pocock-like bound): looks at 0.99 before the last one
keep no more A/A pairs than the final look alone (benchmarks/decision_rates.py)."""
FUTILITY_CONFIDENCE = 0.70
"""The confidence of the interval whose upper bound may stop a bench with a drop: the
candidate's optimistic figure cannot clear the bar the final interval will set. At 0.70
a true +10 % is dropped early in under 1 % of trials at 3-8 % CV per pass (at 0.80: the
same within the benchmark's noise) and an A/A pair stops after 2.6-2.9 passes (2.8-3.1)."""
MIN_PASSES = 2  # the fewest passes a sequential decision is taken on: one shows no spread
MIN_KEEP_PASSES = 4
"""The fewest passes an early keep is taken on. A kept config's passes are the yardstick
every later candidate is judged against: kept on two, the next intervals were too wide to
keep anything (benchmarks/search_quality.py once reverted a true +14 % at [-16 %, +53 %]);
against four, a later +10 % at 3 % CV per pass is kept in 96.5 % of trials (97.7 % against
five; benchmarks/decision_rates.py)."""


def sequential_look(candidate: Sequence[float], incumbent: Sequence[float], *,
                    threshold: float, max_passes: int, min_passes: int = MIN_PASSES,
                    min_keep_passes: int = MIN_KEEP_PASSES,
                    confidence: float = DEFAULT_CONFIDENCE,
                    interim_confidence: float = INTERIM_CONFIDENCE,
                    futility_confidence: float = FUTILITY_CONFIDENCE,
                    noise: NoiseEstimate | None = None,
                    boot_cv: float = DEFAULT_BOOT_CV) -> Look | None:
    """After each pass of a candidate, whether more passes can still change the verdict:
    "keep" when, from `min_keep_passes` on, the interval's lower bound already clears
    `threshold` (a fraction: 0.01 for +1 %) at `interim_confidence`; "drop" when its upper
    bound at `futility_confidence` is below the bar the final interval will set (clearly
    worse, or clearly within the threshold: no later pass is likely to make it a keep);
    None to run another pass. At `max_passes` (today's fixed count) the bench ends anyway
    and the verdict decides as before. The incumbent's passes are complete; only the
    candidate's grow."""
    n = len(candidate)
    if n < min_passes or n >= max_passes or len(incumbent) < 2:
        return None
    if n >= min_keep_passes:
        strict = relative_interval(candidate, incumbent, confidence=interim_confidence,
                                   noise=noise, boot_cv=boot_cv)
        if strict.low > threshold:
            return "keep"
    now = relative_interval(candidate, incumbent, confidence=futility_confidence,
                            noise=noise, boot_cv=boot_cv)
    # The half-width the final interval will have with every pass run (the spread so far
    # carried over): a candidate must clear the threshold by that much to be kept.
    x, y = _logs(candidate, incumbent)
    mean = sum(x) / len(x)
    final = _welch_half_width(x + [mean] * (max_passes - n), y, (1 + confidence) / 2, noise,
                              2 * math.log1p(boot_cv ** 2))
    judged = relative_interval(candidate, incumbent, confidence=confidence, noise=noise,
                               boot_cv=boot_cv)
    if judged.low <= threshold and math.log1p(now.high) < math.log1p(threshold) + final:
        return "drop"  # and the verdict on these passes does not keep it either
    return None


@lru_cache(maxsize=8192)
def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with `df` >= 1 (possibly fractional) degrees of
    freedom. With t = sqrt(df)*tan(theta) the CDF becomes 1/2 + k * integral of
    cos(phi)^(df-1) over [0, theta], a smooth integrand on a bounded range (Simpson's
    rule); Newton's method from the normal quantile converges from below because that
    integral is concave in theta."""
    if not 0 < p < 1 or df < 1:
        raise ValueError(f"need 0 < p < 1 and df >= 1, got p={p}, df={df}")
    z = NormalDist().inv_cdf(p)
    if p < 0.5:
        return -t_quantile(1 - p, df)
    if p == 0.5:
        return 0.0
    if df > 1e7:
        return z
    k = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(math.pi)
    target = p - 0.5
    theta = math.atan(z / math.sqrt(df))
    for _ in range(200):
        grid = np.linspace(0.0, theta, 513)
        f = np.cos(grid) ** (df - 1)
        area = k * theta / 1536 * float(f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())
        step = (target - area) / (k * float(f[-1]))
        theta = min(theta + step, math.pi / 2 * (1 - 1e-12))
        if abs(step) < 1e-13:
            break
    return math.sqrt(df) * math.tan(theta)


def _pct(x: float) -> str:
    return f"{x * 100:+.1f}%"
