"""The surrogate of past moves the builtin strategy searches with where it has no model:
effects read from the history, a prediction pulled towards "no effect" and surer near
measured values, and values at or beyond a crash treated as infeasible."""

from __future__ import annotations

import math

from aevyra_forge.agent.surrogate import Obs, beyond_failure, observations_of, predict
from aevyra_forge.core.values import ExperimentRecord, Proposal, Scalar, Status
from aevyra_forge.space.knob_space import KNOBS

SEQS = KNOBS["max_num_seqs"]
GRID: list[Scalar] = [8, 16, 32, 64, 128, 256, 512, 1024]


def _rec(exp: int, recipe_id: str, parent: str | None, status: Status, score: float | None,
         value: int | None = None) -> ExperimentRecord:
    return ExperimentRecord(
        exp=exp, recipe={}, recipe_id=recipe_id, parent_id=parent, generation=0, layer=1,
        status=status, score=score, started_at="t", finished_at="t",
        proposal=Proposal(rationale="t", layer=1, changes={"max_num_seqs": value})
        if value is not None else None)


def test_effects_are_log_ratios_to_the_parent_and_a_crash_has_none() -> None:
    history = [_rec(0, "base", None, "ok", 1.0), _rec(1, "a", "base", "ok", 1.2, 512),
               _rec(2, "b", "base", "oom", None, 1024)]
    obs = observations_of(history)["max_num_seqs"]
    assert obs[0].value == 512 and math.isclose(obs[0].gain or 0.0, math.log(1.2))
    assert obs[1] == Obs(1024, None)


def test_a_prediction_shrinks_to_no_effect_and_is_surer_near_a_measurement() -> None:
    obs = [Obs(512, math.log(1.2))]
    near_mean, near_sd = predict(SEQS, GRID, 512, obs)
    far_mean, far_sd = predict(SEQS, GRID, 8, obs)
    assert 0 < near_mean < math.log(1.2) and abs(far_mean) < near_mean
    assert near_sd < far_sd


def test_values_at_or_past_a_crash_in_its_direction_are_infeasible() -> None:
    crashed = [Obs(512, None)]
    assert beyond_failure(SEQS, GRID, 256, 512, crashed)
    assert beyond_failure(SEQS, GRID, 256, 1024, crashed)
    assert not beyond_failure(SEQS, GRID, 256, 128, crashed)
