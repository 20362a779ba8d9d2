"""What one run may tune: the knob registry (registry.py) narrowed to this hardware, this
model and this vLLM, with validation of proposals, effective values, and applying a
mutation to a recipe."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aevyra_forge.core.errors import KnobError, RecipeError
from aevyra_forge.core.recipe import QuantSettings, Recipe
from aevyra_forge.core.values import LAYER_NAMES, Hardware, Layer, Scalar
from aevyra_forge.space.model_profile import ModelProfile
from aevyra_forge.space.quant import has_fp8
from aevyra_forge.space.registry import (
    ANY,
    KNOBS,
    NOT_TUNABLE,
    REGISTRY,
    Knob,
    auto_dtype,
    format_number,
    get,
    hw_class,
    places,
)
from aevyra_forge.space.vllm_flags import VllmArgs

__all__ = ["ANY", "KNOBS", "NOT_TUNABLE", "REGISTRY", "Knob", "KnobSpace", "get", "has_fp8",
           "hw_class"]


class KnobSpace:
    """The registry narrowed to one run: this hardware, this model, this vLLM (the set of
    engine arguments it accepts, when known), dry-run or real."""

    def __init__(self, hw: Hardware, model: ModelProfile, simulated: bool = False,
                 vllm: VllmArgs | None = None) -> None:
        self.hw = hw
        self.model = model
        self.simulated = simulated
        self.vllm = vllm

    # -- what may be touched -----------------------------------------------------------
    def available(self, knob: Knob) -> bool:
        if not knob.allowed_on(self.hw):
            return False
        if knob.kind == "choice" and len(self.choices(knob)) < 2:
            return False
        arg = knob.placement.engine_arg(knob)
        if self.vllm is not None and arg is not None:
            return self.vllm.accepts(arg)
        return True

    def knobs(self, layer: Layer | None = None) -> list[Knob]:
        return [k for k in KNOBS.values() if (layer is None or k.layer == layer)
                and self.available(k)]

    def choices(self, knob: Knob) -> tuple[Scalar, ...]:
        values = knob.choices_for(self.hw, self.simulated)
        arg = knob.placement.value_arg(knob)
        listed = self.vllm.choices(arg) if self.vllm is not None and arg else None
        if listed is not None:  # this vLLM's parser names its choices: stay inside them
            values = tuple(v for v in values if str(v) in listed)
        return values

    def auto_dtype(self) -> str:
        """What dtype=auto resolves to on this hardware (registry.auto_dtype)."""
        return auto_dtype(self.hw)

    def bounds(self, knob: Knob) -> tuple[float | None, float | None]:
        high = knob.high
        if knob.name == "max_model_len":
            high = float(self.model.max_context)
        if knob.name == "VLLM_CPU_KVCACHE_SPACE" and self.hw.memory_gib:
            high = max(1.0, float(int(self.hw.memory_gib * 0.75)))
        return knob.low, high

    def default(self, knob: Knob) -> Scalar:
        value = knob.default_for(self.hw)
        arg = knob.placement.value_arg(knob)
        if self.vllm is not None and arg is not None and knob.kind != "choice":
            info = self.vllm.args.get(arg)
            parsed = _parse_default(knob, info.default) if info else None
            if parsed is not None:  # this vLLM's own default beats the registry's
                value = parsed
        if knob.name == "max_model_len" and value is None:
            return self.model.max_context
        return value

    def grid(self, knob: Knob) -> list[Scalar]:
        """Values worth trying for `knob` here, inside its safe range."""
        if knob.kind == "choice":
            return list(self.choices(knob))
        if knob.kind == "bool":
            return [True, False]
        low, high = self.bounds(knob)
        return [v for v in knob.grid if isinstance(v, int | float)
                and (low is None or v >= low) and (high is None or v <= high)]

    # -- validation ---------------------------------------------------------------------
    def check(self, name: str, value: Any) -> Scalar:
        """The value, checked for type, range and hardware; KnobError says why not."""
        knob = get(name)
        if not knob.allowed_on(self.hw):
            raise KnobError(f"knob '{name}' is not available on {self.hw.device}")
        if not self.available(knob):
            raise KnobError(f"knob '{name}' is not available on this hardware or vLLM")
        if knob.kind == "bool":
            if not isinstance(value, bool):
                raise KnobError(f"{name} takes true or false, got {value!r}")
            return value
        if knob.kind == "choice":
            options = self.choices(knob)
            if value not in options or isinstance(value, bool):
                raise KnobError(f"{name} must be one of {', '.join(map(str, options))}; "
                                f"got {value!r}")
            return value  # type: ignore[no-any-return]
        if knob.kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
            raise KnobError(f"{name} takes an integer, got {value!r}")
        if knob.kind == "float" and (isinstance(value, bool)
                                     or not isinstance(value, int | float)):
            raise KnobError(f"{name} takes a number, got {value!r}")
        low, high = self.bounds(knob)
        if (low is not None and value < low) or (high is not None and value > high):
            raise KnobError(f"{name}={value} is out of range "
                            f"[{format_number(low)}, {format_number(high)}]")
        return float(value) if knob.kind == "float" else int(value)

    def validate(self, changes: Mapping[str, Any], layer: Layer | None = None
                 ) -> dict[str, Scalar]:
        if not changes:
            raise KnobError("the proposal changes nothing; name at least one knob")
        out: dict[str, Scalar] = {}
        for name, value in changes.items():
            out[name] = self.check(name, value)
            knob = KNOBS[name]
            if layer is not None and knob.layer != layer:
                raise KnobError(f"knob '{name}' belongs to layer {knob.layer} "
                                f"({LAYER_NAMES[knob.layer]}), not the active layer {layer} "
                                f"({LAYER_NAMES[layer]})")
        return out

    def check_combination(self, recipe: Recipe) -> None:
        """Cross-knob rules vLLM enforces when it builds its config (so a proposal that
        breaks one is refused before booting)."""
        eff = self.effective(recipe, 1)
        seqs, tokens = eff.get("max_num_seqs"), eff.get("max_num_batched_tokens")
        if isinstance(seqs, int) and isinstance(tokens, int) and tokens < seqs:
            raise KnobError(f"max_num_batched_tokens ({tokens}) must be >= max_num_seqs "
                            f"({seqs}), as vLLM's scheduler requires; change both together")

    # -- recipes -----------------------------------------------------------------------
    def baseline(self, model: str) -> Recipe:
        """Experiment 0: the model with vLLM's own defaults for this hardware."""
        return Recipe(model=model)

    def value(self, recipe: Recipe, knob: Knob) -> Scalar:
        """The effective value of `knob` in `recipe` (its default when unset)."""
        raw = knob.placement.read(recipe, knob)
        return self.default(knob) if raw is None else raw

    def effective(self, recipe: Recipe, layer: Layer | None = None) -> dict[str, Scalar]:
        return {k.name: self.value(recipe, k) for k in self.knobs(layer)}

    def apply(self, recipe: Recipe, changes: Mapping[str, Scalar]) -> Recipe:
        """A child recipe with `changes` applied; values equal to the default are dropped
        so the id reflects the effective settings."""
        draft = recipe.to_dict()
        for name, value in changes.items():
            knob = get(name)
            knob.placement.write(draft, knob, value, value == self.default(knob))
        return recipe.child(**draft)

    def check_recipe(self, recipe: Recipe, source: str = "recipe") -> Recipe:
        """Reject unknown or invalid settings in a user-supplied recipe; return it
        normalised (defaults dropped)."""
        changes: dict[str, Scalar] = {}
        for group in places(KNOBS.values()):
            placement = group[0].placement
            here = {placement.key(k): k for k in group}
            for key in placement.keys_set(recipe):
                knob = here.get(key)
                if knob is None:
                    valid = ", ".join(k.name for k in group)
                    raise RecipeError(f"{source}: {placement.unknown(key, valid)}")
                changes[knob.name] = placement.read(recipe, knob)
        try:
            checked = {n: self.check(n, v) for n, v in changes.items()}
        except KnobError as exc:
            raise RecipeError(f"{source}: {exc}") from None
        base = Recipe(model=recipe.model, quant=QuantSettings(
            checkpoint=recipe.quant.checkpoint,
            method=recipe.quant.method if recipe.quant.checkpoint else "none"))
        out = self.apply(base, checked) if checked else base
        return out.model_copy(update={"parent_id": None, "generation": 0})


def _parse_default(knob: Knob, raw: str | None) -> Scalar:
    """A default as `--help` prints it, or None when it is unset or hardware-dependent."""
    if raw is None or raw in ("None", "", "[]", "{}"):
        return None
    try:
        if knob.kind == "bool":
            return {"True": True, "False": False}.get(raw)
        if knob.kind == "int":
            return int(raw)
        if knob.kind == "float":
            return float(raw)
    except ValueError:
        return None
    return raw
