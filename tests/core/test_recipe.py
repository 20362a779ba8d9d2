"""Tests for aevyra_forge.core.recipe: YAML round trip, content ids, lineage, diff, and the
errors a hand-edited recipe gets (rendering is tested in tests/space/test_rendering.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from aevyra_forge.core.errors import RecipeError
from aevyra_forge.core.recipe import (
    KernelSettings,
    QuantSettings,
    Recipe,
    diff,
    load_recipe,
    recipe_from_dict,
)
from aevyra_forge.core.values import SCHEMA_VERSION
from tests.builders import full_recipe

MODEL = "meta-llama/Llama-3.2-1B-Instruct"


# -- YAML round trip and ids -----------------------------------------------------------------

def test_yaml_round_trip_keeps_everything(tmp_path: Path) -> None:
    recipe = full_recipe().child(config={"max_num_seqs": 64})
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe.to_yaml())
    loaded = load_recipe(path)
    assert loaded == recipe
    assert loaded.id == recipe.id
    assert loaded.parent_id == recipe.parent_id is not None
    assert loaded.generation == 1
    data = yaml.safe_load(path.read_text())
    assert list(data)[:2] == ["schema_version", "id"]
    assert data["id"] == recipe.id
    assert data["schema_version"] == SCHEMA_VERSION


def test_id_is_a_short_hex_content_hash() -> None:
    rid = Recipe(model=MODEL).id
    assert len(rid) == 8
    int(rid, 16)


def test_stored_id_is_ignored_and_recomputed(tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(f"id: deadbeef\nmodel: {MODEL}\nconfig:\n  max_num_seqs: 64\n")
    loaded = load_recipe(path)
    assert loaded.id != "deadbeef"
    assert loaded.id == Recipe(model=MODEL, config={"max_num_seqs": 64}).id


def test_equal_settings_equal_id_regardless_of_lineage_and_key_order() -> None:
    a = Recipe(model=MODEL, config={"max_num_seqs": 64, "block_size": 32})
    b = Recipe(model=MODEL, config={"block_size": 32, "max_num_seqs": 64},
               parent_id="0badc0de", generation=7)
    assert a.id == b.id
    c = recipe_from_dict({"kernel": {}, "config": {"block_size": 32, "max_num_seqs": 64},
                          "generation": 2, "model": MODEL})
    assert c.id == a.id


@pytest.mark.parametrize("other", [
    Recipe(model=MODEL, config={"max_num_seqs": 65, "block_size": 32}),
    Recipe(model=MODEL + "-x", config={"max_num_seqs": 64, "block_size": 32}),
    Recipe(model=MODEL, config={"max_num_seqs": 64, "block_size": 32},
           quant=QuantSettings(kv_cache_dtype="fp8")),
    Recipe(model=MODEL, config={"max_num_seqs": 64, "block_size": 32},
           kernel=KernelSettings(env={"X": "1"})),
    Recipe(model=MODEL, config={"max_num_seqs": 64}),
])
def test_different_settings_different_id(other: Recipe) -> None:
    assert other.id != Recipe(model=MODEL, config={"max_num_seqs": 64, "block_size": 32}).id


def test_child_advances_lineage() -> None:
    parent = Recipe(model=MODEL, generation=3)
    child = parent.child(config={"max_num_seqs": 32})
    assert child.parent_id == parent.id
    assert child.generation == 4
    assert child.config == {"max_num_seqs": 32}
    assert child.id != parent.id
    assert parent.config == {}  # the parent is untouched
    grandchild = child.child()
    assert (grandchild.parent_id, grandchild.generation) == (child.id, 5)
    assert grandchild.id == child.id  # same settings, same id


def test_diff() -> None:
    old = Recipe(model=MODEL, config={"max_num_seqs": 64, "block_size": 32})
    new = old.child(config={"max_num_seqs": 128, "enforce_eager": True},
                    quant=QuantSettings(kv_cache_dtype="fp8"),
                    kernel=KernelSettings(compilation_config={"cudagraph_mode": "NONE"}))
    assert diff(old, new) == {
        "config.block_size": (32, None),
        "config.enforce_eager": (None, True),
        "config.max_num_seqs": (64, 128),
        "kernel.compilation_config.cudagraph_mode": (None, "NONE"),
        "quant.kv_cache_dtype": ("auto", "fp8"),
    }
    assert diff(old, old.child()) == {}


# -- errors ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("data", "bad", "valid"), [
    ({"model": MODEL, "confg": {}}, "'confg'",
     "schema_version, parent_id, generation, model, config, quant, kernel"),
    ({"model": MODEL, "quant": {"methd": "awq"}}, "'quant.methd'",
     "method, checkpoint, kv_cache_dtype"),
    ({"model": MODEL, "kernel": {"envs": {}}}, "'kernel.envs'",
     "attention_backend, compilation_config, env"),
])
def test_unknown_keys_list_valid_keys(data: dict[str, Any], bad: str, valid: str) -> None:
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(data, source="r.yaml")
    msg = str(info.value)
    assert msg.startswith("r.yaml: unknown key " + bad)
    assert msg.endswith("valid keys here: " + valid)


def test_missing_model() -> None:
    with pytest.raises(RecipeError, match="recipe: missing required key 'model'"):
        recipe_from_dict({"config": {}})


def test_wrong_schema_version() -> None:
    with pytest.raises(RecipeError, match=r"schema_version 99 is not supported.*upgrade"):
        recipe_from_dict({"schema_version": 99, "model": MODEL})


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="expected a mapping at the top level"):
        load_recipe(path)


def test_bad_value_type_names_the_key() -> None:
    with pytest.raises(RecipeError, match=r"recipe: generation: "):
        recipe_from_dict({"model": MODEL, "generation": "first"})


def test_bad_yaml_reports_the_line(tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(f"model: {MODEL}\n  quant: indented\nconfig: {{}}\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}:2: not valid YAML (")
    assert "\n" not in msg


def test_missing_recipe_file(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_empty_recipe_file_needs_a_model(tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text("")
    with pytest.raises(RecipeError, match="missing required key 'model'"):
        load_recipe(path)


# -- --model and the recipe's model --------------------------------------------------------

def test_a_recipe_without_a_model_serves_the_one_given(tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text("config:\n  seed: 3\n")
    recipe = load_recipe(path, MODEL)
    assert recipe.model == MODEL and recipe.config == {"seed": 3}
    path.write_text("")
    assert load_recipe(path, MODEL) == Recipe(model=MODEL)


def test_a_recipe_naming_another_model_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text("model: Qwen/Qwen2.5-7B-Instruct\n")
    with pytest.raises(RecipeError) as exc:
        load_recipe(path, MODEL)
    assert str(exc.value) == (f"{path}: the recipe serves model 'Qwen/Qwen2.5-7B-Instruct' "
                              f"but --model is '{MODEL}'; make them agree, or drop `model:` "
                              "from the recipe")
    path.write_text(f"model: {MODEL}\n")
    assert load_recipe(path, MODEL) == Recipe(model=MODEL)  # agreeing is fine


def test_ids_of_recipes_without_fixed_arguments_did_not_move() -> None:
    """Runs recorded before recipes could fix engine arguments keep their ids."""
    assert Recipe(model=MODEL).id == "9b54e7a4"
    assert Recipe(model=MODEL, config={"max_num_seqs": 64}).id == "d02b9d55"
