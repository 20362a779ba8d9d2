"""The offline strategy (`--llm builtin`): deterministic for a given seed, no network.

It first fixes a context that cannot boot (vLLM names the largest max_model_len that
fits) and repairs a config that does not boot from vLLM's hint (agent/repair.py). Once a
config served, a model of vLLM (agent/engine_model.py: the simulator calibrated on the
run's reference) ranks every single-knob move of the open layers (the active one and
those before it: escalating closes no layer), the playbook's combined moves, and pairs of
the best single ones (small gains, or one measured up but not confirmed, that add up to
one the keep rule can confirm) by predicted gain plus an uncertainty learned from its
misses; a move is proposed only when that clears the gain the keep rule can confirm,
carrying the refinements the model predicts to add to it that are too small for an
experiment of their own to confirm (agent/carry.py), and a layer hands over as soon as a
later one holds a move predicted to gain more, or one that adds to the open layers' best
move what an experiment of its own would confirm (it gets a boot soon anyway; with its
layer open the two are ranked as a pair, one boot instead of two). A token budget below
the incumbent's max_num_seqs brings max_num_seqs down with it (agent/moves.completed:
vLLM requires both to move together; what it brings is not judged nil). A move it
cannot model (its "no change" is ignorance) is tried once next; the playbook's guesses
the model ranks below what can be confirmed get no boot, and the search explores the
budget left with moves the model cannot rule out (never another layer-2 checkpoint of
the incumbent's quantization method: the same kernels, agent/moves.same_kernels).
Layer 2's candidates are moves like
any other: each carries its method, and the model simulates it from the quant-facts
table; the pairs it ranks take each knob's best value, so the many candidates of
`quant_candidate` leave room for other knobs. Without a model (the CPU build, an
unknown GPU) it plays the playbook's first moves, then a kernel-regression search
(surrogate.py). Every path skips moves the baseline's diagnosis (decide/diagnosis.py)
proves nil, saying why in the next proposal's rationale, treats synonyms on this hardware
(agent/moves.py: fp8 and fp8_e4m3 KV caches on NVIDIA, a dtype and the `auto` that
resolves to it, an explicit default) as one value, and while the incumbent is the config
diagnosed tries only layer-1 knobs that act on the binding resource.

We do not use a global optimiser such as TPE: the loop's contract is ONE mutation of the
incumbent per experiment, and a sampler that proposes whole points would change every
knob at once and make each keep/revert unexplainable."""

from __future__ import annotations

import math

import numpy as np

from aevyra_forge.agent.base import AgentContext, ProposalReply
from aevyra_forge.agent.carry import adds, carry
from aevyra_forge.agent.engine_model import EngineModel
from aevyra_forge.agent.moves import (
    MIN_MODEL_GAIN,
    SEARCH_EXCLUDED,
    Move,
    candidates,
    completed,
    confirmable,
    converged,
    detectable,
    diagnosis_of,
    fresh,
    infeasible,
    layer_of,
    off_lever,
    open_layers,
    own,
    pairable,
    required,
    restricted,
    same_kernels,
)
from aevyra_forge.agent.repair import fit_context, repair_move
from aevyra_forge.agent.surrogate import (
    PRIOR_SD,
    beyond_failure,
    observations_of,
    predict,
)
from aevyra_forge.core.errors import KnobError, UsageError
from aevyra_forge.core.values import LAYERS, Layer, Proposal, Scalar
from aevyra_forge.decide.diagnosis import acts_on, nil
from aevyra_forge.space.knob_space import KNOBS
from aevyra_forge.space.playbook import first_moves

MIN_UCB = 0.005  # below this no move is worth an experiment: the layer is exhausted
OFF_LEVER_SD = 0.03  # prior uncertainty of a knob that does not act on the binding resource
PAIRED = 4  # the best single moves (each of its own knob) whose pairs are also ranked
Ranked = tuple[float, Move, float, float]  # (gain + exploration x sd, move, gain, sd)


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
            reason = None if proposal else converged(ctx, model is not None, skipped)
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
        diagnosis = diagnosis_of(ctx)
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
        misses) in the open layers, when that clears what the keep rule can confirm
        (`detectable`: a smaller gain costs a boot and is reverted as noise)."""
        best = self._ranked(ctx, model, skipped, open_layers(ctx))
        if best is None or best[0] < detectable(ctx):
            return None
        _, changes, gain, sd = best
        text = ", ".join(f"{k}={v}" for k, v in changes.items())
        text += required(ctx, changes)
        carried = carry(ctx, model, changes)
        total = gain + sum(g for _, g in carried.added)
        return Proposal(
            layer=layer_of(carried.changes), changes=carried.changes,
            rationale=(f"model of vLLM (the simulator calibrated on this run's reference): "
                       f"{text} predicted {math.expm1(gain) * 100:+.1f}% (uncertainty "
                       f"±{math.expm1(sd) * 100:.1f}% from its misses so far)"
                       f"{carried.note()}"),
            expected_effect=f"score {math.expm1(total) * 100:+.1f}%")

    def _hand_over(self, ctx: AgentContext, model: EngineModel) -> str | None:
        """Why this layer escalates now (None: it does not): a later layer holds a move
        predicted to gain more than the best one left in the open layers, or one that
        adds to that best move what an experiment of its own would confirm (`confirmable`:
        it gets an experiment soon anyway, and once its layer is open the two are ranked
        as a pair, one boot instead of two). Escalating closes no layer (their moves stay
        open), so the larger gain goes first."""
        best = self._ranked(ctx, model, {}, open_layers(ctx))
        here = max(best[2], MIN_MODEL_GAIN) if best is not None else MIN_MODEL_GAIN
        later = [(layer, self._ranked(ctx, model, {}, (layer,)))
                 for layer in LAYERS if layer > ctx.layer]
        top = max(((b[2], layer, b[1]) for layer, b in later if b is not None),
                  default=None, key=lambda t: t[0])
        if top is None:
            return None
        move = ", ".join(f"{k}={v}" for k, v in top[2].items())
        if top[0] > here:
            return (f"handed over: the best move left up to layer {ctx.layer} is predicted "
                    f"{math.expm1(here) * 100:+.1f}%, layer {top[1]}'s ({move}) "
                    f"{math.expm1(top[0]) * 100:+.1f}%; earlier layers stay open")
        if best is None:
            return None
        added = adds(ctx, model, best[1], top[2])
        if added is None or added < confirmable(ctx) or top[0] < confirmable(ctx):
            return None
        mine = ", ".join(f"{k}={v}" for k, v in best[1].items())
        return (f"handed over: layer {top[1]}'s {move} (predicted "
                f"{math.expm1(top[0]) * 100:+.1f}%) adds {math.expm1(added) * 100:+.1f}% to "
                f"the best move left up to layer {ctx.layer} ({mine}), more than an "
                f"experiment of its own confirms; with its layer open the two are ranked "
                f"together; earlier layers stay open")

    def _unmodelled_move(self, ctx: AgentContext, model: EngineModel) -> Proposal | None:
        """A move the model cannot predict (its "no change" is ignorance: a kernel
        plug-in, a knob the simulator does not read), at the prior uncertainty of the
        search, so each is tried once before the layer is declared converged."""
        observations = observations_of(ctx.history)
        diagnosis = diagnosis_of(ctx)
        best: tuple[float, Move] | None = None
        for changes in candidates(ctx, open_layers(ctx)):
            if len(changes) != 1 or nil(diagnosis, changes) or off_lever(ctx, changes) \
                    or not fresh(ctx, changes) or infeasible(ctx, changes):
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
            layer=layer_of(best[1]), changes=best[1],
            rationale=(f"the model of vLLM cannot predict {text} (the simulator does not "
                       f"model it), so it is tried once: prior uncertainty "
                       f"±{math.expm1(PRIOR_SD) * 100:.0f}%"),
            expected_effect="unknown: measured, not predicted")

    def _ranked(self, ctx: AgentContext, model: EngineModel, skipped: dict[str, str],
                layers: tuple[Layer, ...]) -> Ranked | None:
        """The best move of `layers` by predicted log gain plus uncertainty: (that bound,
        the move, the gain, its sd). Single-knob moves and the playbook's combined ones,
        less what the diagnosis proves nil, what crashed, and what the model expects to
        lose accuracy."""
        base = model.throughput(ctx.best)
        if base <= 0:
            return None
        diagnosis = diagnosis_of(ctx)
        observations = observations_of(ctx.history)
        best: Ranked | None = None
        gains: list[tuple[float, Move]] = []
        for changes in candidates(ctx, layers):
            text = ", ".join(f"{k}={v}" for k, v in changes.items())
            why = nil(diagnosis, own(ctx, changes)) or off_lever(ctx, changes)
            if why is not None:
                skipped[text] = why
                continue
            if infeasible(ctx, changes):
                continue
            if fresh(ctx, changes):
                best = self._score(ctx, model, changes, base, best, gains)
            elif len(changes) == 1 and pairable(changes, observations):
                self._score(ctx, model, changes, base, None, gains)  # it may still pair
        # then the best single moves of two knobs together (of one layer or two open
        # ones): small gains, each below what one experiment can confirm, may add up to
        # one that can be; a move measured up but not confirmed is paired too, one
        # measured flat (alone or in a pair) is not. Only each knob's best value: two
        # values of one knob never pair, and layer 2's many candidates (a Hub copy and
        # the checkpoints forge writes, of one method alike) would crowd out other knobs
        per_knob: dict[str, tuple[float, Move]] = {}
        for g in sorted((g for g in gains if g[0] > 0 and len(g[1]) == 1
                         and pairable(g[1], observations)), key=lambda g: -g[0]):
            per_knob.setdefault(next(iter(g[1])), g)
        top = list(per_knob.values())[:PAIRED]
        for i, (_, one) in enumerate(top):
            for _, other in top[i + 1:]:
                pair = {**one, **other}
                if len(pair) == 2 and fresh(ctx, pair):
                    best = self._score(ctx, model, pair, base, best, [])
        return best

    def _score(self, ctx: AgentContext, model: EngineModel, changes: Move, base: float,
               best: Ranked | None, gains: list[tuple[float, Move]]) -> Ranked | None:
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
            if not fresh(ctx, changes) or infeasible(ctx, changes) \
                    or self._not_worth_a_boot(ctx, model, changes):
                continue
            text = ", ".join(f"{k}={v}" for k, v in changes.items())
            why = nil(diagnosis_of(ctx), changes) or off_lever(ctx, changes)
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
        diagnosis = diagnosis_of(ctx)
        rng = np.random.default_rng([self.seed, len(ctx.history), ctx.attempt])
        best: tuple[float, str, Scalar, float, float, Move] | None = None
        for knob in space.knobs(ctx.layer):
            if knob.name in SEARCH_EXCLUDED:
                continue
            # layer 1 is where the diagnosis speaks: only knobs that act on what binds
            off = diagnosis is not None and not acts_on(diagnosis.binding, knob.name)
            if off and restricted(ctx, knob.name):
                continue
            current = space.value(ctx.best, knob)
            grid = space.grid(knob)
            obs = observations.get(knob.name, [])
            for value in grid:
                if value == current:
                    continue
                changes = completed(ctx, {knob.name: value})
                if not fresh(ctx, changes) or beyond_failure(knob, grid, current, value, obs) \
                        or nil(diagnosis, {knob.name: value}) is not None \
                        or same_kernels(ctx, changes) is not None \
                        or _inaccurate(ctx, model, changes) \
                        or _predicted_loss(ctx, model, changes):
                    continue
                mean, sd = predict(knob, grid, value, obs, OFF_LEVER_SD if off else PRIOR_SD)
                ucb = mean + self.exploration * sd + 1e-9 * float(rng.random())
                if best is None or ucb > best[0]:
                    best = (ucb, knob.name, value, mean, sd, changes)
        if best is None or best[0] < MIN_UCB:
            return None
        _, name, value, mean, sd, changes = best
        old = space.value(ctx.best, KNOBS[name])
        return Proposal(
            layer=ctx.layer, changes=changes,
            rationale=(f"model-based search: {name} {old} -> {value}"
                       f"{required(ctx, changes)}; predicted "
                       f"{math.expm1(mean) * 100:+.1f}% (uncertainty "
                       f"±{math.expm1(sd) * 100:.0f}%) from {len(ctx.history)} experiments"),
            expected_effect=f"score {math.expm1(mean) * 100:+.1f}%")

    def _not_worth_a_boot(self, ctx: AgentContext, model: EngineModel | None,
                          changes: Move) -> bool:
        """Whether the model of vLLM predicts a playbook guess (a move it can model)
        below what the keep rule can confirm, its uncertainty included: the ranking
        already passed it over."""
        gain = _predicted(ctx, model, changes)
        if gain is None or model is None:
            return False
        sd = model.uncertainty(max(gain, 0.0))
        return gain + self.exploration * sd < detectable(ctx)


def _predicted(ctx: AgentContext, model: EngineModel | None, changes: Move) -> float | None:
    """The model's predicted log gain of a move it can model (None: no model, or a move
    it cannot predict; -inf: a move it expects not to serve)."""
    if model is None or not model.models(ctx.best, changes):
        return None
    base = model.throughput(ctx.best)
    value = model.throughput(ctx.space.apply(ctx.best, changes))
    if base <= 0:
        return None
    return math.log(value / base) if value > 0 else -math.inf


def _predicted_loss(ctx: AgentContext, model: EngineModel | None, changes: Move) -> bool:
    """Whether the model predicts the move to lose more than MIN_MODEL_GAIN: the search,
    which explores the budget left once the model has nothing, tries what the model
    cannot rule out (it may misjudge a gain's size on this host), not what it expects to
    lose (its misses are in size, not direction)."""
    gain = _predicted(ctx, model, changes)
    return gain is not None and gain < -MIN_MODEL_GAIN


def _inaccurate(ctx: AgentContext, model: EngineModel | None, changes: Move) -> bool:
    """Whether the model expects the move's accuracy below the run's floor."""
    return model is not None and model.agreement(
        ctx.space.apply(ctx.best, changes)) < ctx.accuracy_floor
