"""Tests for aevyra_forge.loop.state: the incumbent the next verdict is judged against,
folded from the records. A drift check (the incumbent re-measured on a fresh boot) gives
the incumbent its latest passes without taking the lead again."""

from __future__ import annotations

from collections.abc import Sequence

from aevyra_forge.core.recipe import Recipe
from aevyra_forge.core.settings import TuneSettings
from aevyra_forge.core.values import BenchMetrics, ExperimentRecord, Status
from aevyra_forge.loop.state import LoopState
from tests.conftest import MODEL_8B

BASELINE = Recipe(model=MODEL_8B)
CANDIDATE = Recipe(model=MODEL_8B, config={"max_num_seqs": 512})
WINNER = Recipe(model=MODEL_8B, config={"max_num_seqs": 256})


def _passes(*tps: float) -> tuple[BenchMetrics, ...]:
    return tuple(BenchMetrics(completed=10, duration_s=10.0, input_tokens=100,
                              output_tokens=int(t * 10), request_throughput=1.0,
                              output_throughput=t, total_token_throughput=t + 10)
                 for t in tps)


def _row(exp: int, recipe: Recipe, passes: Sequence[BenchMetrics], *, kept: bool = False,
         remeasure: bool = False, status: Status = "ok", score: float | None = 1.0
         ) -> ExperimentRecord:
    return ExperimentRecord(
        exp=exp, recipe=recipe.to_dict(), recipe_id=recipe.id, parent_id=recipe.parent_id,
        generation=recipe.generation, layer=1, status=status, passes=tuple(passes),
        metrics=passes[len(passes) // 2] if passes else None, score=score, kept=kept,
        remeasure=remeasure, started_at="t", finished_at="t")


FIRST = _passes(100.0, 101.0, 99.0)
AGAIN = _passes(95.0, 96.0, 94.0)
HISTORY = [_row(0, BASELINE, FIRST, kept=True),
           _row(1, CANDIDATE, _passes(99.0, 100.0, 98.0), score=0.99)]
DRIFT_CHECK = _row(2, BASELINE, AGAIN, remeasure=True, score=0.95)


def test_a_drift_check_gives_the_incumbent_its_re_measured_passes() -> None:
    before = LoopState(records=list(HISTORY), baseline=BASELINE)
    assert before.best_passes == FIRST and before.best_measured_exp == 0

    replayed = LoopState(records=[*HISTORY, DRIFT_CHECK], baseline=BASELINE)
    live = LoopState(records=list(HISTORY), baseline=BASELINE)
    live.add(DRIFT_CHECK)
    for state in (replayed, live):  # tune and tune resume see the same incumbent
        assert state.best.id == BASELINE.id
        assert state.best_passes == AGAIN
        assert state.best_measured_exp == 2
        # a drift check is not a keep: the lead, its score and the reference stay put
        assert state.best_score == 1.0
        assert state.reference == FIRST[1]


def test_a_failed_drift_check_keeps_the_last_measured_passes() -> None:
    crashed = _row(2, BASELINE, (), remeasure=True, status="crash", score=None)
    state = LoopState(records=[*HISTORY, crashed], baseline=BASELINE)
    assert state.best.id == BASELINE.id and state.best_passes == FIRST


def test_a_new_keep_replaces_the_incumbent_and_its_passes() -> None:
    won = _passes(120.0, 121.0, 119.0)
    records = [*HISTORY, DRIFT_CHECK, _row(3, WINNER, won, kept=True, score=1.2)]
    state = LoopState(records=records, baseline=BASELINE)
    assert state.best.id == WINNER.id
    assert state.best_passes == won and state.best_measured_exp == 3
    assert state.best_score == 1.2


def test_a_kept_record_whose_requests_failed_never_takes_the_lead() -> None:
    """A log written before failed requests were classified: exp 0 is `ok` and kept with
    every request answering HTTP 500. Replayed, it is neither the reference nor the best;
    the first healthy kept record is both. Without the failures it would lead."""
    failing = tuple(m.model_copy(update={"failed": 10, "completed": 0,
                                         "failure_reasons": {"HTTP 500: boom": 10}})
                    for m in _passes(100.0, 101.0, 99.0))
    healthy = _row(1, WINNER, _passes(90.0, 91.0, 89.0), kept=True)
    state = LoopState(records=[_row(0, BASELINE, failing, kept=True), healthy],
                      baseline=BASELINE)
    assert state.reference == healthy.metrics
    assert state.best == WINNER and state.best_record == healthy
    assert state.best_passes == healthy.passes
    alone = LoopState(records=[_row(0, BASELINE, failing, kept=True)], baseline=BASELINE)
    assert alone.reference is None and alone.best_passes == ()  # nothing to judge against
    control = LoopState(records=[_row(0, BASELINE, FIRST, kept=True), healthy],
                        baseline=BASELINE)
    assert control.reference == FIRST[1]


def test_refusal_rows_are_not_experiments_nor_tried_nor_patience() -> None:
    refusals = [_row(2, CANDIDATE, (), status="invalid", score=None),
                _row(3, WINNER, (), status="duplicate", score=None)]
    state = LoopState(records=[*HISTORY, *refusals], baseline=BASELINE)
    assert state.next_exp == 4 and state.experiments == 2
    assert state.experiments_since(0) == 1
    assert WINNER.id not in state.tried_ids and CANDIDATE.id in state.tried_ids
    settings = TuneSettings(model=MODEL_8B, workload="w.jsonl", patience=2)
    assert state.active_layer(settings, set()) == 1  # one measured non-keep, not three
    measured = _row(4, WINNER, _passes(90.0))
    state.add(measured)
    assert state.experiments == 3 and state.active_layer(settings, set()) == 2


def _on(rec: ExperimentRecord, worker: str, round_: int | None = None,
        took_s: float = 0.0) -> ExperimentRecord:
    return rec.model_copy(update={"worker": worker, "round": round_, "boot_s": took_s})


def test_each_worker_keeps_the_incumbents_passes_until_another_takes_the_lead() -> None:
    records = [_on(HISTORY[0], "gpu0"), _on(DRIFT_CHECK, "gpu1", 1)]
    state = LoopState(records=records, baseline=BASELINE)
    inc = state.incumbent()
    assert inc.passes_for("gpu0") == FIRST and inc.passes_for("gpu1") == AGAIN
    assert inc.passes_for("gpu2") == AGAIN  # never measured there: the latest passes
    assert inc.passes_for(None) == AGAIN and state.measured_on == {"gpu0": 0, "gpu1": 2}
    won = _passes(120.0, 121.0, 119.0)
    state.add(_on(_row(3, WINNER, won, kept=True, score=1.2), "gpu2", 2))
    assert state.incumbent().passes_for("gpu0") == won  # gpu0's passes were another's
    assert state.measured_on == {"gpu2": 3}


def test_a_round_takes_as_long_as_its_longest_trial() -> None:
    records = [_on(HISTORY[0], "gpu0", None, 100.0),
               _on(HISTORY[1], "gpu0", 1, 50.0), _on(DRIFT_CHECK, "gpu1", 1, 70.0),
               _on(_row(3, WINNER, FIRST, score=1.0), "gpu0", 2, 30.0)]
    state = LoopState(records=records, baseline=BASELINE)
    assert state.spent_s() == 100.0 + 70.0 + 30.0
    assert state.next_round == 3
    assert state.experiments_since(1) == 2  # by id, whatever order rows were recorded in
