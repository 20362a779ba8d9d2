"""recipe.yaml: the one artifact the agent mutates. Three layers of vLLM settings, a
content-hash id, YAML round trip and diff. Rendering to argv + env for `vllm serve` lives
with the knob declarations, in space/rendering.py."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from aevyra_forge.core.errors import RecipeError
from aevyra_forge.core.values import SCHEMA_VERSION, Scalar

ConfigValue = int | float | bool | str | None
_KEY = re.compile(r"^[a-z][a-z0-9_]*$")  # vLLM engine argument names, snake_case
_ENV_KEY = re.compile(r"^[A-Z][A-Z0-9_]*$")


def _safe_text(value: object, what: str) -> None:
    """Text that becomes one argv element: no control characters, no leading dash."""
    if isinstance(value, str) and (any(ord(c) < 32 or ord(c) == 127 for c in value)
                                   or value.startswith("-")):
        raise ValueError(f"{what} must be plain text without control characters or a "
                         f"leading '-': {value[:40]!r}")


class QuantSettings(BaseModel):
    """Layer 2. `checkpoint` is a pre-quantized hub id or a local path; when it is set,
    vLLM detects the method from the checkpoint and `method` is informational."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: str = "none"
    checkpoint: str | None = None
    kv_cache_dtype: str = "auto"

    @field_validator("method", "checkpoint", "kv_cache_dtype")
    @classmethod
    def _plain(cls, v: str | None) -> str | None:
        _safe_text(v, "quant setting")
        return v


class KernelSettings(BaseModel):
    """Layer 3. `env` holds allow-listed environment variables only (KnobSpace.check_recipe
    checks them against the registry)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    attention_backend: str | None = None
    compilation_config: dict[str, Scalar] = Field(default_factory=dict)
    env: dict[str, str] = Field(default_factory=dict)

    @field_validator("attention_backend")
    @classmethod
    def _backend(cls, v: str | None) -> str | None:
        _safe_text(v, "attention_backend")
        return v

    @field_validator("compilation_config")
    @classmethod
    def _compilation(cls, v: dict[str, Scalar]) -> dict[str, Scalar]:
        for key, value in v.items():
            if not _KEY.match(key):
                raise ValueError(f"compilation_config key {key!r} is not snake_case")
            _safe_text(value, f"compilation_config.{key}")
        return v

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            if not _ENV_KEY.match(key):
                raise ValueError(f"environment variable name {key!r} is not UPPER_CASE")
            if any(ord(c) < 32 for c in value):
                raise ValueError(f"{key} contains control characters")
        return v


class Recipe(BaseModel):
    """A complete description of one vLLM deployment. `config` holds only the engine
    arguments that differ from vLLM's defaults on this hardware (KnobSpace.apply and
    check_recipe keep it that way), so equal deployments share an id."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: int = SCHEMA_VERSION
    id: str = ""
    parent_id: str | None = None
    generation: int = 0
    model: str
    config: dict[str, ConfigValue] = Field(default_factory=dict)
    quant: QuantSettings = QuantSettings()
    kernel: KernelSettings = KernelSettings()

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("model must not be empty")
        _safe_text(v, "model")
        return v

    @field_validator("config")
    @classmethod
    def _config(cls, v: dict[str, ConfigValue]) -> dict[str, ConfigValue]:
        for key, value in v.items():
            if not _KEY.match(key):
                raise ValueError(f"config key {key!r} is not a vLLM argument name "
                                 "(snake_case)")
            _safe_text(value, f"config.{key}")
        return v

    def model_post_init(self, context: Any, /) -> None:
        object.__setattr__(self, "id", content_id(self))

    @property
    def serve_model(self) -> str:
        """What `vllm serve` loads: the quantized checkpoint when there is one."""
        return self.quant.checkpoint or self.model

    def settings(self) -> dict[str, Any]:
        """The effective settings the id is computed from (no lineage fields)."""
        return {
            "model": self.model,
            "config": dict(sorted(self.config.items())),
            "quant": self.quant.model_dump(),
            "kernel": self.kernel.model_dump(),
        }

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)

    def child(self, **updates: Any) -> Recipe:
        """A new recipe derived from this one: lineage advances, id is recomputed."""
        data = self.to_dict()
        data.update(updates)
        data["parent_id"] = self.id
        data["generation"] = self.generation + 1
        data.pop("id", None)
        return Recipe.model_validate(data)


def content_id(recipe: Recipe) -> str:
    blob = json.dumps(recipe.settings(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def recipe_from_dict(data: Mapping[str, Any], source: str = "recipe") -> Recipe:
    """Validate a mapping as a recipe; errors name the bad key and the valid ones."""
    if not isinstance(data, Mapping):
        raise RecipeError(f"{source}: expected a mapping at the top level")
    version = data.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise RecipeError(
            f"{source}: schema_version {version} is not supported (this forge reads "
            f"{SCHEMA_VERSION}); upgrade aevyra-forge"
        )
    clean = {k: v for k, v in data.items() if k != "id"}
    try:
        return Recipe.model_validate(clean)
    except ValidationError as exc:
        raise RecipeError(f"{source}: {_describe(exc)}") from None


def load_recipe(path: Path, model: str | None = None) -> Recipe:
    """A recipe.yaml. With `model` (--model), the recipe serves that model: it may leave
    `model:` out, and naming another one is refused rather than silently overriding it."""
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found; pass the path of a recipe.yaml")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise RecipeError(f"{path}{where}: not valid YAML ({_first_line(exc)})") from None
    data = data or {}
    if model is not None and isinstance(data, Mapping):
        named = data.get("model")
        if named is not None and named != model:
            raise RecipeError(f"{path}: the recipe serves model {named!r} but --model is "
                              f"{model!r}; make them agree, or drop `model:` from the recipe")
        data = {**data, "model": model}
    return recipe_from_dict(data, source=str(path))


def _describe(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        parent: type[BaseModel] = Recipe
        if len(err["loc"]) == 2 and err["loc"][0] == "quant":
            parent = QuantSettings
        elif len(err["loc"]) == 2 and err["loc"][0] == "kernel":
            parent = KernelSettings
        valid = ", ".join(k for k in parent.model_fields if k != "id")
        return f"unknown key '{loc}'; valid keys here: {valid}"
    if err["type"] == "missing":
        return f"missing required key '{loc}'"
    return f"{loc}: {err['msg']}"


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def diff(old: Recipe, new: Recipe) -> dict[str, tuple[Any, Any]]:
    """Dotted path -> (old, new) for every setting that differs."""
    out: dict[str, tuple[Any, Any]] = {}
    _diff_into(out, "", old.settings(), new.settings())
    return out


def _diff_into(out: dict[str, tuple[Any, Any]], prefix: str, a: Any, b: Any) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            _diff_into(out, f"{prefix}{key}" if not prefix else f"{prefix}.{key}",
                       a.get(key), b.get(key))
    elif a != b:
        out[prefix] = (a, b)

