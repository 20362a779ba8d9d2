"""The builtin strategy's moves and what rules one out before a boot: the moves of the
open layers (the active one and those before it), untried ones only (a value and its
synonyms here count as one), none past a value that crashed, none the baseline's
diagnosis proves nil or that leaves the binding resource alone, none to another
checkpoint of the quantization the incumbent serves, and the smallest gain the keep rule
can confirm."""

from __future__ import annotations

import math

from aevyra_forge.agent.base import AgentContext
from aevyra_forge.agent.surrogate import Obs, beyond_failure, observations_of
from aevyra_forge.core.errors import KnobError
from aevyra_forge.core.values import LAYERS, Diagnosis, Layer, Scalar
from aevyra_forge.decide.diagnosis import acts_on, diagnosed, in_force, synonyms
from aevyra_forge.decide.stats import pooled_noise, relative_interval
from aevyra_forge.space.knob_space import KNOBS
from aevyra_forge.space.layer2 import CandidateSlot
from aevyra_forge.space.playbook import first_moves

SEARCH_EXCLUDED = frozenset({"max_model_len"})  # feasibility knob, set by the context fix
MIN_MODEL_GAIN = 0.01  # log gain the model resolves: a smaller predicted gain or loss is none

Move = dict[str, Scalar]


def open_layers(ctx: AgentContext) -> tuple[Layer, ...]:
    """The layers whose knobs may move now: escalating opens a layer and closes none,
    since the incumbent an earlier layer converged on is not the one a later layer
    leaves (an fp8 KV cache frees memory a larger token budget can then use)."""
    return tuple(layer for layer in LAYERS if layer <= ctx.layer)


def layer_of(changes: Move) -> Layer:
    """The layer a move is proposed in: its latest knob's (an earlier layer's knob may
    come along, its layer being open)."""
    return max(KNOBS[k].layer for k in changes)


def candidates(ctx: AgentContext, layers: tuple[Layer, ...]) -> list[Move]:
    """Every single-knob move of `layers`, then the playbook's combined moves of them."""
    out: list[Move] = []
    for layer in layers:
        for knob in ctx.space.knobs(layer):
            if knob.name in SEARCH_EXCLUDED:
                continue
            current = ctx.space.value(ctx.best, knob)
            out += [completed(ctx, {knob.name: v}) for v in ctx.space.grid(knob)
                    if v != current]
    for move in first_moves(ctx.playbook):
        if len(move) > 1 and all(k in KNOBS and KNOBS[k].layer in layers for k in move):
            try:
                out.append(ctx.space.validate(move))
            except KnobError:
                continue
    return out


def completed(ctx: AgentContext, changes: Move) -> Move:
    """The move with what vLLM requires to come with it (max_num_batched_tokens >=
    max_num_seqs): a token budget below the incumbent's max_num_seqs brings max_num_seqs
    down to the largest value of its grid within the budget, and a max_num_seqs above the
    incumbent's budget brings the budget up to the smallest value of its grid that
    covers it. Without this a smaller token budget on a GPU whose default max_num_seqs
    is 1024 is never a candidate, though max_num_seqs above the requests in flight is
    nil (decide.diagnosis)."""
    seqs, tokens = KNOBS["max_num_seqs"], KNOBS["max_num_batched_tokens"]
    if (seqs.name in changes) == (tokens.name in changes):
        return changes
    recipe = ctx.space.apply(ctx.best, changes)
    have_seqs, have_tokens = ctx.space.value(recipe, seqs), ctx.space.value(recipe, tokens)
    if not isinstance(have_seqs, int) or not isinstance(have_tokens, int) \
            or have_tokens >= have_seqs:
        return changes
    if tokens.name in changes:
        fits = [v for v in ctx.space.grid(seqs) if isinstance(v, int) and v <= have_tokens]
        return {**changes, seqs.name: max(fits)} if fits else changes
    covers = [v for v in ctx.space.grid(tokens) if isinstance(v, int) and v >= have_seqs]
    return {**changes, tokens.name: min(covers)} if covers else changes


def own(ctx: AgentContext, changes: Move) -> Move:
    """The part of a move that is its own, less what `completed` brought along (whose
    being nil by the diagnosis does not make the move nil: it is what vLLM requires)."""
    if len(changes) < 2:
        return changes
    return {k: v for k, v in changes.items()
            if completed(ctx, {n: w for n, w in changes.items() if n != k}) != changes}


def required(ctx: AgentContext, changes: Move) -> str:
    """What `completed` brought into a move, for its rationale ("" when nothing)."""
    mine = own(ctx, changes)
    brought = [f"{k}={v}" for k, v in changes.items() if k not in mine]
    return (f" ({', '.join(brought)} comes with it: vLLM requires max_num_batched_tokens "
            f">= max_num_seqs)") if brought else ""


def fresh(ctx: AgentContext, changes: Move) -> bool:
    """Untried, not the incumbent, not chosen for this round already, and a combination
    vLLM would accept; a value and its synonyms here count as one."""
    candidate = ctx.space.apply(ctx.best, changes)
    seen = ctx.tried_ids | ctx.pending_ids | {ctx.best.id}
    if candidate.id in seen:
        return False
    for name, value in changes.items():
        for other in synonyms(ctx.space, name, value, candidate):
            if ctx.space.apply(ctx.best, {**changes, name: other}).id in seen:
                return False
    try:
        ctx.space.check_combination(candidate)
    except KnobError:
        return False
    return True


def infeasible(ctx: AgentContext, changes: Move) -> bool:
    """Whether a value of the move repeats one that crashed or lies past it."""
    observations = observations_of(ctx.history)
    for name, value in changes.items():
        knob = KNOBS[name]
        grid = ctx.space.grid(knob)
        current = ctx.space.value(ctx.best, knob)
        if beyond_failure(knob, grid, current, value, observations.get(name, [])):
            return True
    return False


def pairable(changes: Move, observations: dict[str, list[Obs]]) -> bool:
    """Whether a single-knob move may go into a pair: never measured, or measured (alone
    or with another knob) only as a gain, never a loss, nothing or a failure: a gain
    below what one experiment confirms, which a second move may lift above."""
    [(name, value)] = changes.items()
    return all(o.gain is not None and o.gain > 0
               for o in observations.get(name, []) if o.value == value)


def diagnosis_of(ctx: AgentContext) -> Diagnosis | None:
    """The latest diagnosis of a config that served (the baseline's, normally), with only
    its standing inert knobs once another config leads (decide.diagnosis.in_force)."""
    return in_force(ctx.history, ctx.best.id)


def restricted(ctx: AgentContext, knob: str) -> bool:
    """Whether a move of `knob` off the binding resource is skipped: a layer-1 knob (the
    diagnosis speaks about serving config) in a throughput search (a latency objective
    may gain where throughput cannot), while the incumbent is the config diagnosed: once
    a move was kept the binding may have moved (speculative decoding turns a decode-bound
    engine into one that needs larger steps), so the diagnosis no longer rules it out."""
    found = diagnosed(ctx.history)
    return KNOBS[knob].layer == 1 and ctx.objective == "throughput" \
        and found is not None and found.recipe_id == ctx.best.id


def off_lever(ctx: AgentContext, changes: Move) -> str | None:
    """Why a layer-1 move is skipped when none of its knobs acts on the binding resource."""
    diagnosis = diagnosis_of(ctx)
    if diagnosis is None or not all(restricted(ctx, k) for k in changes) or any(
            acts_on(diagnosis.binding, k) for k in changes):
        return None
    return f"does not act on what binds: {diagnosis.binding.replace('_', ' ')}"


def same_kernels(ctx: AgentContext, changes: Move) -> str | None:
    """Why a move to another layer-2 candidate cannot gain speed: its checkpoint has the
    method and bits of the one the incumbent serves (another publisher's copy, or one
    forge writes), so vLLM runs the same kernels and only accuracy could differ, which the
    keep rule does not reward; a calibrated copy costs minutes to write for nothing."""
    slot = ctx.space.get("quant_candidate").placement
    if "quant_candidate" not in changes or not isinstance(slot, CandidateSlot):
        return None
    now = slot.chosen(ctx.best)
    then = next((c for c in slot.candidates if c.name == changes["quant_candidate"]), None)
    if now is None or then is None or (now.method, now.bits) != (then.method, then.bits):
        return None
    return f"serves {then.method} as the incumbent's {now.name} does: the same kernels"


def detectable(ctx: AgentContext) -> float:
    """The smallest log gain worth a boot: the threshold (--min-improvement-pct) plus half
    the half-width of the interval a candidate measured like the incumbent would get (its
    passes, the assumed between-boot noise). The keep rule confirms such a gain about one
    time in five (its lower bound must clear the threshold, and the measurement must
    exceed the truth by half the half-width); a move predicted below it is not booted."""
    return math.log1p(ctx.min_improvement) + _half_width(ctx) / 2


def confirmable(ctx: AgentContext) -> float:
    """A log gain the keep rule confirms in about nineteen experiments of twenty: the
    threshold plus twice that half-width (the lower bound clears the threshold unless the
    measurement falls short of the truth by more than the half-width)."""
    return math.log1p(ctx.min_improvement) + 2 * _half_width(ctx)


def _half_width(ctx: AgentContext) -> float:
    """The log half-width of the interval a candidate measured like the incumbent would get
    (0 before the incumbent has two passes)."""
    rec = next((r for r in reversed(ctx.history) if r.recipe_id == ctx.best.id
                and r.status == "ok" and len(r.passes) >= 2), None)
    if rec is None:
        return 0.0
    values = [m.output_throughput for m in rec.passes]
    if not all(v > 0 for v in values):
        return 0.0
    noise = pooled_noise([m.output_throughput for m in r.passes] for r in ctx.history
                         if r.status == "ok" and len(r.passes) >= 2)
    iv = relative_interval(values, values, noise=noise if noise.df else None)
    return math.log1p(iv.high)


def converged(ctx: AgentContext, modelled: bool, skipped: dict[str, str]) -> str:
    """Why a layer has nothing left, for the progress line."""
    said = ("the model predicts no move above what the keep rule can confirm "
            f"(+{math.expm1(detectable(ctx)) * 100:.1f}%), and " if modelled else "")
    nil_ = f"; {len(skipped)} moves skipped as nil or off what binds" if skipped else ""
    return (f"layer {ctx.layer} converged: {said}the playbook's and the search's moves "
            f"are tried or ruled out{nil_}")
