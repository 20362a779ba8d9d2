"""Running one trial in this process: prepare (reserved for work before a boot, such as
quantization calibration), boot the server for the trial's recipe, bench it, probe its
accuracy, and tear it down, whatever happens in between. `Executor.run(trial) ->
Measurement` is the one seam the loop sees, so the same loop can later hand trials to a
pool of GPUs or to Ray."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from aevyra_forge.core.recipe import Recipe, recipe_from_dict
from aevyra_forge.core.slo import Slo
from aevyra_forge.core.trial import Measurement, PassStop, Trial
from aevyra_forge.core.values import BenchMetrics, BenchOutcome, LaunchFailure, QualityScore
from aevyra_forge.core.workload import Workload
from aevyra_forge.engine.prepare import PrepareResult
from aevyra_forge.measure.accuracy import QualityError, reference_quality
from aevyra_forge.measure.metrics import median_pass


class Server(Protocol):
    """A live server: where it answers, and how long it took to become healthy."""

    @property
    def url(self) -> str: ...
    @property
    def boot_s(self) -> float: ...


S = TypeVar("S", bound=Server)
S_contra = TypeVar("S_contra", bound=Server, contravariant=True)


class Launcher(Protocol[S]):
    """Boots a server for a recipe (or says why it could not) and tears it down."""

    def launch(self, recipe: Recipe, log_path: Path) -> S | LaunchFailure: ...
    def stop(self, server: S) -> None: ...


class Benchmarker(Protocol[S_contra]):
    """Measures a live server over up to `passes` passes; `stop`, when given, is asked
    after each pass whether the passes so far already decide the verdict."""

    def bench(self, server: S_contra, workload: Workload, concurrency: int,
              passes: int = 1, slo: Slo | None = None,
              stop: Callable[[Sequence[BenchMetrics]], bool] | None = None
              ) -> BenchOutcome: ...


class QualityProbe(Protocol[S_contra]):
    """Accuracy against the baseline: `reference` captures the reference config's outputs
    (kept in its record, so resume has them) or raises QualityError saying why it could
    not, `accuracy` scores another config."""

    def reference(self, server: S_contra) -> dict[str, Any] | None: ...
    def accuracy(self, server: S_contra, reference: dict[str, Any] | None
                 ) -> QualityScore | None: ...


@contextmanager
def serving(launcher: Launcher[S], recipe: Recipe, log_path: Path
            ) -> Iterator[S | LaunchFailure]:
    """A server's whole lifetime as a `with` block: it is stopped on the way out, also
    when the bench raises or the user interrupts."""
    launched = launcher.launch(recipe, log_path)
    if isinstance(launched, LaunchFailure):
        yield launched
        return
    try:
        yield launched
    finally:
        launcher.stop(launched)


class LocalExecutor(Generic[S]):
    """Runs trials one at a time on this host, with the run's fixed measurement settings
    (concurrency, passes, SLO): every config is measured the same way."""

    def __init__(self, launcher: Launcher[S], benchmarker: Benchmarker[S],
                 quality: QualityProbe[S], workload: Workload, *, concurrency: int,
                 repeats: int, slo: Slo | None, log_path: Callable[[int], Path],
                 log_root: Path, on_phase: Callable[[int, str], None] | None = None,
                 check_boot: Callable[[Recipe, Path], str | None] | None = None,
                 stopper: Callable[[PassStop, Sequence[BenchMetrics]], bool] | None = None,
                 prepare: Callable[[Recipe, Path], PrepareResult | None] | None = None
                 ) -> None:
        self.launcher = launcher
        self.benchmarker = benchmarker
        self.quality = quality
        self.workload = workload
        self.concurrency = concurrency
        self.repeats = repeats
        self.slo = slo
        self.log_path = log_path
        self.log_root = log_root
        # told (experiment id, phase) as a trial moves through boot, bench and accuracy
        self.on_phase = on_phase or (lambda exp, phase: None)
        # why a healthy server does not count (a chosen kernel plug-in left no proof in its
        # log: space/plugins.unproven); None when it does
        self.check_boot = check_boot or (lambda recipe, log: None)
        # decides a trial's early stop from its rule (decide.verdict.should_stop): the
        # rule travels with the trial as data, the decision is made here, between passes
        self.stopper = stopper
        # writes the quantized checkpoint a recipe serves before the boot (engine/prepare)
        self.prepare = prepare

    def run(self, trial: Trial) -> Measurement:
        """Prepare what the recipe needs (its time recorded as prepare_s), then serve."""
        if self.prepare is None:
            return self._serve(trial)
        recipe = recipe_from_dict(trial.recipe, source=f"experiment {trial.exp}")
        log_path = self.log_path(trial.exp)
        if recipe.quant.checkpoint:  # only a checkpoint is ever prepared
            self.on_phase(trial.exp, "prepare")
        prepared = self.prepare(recipe, log_path.with_name(log_path.stem + ".prepare.log"))
        if prepared is None:
            return self._serve(trial)
        if prepared.failure is not None:
            return Measurement(status="prepare_failed", reason=prepared.failure,
                               prepare_s=prepared.seconds,
                               log=self._relative(prepared.log) if prepared.log else None)
        return self._serve(trial).model_copy(update={"prepare_s": prepared.seconds})

    def _serve(self, trial: Trial) -> Measurement:
        recipe = recipe_from_dict(trial.recipe, source=f"experiment {trial.exp}")
        log_path = self.log_path(trial.exp)
        self.on_phase(trial.exp, "boot")
        with serving(self.launcher, recipe, log_path) as server:
            if isinstance(server, LaunchFailure):
                return Measurement(status=server.status, reason=server.reason,
                                   boot_s=server.boot_s, log=self._relative(log_path),
                                   suggested_max_model_len=server.suggested_max_model_len)
            refused = self.check_boot(recipe, log_path)
            if refused:  # what was asked for never ran: a failed boot, not "no gain"
                return Measurement(status="boot_failed", reason=refused, boot_s=server.boot_s,
                                   log=self._relative(log_path))
            self.on_phase(trial.exp, "bench")
            outcome = self.benchmarker.bench(server, self.workload, self.concurrency,
                                             self.repeats, self.slo,
                                             stop=self._stop(trial))
            quality: QualityScore | None = None
            captured: dict[str, Any] | None = None
            if outcome.status == "ok":
                self.on_phase(trial.exp, "accuracy")
            note = ""  # what the user must know about accuracy, once, with the reference
            if outcome.status == "ok" and trial.capture_reference:
                captured, note = self._capture(server)
                if captured is not None:
                    quality, note = reference_quality(captured)
            elif outcome.status == "ok":
                quality = self.quality.accuracy(server, trial.quality_reference)
            boot_s = server.boot_s
        metrics = outcome.metrics
        if metrics is None and outcome.passes:  # a bench cut short keeps what it measured
            metrics = median_pass(outcome.passes)
        return Measurement(
            status=outcome.status, reason="; ".join(filter(None, (outcome.reason, note))),
            passes=outcome.passes, pass_isolation=outcome.pass_isolation,
            metrics=metrics, quality=quality, quality_reference=captured,
            boot_s=boot_s, bench_s=outcome.bench_s, log=self._relative(log_path))

    def _stop(self, trial: Trial) -> Callable[[Sequence[BenchMetrics]], bool] | None:
        """The trial's early-stop predicate, None to run every pass."""
        if trial.stop is None or self.stopper is None:
            return None
        return partial(self.stopper, trial.stop)

    def _capture(self, server: S) -> tuple[dict[str, Any] | None, str]:
        """The reference outputs, or None and why accuracy goes unmeasured this run."""
        try:
            captured = self.quality.reference(server)
        except QualityError as exc:
            captured, why = None, str(exc)
        else:
            why = "the probe captured no reference"
        if captured is not None:
            return captured, ""
        return None, (f"accuracy not measured: {why}; changes that can alter outputs "
                      "(dtype, quantization, KV-cache dtype, kernels) will not be kept")

    def _relative(self, log_path: Path) -> str | None:
        if not log_path.exists():
            return None
        try:
            return str(log_path.relative_to(self.log_root))
        except ValueError:
            return str(log_path)
