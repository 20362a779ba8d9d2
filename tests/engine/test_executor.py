"""One trial in, one measurement out: the local executor on the simulator, with a launcher
that fails, a bench that is interrupted, and the accuracy reference captured or used;
the accuracy probe against a fake vLLM that refuses teacher forcing or the probe."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from aevyra_forge.core.recipe import Recipe
from aevyra_forge.core.slo import parse_slo
from aevyra_forge.core.trial import Measurement, PassStop, Trial
from aevyra_forge.core.values import BenchMetrics, BenchOutcome, LaunchFailure, QualityScore
from aevyra_forge.core.workload import Workload, load_workload
from aevyra_forge.engine.executor import LocalExecutor, serving
from aevyra_forge.engine.sim.engine import SimServer, SimulatedEngine
from aevyra_forge.measure.accuracy import VllmQualityProbe
from aevyra_forge.space.gpu_catalogue import gpu_spec
from aevyra_forge.space.knob_space import KnobSpace
from aevyra_forge.space.model_profile import profile
from tests.conftest import MODEL_8B
from tests.fake_vllm import FakeConfig, FakeVllm


class Watched:
    """The simulator, with every launch and stop written down."""

    def __init__(self, fail_boot: bool = False, interrupt_bench: bool = False) -> None:
        hw = gpu_spec("H100").hardware()
        self.space = KnobSpace(hw, profile(MODEL_8B), simulated=True)
        self.sim = SimulatedEngine(hw, gpu_spec("H100"), self.space.model, self.space)
        self.fail_boot = fail_boot
        self.interrupt_bench = interrupt_bench
        self.launched: list[str] = []
        self.stopped: list[str] = []
        self.references: list[Any] = []

    def launch(self, recipe: Recipe, log_path: Path) -> SimServer | LaunchFailure:
        if self.fail_boot:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            log_path.write_text("ValueError: the estimated maximum model length is 4096\n")
            return LaunchFailure(status="boot_failed", reason="context too long",
                                 boot_s=7.0, suggested_max_model_len=4096)
        server = self.sim.launch(recipe, log_path)
        assert isinstance(server, SimServer)
        self.launched.append(server.url)
        return server

    def stop(self, server: SimServer) -> None:
        self.stopped.append(server.url)

    def bench(self, server: SimServer, workload: Workload, concurrency: int,
              passes: int = 1, slo: Any = None, stop: Any = None) -> BenchOutcome:
        if self.interrupt_bench:
            raise KeyboardInterrupt
        return self.sim.bench(server, workload, concurrency, passes, slo, stop=stop)

    def reference(self, server: SimServer) -> dict[str, Any]:
        return {"captured from": server.recipe.id}

    def accuracy(self, server: SimServer, reference: dict[str, Any] | None) -> QualityScore:
        self.references.append(reference)
        return QualityScore(agreement=0.5)


def _executor(tmp_path: Path, engine: Watched, workload: Path) -> LocalExecutor[SimServer]:
    return LocalExecutor(engine, engine, engine, load_workload(workload), concurrency=4,
                         repeats=3, slo=parse_slo("ttft_p99<10s"),
                         log_path=lambda exp: tmp_path / "logs" / f"exp_{exp:03d}.log",
                         log_root=tmp_path)


def _trial(engine: Watched, exp: int = 0, **extra: Any) -> Trial:
    recipe = engine.space.baseline(MODEL_8B)
    return Trial(exp=exp, recipe=recipe.to_dict(), recipe_id=recipe.id, layer=1, **extra)


def test_a_measured_trial_carries_its_passes_median_and_reference(
        tmp_path: Path, small_workload: Path) -> None:
    engine = Watched()
    m = _executor(tmp_path, engine, small_workload).run(
        _trial(engine, capture_reference=True))
    assert m.status == "ok" and len(m.passes) == 3
    assert m.metrics is not None and m.metrics in m.passes  # the median pass, once
    assert all(p.goodput is not None for p in m.passes)  # the run's SLO reached the bench
    assert m.quality_reference == {"captured from": engine.space.baseline(MODEL_8B).id}
    assert m.quality == QualityScore(agreement=1.0, logprob_shift=0.0)
    assert m.log == "logs/exp_000.log" and m.boot_s is not None and m.bench_s
    assert engine.stopped == engine.launched and len(engine.stopped) == 1


def test_a_later_trial_is_scored_against_the_reference_it_carries(
        tmp_path: Path, small_workload: Path) -> None:
    engine = Watched()
    reference = {"tokens": [1, 2, 3]}
    m = _executor(tmp_path, engine, small_workload).run(
        _trial(engine, exp=4, quality_reference=reference))
    assert engine.references == [reference]
    assert m.quality == QualityScore(agreement=0.5) and m.quality_reference is None


def test_a_trials_stop_rule_ends_its_bench_between_passes(tmp_path: Path,
                                                         small_workload: Path) -> None:
    """The rule travels with the trial as data; the executor's stopper decides on it after
    each pass; a trial without a rule, or an executor without a stopper, runs them all."""
    engine, asked = Watched(), []
    rule = PassStop(incumbent=(1.0, 1.0), objective="throughput", slo=None, threshold=0.01,
                    confidence=0.95, boot_cv=0.01, max_passes=3)

    def stopper(got: PassStop, passes: Sequence[BenchMetrics]) -> bool:
        asked.append((got, len(passes)))
        return len(passes) >= 2

    stopping = LocalExecutor(engine, engine, engine, load_workload(small_workload),
                             concurrency=4, repeats=3, slo=None, stopper=stopper,
                             log_path=lambda exp: tmp_path / f"{exp}.log", log_root=tmp_path)
    assert len(stopping.run(_trial(engine, exp=1, stop=rule)).passes) == 2
    assert asked == [(rule, 1), (rule, 2)]
    assert len(stopping.run(_trial(engine, exp=2)).passes) == 3
    plain = _executor(tmp_path, engine, small_workload)
    assert len(plain.run(_trial(engine, exp=3, stop=rule)).passes) == 3


def test_a_boot_failure_is_a_measurement_with_vllms_suggestion(
        tmp_path: Path, small_workload: Path) -> None:
    engine = Watched(fail_boot=True)
    m = _executor(tmp_path, engine, small_workload).run(_trial(engine, exp=2))
    assert m.status == "boot_failed" and m.reason == "context too long"
    assert m.suggested_max_model_len == 4096 and m.boot_s == 7.0
    assert m.passes == () and m.metrics is None and m.quality is None
    assert m.log == "logs/exp_002.log"
    assert engine.stopped == []  # nothing came up, nothing to stop


def test_the_server_is_stopped_when_the_bench_is_interrupted(
        tmp_path: Path, small_workload: Path) -> None:
    engine = Watched(interrupt_bench=True)
    with pytest.raises(KeyboardInterrupt):
        _executor(tmp_path, engine, small_workload).run(_trial(engine))
    assert engine.stopped == engine.launched and len(engine.stopped) == 1


def test_serving_stops_on_the_way_out_of_the_block(tmp_path: Path) -> None:
    engine = Watched()
    recipe = engine.space.baseline(MODEL_8B)
    with pytest.raises(RuntimeError), serving(engine, recipe, tmp_path / "x.log") as server:
        assert isinstance(server, SimServer)
        raise RuntimeError("a bug in the bench")
    assert engine.stopped == engine.launched and len(engine.stopped) == 1


# -- the accuracy probe against a fake vLLM ---------------------------------------------------

class OnFakeVllm:
    """A launcher whose server is an already running fake vLLM (tests/fake_vllm.py), and a
    bench that measured it healthy: what is under test is the accuracy probe."""

    def __init__(self, fake: FakeVllm) -> None:
        self.fake = fake

    def launch(self, recipe: Recipe, log_path: Path) -> FakeServed:
        return FakeServed(self.fake.url)

    def stop(self, server: FakeServed) -> None:
        del server

    def bench(self, server: FakeServed, workload: Workload, concurrency: int,
              passes: int = 1, slo: Any = None, stop: Any = None) -> BenchOutcome:
        m = BenchMetrics(completed=4, duration_s=1.0, input_tokens=40, output_tokens=40,
                         request_throughput=4.0, output_throughput=40.0,
                         total_token_throughput=80.0)
        return BenchOutcome(status="ok", passes=(m,), metrics=m)


class FakeServed:
    def __init__(self, url: str) -> None:
        self.url, self.served_model, self.boot_s = url, "fake-model", 1.0


def _probe_run(tmp_path: Path, workload: Path, config: FakeConfig, **trial: Any
               ) -> Measurement:
    with FakeVllm(config) as fake:
        engine = OnFakeVllm(fake)
        loaded = load_workload(workload)
        executor = LocalExecutor(engine, engine, VllmQualityProbe(loaded, samples=3), loaded,
                                 concurrency=2, repeats=1, slo=None,
                                 log_path=lambda exp: tmp_path / f"exp_{exp}.log",
                                 log_root=tmp_path)
        recipe = Recipe(model="fake-model")
        return executor.run(Trial(exp=trial.pop("exp", 0), recipe=recipe.to_dict(),
                                  recipe_id=recipe.id, layer=1, **trial))


def test_a_server_refusing_teacher_forcing_is_scored_by_greedy_match_and_says_so(
        tmp_path: Path, small_workload: Path) -> None:
    refusing = FakeConfig(length_policy="clamp", refuse_prompt_logprobs=True)
    base = _probe_run(tmp_path, small_workload, refusing, capture_reference=True)
    assert base.status == "ok" and base.quality_reference is not None
    assert base.quality_reference["method"] == "greedy_match"
    assert base.quality is not None and base.quality.method == "greedy_match"
    assert base.reason.startswith("accuracy by greedy token match (teacher forcing "
                                  "refused: /v1/completions answered HTTP 400")
    lossy = FakeConfig(length_policy="clamp", refuse_prompt_logprobs=True, logit_noise=1.0)
    later = _probe_run(tmp_path, small_workload, lossy, exp=3,
                       quality_reference=base.quality_reference)
    assert later.quality is not None and later.quality.method == "greedy_match"
    assert later.quality.agreement < 0.5 and later.reason == ""


def test_a_reference_that_cannot_be_captured_is_said_in_the_measurement(
        tmp_path: Path, small_workload: Path) -> None:
    locked = FakeConfig(length_policy="clamp", api_key="the probe does not have it")
    m = _probe_run(tmp_path, small_workload, locked, capture_reference=True)
    assert m.status == "ok" and m.quality is None and m.quality_reference is None
    assert m.reason.startswith("accuracy not measured: the baseline server failed the "
                               "accuracy reference: /v1/models answered HTTP 401")
    assert m.reason.endswith("will not be kept")
    teacher = _probe_run(tmp_path, small_workload, FakeConfig(length_policy="clamp"),
                         capture_reference=True)
    assert teacher.quality == QualityScore(agreement=1.0, logprob_shift=0.0)
    assert teacher.reason == "" and teacher.quality_reference is not None


def _quant_trial(engine: Watched, tmp_path: Path) -> tuple[Trial, Any]:
    """A trial serving a round-to-nearest W8A8 checkpoint of a (fake) local model."""
    from aevyra_forge.engine import prepare
    source = tmp_path / "model"
    source.mkdir()
    (source / "config.json").write_text("{}")
    quant = prepare.job(source, "w8a8", tmp_path / "quant", {"torch": "x"})
    recipe = engine.space.baseline(MODEL_8B).child(
        quant={"method": "w8a8_int8", "checkpoint": str(quant.out), "kv_cache_dtype": "auto"})
    return Trial(exp=5, recipe=recipe.to_dict(), recipe_id=recipe.id, layer=2), quant


def test_a_failed_prepare_is_a_row_and_nothing_boots(tmp_path: Path,
                                                     small_workload: Path) -> None:
    """The dev environment has no torch, so the real script fails: prepare_failed, with
    its time and its log, and no server."""
    import sys

    from aevyra_forge.engine.prepare import Preparer
    engine = Watched()
    trial, quant = _quant_trial(engine, tmp_path)
    executor = _executor(tmp_path, engine, small_workload)
    executor.prepare = Preparer(sys.executable, {str(quant.out): quant})
    m = executor.run(trial)
    assert m.status == "prepare_failed" and "No module named 'torch'" in m.reason
    assert m.prepare_s is not None and m.prepare_s > 0
    assert m.log == "logs/exp_005.prepare.log" and (tmp_path / m.log).is_file()
    assert engine.launched == [] and m.boot_s is None


def test_a_prepared_checkpoint_is_reused_and_its_time_recorded(tmp_path: Path,
                                                               small_workload: Path) -> None:
    from aevyra_forge.engine.prepare import MANIFEST, Preparer
    engine = Watched()
    trial, quant = _quant_trial(engine, tmp_path)
    quant.out.mkdir(parents=True)
    (quant.out / MANIFEST).write_text("{}")
    ticks = iter([10.0, 10.25])
    executor = _executor(tmp_path, engine, small_workload)
    executor.prepare = Preparer("/no/python/needed", {str(quant.out): quant},
                                clock=lambda: next(ticks))
    m = executor.run(trial)
    assert m.status == "ok" and m.prepare_s == 0.25 and len(engine.launched) == 1


def test_a_chosen_kernel_plugin_that_left_no_proof_is_a_failed_boot_not_benched(
        tmp_path: Path, small_workload: Path) -> None:
    """The server booted, but the plug-in asked for never ran: the trial is a failed boot
    saying so (not a measurement of vLLM's own kernel passed off as the plug-in's; not the
    `invalid` status, which is not counted and may be proposed again), and is torn down."""
    from aevyra_forge.space import plugins

    engine = Watched()
    slot = plugins.slot([plugins.KernelCandidate(
        name="fast_attn", plugins=("fast_kernels",), proof="fast-kernels: loaded")], {})
    space = KnobSpace(engine.space.hw, engine.space.model, simulated=True, plugins=slot)
    recipe = space.apply(space.baseline(MODEL_8B), {"kernel_plugin": "fast_attn"})
    checked = LocalExecutor(engine, engine, engine, load_workload(small_workload),
                            concurrency=4, repeats=3, slo=None,
                            log_path=lambda exp: tmp_path / f"{exp}.log", log_root=tmp_path,
                            check_boot=plugins.boot_check(slot))
    m = checked.run(Trial(exp=1, recipe=recipe.to_dict(), recipe_id=recipe.id, layer=3))
    assert m.status == "boot_failed"
    assert m.reason.startswith("invalid: kernel plug-in 'fast_attn' did not load")
    assert m.passes == () and m.metrics is None and m.boot_s is not None
    assert engine.stopped == engine.launched and len(engine.launched) == 1
    baseline = space.baseline(MODEL_8B)  # no plug-in chosen: measured as always
    m = checked.run(Trial(exp=2, recipe=baseline.to_dict(), recipe_id=baseline.id, layer=1))
    assert m.status == "ok" and len(m.passes) == 3
