"""Tests for aevyra_forge.space.registry: each knob's declaration (type, range, default,
gate) is sane, and the place it declares decides exactly how it reaches vLLM; a new knob
is one entry."""

from __future__ import annotations

from pathlib import Path

import pytest

from aevyra_forge.core.errors import KnobError, RecipeError
from aevyra_forge.core.recipe import Recipe
from aevyra_forge.core.values import Hardware, Scalar
from aevyra_forge.space import gpu_catalogue
from aevyra_forge.space import registry as knobs
from aevyra_forge.space.knob_space import KnobSpace
from aevyra_forge.space.model_profile import profile
from aevyra_forge.space.placement import CompilationField, EngineArg, EnvVar
from aevyra_forge.space.registry import ANY, KNOBS, NOT_TUNABLE, REGISTRY, Knob, places
from aevyra_forge.space.rendering import render
from aevyra_forge.space.vllm_flags import parse_help

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
PROFILE = profile(MODEL)
HELP = Path(__file__).parent.parent / "data" / "vllm" / "serve_help_all_0.32.0+cpu.txt"

A100 = gpu_catalogue.gpu_spec("A100-80GB").hardware()
H100 = gpu_catalogue.gpu_spec("H100").hardware()
H100X2 = gpu_catalogue.gpu_spec("H100").hardware(count=2)
T4 = gpu_catalogue.gpu_spec("T4").hardware()
MI300X = gpu_catalogue.gpu_spec("MI300X").hardware()
CPU = Hardware(device="cpu", cpu_cores=2, memory_gib=24)


# -- the registry ----------------------------------------------------------------------------

def test_registry_names_unique_and_indexed() -> None:
    assert len(KNOBS) == len(REGISTRY)
    assert all(KNOBS[k.name] is k for k in REGISTRY)
    assert not set(NOT_TUNABLE) & set(KNOBS)


@pytest.mark.parametrize("knob", REGISTRY, ids=[k.name for k in REGISTRY])
def test_registry_entry_is_sane(knob: knobs.Knob) -> None:
    assert knob.note.strip() and len(knob.note) > 20
    assert knob.layer in (1, 2, 3)
    assert knob.default, "every knob needs a default"
    # a default for every hardware class, directly or through ANY
    assert ANY in knob.default or {"cpu", "gpu", "gpu_large"} <= set(knob.default)
    if knob.kind in ("int", "float"):
        assert knob.low is not None and knob.high is not None and knob.low < knob.high
        for value in knob.grid:
            assert isinstance(value, int | float) and not isinstance(value, bool)
            assert knob.low <= value <= knob.high, value
        for value in knob.default.values():
            assert value is None or knob.low <= value <= knob.high  # type: ignore[operator]
    if knob.kind == "int":
        assert all(isinstance(v, int) for v in knob.grid)
    if knob.kind == "choice":
        assert knob.choices
        every_choice = {c for opts in knob.choices.values() for c in opts}
        assert set(knob.grid) <= every_choice
        for hw_class, value in knob.default.items():
            options = (knob.choices.get("cpu", knob.choices.get(ANY, ()))
                       if hw_class == "cpu" else every_choice)
            assert value is None or value in options, (hw_class, value)
    if knob.kind == "bool":
        assert all(isinstance(v, bool) for v in knob.default.values())


def test_get_unknown_knob_lists_known_ones() -> None:
    with pytest.raises(KnobError, match=r"unknown knob 'max_seqs'; known knobs: max_num_seqs"):
        knobs.get("max_seqs")


def test_hw_class() -> None:
    assert [knobs.hw_class(h) for h in (A100, H100, T4, MI300X, CPU)] == [
        "gpu", "gpu_large", "gpu", "gpu_huge", "cpu"]


# -- where each knob lives and how it renders -------------------------------------------------

# knob -> (hardware, a value that is not the default there, argv after the model, env)
RENDERED: dict[str, tuple[Hardware, Scalar, list[str], dict[str, str]]] = {
    "max_num_seqs": (H100, 64, ["--max-num-seqs", "64"], {}),
    "max_num_batched_tokens": (H100, 4096, ["--max-num-batched-tokens", "4096"], {}),
    "gpu_memory_utilization": (H100, 0.92, ["--gpu-memory-utilization", "0.92"], {}),
    "max_model_len": (H100, 8192, ["--max-model-len", "8192"], {}),
    "block_size": (H100, 32, ["--block-size", "32"], {}),
    "enable_prefix_caching": (H100, False, ["--no-enable-prefix-caching"], {}),
    "tensor_parallel_size": (H100X2, 2, ["--tensor-parallel-size", "2"], {}),
    "dtype": (CPU, "float32", ["--dtype", "float32"], {}),
    "VLLM_CPU_KVCACHE_SPACE": (CPU, 8, [], {"VLLM_CPU_KVCACHE_SPACE": "8"}),
    "quant_method": (H100, "fp8", ["--quantization", "fp8"], {}),
    "kv_cache_dtype": (H100, "fp8_e4m3", ["--kv-cache-dtype", "fp8_e4m3"], {}),
    "attention_backend": (H100, "FLASHINFER", ["--attention-backend", "FLASHINFER"], {}),
    "cudagraph_mode": (H100, "PIECEWISE",
                       ["--compilation-config", '{"cudagraph_mode": "PIECEWISE"}'], {}),
    "enforce_eager": (H100, True, ["--enforce-eager"], {}),
    "VLLM_CPU_OMP_THREADS_BIND": (CPU, "nobind", [], {"VLLM_CPU_OMP_THREADS_BIND": "nobind"}),
    "data_parallel_size": (H100X2, 2, ["--data-parallel-size", "2"], {}),
    "long_prefill_token_threshold": (H100, 1024, ["--long-prefill-token-threshold", "1024"],
                                     {}),
    # spec_method brings spec_tokens along (companions), and takes it away again
    "spec_method": (CPU, "ngram", ["--spec-method", "ngram", "--spec-tokens", "3"], {}),
    "optimization_level": (H100, 0, ["--optimization-level", "0"], {}),
    "max_cudagraph_capture_size": (H100, 64, ["--max-cudagraph-capture-size", "64"], {}),
}
# knobs that apply only with another one set (Knob.needs): that one's argv comes first
NEEDS_RENDERED: dict[str, tuple[Hardware, Scalar, list[str]]] = {
    "spec_tokens": (CPU, 5, ["--spec-method", "ngram", "--spec-tokens", "5"]),
}
# knobs whose values exist per run only (kernel plug-ins: tests/space/test_plugins.py)
PER_RUN = {"kernel_plugin", "quant_candidate", "spec_model"}
SLOTS = PER_RUN - {"spec_model"}  # of those, the ones with no vLLM flag of their own


def test_every_knob_has_a_rendering_row() -> None:
    assert set(RENDERED) | set(NEEDS_RENDERED) | PER_RUN == set(KNOBS)


@pytest.mark.parametrize("name", list(NEEDS_RENDERED))
def test_a_knob_that_needs_another_renders_after_it(name: str) -> None:
    hw, value, argv = NEEDS_RENDERED[name]
    knob, sp = KNOBS[name], KnobSpace(hw, PROFILE, simulated=True)
    alone = sp.apply(sp.baseline(MODEL), {name: value})
    with pytest.raises(KnobError, match=rf"{name} applies only with {knob.needs} set"):
        sp.check_combination(alone)
    assert knob.needs is not None
    first = sp.apply(sp.baseline(MODEL), {knob.needs: "ngram"})
    recipe = sp.apply(first, {name: value})
    sp.check_combination(recipe)
    assert render(recipe) == ([MODEL, *argv], {})
    assert sp.check_recipe(recipe).id == recipe.id
    off = sp.apply(recipe, {knob.needs: sp.default(KNOBS[knob.needs])})
    assert render(off) == ([MODEL], {})  # the companion goes with it


@pytest.mark.parametrize("name", list(RENDERED))
def test_knob_renders_where_it_declares(name: str) -> None:
    hw, value, argv, env = RENDERED[name]
    knob, sp = KNOBS[name], KnobSpace(hw, PROFILE, simulated=True)
    base = sp.baseline(MODEL)
    assert value != sp.default(knob)
    recipe = sp.apply(base, {name: value})
    assert render(recipe) == ([MODEL, *argv], env)
    assert sp.value(recipe, knob) == value
    assert sp.check_recipe(recipe).id == recipe.id  # a saved recipe reads back the same
    back = sp.apply(recipe, {name: sp.default(knob)})
    assert render(back) == ([MODEL], {})
    assert back.id == base.id


def test_every_engine_argument_a_knob_needs_is_a_vllm_flag() -> None:
    args = parse_help(HELP.read_text())
    for knob in REGISTRY:
        arg = knob.placement.engine_arg(knob)
        assert (arg is None if isinstance(knob.placement, EnvVar) or knob.name in SLOTS
                else arg in args), knob.name


def test_places_follow_recipe_yaml_order() -> None:
    assert [group[0].placement.path for group in places(REGISTRY)] == [
        ("config",), ("quant", "method"), ("quant", "checkpoint"), ("quant", "kv_cache_dtype"),
        ("kernel", "attention_backend"), ("kernel", "compilation_config"), ("kernel", "env")]


# -- a new knob is one entry -------------------------------------------------------------------

NEW_KNOBS = (
    Knob("cpu_offload_gb", 1, "int", EngineArg(),
         "GiB of weights kept in CPU memory and streamed in.",
         {ANY: 0}, low=0, high=65536, grid=(256, 1024)),
    Knob("cudagraph_num_of_warmups", 3, "int", CompilationField(),
         "Warm-up runs before a CUDA graph is captured.",
         {ANY: 512}, devices=knobs.GPU_DEVICES, low=1, high=4096, grid=(256, 1024)),
    Knob("VLLM_USE_FLASHINFER_SAMPLER", 3, "bool", EnvVar(),
         "Sample with FlashInfer's top-k/top-p kernels instead of PyTorch's.",
         {ANY: False}, devices=knobs.GPU_DEVICES),
)


def test_a_knob_of_each_kind_of_place_is_one_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    for knob in NEW_KNOBS:
        monkeypatch.setitem(KNOBS, knob.name, knob)
    sp = KnobSpace(H100, PROFILE)
    assert {k.name for k in NEW_KNOBS} <= {k.name for k in sp.knobs()}
    base = sp.baseline(MODEL)
    recipe = sp.apply(base, {"cpu_offload_gb": 1024,
                             "cudagraph_num_of_warmups": 256,
                             "VLLM_USE_FLASHINFER_SAMPLER": True})
    assert [sp.value(recipe, k) for k in NEW_KNOBS] == [1024, 256, True]
    assert render(recipe) == (
        [MODEL, "--cpu-offload-gb", "1024",
         "--compilation-config", '{"cudagraph_num_of_warmups": 256}'],
        {"VLLM_USE_FLASHINFER_SAMPLER": "true"})
    assert sp.check_recipe(recipe).id == recipe.id
    back = sp.apply(recipe, {"cpu_offload_gb": 0,
                             "cudagraph_num_of_warmups": 512,
                             "VLLM_USE_FLASHINFER_SAMPLER": False})
    assert back.id == base.id


def test_without_the_entry_the_setting_is_fixed_not_tuned() -> None:
    """No knob: an argument vLLM accepts stays in the recipe as given, and is not offered
    to the agent; one vLLM does not accept is refused."""
    sp = KnobSpace(H100, PROFILE)
    recipe = Recipe(model=MODEL, config={"cpu_offload_gb": 1024})
    assert sp.check_recipe(recipe).config == {"cpu_offload_gb": 1024}
    assert "cpu_offload_gb" not in {k.name for k in sp.knobs()}
    with pytest.raises(RecipeError, match=r"config\.cpu_offload_gib: vLLM 0\.32\.0 has no "
                                          r"such argument .*did you mean cpu_offload_gb\?"):
        sp.check_recipe(Recipe(model=MODEL, config={"cpu_offload_gib": 1024}))
