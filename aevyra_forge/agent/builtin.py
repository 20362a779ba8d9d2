"""The offline strategy (`--llm builtin`): deterministic for a given seed, no network.

It first fixes a context that cannot boot (vLLM names the largest max_model_len that
fits), then plays the playbook's first moves for the active layer, then runs a
model-based local search. We do not use a global optimiser such as TPE: the loop's
contract is ONE mutation of the incumbent per experiment, and a sampler that proposes
whole points would change every knob at once and make each keep/revert unexplainable.
Instead each candidate is a single-knob move from the incumbent, ranked by an upper
confidence bound from a kernel-regression surrogate of past moves on that knob, and moves
at or beyond a value that crashed are treated as infeasible."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from aevyra_forge.agent.base import AgentContext, ProposalReply
from aevyra_forge.core.errors import KnobError
from aevyra_forge.core.values import ExperimentRecord, Proposal, Scalar
from aevyra_forge.space.knob_space import KNOBS, Knob
from aevyra_forge.space.playbook import first_moves

FAILED = frozenset({"crash", "boot_failed", "oom", "timeout", "hung", "request_error"})
PRIOR_SD = 0.10  # prior uncertainty of a move's effect, as log score ratio (~10 %)
SHRINK = 1.0  # pseudo-observations pulling an estimate towards "no effect"
BANDWIDTH = 1.0  # kernel width in grid steps
MIN_UCB = 0.005  # below this no move is worth an experiment: the layer is exhausted
SEARCH_EXCLUDED = frozenset({"max_model_len"})  # feasibility knob, set by the context fix


@dataclass(frozen=True)
class _Obs:
    value: Scalar
    gain: float | None  # log(score / parent score); None when the config failed


class BuiltinStrategy:
    name = "builtin"

    def __init__(self, seed: int = 0, exploration: float = 1.0) -> None:
        self.seed = seed
        self.exploration = exploration

    def propose(self, ctx: AgentContext) -> ProposalReply:
        for step in (self._fix_context, self._playbook_move, self._search_move):
            proposal = step(ctx)
            if proposal is not None:
                return ProposalReply(proposal=proposal)
        return ProposalReply(proposal=None)

    # -- 1. a context that does not fit ------------------------------------------------
    def _fix_context(self, ctx: AgentContext) -> Proposal | None:
        if ctx.layer != 1 or "max_model_len" not in {k.name for k in ctx.space.knobs(1)}:
            return None
        knob = KNOBS["max_model_len"]
        current = ctx.space.value(ctx.best, knob)
        for rec in reversed(ctx.history):
            if rec.suggested_max_model_len is None:
                continue
            limit = rec.suggested_max_model_len
            if not isinstance(current, int) or current <= limit:
                return None
            need = ctx.workload.input_tokens.max + ctx.workload.output_tokens.max
            target = min(limit, 2 ** math.ceil(math.log2(max(need * 1.1, 256))))
            if target < need:
                target = limit
            changes = {"max_model_len": target}
            if not self._fresh(ctx, changes):
                return None
            return Proposal(
                layer=1, changes=changes,
                rationale=(f"vLLM could not fit the default context: it estimates the "
                           f"largest max_model_len as {limit}; the workload needs about "
                           f"{need} tokens per request, so cap it at {target}"),
                expected_effect="the server boots; throughput unchanged")
        return None

    # -- 2. the playbook's first moves ---------------------------------------------------
    def _playbook_move(self, ctx: AgentContext) -> Proposal | None:
        used = [dict(r.proposal.changes) for r in ctx.history if r.proposal is not None]
        for move in first_moves(ctx.playbook):
            if move in used or any(k not in KNOBS or KNOBS[k].layer != ctx.layer
                                   for k in move):
                continue
            try:
                changes = ctx.space.validate(move, ctx.layer)
            except KnobError:
                continue
            if not self._fresh(ctx, changes) or self._infeasible(ctx, changes):
                continue
            text = ", ".join(f"{k}={v}" for k, v in changes.items())
            return Proposal(layer=ctx.layer, changes=changes,
                            rationale=f"playbook first move for this layer: {text}",
                            expected_effect="see the playbook's 'What to try first'")
        return None

    # -- 3. model-based local search -----------------------------------------------------
    def _search_move(self, ctx: AgentContext) -> Proposal | None:
        space = ctx.space
        observations = _observations(ctx.history)
        rng = np.random.default_rng([self.seed, len(ctx.history), ctx.attempt])
        best: tuple[float, str, Scalar, float, float] | None = None
        for knob in space.knobs(ctx.layer):
            if knob.name in SEARCH_EXCLUDED:
                continue
            current = space.value(ctx.best, knob)
            grid = space.grid(knob)
            obs = observations.get(knob.name, [])
            for value in grid:
                if value == current:
                    continue
                changes = {knob.name: value}
                if not self._fresh(ctx, changes) or _beyond_failure(
                        knob, grid, current, value, obs):
                    continue
                mean, sd = _predict(knob, grid, value, obs)
                ucb = mean + self.exploration * sd + 1e-9 * float(rng.random())
                if best is None or ucb > best[0]:
                    best = (ucb, knob.name, value, mean, sd)
        if best is None or best[0] < MIN_UCB:
            return None
        _, name, value, mean, sd = best
        old = space.value(ctx.best, KNOBS[name])
        return Proposal(
            layer=ctx.layer, changes={name: value},
            rationale=(f"model-based search: {name} {old} -> {value}; predicted "
                       f"{math.expm1(mean) * 100:+.1f}% (uncertainty "
                       f"±{math.expm1(sd) * 100:.0f}%) from {len(ctx.history)} experiments"),
            expected_effect=f"score {math.expm1(mean) * 100:+.1f}%")

    # -- helpers --------------------------------------------------------------------------
    @staticmethod
    def _fresh(ctx: AgentContext, changes: dict[str, Scalar]) -> bool:
        """Untried, not the incumbent, and a combination vLLM would accept."""
        candidate = ctx.space.apply(ctx.best, changes)
        if candidate.id == ctx.best.id or candidate.id in ctx.tried_ids:
            return False
        try:
            ctx.space.check_combination(candidate)
        except KnobError:
            return False
        return True

    @staticmethod
    def _infeasible(ctx: AgentContext, changes: dict[str, Scalar]) -> bool:
        observations = _observations(ctx.history)
        for name, value in changes.items():
            knob = KNOBS[name]
            grid = ctx.space.grid(knob)
            current = ctx.space.value(ctx.best, knob)
            if _beyond_failure(knob, grid, current, value, observations.get(name, [])):
                return True
        return False


def _observations(history: Sequence[ExperimentRecord]) -> dict[str, list[_Obs]]:
    """Per knob, the effect of every past move that changed it."""
    scores = {r.recipe_id: r.score for r in history if r.status == "ok" and r.score}
    out: dict[str, list[_Obs]] = {}
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
            out.setdefault(name, []).append(_Obs(value, gain))
    return out


def _position(knob: Knob, grid: list[Scalar], value: Scalar) -> float | None:
    """Where `value` sits on an ordered knob's grid, in grid steps (None if unordered)."""
    if knob.kind not in ("int", "float") or not isinstance(value, int | float):
        return None
    numeric = sorted(float(v) for v in grid if isinstance(v, int | float))
    if not numeric:
        return None
    return float(np.interp(float(value), numeric, range(len(numeric)),
                           left=-1.0, right=float(len(numeric))))


def _distance(knob: Knob, grid: list[Scalar], a: Scalar, b: Scalar) -> float:
    pa, pb = _position(knob, grid, a), _position(knob, grid, b)
    if pa is None or pb is None:
        return 0.0 if a == b else math.inf
    return abs(pa - pb)


def _predict(knob: Knob, grid: list[Scalar], value: Scalar, obs: list[_Obs]
             ) -> tuple[float, float]:
    weights = gains = 0.0
    for o in obs:
        if o.gain is None:
            continue
        w = math.exp(-((_distance(knob, grid, value, o.value) / BANDWIDTH) ** 2))
        weights += w
        gains += w * o.gain
    mean = gains / (weights + SHRINK)
    return mean, PRIOR_SD / math.sqrt(1.0 + weights)


def _beyond_failure(knob: Knob, grid: list[Scalar], current: Scalar, value: Scalar,
                    obs: list[_Obs]) -> bool:
    """True when `value` repeats a failed value, or lies past one in the same direction
    from the incumbent (more memory than already crashed, say)."""
    pc, pv = _position(knob, grid, current), _position(knob, grid, value)
    for o in obs:
        if o.gain is not None:
            continue
        if o.value == value:
            return True
        pf = _position(knob, grid, o.value)
        if pc is None or pv is None or pf is None:
            continue
        if (pf - pc) * (pv - pc) > 0 and abs(pv - pc) >= abs(pf - pc):
            return True
    return False


