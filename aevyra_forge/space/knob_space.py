"""What one run may tune: the knob registry (registry.py) narrowed to this hardware, this
model and this vLLM (and the packages its environment has), with this run's kernel plug-in
candidates as the values of `kernel_plugin`; validation of proposals, effective values,
and applying a mutation to a recipe."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from aevyra_forge.core.errors import KnobError, RecipeError
from aevyra_forge.core.recipe import ConfigValue, QuantSettings, Recipe
from aevyra_forge.core.values import LAYER_NAMES, Hardware, Layer, Scalar
from aevyra_forge.space.layer2 import NO_CANDIDATE, CandidateSlot, QuantCandidate
from aevyra_forge.space.model_profile import ModelProfile
from aevyra_forge.space.placement import NO_PLUGIN, PluginSlot
from aevyra_forge.space.quant import has_fp8, vllm_refusal
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
from aevyra_forge.space.vllm_flags import VllmArgs, check_fixed, vendored

__all__ = ["ANY", "KNOBS", "NOT_TUNABLE", "REGISTRY", "Knob", "KnobSpace", "get", "has_fp8",
           "hw_class"]


class KnobSpace:
    """The registry narrowed to one run: this hardware, this model, this vLLM (the set of
    engine arguments it accepts, when known; `packages`, the distributions its environment
    has, when asked), dry-run or real. `plugins` holds this run's kernel plug-in candidates
    (space/plugins.py); every method takes a registry knob and works on the run's own."""

    def __init__(self, hw: Hardware, model: ModelProfile, simulated: bool = False,
                 vllm: VllmArgs | None = None, plugins: PluginSlot | None = None,
                 packages: Mapping[str, str | None] | None = None,
                 concurrency: int | None = None,
                 drafts: Mapping[str, str] | None = None) -> None:
        self.hw = hw
        self.concurrency = concurrency  # the most requests the bench keeps in flight
        self.model = model
        self.simulated = simulated
        self.vllm = vllm
        self.plugins = plugins or PluginSlot()
        self.packages = packages
        names = tuple(c.name for c in self.plugins.candidates)
        self.local: dict[str, Knob] = {"kernel_plugin": replace(
            KNOBS["kernel_plugin"], placement=self.plugins,
            choices={ANY: (NO_PLUGIN, *names)})}
        self.drafts: dict[str, str] = {}
        self.offer_drafts(drafts or {})
        self.quant_candidates: tuple[QuantCandidate, ...] = ()
        self.quant_refused: dict[str, str] = {}  # candidate -> a boot failure's reason
        self.quant_unserved: dict[str, str] = {}  # candidate -> why this vLLM cannot load it

    def offer_drafts(self, drafts: Mapping[str, str]) -> None:
        """Speculative methods with a draft found for this model (space/drafts.py: an
        EAGLE / EAGLE-3 head, a small draft model): spec method -> its draft, offered as
        values of spec_method that bring their draft as spec_model; none without one."""
        self.drafts = dict(drafts)
        method, draft = KNOBS["spec_method"], KNOBS["spec_model"]
        self.local["spec_method"] = replace(method, choices={
            ANY: (*method.choices[ANY], *self.drafts)})
        self.local["spec_model"] = replace(draft, choices={ANY: (None, *self.drafts.values())})

    def offer_quant(self, candidates: Sequence[QuantCandidate]) -> None:
        """Layer 2's concrete candidates for this run (space/layer2.py), as the values of
        `quant_candidate`: the only way a recipe serves a checkpoint forge chose. A
        candidate whose method this vLLM does not list is left out (quant_unserved)."""
        listed = self.vllm.choices("quantization") if self.vllm is not None else None
        version = self.vllm.version if self.vllm is not None else ""
        self.quant_unserved = {c.name: why for c in candidates
                               if (why := vllm_refusal(c.method, listed, version))}
        self.quant_candidates = tuple(c for c in candidates
                                      if c.name not in self.quant_unserved)
        self._quant_knob()

    def _quant_knob(self) -> None:
        slot = CandidateSlot(("quant", "checkpoint"), "", (None,),
                             candidates=self.quant_candidates)
        usable = tuple(c.name for c in self.quant_candidates
                       if c.name not in self.quant_refused)
        self.local["quant_candidate"] = replace(
            KNOBS["quant_candidate"], placement=slot, choices={ANY: (NO_CANDIDATE, *usable)})

    def refuse_quant(self, recipe: Recipe, reason: str) -> str | None:
        """Remember for the run that this host refused the recipe's candidate (a boot
        failure classified as unsupported here): it is no longer offered. Returns its
        name, or None when the recipe serves no candidate."""
        found = CandidateSlot(("quant", "checkpoint"), "", (None,),
                              candidates=self.quant_candidates).chosen(recipe)
        if found is None:
            return None
        self.quant_refused[found.name] = reason
        self._quant_knob()
        return found.name

    def own(self, knob: Knob) -> Knob:
        """This run's version of a registry knob (the plug-in slot with its candidates)."""
        return self.local.get(knob.name, knob)

    def get(self, name: str) -> Knob:
        return self.own(get(name))

    # -- what may be touched -----------------------------------------------------------
    def available(self, knob: Knob) -> bool:
        knob = self.own(knob)
        if not knob.allowed_on(self.hw):
            return False
        if knob.kind == "choice" and len(self.choices(knob)) < 2:
            return False
        arg = knob.placement.engine_arg(knob)
        if self.vllm is not None and arg is not None:
            return self.vllm.accepts(arg)
        return True

    def knobs(self, layer: Layer | None = None) -> list[Knob]:
        return [self.own(k) for k in KNOBS.values() if (layer is None or k.layer == layer)
                and self.available(k)]

    def choices(self, knob: Knob) -> tuple[Scalar, ...]:
        knob = self.own(knob)
        values = knob.choices_for(self.hw, self.simulated)
        if self.packages is not None:  # a choice whose package vLLM's environment lacks
            values = tuple(v for v in values if not (
                str(v) in knob.choice_packages
                and not self.packages.get(knob.choice_packages[str(v)])))
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
        knob = self.own(knob)
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
        knob = self.own(knob)
        if knob.kind == "choice":
            return list(self.choices(knob))
        if knob.kind == "bool":
            return [True, False]
        low, high = self.bounds(knob)
        grid: list[Scalar] = list(knob.grid)
        if knob.name == "max_cudagraph_capture_size" and self.concurrency:
            # graphs for the decode batches this workload reaches, not for 512 sequences
            need = -(-self.concurrency // 8) * 8
            grid = [*sorted({need, 2 * need, *(v for v in grid if isinstance(v, int)
                                                and need <= v <= 4 * need)})]
        return [v for v in grid if isinstance(v, int | float)
                and (low is None or v >= low) and (high is None or v <= high)]

    # -- validation ---------------------------------------------------------------------
    def check(self, name: str, value: Any) -> Scalar:
        """The value, checked for type, range and hardware; KnobError says why not."""
        knob = self.get(name)
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
            knob = self.get(name)
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
        for knob in self.knobs():
            needed = KNOBS.get(knob.needs or "")
            if (needed is not None and self.value(recipe, knob) != self.default(knob)
                    and self.value(recipe, needed) == self.default(needed)):
                raise KnobError(f"{knob.name} applies only with {needed.name} set; set "
                                f"{needed.name} first")
        method, draft_of = eff.get("spec_method"), eff.get("spec_model")
        if draft_of != self.drafts.get(str(method)):
            raise KnobError(f"spec_model must be the draft known for spec_method={method} "
                            f"({self.drafts.get(str(method))}), not {draft_of}")
        replicas, tp = eff.get("data_parallel_size"), eff.get("tensor_parallel_size")
        if isinstance(replicas, int) and replicas * (tp if isinstance(tp, int) else 1) \
                > max(1, self.hw.gpu_count):
            raise KnobError(f"data_parallel_size ({replicas}) x tensor_parallel_size ({tp}) "
                            f"needs more than the {self.hw.gpu_count} GPUs here")

    # -- recipes -----------------------------------------------------------------------
    def baseline(self, model: str) -> Recipe:
        """Experiment 0: the model with vLLM's own defaults for this hardware."""
        return Recipe(model=model)

    def value(self, recipe: Recipe, knob: Knob) -> Scalar:
        """The effective value of `knob` in `recipe` (its default when unset)."""
        knob = self.own(knob)
        raw = knob.placement.read(recipe, knob)
        return self.default(knob) if raw is None else raw

    def effective(self, recipe: Recipe, layer: Layer | None = None) -> dict[str, Scalar]:
        return {k.name: self.value(recipe, k) for k in self.knobs(layer)}

    def apply(self, recipe: Recipe, changes: Mapping[str, Scalar]) -> Recipe:
        """A child recipe with `changes` applied; values equal to the default are dropped
        so the id reflects the effective settings."""
        draft = recipe.to_dict()
        for name, value in changes.items():
            knob = self.get(name)
            knob.placement.write(draft, knob, value, value == self.default(knob))
            before = self.value(recipe, knob) != self.default(knob)
            for other, companion in knob.companions.items():  # e.g. spec_tokens
                partner = self.get(other)
                if other in changes:
                    continue
                if value == self.default(knob):
                    partner.placement.write(draft, partner, None, True)
                elif not before and partner.placement.read(recipe, partner) is None:
                    partner.placement.write(draft, partner, companion,
                                            companion == self.default(partner))
            if name == "spec_method" and "spec_model" not in changes:  # a draft method
                spec_model = self.get("spec_model")  # brings its draft; others none
                draft_of = self.drafts.get(str(value))
                spec_model.placement.write(draft, spec_model, draft_of, draft_of is None)
        return recipe.child(**draft)

    def fixed(self, recipe: Recipe) -> dict[str, ConfigValue]:
        """The recipe's fixed engine arguments: `config` keys no knob declares and no
        kernel plug-in set. Every experiment of a run keeps its starting recipe's."""
        _, plugin_args = self.plugins.owned(recipe)
        return {k: v for k, v in recipe.config.items()
                if k not in plugin_args and not (k in KNOBS and
                                                 KNOBS[k].placement.path == ("config",))}

    def check_recipe(self, recipe: Recipe, source: str = "recipe") -> Recipe:
        """Reject unknown or invalid settings in a user-supplied recipe; return it
        normalised (knobs at their default dropped). Engine arguments that are no knob
        are the deployment's fixed settings: kept as given if this vLLM accepts them
        (vllm_flags.check_fixed; a dry run checks against the vendored flag list)."""
        changes: dict[str, Scalar] = {}
        fixed: dict[str, ConfigValue] = {}
        slot = self.get("kernel_plugin")
        plugin_env, plugin_args = self.plugins.owned(recipe)
        chosen = slot.placement.read(recipe, slot)
        if chosen is not None:  # a plug-in this run does not offer is refused by name
            try:
                changes[slot.name] = self.check(slot.name, chosen)
            except KnobError as exc:
                raise RecipeError(f"{source}: {exc}") from None
        for group in places(KNOBS.values()):
            placement = group[0].placement
            group = [k for k in group if not isinstance(k.placement, PluginSlot)]
            here = {placement.key(k): k for k in group}
            owned = plugin_env if placement.path == self.plugins.path else (
                plugin_args if placement.path == ("config",) else set())
            for key in placement.keys_set(recipe):
                if key in owned:
                    continue
                knob = here.get(key)
                if knob is None and placement.path == ("config",):
                    fixed[key] = recipe.config[key]
                    continue
                if knob is None:
                    valid = ", ".join(k.name for k in group)
                    raise RecipeError(f"{source}: {placement.unknown(key, valid)}")
                changes[knob.name] = placement.read(recipe, knob)
        try:
            checked = {n: self.check(n, v) for n, v in changes.items()}
        except KnobError as exc:
            raise RecipeError(f"{source}: {exc}") from None
        fixed = check_fixed(fixed, self.vllm or vendored(), source)
        base = Recipe(model=recipe.model, config=fixed, quant=QuantSettings(
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
