"""What one run may tune: the knob registry (registry.py) narrowed to this hardware, this
model and this vLLM, with validation of proposals, effective values, and applying a
mutation to a recipe.

Based on vLLM's V1 engine: chunked prefill is always on and prefix caching is on by
default, so neither is offered as a win (prefix caching can only be turned off)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aevyra_forge.core.errors import KnobError, RecipeError
from aevyra_forge.core.recipe import KernelSettings, QuantSettings, Recipe
from aevyra_forge.core.values import LAYER_NAMES, Hardware, Layer, Scalar
from aevyra_forge.space.model_profile import ModelProfile
from aevyra_forge.space.registry import (
    ANY,
    KNOBS,
    NOT_TUNABLE,
    REGISTRY,
    VLLM_FLAG,
    Knob,
    format_number,
    get,
    has_fp8,
    hw_class,
)
from aevyra_forge.space.vllm_flags import VllmArgs

__all__ = ["ANY", "KNOBS", "NOT_TUNABLE", "REGISTRY", "VLLM_FLAG", "Knob", "KnobSpace",
           "get", "has_fp8", "hw_class"]


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
        if knob.name == "tensor_parallel_size" and self.hw.gpu_count < 2:
            return False
        flag = VLLM_FLAG.get(knob.name, knob.name if knob.target == "config" else None)
        if self.vllm is not None and flag is not None:
            return self.vllm.accepts(flag)
        return True

    def knobs(self, layer: Layer | None = None) -> list[Knob]:
        return [k for k in REGISTRY if (layer is None or k.layer == layer)
                and self.available(k)]

    def choices(self, knob: Knob) -> tuple[Scalar, ...]:
        values = knob.choices_for(self.hw, self.simulated)
        if knob.name == "tensor_parallel_size":
            values = tuple(v for v in values if isinstance(v, int)
                           and v <= max(1, self.hw.gpu_count))
        flag = VLLM_FLAG.get(knob.name, knob.name)
        listed = self.vllm.choices(flag) if self.vllm is not None and flag else None
        if listed is not None:  # this vLLM's parser names its choices: stay inside them
            values = tuple(v for v in values if str(v) in listed)
        if knob.name == "dtype":  # "auto" already is this dtype: not a separate choice
            auto = self.auto_dtype()
            # GPUs without bf16 (auto is float16 there) reject bfloat16 at boot
            values = tuple(v for v in values if v != auto
                           and not (auto == "float16" and v == "bfloat16"))
        return values

    def auto_dtype(self) -> str:
        """What dtype=auto resolves to here for a bf16 checkpoint: float16 on GPUs without
        bf16 support (compute capability < 8.0, e.g. T4), bfloat16 elsewhere (the CPU build
        included)."""
        gpu = self.hw.gpu
        if self.hw.device == "cuda" and gpu is not None:
            try:
                if float(gpu.compute_capability or 8.0) < 8.0:
                    return "float16"
            except ValueError:
                pass
        return "bfloat16"

    def bounds(self, knob: Knob) -> tuple[float | None, float | None]:
        high = knob.high
        if knob.name == "max_model_len":
            high = float(self.model.max_context)
        if knob.name == "VLLM_CPU_KVCACHE_SPACE" and self.hw.memory_gib:
            high = max(1.0, float(int(self.hw.memory_gib * 0.75)))
        return knob.low, high

    def default(self, knob: Knob) -> Scalar:
        value = knob.default_for(self.hw)
        if self.vllm is not None and knob.target == "config" and knob.kind != "choice":
            info = self.vllm.args.get(knob.name)
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
        raw: Scalar
        if knob.target == "config":
            raw = recipe.config.get(knob.name)
        elif knob.target == "quant":
            raw = recipe.quant.method if knob.name == "quant_method" else getattr(
                recipe.quant, knob.name)
            return raw
        elif knob.target == "kernel":
            raw = getattr(recipe.kernel, knob.name)
        elif knob.target == "compilation":
            raw = recipe.kernel.compilation_config.get(knob.name)
        else:
            env_raw = recipe.kernel.env.get(knob.name)
            raw = _parse_env(knob, env_raw) if env_raw is not None else None
        return self.default(knob) if raw is None else raw

    def effective(self, recipe: Recipe, layer: Layer | None = None) -> dict[str, Scalar]:
        return {k.name: self.value(recipe, k) for k in self.knobs(layer)}

    def apply(self, recipe: Recipe, changes: Mapping[str, Scalar]) -> Recipe:
        """A child recipe with `changes` applied; values equal to the default are dropped
        so the id reflects the effective settings."""
        config = dict(recipe.config)
        quant = recipe.quant.model_dump()
        kernel = recipe.kernel.model_dump()
        for name, value in changes.items():
            knob = get(name)
            is_default = value == self.default(knob)
            if knob.target == "config":
                config.pop(name, None)
                if not is_default:
                    config[name] = value
            elif knob.target == "quant":
                quant["method" if name == "quant_method" else name] = value
            elif knob.target == "kernel":
                kernel[name] = None if is_default else value
            elif knob.target == "compilation":
                kernel["compilation_config"].pop(name, None)
                if not is_default:
                    kernel["compilation_config"][name] = value
            else:
                kernel["env"].pop(name, None)
                if not is_default:
                    kernel["env"][name] = str(value).lower() if isinstance(
                        value, bool) else str(value)
        return recipe.child(config=config, quant=QuantSettings(**quant),
                            kernel=KernelSettings(**kernel))

    def check_recipe(self, recipe: Recipe, source: str = "recipe") -> Recipe:
        """Reject unknown or invalid settings in a user-supplied recipe; return it
        normalised (defaults dropped)."""
        changes: dict[str, Scalar] = {}
        for name, value in recipe.config.items():
            knob = KNOBS.get(name)
            if knob is None or knob.target != "config":
                valid = ", ".join(k.name for k in REGISTRY if k.target == "config")
                raise RecipeError(f"{source}: unknown key 'config.{name}'; valid keys: "
                                  f"{valid}")
            changes[name] = value
        for name, raw in recipe.kernel.env.items():
            env_knob = KNOBS.get(name)
            if env_knob is None or env_knob.target != "env":
                valid = ", ".join(k.name for k in REGISTRY if k.target == "env")
                raise RecipeError(f"{source}: environment variable '{name}' is not "
                                  f"allow-listed; allowed: {valid}")
            changes[name] = _parse_env(env_knob, raw)
        for name, value in recipe.kernel.compilation_config.items():
            if name not in KNOBS or KNOBS[name].target != "compilation":
                valid = ", ".join(k.name for k in REGISTRY if k.target == "compilation")
                raise RecipeError(f"{source}: unknown key 'kernel.compilation_config."
                                  f"{name}'; valid keys: {valid}")
            changes[name] = value
        if recipe.quant.method != "none" and recipe.quant.checkpoint is None:
            changes["quant_method"] = recipe.quant.method
        if recipe.quant.kv_cache_dtype != "auto":
            changes["kv_cache_dtype"] = recipe.quant.kv_cache_dtype
        if recipe.kernel.attention_backend is not None:
            changes["attention_backend"] = recipe.kernel.attention_backend
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


def _parse_env(knob: Knob, raw: str) -> Scalar:
    if knob.kind == "int":
        try:
            return int(raw)
        except ValueError:
            raise KnobError(f"{knob.name} must be an integer, got {raw!r}") from None
    return raw
