"""Tests for aevyra_forge.space.placement: reading, writing and rendering each kind of
place a knob can live in a recipe, on its own (the registry's knobs are tested through
test_registry.py)."""

from __future__ import annotations

import pytest

from aevyra_forge.core.errors import KnobError
from aevyra_forge.core.recipe import KernelSettings, QuantSettings, Recipe
from aevyra_forge.core.values import Scalar
from aevyra_forge.space.placement import EnvVar, RecipeField, layout_position
from aevyra_forge.space.registry import ANY, Knob, KnobKind

MODEL = "acme/model"


def env_knob(kind: KnobKind) -> Knob:
    return Knob("VLLM_TEST", 3, kind, EnvVar(), "An environment variable for the tests.",
                {ANY: None})


@pytest.mark.parametrize(("kind", "raw", "value"), [
    ("int", "8", 8), ("float", "0.5", 0.5), ("bool", "true", True), ("bool", "0", False),
    ("choice", "nobind", "nobind"),
])
def test_env_text_is_read_as_the_knobs_kind(kind: KnobKind, raw: str, value: Scalar) -> None:
    knob = env_knob(kind)
    recipe = Recipe(model=MODEL, kernel=KernelSettings(env={"VLLM_TEST": raw}))
    assert EnvVar().read(recipe, knob) == value
    draft = Recipe(model=MODEL).to_dict()
    EnvVar().write(draft, knob, value, is_default=False)
    assert draft["kernel"]["env"] == {"VLLM_TEST": raw if kind != "bool" else str(value).lower()}


@pytest.mark.parametrize(("kind", "raw", "reason"), [
    ("int", "eight", "must be an integer"), ("float", "half", "must be a number"),
    ("bool", "yes", "must be true or false"),
])
def test_env_text_of_the_wrong_kind_is_refused(kind: KnobKind, raw: str, reason: str) -> None:
    recipe = Recipe(model=MODEL, kernel=KernelSettings(env={"VLLM_TEST": raw}))
    with pytest.raises(KnobError, match=f"VLLM_TEST {reason}, got '{raw}'"):
        EnvVar().read(recipe, env_knob(kind))


def test_a_field_without_checkpoint_is_neither_set_nor_passed_beside_one() -> None:
    field = RecipeField(("quant", "method"), "--quantization", ("none",), with_checkpoint=False)
    on_the_fly = Recipe(model=MODEL, quant=QuantSettings(method="fp8"))
    assert field.keys_set(on_the_fly) == ["method"]
    assert field.render(on_the_fly) == (["--quantization", "fp8"], {})
    served = Recipe(model=MODEL, quant=QuantSettings(method="awq", checkpoint="acme/m-awq"))
    assert field.keys_set(served) == []
    assert field.render(served) == ([], {})
    assert field.engine_arg(env_knob("choice")) == "quantization"


def test_layout_position_is_recipe_yaml_order_and_refuses_other_paths() -> None:
    assert layout_position(("config",)) < layout_position(("quant", "method")) \
        < layout_position(("kernel", "env"))
    for path in [("kernel", "envs"), ("config", "max_num_seqs")]:
        with pytest.raises(ValueError, match="is not a place in a recipe"):
            layout_position(path)
