"""Tests for aevyra_forge.space.rendering: a recipe as `vllm serve` receives it (argv in
recipe.yaml's order, the extra environment), whatever text a recipe holds."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from aevyra_forge.core.errors import RecipeError
from aevyra_forge.core.recipe import KernelSettings, QuantSettings, Recipe, recipe_from_dict
from aevyra_forge.space.rendering import render
from tests.builders import full_recipe

MODEL = "meta-llama/Llama-3.2-1B-Instruct"




def test_render_full() -> None:
    argv, env = render(full_recipe())
    assert argv == [
        MODEL,
        "--no-enable-prefix-caching",
        "--enforce-eager",
        "--gpu-memory-utilization", "0.92",
        "--max-num-seqs", "128",
        "--kv-cache-dtype", "fp8",
        "--attention-backend", "FLASHINFER",
        "--compilation-config", argv[-1],
    ]
    assert json.loads(argv[-1]) == {"cudagraph_mode": "PIECEWISE", "level": 3}
    assert env == {"VLLM_CPU_KVCACHE_SPACE": "8"}


def test_render_baseline_is_just_the_model() -> None:
    assert render(Recipe(model=MODEL)) == ([MODEL], {})


def test_render_booleans_none_and_keys_no_knob_declares() -> None:
    # enable_chunked_prefill is no knob (always on in V1), yet a user's recipe may hold it
    argv, _ = render(Recipe(model=MODEL, config={"enable_chunked_prefill": True,
                                                 "enable_prefix_caching": False,
                                                 "max_model_len": None}))
    assert argv == [MODEL, "--enable-chunked-prefill", "--no-enable-prefix-caching"]
    assert not any("max-model-len" in a for a in argv)


def test_quantized_checkpoint_replaces_model_without_quantization_flag() -> None:
    recipe = Recipe(model=MODEL, quant=QuantSettings(method="awq",
                                                     checkpoint="acme/Llama-3.2-1B-AWQ"))
    argv, _ = render(recipe)
    assert recipe.serve_model == "acme/Llama-3.2-1B-AWQ"
    assert argv == ["acme/Llama-3.2-1B-AWQ"]
    assert "--quantization" not in argv
    assert MODEL not in argv


def test_on_the_fly_quantization_is_passed() -> None:
    argv, _ = render(Recipe(model=MODEL, quant=QuantSettings(method="fp8")))
    assert argv == [MODEL, "--quantization", "fp8"]


def test_every_recipe_field_in_recipe_yaml_order() -> None:
    recipe = Recipe(model=MODEL, config={"max_num_seqs": 8},
                    quant=QuantSettings(method="fp8", kv_cache_dtype="fp8_e5m2"),
                    kernel=KernelSettings(attention_backend="TRITON_ATTN",
                                          compilation_config={"cudagraph_mode": "NONE"},
                                          env={"VLLM_CPU_OMP_THREADS_BIND": "nobind"}))
    assert render(recipe) == (
        [MODEL, "--max-num-seqs", "8", "--quantization", "fp8", "--kv-cache-dtype", "fp8_e5m2",
         "--attention-backend", "TRITON_ATTN", "--compilation-config",
         '{"cudagraph_mode": "NONE"}'],
        {"VLLM_CPU_OMP_THREADS_BIND": "nobind"})


def test_an_empty_attention_backend_passes_no_flag() -> None:
    recipe = Recipe(model=MODEL, kernel=KernelSettings(attention_backend=""))
    assert render(recipe) == ([MODEL], {})


# -- properties -----------------------------------------------------------------------------

RENDERED_BY_RECIPE = {"quantization", "kv_cache_dtype", "attention_backend", "compilation_config"}
identifier = st.from_regex(r"[a-z][a-z0-9_]{0,20}", fullmatch=True).filter(
    lambda k: k not in RENDERED_BY_RECIPE)
safe_text = st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")),
                    min_size=1, max_size=30).filter(lambda t: not t.startswith("-"))
config_value = st.one_of(st.none(), st.booleans(), st.integers(), safe_text,
                         st.floats(allow_nan=False, allow_infinity=False))


@given(st.dictionaries(identifier, config_value, max_size=6),
       st.dictionaries(identifier, st.one_of(st.booleans(), st.integers(), safe_text),
                       max_size=3),
       st.one_of(st.none(), safe_text), st.sampled_from(["auto", "fp8"]),
       st.one_of(st.none(), safe_text))
@settings(max_examples=150, deadline=None)
def test_render_argv_is_a_flat_list_of_single_line_strings(
        config: dict[str, Any], compilation: dict[str, Any], backend: str | None,
        kv: str, checkpoint: str | None) -> None:
    recipe = Recipe(model=MODEL, config=config,
                    quant=QuantSettings(method="awq", checkpoint=checkpoint, kv_cache_dtype=kv),
                    kernel=KernelSettings(attention_backend=backend,
                                          compilation_config=compilation))
    argv, env = render(recipe)
    assert isinstance(argv, list)
    assert all(type(a) is str for a in argv)
    assert not any("\n" in a or "\x00" in a for a in argv)
    assert argv[0] == (checkpoint or MODEL)
    flags = [a for a in argv if a.startswith("--")]
    expected = {("--no-" if v is False else "--") + k.replace("_", "-")
                for k, v in config.items() if v is not None}
    assert expected <= set(flags)
    assert ("--quantization" in argv) == (checkpoint is None)
    assert env == {}
    if compilation:
        assert json.loads(argv[argv.index("--compilation-config") + 1]) == compilation


@given(st.text(max_size=12), st.text(max_size=12))
@settings(max_examples=200, deadline=None)
def test_render_never_emits_newlines_or_nul_even_from_odd_strings(key: str,
                                                                  value: str) -> None:
    try:
        recipe = recipe_from_dict({"model": MODEL, "config": {key: value},
                                   "kernel": {"attention_backend": value}})
        argv, _ = render(recipe)
    except RecipeError:
        return  # refusing the recipe is a fine answer
    assert not any("\n" in a or "\x00" in a for a in argv)


# -- a real deployment as the starting point (--recipe) --------------------------------------

DEPLOYMENT = """\
model: meta-llama/Llama-3.2-1B-Instruct
config:
  trust_remote_code: true
  served_model_name: chat-prod
  max_model_len: 8192
  enable_chunked_prefill: false
  seed: 1234
  max_num_seqs: 128
  disable_log_stats: true
"""


def _deployment(tmp_path: Any) -> Recipe:
    from aevyra_forge.core.recipe import load_recipe
    from aevyra_forge.space.gpu_catalogue import gpu_spec
    from aevyra_forge.space.knob_space import KnobSpace
    from aevyra_forge.space.model_profile import profile

    path = tmp_path / "deploy.yaml"
    path.write_text(DEPLOYMENT)
    space = KnobSpace(gpu_spec("A100-80GB").hardware(), profile(MODEL), simulated=True)
    return space.check_recipe(load_recipe(path, MODEL), str(path))


def test_a_deployment_recipe_renders_every_fixed_argument_as_given(tmp_path: Any) -> None:
    from aevyra_forge.space.rendering import serve_argv, served_name

    recipe = _deployment(tmp_path)
    argv, env = serve_argv(recipe, "127.0.0.1", 8000)
    assert argv == [
        MODEL,
        "--disable-log-stats",
        "--no-enable-chunked-prefill",
        "--max-model-len", "8192",
        "--max-num-seqs", "128",
        "--seed", "1234",
        "--served-model-name", "chat-prod",
        "--trust-remote-code",
        "--host", "127.0.0.1", "--port", "8000",  # the server answers to its own name
    ]
    assert env == {} and served_name(recipe) == "chat-prod"
    assert serve_argv(Recipe(model=MODEL), "h", 1)[0][-2:] == ["--served-model-name", MODEL]


def test_fixed_arguments_are_never_tuned_and_survive_every_change(tmp_path: Any) -> None:
    from aevyra_forge.core.errors import KnobError
    from aevyra_forge.space.gpu_catalogue import gpu_spec
    from aevyra_forge.space.knob_space import KnobSpace
    from aevyra_forge.space.model_profile import profile

    space = KnobSpace(gpu_spec("A100-80GB").hardware(), profile(MODEL), simulated=True)
    recipe = _deployment(tmp_path)
    child = space.apply(recipe, {"max_num_seqs": 64, "max_model_len": 4096})  # knobs
    assert {k: child.config[k] for k in ("trust_remote_code", "served_model_name", "seed",
                                         "enable_chunked_prefill", "disable_log_stats")} == {
        "trust_remote_code": True, "served_model_name": "chat-prod", "seed": 1234,
        "enable_chunked_prefill": False, "disable_log_stats": True}
    assert child.config["max_num_seqs"] == 64 and child.config["max_model_len"] == 4096
    for name in ("trust_remote_code", "seed", "served_model_name"):
        assert name not in {k.name for k in space.knobs()}
        try:
            space.check(name, 1)
        except KnobError:
            continue
        raise AssertionError(f"{name} was accepted as a change")
