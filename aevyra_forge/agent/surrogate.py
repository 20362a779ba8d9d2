"""The builtin strategy's surrogate of past moves, for hardware it has no model of: per
knob, the effect of every measured move, a kernel regression over grid steps with a prior
of "no effect", and the values at or beyond one that crashed."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from aevyra_forge.core.values import ExperimentRecord, Scalar
from aevyra_forge.space.knob_space import Knob

FAILED = frozenset({"crash", "boot_failed", "oom", "timeout", "hung", "request_error",
                    "prepare_failed"})
PRIOR_SD = 0.10  # prior uncertainty of a move's effect, as log score ratio (~10 %)
SHRINK = 1.0  # pseudo-observations pulling an estimate towards "no effect"
BANDWIDTH = 1.0  # kernel width in grid steps


@dataclass(frozen=True)
class Obs:
    value: Scalar
    gain: float | None  # log(score / parent score); None when the config failed


def observations_of(history: Sequence[ExperimentRecord]) -> dict[str, list[Obs]]:
    """Per knob, the effect of every past move that changed it."""
    scores = {r.recipe_id: r.score for r in history if r.status == "ok" and r.score}
    out: dict[str, list[Obs]] = {}
    for rec in history:
        if rec.proposal is None:
            continue
        gain: float | None
        if rec.status in FAILED:
            gain = None
        elif rec.status == "ok" and rec.score and scores.get(rec.parent_id or ""):
            gain = math.log(rec.score / scores[rec.parent_id or ""])
        else:
            continue
        for name, value in rec.proposal.changes.items():
            out.setdefault(name, []).append(Obs(value, gain))
    return out


def position(knob: Knob, grid: list[Scalar], value: Scalar) -> float | None:
    """Where `value` sits on an ordered knob's grid, in grid steps (None if unordered)."""
    if knob.kind not in ("int", "float") or not isinstance(value, int | float):
        return None
    numeric = sorted(float(v) for v in grid if isinstance(v, int | float))
    if not numeric:
        return None
    return float(np.interp(float(value), numeric, range(len(numeric)),
                           left=-1.0, right=float(len(numeric))))


def distance(knob: Knob, grid: list[Scalar], a: Scalar, b: Scalar) -> float:
    pa, pb = position(knob, grid, a), position(knob, grid, b)
    if pa is None or pb is None:
        return 0.0 if a == b else math.inf
    return abs(pa - pb)


def predict(knob: Knob, grid: list[Scalar], value: Scalar, obs: list[Obs],
             prior_sd: float = PRIOR_SD) -> tuple[float, float]:
    weights = gains = 0.0
    for o in obs:
        if o.gain is None:
            continue
        w = math.exp(-((distance(knob, grid, value, o.value) / BANDWIDTH) ** 2))
        weights += w
        gains += w * o.gain
    mean = gains / (weights + SHRINK)
    return mean, prior_sd / math.sqrt(1.0 + weights)


def beyond_failure(knob: Knob, grid: list[Scalar], current: Scalar, value: Scalar,
                    obs: list[Obs]) -> bool:
    """True when `value` repeats a failed value, or lies past one in the same direction
    from the incumbent (more memory than already crashed, say)."""
    pc, pv = position(knob, grid, current), position(knob, grid, value)
    for o in obs:
        if o.gain is not None:
            continue
        if o.value == value:
            return True
        pf = position(knob, grid, o.value)
        if pc is None or pv is None or pf is None:
            continue
        if (pf - pc) * (pv - pc) > 0 and abs(pv - pc) >= abs(pf - pc):
            return True
    return False
