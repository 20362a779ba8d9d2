"""How often does a keep/revert rule keep a change that did nothing (A/A), and how often
does it find one that did? Simulates noisy bench passes and prints the keep rate of each
rule over a grid of per-pass noise (CV), passes per config (n), between-boot noise and
true effect (0, +5, +10, +20 %), with the median width of the interval where there is one,
then the passes each CV needs for a +10 % change to be kept 90 % of the time.

Noise model: every pass's value is true value x boot factor x pass factor, both
lognormal with the stated CV; each config is booted once, so its passes share one boot
factor that no number of passes averages away. The incumbent is re-drawn each trial.
"history" pools the pass-to-pass spread of 8 earlier configs (n passes each) of the run.

    python benchmarks/decision_rates.py [--trials 2000] [--seed 0] [--confidence 0.90]
                                         [--min-improvement-pct 1]

What it showed (2000 trials, 90 % intervals as the keep rule uses them, 1 % assumed
between-boot CV): the reference tool's single run keeps 42-48 % of A/A comparisons, a
median of 3-5 passes still 35-46 %; the Welch t-interval on log values with history keeps
2-3 % (5-6 % when the true between-boot CV is twice the assumed one: the loop's
re-measurements of the incumbent raise the assumption to what they show) and finds a true
+10 % in 97 % of trials at n=5 and 3 % CV per pass; at 5 % CV it needs 8 passes for 90 %,
at 8 % 20. A percentile bootstrap at n=3 keeps 5-11 % of A/A comparisons. (At 95 %, the
default until the search benchmark showed true gains of +2-4 % reverted too often: A/A
1-1.5 %, +10 % at n=5 and 3 % CV 94 %.)

The sequential test (stats.sequential_look as verdict.should_stop applies it: up to 5
passes, a look after each from the second; a drop may end a bench from pass 2, a keep
from pass 4 when its 99 % bound clears the bar; 2000 trials, with history, true boot CV
1 %) keeps the error rates of the fixed five passes on the same draws and takes 3.26
passes per decision on average at 3 % CV (3.27 at 5 %, 3.21 at 8 %; -35 %) over true
effects 0, +10, -10 and +5 %: A/A keeps 1.9 / 3.3 / 4.3 % (fixed: the same), +10 % kept
97.7 / 79.0 / 47.7 % (fixed: 97.8 / 79.4 / 48.3 %); an A/A pair stops after 2.6-2.9
passes, a -10 % one after 2.0, a +10 % one after 4.2-4.5. An early keep leaves a 4-pass
yardstick: a later +10 % is kept 96.5 / 75.0 / 42.8 % of the time against it (97.7 / 79.0
/ 47.7 % against five). Keeps on two passes took fewer passes still, but left the next
comparisons against a two-pass incumbent too wide to keep anything (seen in
search_quality.py: a true +14 % reverted at [-16 %, +53 %]). With --min-improvement-pct 0
the sequential rule keeps 4.5 / 5.3 / 6.1 % of A/A pairs at 3 / 5 / 8 % CV (above 5 % from
5 % noise on), a true +2 % 21 % of the time at 3 % CV (10 % at the default +1 %).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from aevyra_forge.core.settings import DEFAULT_BOOT_CV, DEFAULT_CONFIDENCE, TuneSettings
from aevyra_forge.decide.stats import (
    INTERIM_CONFIDENCE,
    MIN_KEEP_PASSES,
    Interval,
    NoiseEstimate,
    pooled_noise,
    relative_interval,
    sequential_look,
)

# the keep rule's threshold as a fraction: --min-improvement-pct's default, or the flag's
MIN_IMPROVEMENT = TuneSettings.model_fields["min_improvement_pct"].default / 100
EFFECTS = (0.0, 0.05, 0.10, 0.20)
CVS = (0.03, 0.05, 0.08)
PASSES = (3, 5)
BOOT_CVS = (0.01, 0.02)  # true between-boot CV; the rules assume DEFAULT_BOOT_CV
HISTORY = 8  # earlier configs pooled by the "history" rule
Rule = Callable[[np.ndarray, np.ndarray, NoiseEstimate], tuple[bool, float | None]]


def sigma(cv: float) -> float:
    """The lognormal sigma whose CV is `cv`."""
    return math.sqrt(math.log1p(cv * cv))


def measure(rng: np.random.Generator, effect: float, n: int, cv: float, boot_cv: float
            ) -> np.ndarray:
    boot = math.exp(rng.normal(0.0, sigma(boot_cv)))
    return (1 + effect) * boot * np.exp(rng.normal(0.0, sigma(cv), n))


def _interval_rule(confidence: float, history: bool = False, bootstrap: bool = False) -> Rule:
    def rule(c: np.ndarray, b: np.ndarray, noise: NoiseEstimate) -> tuple[bool, float | None]:
        iv: Interval = relative_interval(
            list(c), list(b), confidence=confidence, noise=noise if history else None,
            method="bootstrap" if bootstrap else "welch", resamples=1000)
        return iv.low > MIN_IMPROVEMENT, iv.high - iv.low
    return rule


def _single_run(c: np.ndarray, b: np.ndarray, noise: NoiseEstimate) -> tuple[bool, None]:
    return bool(c[0] / b[0] - 1 > MIN_IMPROVEMENT), None  # the reference tool's rule


def _medians(c: np.ndarray, b: np.ndarray, noise: NoiseEstimate) -> tuple[bool, None]:
    return bool(np.median(c) / np.median(b) - 1 > MIN_IMPROVEMENT), None


def _bar() -> str:
    return f"{MIN_IMPROVEMENT:+.1%}"


def rules(confidence: float) -> dict[str, Rule]:
    return {
        f"1 pass, keep > {_bar()} (reference tool)": _single_run,
        f"median of n, keep > {_bar()}": _medians,
        f"percentile bootstrap, low > {_bar()}": _interval_rule(confidence, bootstrap=True),
        f"welch t (log), low > {_bar()}": _interval_rule(confidence),
        f"welch t (log) + history, low > {_bar()}": _interval_rule(confidence, history=True),
    }


def rate(rule: Rule, n: int, cv: float, boot_cv: float, effect: float, trials: int,
         seed: int) -> tuple[float, float | None]:
    """Fraction of trials kept, and the median interval width (None for point rules)."""
    rng = np.random.default_rng([seed, n, round(cv * 1000), round(boot_cv * 1000),
                                 round(effect * 1000)])
    kept, widths = 0, []
    for _ in range(trials):
        history = pooled_noise(list(measure(rng, 0.0, n, cv, 0.0)) for _ in range(HISTORY))
        ok, width = rule(measure(rng, effect, n, cv, boot_cv), measure(rng, 0.0, n, cv, boot_cv),
                         history)
        kept += ok
        if width is not None:
            widths.append(width)
    return kept / trials, statistics.median(widths) if widths else None


def grid(trials: int, seed: int, confidence: float) -> None:
    print(f"keep rate by true effect; intervals {confidence:.0%} two-sided, assumed "
          f"between-boot CV {DEFAULT_BOOT_CV:.0%}; {trials} trials per cell")
    head = "  ".join(f"{e:+.0%}".rjust(5) for e in EFFECTS)
    print(f"{'rule':<38} {'n':>2} {'CV':>4} {'boot':>4}  {head}  width(A/A)")
    for name, rule in rules(confidence).items():
        for n in (1,) if rule is _single_run else PASSES:
            for cv in CVS:
                for boot_cv in BOOT_CVS:
                    cells = [rate(rule, n, cv, boot_cv, e, trials, seed) for e in EFFECTS]
                    width = cells[0][1]
                    shown = f"{width * 100:9.1f}pt" if width is not None else ""
                    rates = "  ".join(f"{r:5.3f}" for r, _ in cells)
                    print(f"{name:<38} {n:>2} {cv:4.0%} {boot_cv:4.0%}  {rates}  {shown}")


def passes_needed(trials: int, seed: int, confidence: float) -> None:
    print("\npasses per config for +10% kept >= 90% (welch t on logs; true boot CV = "
          f"assumed {DEFAULT_BOOT_CV:.0%}; A/A rate at that n)")
    for history in (False, True):
        rule = _interval_rule(confidence, history=history)
        for cv in CVS:
            found = "none up to 40"
            for n in (2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 40):
                power, _ = rate(rule, n, cv, DEFAULT_BOOT_CV, 0.10, trials, seed)
                if power >= 0.90:
                    aa, _ = rate(rule, n, cv, DEFAULT_BOOT_CV, 0.0, trials, seed)
                    found = f"n={n}: +10% kept {power:.3f}, A/A kept {aa:.3f}"
                    break
            label = "with history" if history else "pair only   "
            print(f"  {label} CV {cv:.0%}: {found}")


def sequential(trials: int, seed: int, confidence: float, max_passes: int = 5) -> None:
    """The sequential test (stats.sequential_look, as verdict.should_stop applies it)
    against today's fixed passes on the same draws: keep rates and the mean passes a
    decision takes, with history, true boot CV = assumed; then what an early keep costs
    the next decisions, whose yardstick it has become: a +10 % kept against an incumbent
    of MIN_KEEP_PASSES passes instead of all of them."""
    print(f"\nsequential test vs fixed {max_passes} passes (welch t + history, low > "
          f"{_bar()}; "
          f"drop when even the optimistic bound cannot clear the final bar, keep from "
          f"{MIN_KEEP_PASSES} passes when the {INTERIM_CONFIDENCE:.0%} bound clears it)")
    print(f"{'CV':>4}  {'effect':>6}  {'fixed keep':>10}  {'seq keep':>8}  {'seq passes':>10}")
    for cv in CVS:
        spent = []
        for effect in (0.0, 0.10, -0.10, 0.05):
            fixed, kept, passes = _sequential_rates(effect, cv, trials, seed, confidence,
                                                    max_passes)
            spent.append(passes)
            print(f"{cv:4.0%}  {effect:+6.0%}  {fixed:10.3f}  {kept:8.3f}  {passes:10.2f}")
        mean = statistics.mean(spent)
        print(f"{cv:4.0%}  mean passes over these effects {mean:.2f} (fixed: {max_passes}; "
              f"{mean / max_passes - 1:+.0%})")
    print(f"\na +10% judged against an incumbent kept early on {MIN_KEEP_PASSES} passes "
          f"(sequential keep rate; against {max_passes} passes in brackets)")
    for cv in CVS:
        short = _sequential_rates(0.10, cv, trials, seed, confidence, max_passes,
                                  incumbent_passes=MIN_KEEP_PASSES)[1]
        full = _sequential_rates(0.10, cv, trials, seed, confidence, max_passes)[1]
        print(f"{cv:4.0%}  {short:.3f} ({full:.3f})")


def _sequential_rates(effect: float, cv: float, trials: int, seed: int, confidence: float,
                      max_passes: int, incumbent_passes: int | None = None
                      ) -> tuple[float, float, float]:
    """(fixed-n keep rate, sequential keep rate, mean passes) on the same draws."""
    rng = np.random.default_rng([seed, round(cv * 1000), round(effect * 1000) + 1000])
    fixed = kept = passes = 0
    for _ in range(trials):
        history = pooled_noise(list(measure(rng, 0.0, max_passes, cv, 0.0))
                               for _ in range(HISTORY))
        inc = list(measure(rng, 0.0, incumbent_passes or max_passes, cv, DEFAULT_BOOT_CV))
        cand = list(measure(rng, effect, max_passes, cv, DEFAULT_BOOT_CV))
        fixed += relative_interval(cand, inc, confidence=confidence,
                                   noise=history).low > MIN_IMPROVEMENT
        # as verdict.should_stop: a look's drop or keep ends the bench; the verdict then
        # judges the passes run (an early keep clears it: its interval is the stricter)
        look, n = None, 0
        while look is None and n < max_passes:
            n += 1
            look = sequential_look(cand[:n], inc, threshold=MIN_IMPROVEMENT,
                                   max_passes=max_passes, confidence=confidence,
                                   noise=history)
        passes += n
        kept += look != "drop" and relative_interval(
            cand[:n], inc, confidence=confidence, noise=history).low > MIN_IMPROVEMENT
    return fixed / trials, kept / trials, passes / trials


def latency_guard_noise(experiments: int = 12) -> None:
    """A/A spread of p99 E2E and TTFT between boots of one config in the dry-run simulator
    (noise CV 8 %), against the guard's 1.5x."""
    from aevyra_forge.core.values import LaunchFailure
    from aevyra_forge.core.workload import load_workload
    from aevyra_forge.engine.sim.engine import SimulatedEngine
    from aevyra_forge.space.gpu_catalogue import GPU_CATALOG
    from aevyra_forge.space.knob_space import KnobSpace
    from aevyra_forge.space.model_profile import profile

    root = Path(__file__).resolve().parent.parent
    workload = load_workload(root / "examples" / "sample_workload.jsonl")
    spec = next(s for s in GPU_CATALOG if "H100" in s.name)
    hw = spec.hardware()
    space = KnobSpace(hw, profile("meta-llama/Llama-3.1-8B-Instruct"), simulated=True)
    recipe = space.apply(space.baseline("meta-llama/Llama-3.1-8B-Instruct"),
                         {"max_model_len": 8192})
    e2e, ttft = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(experiments):
            sim = SimulatedEngine(hw, spec, space.model, space, seed=seed, noise_cv=0.08)
            server = sim.launch(recipe, Path(tmp) / f"{seed}.log")
            if isinstance(server, LaunchFailure):
                continue
            out = sim.bench(server, workload, concurrency=8, passes=3)
            e2e.append(statistics.median(m.e2e_ms.p99 for m in out.passes))
            ttft.append(statistics.median(m.ttft_ms.p99 for m in out.passes))
    for label, values in (("p99 E2E", e2e), ("p99 TTFT", ttft)):
        worst = max(a / b for a in values for b in values)
        print(f"  {label}: largest ratio between two boots of the baseline {worst:.2f}x "
              f"over {len(values)} boots (guard refuses above 1.5x)")


def main() -> None:
    global MIN_IMPROVEMENT  # the rules read it; the default is the CLI's
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--confidence", type=float, default=DEFAULT_CONFIDENCE)
    parser.add_argument("--min-improvement-pct", type=float, default=MIN_IMPROVEMENT * 100,
                        help="the keep rule's threshold (--min-improvement-pct of tune)")
    args = parser.parse_args()
    MIN_IMPROVEMENT = args.min_improvement_pct / 100
    start = time.perf_counter()
    grid(args.trials, args.seed, args.confidence)
    passes_needed(max(500, args.trials // 2), args.seed, args.confidence)
    sequential(args.trials, args.seed, args.confidence)
    print("\nlatency guard in the simulator (A/A):")
    latency_guard_noise()
    print(f"\n({time.perf_counter() - start:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
