"""Rounds: one ask for a round's proposals, every start logged before any runs, each
trial judged against the incumbent the round started from whatever order they finish
in, the best surviving one leading afterwards, and a killed round re-run on resume
without repeating its finished trials."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aevyra_forge.agent import AgentContext, ProposalReply
from aevyra_forge.core.settings import TuneSettings
from aevyra_forge.core.trial import Measurement, Trial
from aevyra_forge.core.values import Proposal
from aevyra_forge.core.workload import load_workload
from aevyra_forge.loop.tuner import Tuner
from aevyra_forge.space.gpu_catalogue import gpu_spec
from aevyra_forge.space.knob_space import KnobSpace
from aevyra_forge.space.model_profile import profile
from aevyra_forge.space.playbook import load_playbook
from aevyra_forge.store.run_store import RunStore
from tests.builders import metrics
from tests.conftest import MODEL_8B

WORKERS = ("gpu0", "gpu1", "gpu2")
BASE = 1000.0  # the baseline's throughput, tokens/s


class Engine:
    """The far side of a pool: each recipe's throughput by its long-prefill threshold, results
    handed back in `order` (indices into the round), and what it was asked to run."""

    workers = WORKERS

    def __init__(self, speeds: dict[int, float], order: Sequence[int] = (0, 1, 2),
                 gpu_speed: dict[str, float] | None = None) -> None:
        self.speeds, self.order = speeds, order
        self.gpu_speed = gpu_speed or {}  # two GPUs are two instruments
        self.rounds: list[list[Trial]] = []

    def measure(self, trial: Trial) -> Measurement:
        seqs = trial.recipe.get("config", {}).get("long_prefill_token_threshold")
        speed = self.speeds.get(seqs, BASE) if seqs else BASE
        speed *= self.gpu_speed.get(trial.worker or "", 1.0)
        passes = (metrics(speed), metrics(speed * 1.002), metrics(speed * 0.998))
        return Measurement(status="ok", passes=passes, metrics=passes[0], boot_s=60.0,
                           bench_s=30.0)

    def run(self, trial: Trial) -> Measurement:
        return self.measure(trial)

    def run_many(self, trials: Sequence[Trial]) -> Iterator[tuple[Trial, Measurement]]:
        self.rounds.append(list(trials))
        for i in self.order[:len(trials)]:
            yield trials[i], self.measure(trials[i])


class Batch:
    """An LLM-like proposer: every ask answered with `want` proposals in one reply."""

    name = "batch"

    def __init__(self, values: list[int]) -> None:
        self.values = iter(values)
        self.contexts: list[AgentContext] = []

    def propose(self, ctx: AgentContext) -> ProposalReply:
        self.contexts.append(ctx)
        got = [Proposal(rationale="t", layer=1, changes={"long_prefill_token_threshold": v})
               for v in itertools.islice(self.values, ctx.want)]
        return ProposalReply(got[0] if got else None, more=tuple(got[1:]))


def _tuner(tmp_path: Path, workload: Path, proposer: Any, engine: Engine,
           reopen: Path | None = None, **overrides: Any) -> Tuner:
    settings = TuneSettings(model=MODEL_8B, workload=str(workload), llm="builtin",
                            dry_run=True, run_dir=str(tmp_path / ".forge"), parallel=3,
                            **{"repeats": 3, "max_experiments": 4, "remeasure_every": 0,
                               "max_latency_regression": None, **overrides})
    hw = gpu_spec("H100").hardware()
    space = KnobSpace(hw, profile(MODEL_8B), simulated=True)
    store = RunStore(tmp_path / ".forge")
    run = store.open_run(reopen) if reopen else store.create_run({"model": MODEL_8B})
    return Tuner(settings, hw, load_workload(workload), space, load_playbook(), proposer,
                 engine, run, space.baseline(MODEL_8B))


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_a_round_is_judged_against_its_start_and_its_best_leads(
        tmp_path: Path, small_workload: Path, order: tuple[int, ...]) -> None:
    engine = Engine({64: 1200.0, 128: 1500.0, 32: 1300.0}, order)
    proposer = Batch([64, 128, 32])
    tuner = _tuner(tmp_path, small_workload, proposer, engine)
    outcome = tuner.run()
    recs = {r.exp: r for r in tuner.run_log.records()}
    assert len(proposer.contexts) == 1 and proposer.contexts[0].want == 3  # one ask
    assert [t.exp for t in engine.rounds[0]] == [1, 2, 3]
    assert [t.worker for t in engine.rounds[0]] == list(WORKERS)
    assert {recs[e].round for e in (1, 2, 3)} == {1}
    # every gain is measured against the baseline, not against a round-mate
    for exp, gain in ((1, 0.2), (2, 0.5), (3, 0.3)):
        low, high = recs[exp].interval or (0.0, 0.0)
        assert low < gain < high
    assert outcome.best_record is not None and outcome.best_record.exp == 2
    assert tuner.state.best.config["long_prefill_token_threshold"] == 128
    finished = [[1, 2, 3][i] for i in order]
    after_best = finished[finished.index(2) + 1:]
    assert recs[2].kept and not any(recs[e].kept for e in after_best)


def test_the_pending_proposals_are_shown_and_a_repeat_is_refused(
        tmp_path: Path, small_workload: Path) -> None:
    """A strategy that gives one proposal per ask is asked again with the round's chosen
    ones pending; a proposal repeating one of them is refused before it runs."""

    class OneAtATime:
        name = "one"

        def __init__(self) -> None:
            self.replies = iter([64, 64, 128, 32])
            self.contexts: list[AgentContext] = []

        def propose(self, ctx: AgentContext) -> ProposalReply:
            self.contexts.append(ctx)
            value = next(self.replies, None)
            return ProposalReply(None if value is None else Proposal(
                rationale="t", layer=1, changes={"long_prefill_token_threshold": value}))

    proposer = OneAtATime()
    engine = Engine({})
    _tuner(tmp_path, small_workload, proposer, engine).run()
    assert [c.want for c in proposer.contexts[:4]] == [3, 2, 2, 1]
    assert [dict(p.changes) for p in proposer.contexts[3].pending] == [
        {"long_prefill_token_threshold": 64}, {"long_prefill_token_threshold": 128}]
    assert "chosen for this round" in (proposer.contexts[2].feedback or "")
    knob = "long_prefill_token_threshold"
    assert [t.recipe["config"][knob] for t in engine.rounds[0]] == [64, 128, 32]


def test_a_killed_round_reruns_only_its_unfinished_trials(tmp_path: Path,
                                                          small_workload: Path) -> None:
    engine = Engine({64: 1200.0, 128: 1500.0, 32: 1300.0})
    first = _tuner(tmp_path, small_workload, Batch([64, 128, 32]), engine)
    first.execute(Trial(exp=0, recipe=first.state.baseline.to_dict(),
                        recipe_id=first.state.baseline.id, layer=1, worker="gpu0"))
    trials = first.rounds.ask(1) if first.rounds else []
    started = [first.begin(t) for t in trials]
    first.tell(started[1], engine.measure(started[1]), first.state.incumbent())
    path = first.run_log.path
    first.run_log.close()  # killed here: 1 and 3 in flight, 2 finished

    again = Engine({64: 1200.0, 128: 1500.0, 32: 1300.0})
    resumed = _tuner(tmp_path, small_workload, Batch([16]), again, reopen=path)
    resumed.run()
    assert [(t.exp, t.worker) for t in again.rounds[0]] == [(1, "gpu0"), (3, "gpu2")]
    assert sorted(r.exp for r in resumed.run_log.records()) == [0, 1, 2, 3]
    assert [t.exp for t in resumed.run_log.started()].count(2) == 1


def test_a_round_never_overshoots_the_layers_cap(tmp_path: Path,
                                                small_workload: Path) -> None:
    """--max-config-experiments 2 with three workers: the round asks for two trials, not
    three, and the layer is done (the third worker's trial would have spent a budget
    the cap keeps for the other layers)."""
    engine = Engine({64: 1200.0, 128: 1500.0, 32: 1300.0})
    proposer = Batch([64, 128, 32])
    outcome = _tuner(tmp_path, small_workload, proposer, engine, max_experiments=6,
                     max_config_experiments=2, skip_quant=True, skip_kernel=True).run()
    assert [c.want for c in proposer.contexts] == [2]
    assert [len(r) for r in engine.rounds] == [2]
    assert outcome.experiments == 3 and outcome.reason == "every layer converged"


@pytest.mark.parametrize("order", [(0, 1, 2), (1, 2, 0)])
def test_a_rounds_mates_of_a_gain_spend_no_patience_whatever_order_they_finish(
        tmp_path: Path, small_workload: Path, order: tuple[int, ...]) -> None:
    """--patience 2 with three workers: the round's winner (threshold 64) finishing
    first or last, its two round-mates were judged against the old incumbent and do not
    count as two tries from the new one, so the layer goes on for another round (a
    sequential run would try twice from the new incumbent too)."""
    engine = Engine({64: 1500.0, 128: 990.0, 32: 990.0}, order)
    proposer = Batch([64, 128, 32, 16, 8, 256])
    outcome = _tuner(tmp_path, small_workload, proposer, engine, max_experiments=7,
                     patience=2, skip_quant=True, skip_kernel=True).run()
    assert [len(r) for r in engine.rounds] == [3, 3]
    assert outcome.experiments == 7 and outcome.best_record is not None
    assert outcome.best_record.exp == 1


def test_each_gpu_judges_against_the_incumbent_as_it_measured_it(
        tmp_path: Path, small_workload: Path) -> None:
    """gpu1 reads 20 % low. Stale workers re-measure the incumbent one per round; a trial
    is then judged against the incumbent's passes from its own GPU: +10 % on either."""
    engine = Engine({64: 900.0, 128: 900.0, 32: 1100.0, 16: 1100.0},
                    gpu_speed={"gpu1": 0.8})
    tuner = _tuner(tmp_path, small_workload, Batch([64, 128, 32, 16]), engine,
                   max_experiments=7, remeasure_every=1)
    tuner.run()
    recs = {r.exp: r for r in tuner.run_log.records()}
    assert [(t.exp, t.worker, t.remeasure) for t in engine.rounds[1]] == [
        (4, "gpu2", True), (5, "gpu0", False), (6, "gpu1", False)]
    assert recs[1].remeasure and recs[1].worker == "gpu1"
    # the same +10 % on each GPU's own scale: the same interval (against passes from
    # another GPU, gpu0's 1100 would be judged against gpu1's 800)
    assert recs[5].interval is not None and recs[6].interval is not None
    assert recs[5].interval == pytest.approx(recs[6].interval, rel=1e-6)
    assert recs[5].interval[0] < 0.10 < recs[5].interval[1]


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(speeds=st.lists(st.sampled_from([800.0, 990.0, 1100.0, 1250.0, 1400.0]),
                       min_size=3, max_size=3),
       order=st.permutations([0, 1, 2]))
def test_whatever_the_speeds_and_order_the_rounds_best_survivor_leads(
        tmp_path_factory: pytest.TempPathFactory, small_workload: Path,
        speeds: list[float], order: list[int]) -> None:
    """Every kept trial of a round beat the round's kept ones recorded before it, and the
    incumbent afterwards is the best trial the round's starting incumbent would keep."""
    values = [64, 128, 32]
    engine = Engine(dict(zip(values, speeds, strict=True)), order)
    tuner = _tuner(tmp_path_factory.mktemp("run"), small_workload, Batch(values), engine)
    tuner.run()
    rows = [r for r in tuner.run_log.records() if r.round == 1]
    kept = [r for r in rows if r.kept]
    assert all((b.score or 0) > (a.score or 0) for a, b in itertools.pairwise(kept))
    beats = [r for r in rows if r.interval is not None
             and r.interval[0] > tuner.s.min_improvement_pct / 100]
    best = tuner.state.best_record
    assert best is not None
    if beats:
        assert best.score == max(r.score or 0 for r in beats)
    else:
        assert best.exp == 0
