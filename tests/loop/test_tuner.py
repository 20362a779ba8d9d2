"""The loop on the simulator with a real store: baseline first, refusals without spending
an experiment, escalation, budgets, crash rows, and interrupts."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from aevyra_forge.agent import AgentContext, BuiltinStrategy, ProposalReply
from aevyra_forge.core.recipe import Recipe
from aevyra_forge.core.settings import TuneSettings
from aevyra_forge.core.values import LaunchFailure, Proposal
from aevyra_forge.core.workload import load_workload
from aevyra_forge.engine.executor import LocalExecutor
from aevyra_forge.engine.sim.engine import SimulatedEngine
from aevyra_forge.loop.events import Event, LayerEscalated, ProposalRefused
from aevyra_forge.loop.tuner import MAX_ASKS, Tuner
from aevyra_forge.space.gpu_catalogue import gpu_spec
from aevyra_forge.space.knob_space import KnobSpace
from aevyra_forge.space.model_profile import profile
from aevyra_forge.space.playbook import load_playbook
from aevyra_forge.store.run_store import RunStore
from tests.conftest import MODEL_8B


class Scripted:
    """A proposer that replays fixed replies and remembers what it was shown."""

    name = "scripted"

    def __init__(self, replies: list[ProposalReply]) -> None:
        self.replies: Iterator[ProposalReply] = iter(replies)
        self.contexts: list[AgentContext] = []

    def propose(self, ctx: AgentContext) -> ProposalReply:
        self.contexts.append(ctx)
        return next(self.replies, ProposalReply(proposal=None))


E = TypeVar("E")


class Events:
    def __init__(self) -> None:
        self.seen: list[Event] = []

    def notify(self, event: Event) -> None:
        self.seen.append(event)

    def of(self, kind: type[E]) -> list[E]:
        return [e for e in self.seen if isinstance(e, kind)]


def _reply(layer: int, **changes: Any) -> ProposalReply:
    return ProposalReply(proposal=Proposal(rationale="test", layer=layer,  # type: ignore[arg-type]
                                           changes=changes))


def _tuner(tmp_path: Path, workload: Path, proposer: Any, engine: Any = None,
           gpu: str = "H100", **overrides: Any) -> tuple[Tuner, Events]:
    """A tuner on the simulator; `engine` is (launcher, benchmarker, quality probe)."""
    settings = TuneSettings(model=MODEL_8B, workload=str(workload), llm="builtin",
                            dry_run=True, run_dir=str(tmp_path / ".forge"),
                            **{"repeats": 2, **overrides})
    hw = gpu_spec(gpu).hardware()
    space = KnobSpace(hw, profile(MODEL_8B), simulated=True)
    sim = SimulatedEngine(hw, gpu_spec(gpu), space.model, space, seed=1)
    run = RunStore(tmp_path / ".forge").create_run({"model": MODEL_8B, "hardware": gpu})
    events = Events()
    loaded = load_workload(workload)
    launcher, bench, quality = engine or (sim, sim, sim)
    executor = LocalExecutor(launcher, bench, quality, loaded,
                             concurrency=settings.concurrency, repeats=settings.repeats,
                             slo=settings.parsed_slo(), log_path=run.log_path,
                             log_root=run.path)
    tuner = Tuner(settings, hw, loaded, space, load_playbook(), proposer, executor, run,
                  space.baseline(MODEL_8B), events)
    return tuner, events


def test_baseline_first_then_one_change_per_experiment(tmp_path: Path,
                                                       small_workload: Path) -> None:
    proposer = Scripted([_reply(1, max_num_seqs=64), _reply(1, max_num_batched_tokens=4096)])
    tuner, _ = _tuner(tmp_path, small_workload, proposer, max_experiments=3)
    assert tuner.run().reason.startswith("experiment budget")
    recs = tuner.run_log.records()
    assert [r.exp for r in recs] == [0, 1, 2]
    assert recs[0].proposal is None and recs[0].status == "ok" and recs[0].kept
    assert recs[0].score == 1.0
    assert recs[1].recipe["config"] == {"max_num_seqs": 64}
    assert recs[1].parent_id == recs[0].recipe_id
    assert proposer.contexts[0].best_score == 1.0 and len(proposer.contexts[0].history) == 1
    assert (tuner.run_log.path / "completed.json").exists()
    assert (tuner.run_log.path / "best_recipe.yaml").exists()


def test_refused_proposals_cost_no_experiment(tmp_path: Path, small_workload: Path) -> None:
    proposer = Scripted([
        _reply(1, max_num_seqs=1024),  # H100 default: a no-op
        _reply(1, max_num_seq=64),  # unknown knob
        _reply(1, max_num_seqs=64),
        _reply(2, quant_method="fp8"),  # not the active layer
        _reply(1, max_num_seqs=64),  # now a no-op: it was kept, or a repeat
        _reply(1, max_num_seqs=32),
    ])
    tuner, events = _tuner(tmp_path, small_workload, proposer, max_experiments=3)
    tuner.run()
    recs = tuner.run_log.records()
    assert [r.status for r in recs] == ["ok", "ok", "ok"]
    assert recs[1].recipe["config"] == {"max_num_seqs": 64}
    assert recs[2].recipe["config"]["max_num_seqs"] == 32
    reasons = [e.reason for e in events.of(ProposalRefused)]
    assert len(reasons) == 4
    assert "no-op" in reasons[0] and "unknown knob" in reasons[1]
    assert "active layer is 1" in reasons[2]
    assert "no-op" in reasons[3] or "repeat of experiment 1" in reasons[3]
    assert proposer.contexts[1].feedback == reasons[0]
    assert [c.attempt for c in proposer.contexts] == [0, 1, 2, 0, 1, 2]


def test_exhausted_reasks_record_one_row_without_booting(tmp_path: Path,
                                                          small_workload: Path) -> None:
    proposer = Scripted([_reply(1, max_num_seqs=1024)] * MAX_ASKS)
    tuner, _ = _tuner(tmp_path, small_workload, proposer, max_experiments=2)
    tuner.run()
    recs = tuner.run_log.records()
    assert recs[1].status == "duplicate" and not recs[1].kept
    assert not tuner.run_log.log_path(1).exists()


def test_repeat_of_a_tried_recipe_is_refused(tmp_path: Path, small_workload: Path) -> None:
    proposer = Scripted([_reply(1, max_num_seqs=64), _reply(1, max_num_seqs=64),
                         _reply(1, max_num_seqs=32)])
    tuner, events = _tuner(tmp_path, small_workload, proposer, max_experiments=3)
    tuner.run()
    recs = tuner.run_log.records()
    if recs[1].kept:  # from the new incumbent, max_num_seqs=64 is a no-op
        assert "no-op" in events.of(ProposalRefused)[0].reason
    else:
        assert "repeat of experiment 1" in events.of(ProposalRefused)[0].reason
    assert recs[2].recipe["config"]["max_num_seqs"] == 32


@pytest.mark.parametrize(("overrides", "expected_layers"), [
    ({"max_config_experiments": 2}, [1, 1, 1, 2]),
    ({"skip_config": True}, [1, 2, 2, 2]),
    ({"start_layer": 3}, [1, 3, 3, 3]),
    ({"skip_config": True, "skip_quant": True}, [1, 3, 3, 3]),
])
def test_escalation_honours_the_layer_options(tmp_path: Path, small_workload: Path,
                                              overrides: dict[str, Any],
                                              expected_layers: list[int]) -> None:
    tuner, _ = _tuner(tmp_path, small_workload, BuiltinStrategy(seed=3), max_experiments=4,
                      **overrides)
    tuner.run()
    assert [r.layer for r in tuner.run_log.records()] == expected_layers


def test_layers_converge_and_the_run_ends(tmp_path: Path, small_workload: Path) -> None:
    tuner, events = _tuner(tmp_path, small_workload, Scripted([]), max_experiments=50)
    why = tuner.run().reason
    assert why == "every layer converged"
    assert [e.layer for e in events.of(LayerEscalated)] == [1, 2, 3]
    assert len(tuner.run_log.records()) == 1


class FailingLauncher:
    """A launcher whose server never comes up, like a vLLM that rejects its flags."""

    def __init__(self) -> None:
        self.calls = 0

    def launch(self, recipe: Recipe, log_path: Path) -> LaunchFailure:
        self.calls += 1
        log_path.write_text("error: unrecognized arguments\n")
        return LaunchFailure(status="boot_failed", reason="invalid argument", boot_s=3.0)

    def stop(self, server: Any) -> None:
        raise AssertionError("nothing to stop")


def test_failures_become_rows_and_reach_the_strategy(tmp_path: Path,
                                                     small_workload: Path) -> None:
    launcher = FailingLauncher()
    proposer = Scripted([_reply(1, max_num_seqs=64), _reply(1, max_num_seqs=32)])
    tuner, _ = _tuner(tmp_path, small_workload, proposer,
                      engine=(launcher, None, None),
                      max_experiments=3)
    tuner.run()
    recs = tuner.run_log.records()
    assert [r.status for r in recs] == ["boot_failed"] * 3
    assert recs[1].log == "logs/exp_001.log"
    assert [r.status for r in proposer.contexts[1].history] == ["boot_failed"] * 2
    assert proposer.contexts[1].best_score is None


class InterruptingBench:
    def __init__(self, sim: SimulatedEngine) -> None:
        self.sim = sim
        self.stopped: list[str] = []

    def launch(self, recipe: Recipe, log_path: Path) -> Any:
        return self.sim.launch(recipe, log_path)

    def stop(self, server: Any) -> None:
        self.stopped.append(server.url)

    def bench(self, server: Any, workload: Any, concurrency: int, passes: int = 1,
              slo: Any = None) -> Any:
        raise KeyboardInterrupt


def test_interrupt_tears_down_the_server_and_leaves_the_run_resumable(
        tmp_path: Path, small_workload: Path) -> None:
    hw = gpu_spec("H100").hardware()
    space = KnobSpace(hw, profile(MODEL_8B), simulated=True)
    fake = InterruptingBench(SimulatedEngine(hw, gpu_spec("H100"), space.model, space))
    tuner, _ = _tuner(tmp_path, small_workload, Scripted([]),
                      engine=(fake, fake, fake.sim))
    with pytest.raises(KeyboardInterrupt):
        tuner.run()
    assert len(fake.stopped) == 1
    assert tuner.run_log.records() == []
    assert not (tuner.run_log.path / "completed.json").exists()


def test_time_budget_counts_boot_and_bench(tmp_path: Path, small_workload: Path) -> None:
    tuner, _ = _tuner(tmp_path, small_workload, BuiltinStrategy(), max_hours=0.01,
                      max_experiments=50)
    why = tuner.run().reason
    assert why.startswith("time budget")
    recs = tuner.run_log.records()
    assert sum((r.boot_s or 0) + (r.bench_s or 0) for r in recs) >= 36
    assert len(recs) < 50


class GivesUp:
    """A proposer whose "nothing left to try" answers cost tokens, like an LLM's."""

    name = "gives-up"

    def propose(self, ctx: AgentContext) -> ProposalReply:
        from aevyra_forge.core.values import LLMUsage

        return ProposalReply(proposal=None, usage=LLMUsage(input_tokens=1000,
                                                           output_tokens=50,
                                                           cost_usd=0.01))


def test_usage_of_a_nothing_left_reply_is_billed(tmp_path: Path,
                                                 small_workload: Path) -> None:
    import json

    tuner, _ = _tuner(tmp_path, small_workload, GivesUp(), max_experiments=5)
    tuner.run()
    done = json.loads((tuner.run_log.path / "completed.json").read_text())
    assert done["llm_cost_usd"] == pytest.approx(0.03)  # one call per layer


def test_decisions_carry_intervals_and_the_baseline_keeps_the_reference(
        tmp_path: Path, small_workload: Path) -> None:
    proposer = Scripted([_reply(1, max_num_seqs=64), _reply(3, enforce_eager=True)])
    tuner, _ = _tuner(tmp_path, small_workload, proposer, max_experiments=3,
                      skip_quant=True, max_config_experiments=1, repeats=3)
    tuner.run()
    base, seqs, eager = tuner.run_log.records()
    assert base.quality_reference is not None and base.accuracy == 1.0
    assert len(base.passes) == 3 and base.metrics in base.passes
    for rec in (seqs, eager):
        assert rec.interval is not None and rec.interval[0] <= rec.interval[1]
        assert ("%" in rec.decision or "latency guard" in rec.decision)
        assert rec.accuracy is not None
    assert not eager.kept and eager.interval is not None and eager.interval[1] < 0


def test_an_slo_breach_is_never_kept(tmp_path: Path, small_workload: Path) -> None:
    proposer = Scripted([_reply(1, max_num_seqs=1), _reply(1, max_num_seqs=2)])
    tuner, _ = _tuner(tmp_path, small_workload, proposer, max_experiments=3,
                      slo="ttft_p99<200ms")
    tuner.run()
    recs = tuner.run_log.records()
    assert recs[0].slo_violations == ()  # the baseline meets it
    for rec in recs[1:]:  # one or two sequences at a time queue far beyond 200 ms
        assert rec.slo_violations and not rec.kept and "SLO" in rec.decision


def test_the_incumbent_is_remeasured_for_drift(tmp_path: Path, small_workload: Path) -> None:
    proposer = Scripted([_reply(1, max_num_seqs=n) for n in (64, 32, 16, 8)])
    tuner, _ = _tuner(tmp_path, small_workload, proposer, max_experiments=5,
                      remeasure_every=2, patience=10)
    tuner.run()
    recs = tuner.run_log.records()
    drift = [r for r in recs if r.remeasure]
    assert drift and all(not r.kept and r.proposal is None for r in drift)
    assert all(r.decision.startswith("drift check") for r in drift)
    assert drift[0].recipe_id == recs[0].recipe_id or recs[1].kept


def test_an_accuracy_below_the_floor_is_reverted(tmp_path: Path, small_workload: Path) -> None:
    proposer = Scripted([_reply(2, quant_method="awq")])
    tuner, _ = _tuner(tmp_path, small_workload, proposer, max_experiments=2, start_layer=2,
                      gpu="A100-80GB")
    tuner.run()
    awq = tuner.run_log.records()[1]
    assert awq.accuracy is not None and awq.accuracy < 0.99
    assert not awq.kept and "below floor" in awq.decision


class FailsFirstBench:
    """The simulator, except that its first bench answered every request with HTTP 500
    and was still reported `ok` (what the bench adapter did before issue #10)."""

    def __init__(self, sim: SimulatedEngine) -> None:
        self.sim = sim
        self.calls = 0

    def bench(self, server: Any, workload: Any, concurrency: int, passes: int = 1,
              slo: Any = None) -> Any:
        self.calls += 1
        outcome = self.sim.bench(server, workload, concurrency, passes, slo)
        if self.calls > 1:
            return outcome
        failed = tuple(m.model_copy(update={
            "failed": m.completed + m.failed, "completed": 0, "output_tokens": 0,
            "failure_reasons": {"HTTP 500: EngineCore encountered an issue": m.completed}})
            for m in outcome.passes)
        return outcome.model_copy(update={"passes": failed, "metrics": failed[0]})


def test_a_baseline_whose_requests_failed_is_not_the_reference(tmp_path: Path,
                                                              small_workload: Path) -> None:
    hw = gpu_spec("H100").hardware()
    space = KnobSpace(hw, profile(MODEL_8B), simulated=True)
    sim = SimulatedEngine(hw, gpu_spec("H100"), space.model, space, seed=1)
    proposer = Scripted([_reply(1, max_num_seqs=64), _reply(1, max_num_seqs=32)])
    tuner, _ = _tuner(tmp_path, small_workload, proposer,
                      engine=(sim, FailsFirstBench(sim), sim), max_experiments=3)
    tuner.run()
    recs = tuner.run_log.records()
    assert not recs[0].kept and "vLLM's defaults cannot serve this workload" in \
        recs[0].decision
    assert recs[1].kept and recs[1].decision.startswith(
        "first healthy measurement becomes the reference (the baseline, vLLM's defaults, "
        "was not healthy: experiment 0 failed requests)")
    assert tuner.state.reference == recs[1].metrics
    assert tuner.state.best.id == recs[1].recipe_id
    assert proposer.contexts[0].best_score is None
