"""Refinements a model-ranked move carries along: the knobs the model of vLLM predicts to
add to it that no experiment of their own could keep.

Why: a gain the keep rule can confirm is a few percent at least (one boot per side,
between-boot noise, --min-improvement-pct). Once a large move is kept, the refinements
left (spec_tokens=8 on top of the n-gram drafter, an fp8 KV cache on top of fp8 weights,
a larger token budget) are worth 1-3 % each, and each is reverted as noise in turn:
benchmarks/search_quality.py showed every run short of 0.99 of the optimum after 5
experiments had booted such a refinement and reverted it. Measured together with the move
they ride on, they are confirmed with it.

A refinement is a single-knob move of an open layer that the model can predict and that
nothing rules out (what the workload or the hardware makes nil, a crash, the incumbent's
kernels, a measured loss). It must add to the move so far at least what the model
resolves (MIN_MODEL_GAIN) and less than one experiment of its own would confirm reliably
(`confirmable`): a knob whose best value adds that much gets its own experiment, kept or
reverted on its own evidence. What it adds is judged on the move, not on the incumbent:
an fp8 KV cache that pays a lot alone may add only 4 % once fp8 weights freed memory,
and would then be stranded; spec_tokens does nothing without a drafter. The best
refinement is added, then the next, up to MAX_CARRIED; then any that a later one left
adding less than MIN_MODEL_GAIN is dropped. The proposal stays a move a reader can
follow: its rationale lists each refinement and what it adds. What bound at the baseline
is not asked: the move changes the config the diagnosis read (speculative decoding makes
each step larger, so a token budget that did not bind may), and the model is run on the
config with it."""

from __future__ import annotations

import math
from dataclasses import dataclass

from aevyra_forge.agent.base import AgentContext
from aevyra_forge.agent.engine_model import EngineModel
from aevyra_forge.agent.moves import (
    MIN_MODEL_GAIN,
    Move,
    candidates,
    confirmable,
    fresh,
    infeasible,
    open_layers,
    pairable,
    same_kernels,
)
from aevyra_forge.agent.surrogate import observations_of
from aevyra_forge.core.errors import KnobError
from aevyra_forge.decide.diagnosis import in_force, nil

MAX_CARRIED = 3  # refinements one move carries at most


@dataclass(frozen=True)
class Carried:
    """The move with its refinements, each with the log gain the model predicts it adds
    (in the order added)."""

    changes: Move
    added: tuple[tuple[str, float], ...]

    def note(self) -> str:
        """The refinements for the rationale ("" when none)."""
        if not self.added:
            return ""
        parts = ", ".join(f"{name}={self.changes[name]} {math.expm1(gain) * 100:+.1f}%"
                          for name, gain in self.added)
        return (f"; carried along (each too small for an experiment of its own to "
                f"confirm reliably; predicted to add): {parts}")


def carry(ctx: AgentContext, model: EngineModel, changes: Move) -> Carried:
    """`changes` with the refinements the model predicts to add to it (module docstring);
    `changes` itself when none does, or when the model predicts nothing for it."""
    move = dict(changes)
    moved = ctx.space.apply(ctx.best, move)
    if model.throughput(moved) <= 0:
        return Carried(move, ())
    # the baseline's diagnosis read another config: only what the workload or the hardware
    # fixes still holds (decide.diagnosis.in_force), and what binds is the model's to say
    diagnosis = in_force(ctx.history, moved.id)
    observations = observations_of(ctx.history)
    singles = [one for one in candidates(ctx, open_layers(ctx)) if len(one) == 1
               and not set(one) & set(move) and model.models(ctx.best, one)
               and nil(diagnosis, one) is None
               and not infeasible(ctx, one) and same_kernels(ctx, one) is None
               and pairable(one, observations)]
    # a knob whose best value adds to the move what one experiment of its own would
    # confirm reliably gets that experiment (kept or reverted on its own evidence); less
    # than that, it would likely be reverted as noise after the move: it rides with it
    ceiling = confirmable(ctx)
    own: set[str] = set()
    carried: list[str] = []
    while len(carried) < MAX_CARRIED:
        best = _best_values(ctx, model, move, [o for o in singles if not set(o) & own])
        own |= {name for name, (gain, _) in best.items() if gain >= ceiling}
        small = [(gain, one) for name, (gain, one) in best.items()
                 if name not in own and gain >= MIN_MODEL_GAIN]
        if not small:
            break
        _, one = max(small, key=lambda b: b[0])
        move.update(one)
        carried += list(one)
    # what each adds to the whole (a later one can make an earlier one pointless): the
    # least useful goes until each adds what the model resolves
    while carried:
        adds = {name: _adds(ctx, model, move, name) for name in carried}
        worst = min(carried, key=lambda name: adds[name])
        if adds[worst] >= MIN_MODEL_GAIN:
            return Carried(move, tuple((name, adds[name]) for name in carried))
        carried.remove(worst)
        del move[worst]
    return Carried(move, ())


def _best_values(ctx: AgentContext, model: EngineModel, move: Move, singles: list[Move]
                 ) -> dict[str, tuple[float, Move]]:
    """Per knob not in `move`, the log gain its best value adds to it (by the model; to
    the incumbent when `move` is empty), among values that make a valid, untried config
    the model expects to serve within the accuracy floor."""
    value = model.throughput(ctx.space.apply(ctx.best, move))
    best: dict[str, tuple[float, Move]] = {}
    for one in singles:
        [name] = one
        if name in move or not fresh(ctx, {**move, **one}):
            continue
        recipe = ctx.space.apply(ctx.best, {**move, **one})
        found = model.throughput(recipe)
        if found <= 0 or model.agreement(recipe) < ctx.accuracy_floor:
            continue
        gain = math.log(found / value)
        if name not in best or gain > best[name][0]:
            best[name] = (gain, one)
    return best


def _adds(ctx: AgentContext, model: EngineModel, move: Move, name: str) -> float:
    """The log gain knob `name`'s value in `move` adds to the rest of it, by the model."""
    rest = {k: v for k, v in move.items() if k != name}
    found = adds(ctx, model, rest, {name: move[name]})
    return math.inf if found is None else found


def adds(ctx: AgentContext, model: EngineModel, move: Move, other: Move) -> float | None:
    """The log gain the model predicts `other` to add to `move` (None: they share a knob,
    or together or without `other` they make no valid config, or one it expects not to
    serve)."""
    if set(move) & set(other):
        return None
    try:
        both = ctx.space.apply(ctx.best, {**move, **other})
        ctx.space.check_combination(both)
    except KnobError:
        return None
    without, with_both = model.throughput(ctx.space.apply(ctx.best, move)), \
        model.throughput(both)
    if without <= 0 or with_both <= 0:
        return None
    return math.log(with_both / without)
