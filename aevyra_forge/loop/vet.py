"""What the loop refuses before any GPU time, whichever agent proposed it: a proposal it
cannot apply, one for a layer not open yet, a repeat of a config already measured or
chosen (also under another name that selects the same engine setting here, such as the
`fp8` and `fp8_e4m3` KV caches on NVIDIA GPUs), and a move the diagnosis proves nil in
every knob it sets (all it found while the incumbent is the config it read, only what the
workload or the hardware fixes once another leads: decide.diagnosis.in_force). The reason
goes back to the agent as feedback, so an LLM that ignored the diagnosis in its prompt is
told before a boot is spent on it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from aevyra_forge.core.errors import KnobError
from aevyra_forge.core.recipe import Recipe
from aevyra_forge.core.trial import Trial
from aevyra_forge.core.values import ExperimentRecord, Layer, Proposal, Scalar, Status
from aevyra_forge.decide.diagnosis import in_force, nil, synonyms
from aevyra_forge.loop.state import refused
from aevyra_forge.space.knob_space import KnobSpace

Vetted = tuple[Recipe | None, str, Status]


def vet(space: KnobSpace, best: Recipe, records: Sequence[ExperimentRecord],
        proposal: Proposal, layer: Layer, pending: Sequence[Trial] = ()) -> Vetted:
    """The recipe a proposal leads to from the incumbent `best`, or why it must not run.
    The proposal is validated and applied once, here."""
    # layers escalate, they do not close: an earlier layer's knobs stay open (alone or
    # with the proposal's layer's), since the incumbent a layer converged on is not the
    # one a later layer leaves
    if proposal.layer > layer:
        return None, (f"proposal is for layer {proposal.layer}; the active layer is "
                      f"{layer} (it and the layers before it are open)"), "invalid"
    try:
        changes = space.validate(proposal.changes)
        late = next((k for k in changes if space.get(k).layer > proposal.layer), "")
        if late:
            raise KnobError(f"knob '{late}' belongs to layer {space.get(late).layer}, "
                            f"after the proposal's layer {proposal.layer}")
        recipe = space.apply(best, changes)
        space.check_combination(recipe)
    except KnobError as exc:
        return None, str(exc), "invalid"
    seen = {t.recipe_id: f"experiment {t.exp}, chosen for this round" for t in pending}
    for rec in reversed(records):
        if not refused(rec):
            seen[rec.recipe_id] = f"experiment {rec.exp}"
    why = _repeat(space, best, recipe, changes, seen)
    if why:
        return None, why, "duplicate"
    why = nil(in_force(records, best.id), changes, wholly=True)
    if why:
        return None, (f"the baseline's diagnosis shows this move cannot change the score: "
                      f"{why}"), "invalid"
    return recipe, "", "ok"


def _repeat(space: KnobSpace, best: Recipe, recipe: Recipe, changes: Mapping[str, Scalar],
            seen: Mapping[str, str]) -> str | None:
    """Why `recipe` measures nothing new: it is the incumbent, a config already measured
    or chosen, or one of those under another name for a value here."""
    if recipe.id == best.id:
        return "no-op: these values are already the incumbent's"
    if recipe.id in seen:
        return f"repeat of {seen[recipe.id]} (recipe {recipe.id})"
    for name, value in changes.items():
        for other in synonyms(space, name, value, recipe):
            twin = space.apply(best, {**changes, name: other}).id
            same = (f"{_named(name, value)} selects the same engine setting as "
                    f"{_named(name, other)} here")
            if twin == best.id:
                return f"no-op: {same}, which the incumbent runs"
            if twin in seen:
                return f"repeat of {seen[twin]} under another name: {same}"
    return None


def _named(knob: str, value: Scalar) -> str:
    return f"leaving {knob} unset" if value is None else f"{knob}={value}"
