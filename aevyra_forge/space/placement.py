"""Where a knob lives in a recipe and how vLLM receives it: an engine argument in `config`,
a field of `quant` or `kernel` with its own flag, a field of `compilation_config`, an
allow-listed environment variable, or a kernel plug-in's settings. Every knob names one;
reading, writing, checking and rendering a recipe go through it, so a new kind of place
is one more class here."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from aevyra_forge.core.errors import KnobError
from aevyra_forge.core.recipe import ConfigValue, Recipe
from aevyra_forge.core.values import Scalar

if TYPE_CHECKING:
    from aevyra_forge.space.plugins import KernelCandidate
    from aevyra_forge.space.registry import Knob

Draft = dict[str, Any]  # a recipe as Recipe.to_dict() gives it, being edited
Rendered = tuple[list[str], dict[str, str]]  # argv elements, environment variables


class Placement(ABC):
    """One place in a recipe. `path` names it as recipe.yaml does; placements with the
    same path render once, between the others in recipe.yaml's key order."""

    path: tuple[str, ...]

    @abstractmethod
    def key(self, knob: Knob) -> str:
        """The knob's key at this place."""

    @abstractmethod
    def read(self, recipe: Recipe, knob: Knob) -> Scalar:
        """The knob's value as the recipe holds it; None when unset."""

    @abstractmethod
    def write(self, draft: Draft, knob: Knob, value: Scalar, is_default: bool) -> None:
        """Set the knob in `draft`, leaving it unset when `value` is the default."""

    @abstractmethod
    def keys_set(self, recipe: Recipe) -> list[str]:
        """The keys a recipe sets here, known to the registry or not."""

    @abstractmethod
    def engine_arg(self, knob: Knob) -> str | None:
        """The vLLM engine argument (snake_case) the knob needs; None when there is none."""

    @abstractmethod
    def render(self, recipe: Recipe) -> Rendered:
        """Everything the recipe holds at this place, as argv and environment."""

    def value_arg(self, knob: Knob) -> str | None:
        """The engine argument whose value is the knob's own, so that its choices and
        default as this vLLM lists them apply to the knob; None when there is none."""
        return self.engine_arg(knob)

    def unknown(self, key: str, valid: str) -> str:
        """Why a recipe may not set `key` here; `valid` lists the keys it may set."""
        return f"unknown key '{'.'.join(self.path)}.{key}'; valid keys: {valid}"


def _get(obj: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
    return obj


class _Entry(Placement):
    """A key, named as the knob, of the mapping at `path`."""

    def key(self, knob: Knob) -> str:
        return knob.name

    def read(self, recipe: Recipe, knob: Knob) -> Scalar:
        value: Scalar = _get(recipe, self.path).get(knob.name)
        return value

    def write(self, draft: Draft, knob: Knob, value: Scalar, is_default: bool) -> None:
        mapping = _get(draft, self.path)
        mapping.pop(knob.name, None)
        if not is_default:
            mapping[knob.name] = self.encode(value)

    def encode(self, value: Scalar) -> Scalar:
        return value

    def keys_set(self, recipe: Recipe) -> list[str]:
        return list(_get(recipe, self.path))


@dataclass(frozen=True)
class EngineArg(_Entry):
    """An engine argument in `config`, named as vLLM names it: `--max-num-seqs 64`, and
    `--x` / `--no-x` for booleans. Keys no knob declares (a user's deployment) render
    the same way."""

    path: tuple[str, ...] = ("config",)

    def engine_arg(self, knob: Knob) -> str | None:
        return knob.name

    def render(self, recipe: Recipe) -> Rendered:
        argv: list[str] = []
        for name, value in sorted(recipe.config.items()):
            argv.extend(_flag(name, value))
        return argv, {}


@dataclass(frozen=True)
class CompilationField(_Entry):
    """A field of `kernel.compilation_config`, passed as one JSON `--compilation-config`."""

    path: tuple[str, ...] = ("kernel", "compilation_config")

    def engine_arg(self, knob: Knob) -> str | None:
        return "compilation_config"

    def value_arg(self, knob: Knob) -> str | None:
        return None  # the argument's value is the whole JSON object

    def render(self, recipe: Recipe) -> Rendered:
        config = recipe.kernel.compilation_config
        if not config:
            return [], {}
        return ["--compilation-config", json.dumps(config, sort_keys=True)], {}


@dataclass(frozen=True)
class EnvVar(_Entry):
    """An allow-listed environment variable in `kernel.env`, named as the knob; vLLM has
    no argument for it. The recipe stores text; reading parses it by the knob's kind."""

    path: tuple[str, ...] = ("kernel", "env")

    def engine_arg(self, knob: Knob) -> str | None:
        return None

    def read(self, recipe: Recipe, knob: Knob) -> Scalar:
        raw = recipe.kernel.env.get(knob.name)
        return None if raw is None else _parse_env(knob, raw)

    def encode(self, value: Scalar) -> Scalar:
        return str(value).lower() if isinstance(value, bool) else str(value)

    def render(self, recipe: Recipe) -> Rendered:
        return [], dict(recipe.kernel.env)

    def unknown(self, key: str, valid: str) -> str:
        return f"environment variable '{key}' is not allow-listed; allowed: {valid}"


@dataclass(frozen=True)
class RecipeField(Placement):
    """One of the recipe's own fields (e.g. `quant.kv_cache_dtype`), passed as its own vLLM
    flag. `unset` holds the values that leave the choice to vLLM and pass no flag; the
    first is the field's default, written when the knob returns to its default. Any other
    value counts as set, so that checking a recipe sees (and refuses) an odd one."""

    path: tuple[str, ...]
    flag: str
    unset: tuple[ConfigValue, ...]
    with_checkpoint: bool = True  # False: ignored while a pre-quantized checkpoint is served

    def key(self, knob: Knob) -> str:
        return self.path[-1]

    def read(self, recipe: Recipe, knob: Knob) -> Scalar:
        value: Scalar = _get(recipe, self.path)
        return value

    def write(self, draft: Draft, knob: Knob, value: Scalar, is_default: bool) -> None:
        _get(draft, self.path[:-1])[self.path[-1]] = self.unset[0] if is_default else value

    def _applies(self, recipe: Recipe) -> bool:
        return self.with_checkpoint or recipe.quant.checkpoint is None

    def keys_set(self, recipe: Recipe) -> list[str]:
        set_here = _get(recipe, self.path) != self.unset[0] and self._applies(recipe)
        return [self.path[-1]] if set_here else []

    def engine_arg(self, knob: Knob) -> str | None:
        return self.flag.removeprefix("--").replace("-", "_")

    def render(self, recipe: Recipe) -> Rendered:
        value = _get(recipe, self.path)
        if value in self.unset or not self._applies(recipe):
            return [], {}
        return [self.flag, str(value)], {}


PLUGINS_ENV = "VLLM_PLUGINS"
NO_PLUGIN = "none"


@dataclass(frozen=True)
class PluginSlot(EnvVar):
    """A kernel plug-in candidate (space/plugins.py), chosen by name: the recipe holds what
    it sets, literally (VLLM_PLUGINS and its switches in `kernel.env`, its serve arguments
    in `config`), so a recipe renders and deploys without the plug-in's generator. The
    registry's slot has no candidates; KnobSpace gives each run its own."""

    candidates: tuple[KernelCandidate, ...] = ()
    user_plugins: tuple[str, ...] = ()  # the user's own VLLM_PLUGINS, kept in every boot

    def plugins_value(self, candidate: KernelCandidate) -> str:
        names = [*self.user_plugins, *(p for p in candidate.plugins
                                       if p not in self.user_plugins)]
        return ",".join(names)

    def chosen(self, recipe: Recipe) -> KernelCandidate | None:
        """The candidate whose settings the recipe holds, all of them."""
        env, config = recipe.kernel.env, recipe.config
        for cand in self.candidates:
            if (env.get(PLUGINS_ENV) == self.plugins_value(cand)
                    and all(env.get(k) == v for k, v in cand.env.items())
                    and all(config.get(k) == v for k, v in cand.serve_args.items())):
                return cand
        return None

    def read(self, recipe: Recipe, knob: Knob) -> Scalar:
        """The chosen candidate's name; the raw VLLM_PLUGINS when it matches none of this
        run's (so that checking refuses it); None when the recipe enables no plug-in."""
        if PLUGINS_ENV not in recipe.kernel.env:
            return None
        found = self.chosen(recipe)
        return found.name if found else recipe.kernel.env[PLUGINS_ENV]

    def owned(self, recipe: Recipe) -> tuple[set[str], set[str]]:
        """The `kernel.env` and `config` keys the chosen candidate accounts for."""
        found = self.chosen(recipe)
        if found is None:
            return set(), set()
        return {PLUGINS_ENV, *found.env}, set(found.serve_args)

    def write(self, draft: Draft, knob: Knob, value: Scalar, is_default: bool) -> None:
        env, config = draft["kernel"]["env"], draft["config"]
        for cand in self.candidates:  # whatever candidate the draft held goes first
            for key, val in cand.env.items():
                if env.get(key) == val:
                    env.pop(key)
            for key, arg in cand.serve_args.items():
                if config.get(key) == arg:
                    config.pop(key)
        env.pop(PLUGINS_ENV, None)
        if is_default or value == NO_PLUGIN:
            return
        chosen = next((c for c in self.candidates if c.name == value), None)
        if chosen is None:
            raise KnobError(f"no kernel plug-in candidate named {value!r} in this run")
        env.update({PLUGINS_ENV: self.plugins_value(chosen), **chosen.env})
        config.update(chosen.serve_args)


def layout_position(path: tuple[str, ...]) -> tuple[int, ...]:
    """Where `path` sits in recipe.yaml's key order (config, quant, kernel, then each
    one's fields), which is the order of vLLM's argv."""
    model: type[BaseModel] | None = Recipe
    out: list[int] = []
    for part in path:
        if model is None or part not in model.model_fields:
            raise ValueError(f"{'.'.join(path)} is not a place in a recipe")
        out.append(list(model.model_fields).index(part))
        nested = model.model_fields[part].annotation
        model = nested if isinstance(nested, type) and issubclass(nested, BaseModel) else None
    return tuple(out)


def _flag(name: str, value: ConfigValue) -> list[str]:
    flag = "--" + name.replace("_", "-")
    if value is None:
        return []
    if isinstance(value, bool):
        return [flag] if value else ["--no-" + name.replace("_", "-")]
    return [flag, str(value)]


def _parse_env(knob: Knob, raw: str) -> Scalar:
    if knob.kind == "int":
        try:
            return int(raw)
        except ValueError:
            raise KnobError(f"{knob.name} must be an integer, got {raw!r}") from None
    if knob.kind == "float":
        try:
            return float(raw)
        except ValueError:
            raise KnobError(f"{knob.name} must be a number, got {raw!r}") from None
    if knob.kind == "bool":
        if raw.lower() not in ("true", "false", "1", "0"):
            raise KnobError(f"{knob.name} must be true or false, got {raw!r}")
        return raw.lower() in ("true", "1")
    return raw
