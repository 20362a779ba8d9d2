"""The offline strategy (`--llm builtin`): deterministic for a given seed, no network.

It first fixes a context that cannot boot (vLLM names the largest max_model_len that
fits) and repairs a config that does not boot from vLLM's hint (agent/repair.py). Once a
config served, a model of vLLM (agent/engine_model.py: the simulator calibrated on the
run's reference) ranks every single-knob move of the active layer, and the playbook's
combined ones, by predicted gain plus an uncertainty learned from its misses; a move is
proposed only when that clears the gain the keep rule can confirm; a move it cannot model
(its "no change" is ignorance) is tried once next. Without a model (the CPU build, an
unknown GPU) it plays the playbook's first moves, then a kernel-regression search
(surrogate.py). Every path skips moves the baseline's diagnosis (decide/diagnosis.py)
proves nil, saying why in the next proposal's rationale, treats synonyms on this hardware
(fp8 and fp8_e4m3 KV caches on NVIDIA, a dtype and the `auto` that resolves to it) as one
value, and in layer 1 tries only knobs that act on the binding resource, so a layer whose
levers are spent escalates early.

We do not use a global optimiser such as TPE: the loop's contract is ONE mutation of the
incumbent per experiment, and a sampler that proposes whole points would change every
knob at once and make each keep/revert unexplainable."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from aevyra_forge.agent.base import AgentContext, ProposalReply
from aevyra_forge.agent.engine_model import EngineModel
from aevyra_forge.agent.repair import fit_context, repair_move
from aevyra_forge.agent.surrogate import PRIOR_SD, beyond_failure, observations_of, predict
from aevyra_forge.core.errors import KnobError, UsageError
from aevyra_forge.core.values import LAYERS, Diagnosis, Proposal, Scalar
from aevyra_forge.decide.diagnosis import acts_on, synonyms
from aevyra_forge.decide.stats import pooled_noise, relative_interval
from aevyra_forge.space.knob_space import KNOBS
from aevyra_forge.space.playbook import first_moves

MIN_UCB = 0.005  # below this no move is worth an experiment: the layer is exhausted
SEARCH_EXCLUDED = frozenset({"max_model_len"})  # feasibility knob, set by the context fix
OFF_LEVER_SD = 0.03  # prior uncertainty of a knob that does not act on the binding resource
MIN_MODEL_GAIN = 0.01  # log gain below which no move is worth a boot (--min-improvement-pct)
# a layer escalates while the predicted gain (log) of its best move is under SMALL_GAIN and
# a later layer's is LATER_RATIO times larger
SMALL_GAIN, LATER_RATIO = 0.05, 1.5
PAIRED = 4  # the best single moves whose pairs are also ranked


class BuiltinStrategy:
    name = "builtin"

    def __init__(self, seed: int = 0, exploration: float = 1.0, use_model: bool = True
                 ) -> None:
        self.seed = seed
        self.exploration = exploration
        self.use_model = use_model
        self._models: dict[tuple[object, ...], EngineModel | None] = {}

    def propose(self, ctx: AgentContext) -> ProposalReply:
        skipped: dict[str, str] = {}  # moves the diagnosis proves nil -> why
        model = self._model(ctx)
        proposal = fit_context(ctx) or repair_move(ctx)
        reason = self._hand_over(ctx, model) if proposal is None and model else None
        if proposal is None and reason is None:
            # the model's best move first, then each move it cannot model (once); once
            # nothing is worth a boot here, the playbook and the search explore the rest
            proposal = ((self._model_move(ctx, model, skipped) if model else None)
                        or (self._unmodelled_move(ctx, model) if model else None)
                        or self._playbook_move(ctx, skipped, model)
                        or self._search_move(ctx, skipped, model))
            reason = None if proposal else _converged(ctx, model is not None, skipped)
        said = " ".join(r.proposal.rationale for r in ctx.history if r.proposal is not None)
        skipped = {move: why for move, why in skipped.items() if f"{move} (" not in said}
        if proposal is not None and skipped:  # each skip is recorded once, where it happens
            note = "; ".join(f"{move} ({why})" for move, why in skipped.items())
            proposal = proposal.model_copy(update={
                "rationale": f"{proposal.rationale}. Skipped as nil: {note}"})
        return ProposalReply(proposal=proposal, reason=None if proposal else reason)

    # -- 2. a model of vLLM ranks every move --------------------------------------------
    def _model(self, ctx: AgentContext) -> EngineModel | None:
        """The simulator calibrated on this run's reference, once one config served and
        the hardware is one it knows; None otherwise (the playbook and search follow)."""
        diagnosis = _diagnosis(ctx)
        reference = next((r for r in ctx.history if r.status == "ok" and r.kept
                          and r.metrics is not None), None)
        if not self.use_model or diagnosis is None or reference is None \
                or reference.metrics is None:
            return None
        concurrency = ctx.concurrency or int(diagnosis.evidence.get("concurrency", 8))
        key = (ctx.hardware, ctx.space.model.name, ctx.workload, concurrency,
               reference.recipe_id)
        if key not in self._models:
            try:
                self._models[key] = EngineModel(ctx, concurrency,
                                                reference.metrics.output_throughput)
            except UsageError:
                self._models[key] = None
        found = self._models[key]
        if found is not None:
            found.ctx = ctx  # the history grows; the calibration stays
        return found

    def _model_move(self, ctx: AgentContext, model: EngineModel, skipped: dict[str, str]
                    ) -> Proposal | None:
        """The move with the highest predicted gain plus uncertainty (the model's past
        misses), when that clears what the keep rule can confirm (`_detectable`: a smaller
        gain costs a boot and is reverted as noise)."""
        best = self._ranked(ctx, model, skipped)
        if best is None or best[0] < _detectable(ctx):
            return None
        _, changes, gain, sd = best
        text = ", ".join(f"{k}={v}" for k, v in changes.items())
        return Proposal(
            layer=ctx.layer, changes=changes,
            rationale=(f"model of vLLM (the simulator calibrated on this run's reference): "
                       f"{text} predicted {math.expm1(gain) * 100:+.1f}% (uncertainty "
                       f"±{math.expm1(sd) * 100:.1f}% from its misses so far)"),
            expected_effect=f"score {math.expm1(gain) * 100:+.1f}%")

    def _hand_over(self, ctx: AgentContext, model: EngineModel) -> str | None:
        """Why this layer escalates now (None: it does not): its best move is predicted
        under SMALL_GAIN and a later layer's LATER_RATIO times more, and no move here is
        one the model cannot predict. Layers are not revisited, so the small gains left
        here are the cheaper loss, and such gains are mostly reverted as noise anyway."""
        best = self._ranked(ctx, model, {})
        here = max(best[2], MIN_MODEL_GAIN) if best is not None else MIN_MODEL_GAIN
        later = [(layer, self._ranked(replace(ctx, layer=layer), model, {}))
                 for layer in LAYERS if layer > ctx.layer]
        top = max(((b[2], layer, b[1]) for layer, b in later if b is not None),
                  default=None, key=lambda t: t[0])
        if top is None or here >= SMALL_GAIN or top[0] <= LATER_RATIO * here \
                or self._unmodelled_move(ctx, model) is not None:
            return None
        move = ", ".join(f"{k}={v}" for k, v in top[2].items())
        return (f"handed over early: the best move left in layer {ctx.layer} is predicted "
                f"{math.expm1(here) * 100:+.1f}%, layer {top[1]}'s ({move}) "
                f"{math.expm1(top[0]) * 100:+.1f}%; layers are not revisited")

    def _unmodelled_move(self, ctx: AgentContext, model: EngineModel) -> Proposal | None:
        """A move the model cannot predict (its "no change" is ignorance: a kernel
        plug-in, a knob the simulator does not read), at the prior uncertainty of the
        search, so each is tried once before the layer is declared converged."""
        observations = observations_of(ctx.history)
        diagnosis = _diagnosis(ctx)
        best: tuple[float, dict[str, Scalar]] | None = None
        for changes in self._candidates(ctx):
            if len(changes) != 1 or _nil(diagnosis, changes) or _off_lever(ctx, changes) \
                    or not self._fresh(ctx, changes) or self._infeasible(ctx, changes):
                continue
            [(name, value)] = changes.items()
            if model.models(ctx.best, changes):
                continue
            knob = KNOBS[name]
            mean, sd = predict(knob, ctx.space.grid(knob), value,
                               observations.get(name, []), PRIOR_SD)
            if best is None or mean + sd > best[0]:
                best = (mean + sd, changes)
        if best is None or best[0] < MIN_UCB:
            return None
        text = ", ".join(f"{k}={v}" for k, v in best[1].items())
        return Proposal(
            layer=ctx.layer, changes=best[1],
            rationale=(f"the model of vLLM cannot predict {text} (the simulator does not "
                       f"model it), so it is tried once: prior uncertainty "
                       f"±{math.expm1(PRIOR_SD) * 100:.0f}%"),
            expected_effect="unknown: measured, not predicted")

    def _ranked(self, ctx: AgentContext, model: EngineModel, skipped: dict[str, str]
                ) -> tuple[float, dict[str, Scalar], float, float] | None:
        """The layer's best move by predicted log gain plus uncertainty: (that bound, the
        move, the gain, its sd). Single-knob moves and the playbook's combined ones, less
        what the diagnosis proves nil, what crashed, and what the model expects to lose
        accuracy."""
        base = model.throughput(ctx.best)
        if base <= 0:
            return None
        observations = observations_of(ctx.history)
        diagnosis = _diagnosis(ctx)
        best: tuple[float, dict[str, Scalar], float, float] | None = None
        gains: list[tuple[float, dict[str, Scalar]]] = []
        for changes in self._candidates(ctx):
            text = ", ".join(f"{k}={v}" for k, v in changes.items())
            why = _nil(diagnosis, changes) or _off_lever(ctx, changes)
            if why is not None:
                skipped[text] = why
                continue
            if not self._fresh(ctx, changes) or any(
                    beyond_failure(KNOBS[k], ctx.space.grid(KNOBS[k]),
                                   ctx.space.value(ctx.best, KNOBS[k]), v,
                                   observations.get(k, [])) for k, v in changes.items()):
                continue
            best = self._score(ctx, model, changes, base, best, gains)
        # then the best single moves of two knobs together: small gains, each below what
        # one experiment can confirm, may add up to one that can be
        top = sorted((g for g in gains if g[0] > 0 and len(g[1]) == 1),
                     key=lambda g: -g[0])[:PAIRED]
        for i, (_, one) in enumerate(top):
            for _, other in top[i + 1:]:
                pair = {**one, **other}
                if len(pair) == 2 and self._fresh(ctx, pair):
                    best = self._score(ctx, model, pair, base, best, [])
        return best

    def _score(self, ctx: AgentContext, model: EngineModel, changes: dict[str, Scalar],
               base: float, best: tuple[float, dict[str, Scalar], float, float] | None,
               gains: list[tuple[float, dict[str, Scalar]]]
               ) -> tuple[float, dict[str, Scalar], float, float] | None:
        """The better of `best` and `changes` by predicted gain plus uncertainty."""
        recipe = ctx.space.apply(ctx.best, changes)
        value = model.throughput(recipe)
        if value <= 0 or model.agreement(recipe) < ctx.accuracy_floor:
            return best
        gain = math.log(value / base)
        gains.append((gain, changes))
        # the model misses in size, not direction: a predicted loss gets the floor's sd
        sd = model.uncertainty(max(gain, 0.0))
        if best is None or gain + self.exploration * sd > best[0]:
            return gain + self.exploration * sd, changes, gain, sd
        return best

    def _candidates(self, ctx: AgentContext) -> list[dict[str, Scalar]]:
        """Every single-knob move of the layer, then the playbook's combined moves."""
        out: list[dict[str, Scalar]] = []
        for knob in ctx.space.knobs(ctx.layer):
            if knob.name in SEARCH_EXCLUDED:
                continue
            current = ctx.space.value(ctx.best, knob)
            out += [{knob.name: v} for v in ctx.space.grid(knob) if v != current]
        for move in first_moves(ctx.playbook):
            if len(move) > 1 and all(k in KNOBS and KNOBS[k].layer == ctx.layer
                                     for k in move):
                try:
                    out.append(ctx.space.validate(move, ctx.layer))
                except KnobError:
                    continue
        return out

    # -- 3. the playbook's first moves ---------------------------------------------------
    def _playbook_move(self, ctx: AgentContext, skipped: dict[str, str],
                       model: EngineModel | None = None) -> Proposal | None:
        used = [dict(r.proposal.changes) for r in ctx.history if r.proposal is not None]
        used += [dict(p.changes) for p in ctx.pending]  # chosen for this round already
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
            why = _nil(_diagnosis(ctx), changes) or _off_lever(ctx, changes)
            if why is None and _inaccurate(ctx, model, changes):
                why = "the model expects its accuracy below --accuracy-floor"
            if why is not None:
                skipped[text] = why
                continue
            return Proposal(layer=ctx.layer, changes=changes,
                            rationale=f"playbook first move for this layer: {text}",
                            expected_effect="see the playbook's 'What to try first'")
        return None

    # -- 4. kernel-regression local search (no model of this hardware) -------------------
    def _search_move(self, ctx: AgentContext, skipped: dict[str, str],
                     model: EngineModel | None = None) -> Proposal | None:
        space = ctx.space
        observations = observations_of(ctx.history)
        diagnosis = _diagnosis(ctx)
        rng = np.random.default_rng([self.seed, len(ctx.history), ctx.attempt])
        best: tuple[float, str, Scalar, float, float] | None = None
        for knob in space.knobs(ctx.layer):
            if knob.name in SEARCH_EXCLUDED:
                continue
            # layer 1 is where the diagnosis speaks: only knobs that act on what binds
            off_lever = diagnosis is not None and not acts_on(diagnosis.binding, knob.name)
            if off_lever and _restrict(ctx):
                continue
            current = space.value(ctx.best, knob)
            grid = space.grid(knob)
            obs = observations.get(knob.name, [])
            for value in grid:
                if value == current:
                    continue
                changes = {knob.name: value}
                if not self._fresh(ctx, changes) or beyond_failure(
                        knob, grid, current, value, obs):
                    continue
                if _nil(diagnosis, changes) is not None or _inaccurate(ctx, model, changes):
                    continue
                mean, sd = predict(knob, grid, value, obs,
                                    OFF_LEVER_SD if off_lever else PRIOR_SD)
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
        """Untried, not the incumbent, not chosen for this round already, and a
        combination vLLM would accept; a value and its synonyms here count as one."""
        candidate = ctx.space.apply(ctx.best, changes)
        seen = ctx.tried_ids | ctx.pending_ids | {ctx.best.id}
        if candidate.id in seen:
            return False
        for name, value in changes.items():
            for other in synonyms(ctx.space, name, value):
                if ctx.space.apply(ctx.best, {**changes, name: other}).id in seen:
                    return False
        try:
            ctx.space.check_combination(candidate)
        except KnobError:
            return False
        return True

    @staticmethod
    def _infeasible(ctx: AgentContext, changes: dict[str, Scalar]) -> bool:
        observations = observations_of(ctx.history)
        for name, value in changes.items():
            knob = KNOBS[name]
            grid = ctx.space.grid(knob)
            current = ctx.space.value(ctx.best, knob)
            if beyond_failure(knob, grid, current, value, observations.get(name, [])):
                return True
        return False


def _diagnosis(ctx: AgentContext) -> Diagnosis | None:
    """The latest diagnosis of a config that served (the baseline's, normally)."""
    return next((r.diagnosis for r in reversed(ctx.history)
                 if r.diagnosis is not None and r.diagnosis.binding != "boot"), None)


def _nil(diagnosis: Diagnosis | None, changes: dict[str, Scalar]) -> str | None:
    """Why a move is (partly) nil: a knob it sets is inert. The rest of a combined move,
    when it matters, is a move of its own."""
    if diagnosis is None:
        return None
    reasons = [r for k, v in changes.items() if (r := diagnosis.inert_reason(k, v))]
    return "; ".join(dict.fromkeys(reasons)) or None


def _converged(ctx: AgentContext, modelled: bool, skipped: dict[str, str]) -> str:
    """Why a layer has nothing left, for the progress line."""
    said = ("the model predicts no move above what the keep rule can confirm "
            f"(+{math.expm1(_detectable(ctx)) * 100:.1f}%), and " if modelled else "")
    nil = f"; {len(skipped)} moves skipped as nil or off what binds" if skipped else ""
    return (f"layer {ctx.layer} converged: {said}the playbook's and the search's moves "
            f"are tried or ruled out{nil}")


def _inaccurate(ctx: AgentContext, model: EngineModel | None,
                changes: dict[str, Scalar]) -> bool:
    """Whether the model expects the move's accuracy below the run's floor."""
    return model is not None and model.agreement(
        ctx.space.apply(ctx.best, changes)) < ctx.accuracy_floor


def _detectable(ctx: AgentContext) -> float:
    """The smallest log gain the keep rule confirms about half the time: the threshold
    plus half the width of the interval a candidate measured like the incumbent would
    get (its passes, the assumed between-boot noise)."""
    rec = next((r for r in reversed(ctx.history) if r.recipe_id == ctx.best.id
                and r.status == "ok" and len(r.passes) >= 2), None)
    if rec is None:
        return MIN_MODEL_GAIN
    values = [m.output_throughput for m in rec.passes]
    if not all(v > 0 for v in values):
        return MIN_MODEL_GAIN
    noise = pooled_noise([m.output_throughput for m in r.passes] for r in ctx.history
                         if r.status == "ok" and len(r.passes) >= 2)
    iv = relative_interval(values, values, noise=noise if noise.df else None)
    return MIN_MODEL_GAIN + math.log1p(iv.high) / 2


def _restrict(ctx: AgentContext) -> bool:
    """Whether layer-1 moves off the binding resource are skipped: for throughput, which
    the diagnosis speaks about (a latency objective may gain where throughput cannot)."""
    return ctx.layer == 1 and ctx.objective == "throughput"


def _off_lever(ctx: AgentContext, changes: dict[str, Scalar]) -> str | None:
    """Why a layer-1 move is skipped when none of its knobs acts on the binding resource."""
    diagnosis = _diagnosis(ctx)
    if diagnosis is None or not _restrict(ctx) or any(
            acts_on(diagnosis.binding, k) for k in changes):
        return None
    return f"does not act on what binds: {diagnosis.binding.replace('_', ' ')}"
