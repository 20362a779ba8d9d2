"""Tests for aevyra_forge.space.knob_space: what each hardware class may touch, value
checking, applying changes to recipes and checking hand-written recipes (the registry's own
entries are tested in test_registry.py)."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aevyra_forge.core.errors import KnobError, RecipeError
from aevyra_forge.core.recipe import KernelSettings, QuantSettings, Recipe
from aevyra_forge.core.values import Hardware
from aevyra_forge.engine.sim import layer2 as sim_layer2
from aevyra_forge.space import gpu_catalogue
from aevyra_forge.space.knob_space import KNOBS, KnobSpace
from aevyra_forge.space.model_profile import ModelProfile, profile

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
PROFILE: ModelProfile = profile(MODEL)

A100 = gpu_catalogue.gpu_spec("A100-80GB").hardware()
H100 = gpu_catalogue.gpu_spec("H100").hardware()
T4 = gpu_catalogue.gpu_spec("T4").hardware()
L4 = gpu_catalogue.gpu_spec("L4").hardware()
A10G = gpu_catalogue.gpu_spec("A10G").hardware()
MI300X = gpu_catalogue.gpu_spec("MI300X").hardware()
CPU = Hardware(device="cpu", cpu_cores=2, memory_gib=24)
ALL_HW = {"A100": A100, "H100": H100, "T4": T4, "L4": L4, "A10G": A10G, "MI300X": MI300X,
          "CPU": CPU}


def space(hw: Hardware, simulated: bool = False) -> KnobSpace:
    return KnobSpace(hw, PROFILE, simulated=simulated)


# -- what each hardware may touch ------------------------------------------------------------

@pytest.mark.parametrize(("hw", "seqs", "tokens"), [
    (H100, 1024, 8192), (A100, 256, 2048), (T4, 256, 2048), (MI300X, 1024, 16384),
    (CPU, 128, 2048),
])
def test_batch_defaults_per_hardware_class(hw: Hardware, seqs: int, tokens: int) -> None:
    sp = space(hw)
    assert sp.default(KNOBS["max_num_seqs"]) == seqs
    assert sp.default(KNOBS["max_num_batched_tokens"]) == tokens
    baseline = sp.baseline(MODEL)
    assert sp.value(baseline, KNOBS["max_num_seqs"]) == seqs
    assert sp.value(baseline, KNOBS["max_num_batched_tokens"]) == tokens


def test_max_model_len_defaults_to_the_model_context() -> None:
    sp = space(A100)
    assert sp.default(KNOBS["max_model_len"]) == PROFILE.max_context == 131072
    assert sp.bounds(KNOBS["max_model_len"]) == (128, 131072)
    with pytest.raises(KnobError, match="out of range"):
        sp.check("max_model_len", 131073)


@pytest.mark.parametrize("simulated", [False, True])
@pytest.mark.parametrize("name", ["H100", "L4", "MI300X", "A100", "T4", "A10G", "CPU"])
def test_fp8_only_on_fp8_hardware(name: str, simulated: bool) -> None:
    sp = space(ALL_HW[name], simulated)
    fp8_ok = name in ("H100", "L4", "MI300X")
    kv, quant = KNOBS["kv_cache_dtype"], KNOBS["quant_method"]
    assert ("fp8" in sp.choices(kv)) == fp8_ok
    assert ("fp8" in sp.choices(quant)) == fp8_ok
    assert sp.available(kv) == fp8_ok
    for knob_name in ("kv_cache_dtype", "quant_method"):
        if fp8_ok:
            assert sp.check(knob_name, "fp8") == "fp8"
        else:
            with pytest.raises(KnobError):
                sp.check(knob_name, "fp8")


def test_prequantized_methods_are_candidates_in_a_dry_run_as_in_a_real_one() -> None:
    """By name a dry run offers what a real run does: fp8 where vLLM applies it while
    loading. Pre-quantized methods are layer-2 candidates (a dry run's simulated, as
    engine/sim/layer2.py offers them); choosing one serves its checkpoint with its method."""
    for simulated in (False, True):
        assert space(H100, simulated).choices(KNOBS["quant_method"]) == ("none", "fp8")
        assert not space(A100, simulated).available(KNOBS["quant_method"])  # only "none"
    dry = space(H100, simulated=True)
    assert dry.choices(KNOBS["quant_candidate"]) == ("none",)  # nothing offered yet
    sim_layer2.offer(MODEL, dry, lambda _: None)
    assert {c.method for c in dry.quant_candidates} == {"awq", "fp8", "w8a8_int8", "w4a16"}
    assert dry.choices(KNOBS["quant_candidate"]) == (
        "none", *(c.name for c in dry.quant_candidates))
    base = dry.baseline(MODEL)
    for c in dry.quant_candidates:
        recipe = dry.apply(base, {"quant_candidate": c.name})
        assert (recipe.quant.checkpoint, recipe.quant.method) == (c.checkpoint, c.method)
        assert dry.value(recipe, KNOBS["quant_candidate"]) == c.name
        assert dry.apply(recipe, {"quant_candidate": "none"}).id == base.id


def test_cpu_block_size_and_gpu_block_size() -> None:
    block = KNOBS["block_size"]
    assert space(CPU).choices(block) == (32, 64, 128)
    assert space(CPU).default(block) == 128
    assert space(H100).choices(block) == (16, 32)
    assert space(H100).default(block) == 16
    with pytest.raises(KnobError, match="block_size must be one of 32, 64, 128; got 16"):
        space(CPU).check("block_size", 16)


def test_float32_only_on_cpu() -> None:
    assert space(CPU).check("dtype", "float32") == "float32"
    for hw in (H100, A100, MI300X):
        with pytest.raises(KnobError, match="dtype must be one of"):
            space(hw).check("dtype", "float32")


def test_cpu_has_no_gpu_knobs_and_gpus_no_cpu_knobs() -> None:
    cpu_names = {k.name for k in space(CPU).knobs()}
    assert {"gpu_memory_utilization", "kv_cache_dtype", "attention_backend",
            "tensor_parallel_size", "cudagraph_mode"}.isdisjoint(cpu_names)
    assert {"VLLM_CPU_KVCACHE_SPACE", "block_size", "max_num_seqs"} <= cpu_names
    with pytest.raises(KnobError, match="not available on cpu"):
        space(CPU).check("gpu_memory_utilization", 0.9)
    with pytest.raises(KnobError, match="not available on cuda"):
        space(H100).check("VLLM_CPU_KVCACHE_SPACE", 4)


def test_tensor_parallel_needs_several_gpus() -> None:
    tp = KNOBS["tensor_parallel_size"]
    assert not space(H100).available(tp)
    assert tp not in space(H100).knobs(1)
    with pytest.raises(KnobError, match="not available"):
        space(H100).check("tensor_parallel_size", 2)
    two = space(gpu_catalogue.gpu_spec("H100").hardware(count=2))
    assert two.available(tp)
    assert two.choices(tp) == (1, 2)
    assert two.check("tensor_parallel_size", 2) == 2
    with pytest.raises(KnobError):
        two.check("tensor_parallel_size", 4)
    with pytest.raises(KnobError):
        two.check("tensor_parallel_size", True)  # True == 1, but it is not a GPU count
    assert space(gpu_catalogue.gpu_spec("H100").hardware(count=8)).choices(tp) == (1, 2, 4, 8)


def test_a_vllm_without_a_flag_hides_its_knob() -> None:
    from aevyra_forge.space.vllm_flags import ArgInfo, VllmArgs

    args = {name: ArgInfo(name, (f"--{name}",), None, None, False)
            for name in ("max_num_seqs", "block_size")}
    sp = KnobSpace(CPU, PROFILE, vllm=VllmArgs(version="0.0.1+cpu", args=args))
    names = {k.name for k in sp.knobs(1)}
    assert "max_num_seqs" in names and "block_size" in names
    assert "max_num_batched_tokens" not in names
    assert "VLLM_CPU_KVCACHE_SPACE" in names  # env knobs are not vLLM arguments


def test_knobs_outside_config_follow_the_vllm_flag_they_render_to() -> None:
    from aevyra_forge.space.vllm_flags import ArgInfo, VllmArgs

    def vllm(**choices: tuple[str, ...] | None) -> VllmArgs:
        return VllmArgs(version="0.0.1", args={
            name: ArgInfo(name, (f"--{name}",), options, None, False)
            for name, options in choices.items()})

    sp = KnobSpace(H100, PROFILE, simulated=True, vllm=vllm(
        kv_cache_dtype=("auto", "fp8_e4m3"), compilation_config=None))
    assert sp.choices(KNOBS["kv_cache_dtype"]) == ("auto", "fp8_e4m3")  # --kv-cache-dtype's
    assert sp.available(KNOBS["cudagraph_mode"])  # --compilation-config carries it
    assert len(sp.choices(KNOBS["cudagraph_mode"])) == 5  # the JSON's choices are not listed
    assert not sp.available(KNOBS["quant_method"])  # this vLLM has no --quantization
    assert not sp.available(KNOBS["attention_backend"])


def test_knobs_by_layer() -> None:
    sp = space(H100, simulated=True)
    assert {k.layer for k in sp.knobs(1)} == {1}
    assert {k.name for k in sp.knobs(2)} == {"quant_method", "kv_cache_dtype"}
    assert {k.name for k in sp.knobs(3)} >= {"attention_backend", "cudagraph_mode"}
    assert len(sp.knobs()) == sum(len(sp.knobs(layer)) for layer in (1, 2, 3))


# -- check() -------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "value", "reason"), [
    ("max_num_seqs", 64.0, "takes an integer"),
    ("max_num_seqs", 12.5, "takes an integer"),
    ("max_num_seqs", True, "takes an integer"),
    ("max_num_seqs", "64", "takes an integer"),
    ("max_num_seqs", 0, "out of range [1, 4096]"),
    ("max_num_seqs", 4097, "out of range"),
    ("max_num_batched_tokens", 63, "out of range"),
    ("gpu_memory_utilization", 0.99, "out of range [0.5, 0.98]"),
    ("gpu_memory_utilization", False, "takes a number"),
    ("gpu_memory_utilization", "0.9", "takes a number"),
    ("enable_prefix_caching", 1, "takes true or false"),
    ("enable_prefix_caching", "true", "takes true or false"),
    ("attention_backend", "FLASHINFER; rm -rf /", "must be one of"),
    ("attention_backend", "flashinfer", "must be one of"),
    ("block_size", 16.0 + 0.5, "must be one of"),
    ("no_such_knob", 1, "unknown knob 'no_such_knob'"),
    ("enable_chunked_prefill", True, "unknown knob"),
])
def test_check_rejects(name: str, value: Any, reason: str) -> None:
    with pytest.raises(KnobError) as info:
        space(H100).check(name, value)
    assert reason in str(info.value)


def test_check_accepts_and_normalises() -> None:
    sp = space(H100)
    assert sp.check("gpu_memory_utilization", 0.92) == 0.92
    assert sp.check("max_num_seqs", 4096) == 4096
    assert sp.check("attention_backend", "FLASHINFER") == "FLASHINFER"
    assert sp.check("enforce_eager", True) is True
    one = sp.check("max_num_batched_tokens", 64)
    assert one == 64 and type(one) is int


def test_cpu_kv_cache_space_bounded_by_host_memory() -> None:
    sp = space(CPU)  # 24 GiB host: at most three quarters for the KV cache
    assert sp.check("VLLM_CPU_KVCACHE_SPACE", 18) == 18
    with pytest.raises(KnobError, match="out of range"):
        sp.check("VLLM_CPU_KVCACHE_SPACE", 19)


def test_validate() -> None:
    sp = space(H100)
    assert sp.validate({"max_num_seqs": 64, "enforce_eager": True}) == {
        "max_num_seqs": 64, "enforce_eager": True}
    with pytest.raises(KnobError, match="changes nothing"):
        sp.validate({})
    with pytest.raises(KnobError, match=r"belongs to layer 3 \(kernel\), not the active layer 1"):
        sp.validate({"attention_backend": "FLASHINFER"}, layer=1)


# -- apply() ---------------------------------------------------------------------------------

def test_apply_default_value_drops_the_override() -> None:
    sp = space(A100)
    base = sp.baseline(MODEL)
    tuned = sp.apply(base, {"max_num_seqs": 128, "enforce_eager": True})
    assert tuned.config == {"max_num_seqs": 128, "enforce_eager": True}
    assert (tuned.parent_id, tuned.generation) == (base.id, 1)
    back = sp.apply(tuned, {"max_num_seqs": 256, "enforce_eager": False})  # A100 defaults
    assert back.config == {}
    assert back.id == base.id
    assert (back.parent_id, back.generation) == (tuned.id, 2)


def test_apply_routes_each_target() -> None:
    sp = space(H100, simulated=True)
    base = sp.baseline(MODEL)
    r = sp.apply(base, {"quant_method": "fp8", "kv_cache_dtype": "fp8_e4m3",
                        "attention_backend": "FLASHINFER", "cudagraph_mode": "PIECEWISE"})
    assert r.quant == QuantSettings(method="fp8", kv_cache_dtype="fp8_e4m3")
    assert r.kernel.attention_backend == "FLASHINFER"
    assert r.kernel.compilation_config == {"cudagraph_mode": "PIECEWISE"}
    back = sp.apply(r, {"quant_method": "none", "kv_cache_dtype": "auto",
                        "cudagraph_mode": "FULL_AND_PIECEWISE"})
    assert back.kernel.compilation_config == {}
    assert back.id == sp.apply(base, {"attention_backend": "FLASHINFER"}).id


def test_apply_env_knob_on_cpu() -> None:
    sp = space(CPU)
    base = sp.baseline(MODEL)
    r = sp.apply(base, {"VLLM_CPU_KVCACHE_SPACE": 8, "VLLM_CPU_OMP_THREADS_BIND": "all"})
    assert r.kernel.env == {"VLLM_CPU_KVCACHE_SPACE": "8", "VLLM_CPU_OMP_THREADS_BIND": "all"}
    assert sp.value(r, KNOBS["VLLM_CPU_KVCACHE_SPACE"]) == 8
    assert sp.apply(r, {"VLLM_CPU_KVCACHE_SPACE": 4,
                        "VLLM_CPU_OMP_THREADS_BIND": "auto"}).id == base.id


def test_effective_lists_every_available_knob() -> None:
    sp = space(CPU)
    eff = sp.effective(sp.apply(sp.baseline(MODEL), {"block_size": 64}), layer=1)
    assert eff["block_size"] == 64
    assert eff["max_num_seqs"] == 128  # the API server's CPU default
    assert set(eff) == {k.name for k in sp.knobs(1)}


# -- check_recipe() --------------------------------------------------------------------------

def test_check_recipe_unknown_config_key_lists_valid_keys() -> None:
    recipe = Recipe(model=MODEL, config={"max_num_seq": 8})
    with pytest.raises(RecipeError) as info:
        space(A100).check_recipe(recipe, source="best.yaml")
    # not a knob, nor any argument vLLM accepts (a dry run checks the vendored list)
    assert str(info.value) == ("best.yaml: config.max_num_seq: vLLM 0.32.0 has no such "
                               "argument (see vllm serve --help=all); did you mean "
                               "max_num_seqs?")


@pytest.mark.parametrize("var", ["LD_PRELOAD", "VLLM_ATTENTION_BACKEND", "PATH"])
def test_check_recipe_rejects_env_not_allow_listed(var: str) -> None:
    recipe = Recipe(model=MODEL, kernel=KernelSettings(env={var: "x"}))
    with pytest.raises(RecipeError, match=f"environment variable '{var}' is not allow-listed; "
                       "allowed: VLLM_CPU_KVCACHE_SPACE"):
        space(CPU).check_recipe(recipe)


def test_check_recipe_rejects_unknown_compilation_key() -> None:
    recipe = Recipe(model=MODEL, kernel=KernelSettings(compilation_config={"level": 3}))
    expected = "unknown key 'kernel.compilation_config.level'; valid keys: cudagraph_mode"
    with pytest.raises(RecipeError, match=re.escape(expected)):
        space(H100).check_recipe(recipe)


def test_check_recipe_rejects_bad_values_with_source() -> None:
    with pytest.raises(RecipeError, match=re.escape("r.yaml: max_num_seqs=0 is out of range")):
        space(A100).check_recipe(Recipe(model=MODEL, config={"max_num_seqs": 0}), "r.yaml")
    with pytest.raises(RecipeError, match="kv_cache_dtype"):
        space(A100).check_recipe(Recipe(model=MODEL, quant=QuantSettings(
            kv_cache_dtype="fp8")))


def test_check_recipe_normalises() -> None:
    sp = space(A100)
    recipe = Recipe(model=MODEL, config={"max_num_seqs": 256, "block_size": 32},
                    parent_id="abcdef12", generation=9)
    checked = sp.check_recipe(recipe)
    assert checked.config == {"block_size": 32}  # 256 is the A100 default
    assert (checked.parent_id, checked.generation) == (None, 0)
    assert checked.id == Recipe(model=MODEL, config={"block_size": 32}).id
    quantized = Recipe(model=MODEL, quant=QuantSettings(method="awq", checkpoint="acme/m-awq"))
    assert sp.check_recipe(quantized).quant == quantized.quant


# -- properties -----------------------------------------------------------------------------

@given(st.data())
@settings(max_examples=200, deadline=None)
def test_apply_then_value_returns_the_value(data: st.DataObject) -> None:
    hw = data.draw(st.sampled_from(list(ALL_HW.values())), label="hw")
    sp = space(hw, simulated=data.draw(st.booleans(), label="simulated"))
    knob = data.draw(st.sampled_from(sp.knobs()), label="knob")
    grid = sp.grid(knob)
    assert grid, f"{knob.name} has nothing to try"
    value = data.draw(st.sampled_from(grid), label="value")
    assert sp.check(knob.name, value) == value
    start = sp.apply(sp.baseline(MODEL), {"max_num_batched_tokens": 1024})
    applied = sp.apply(start, {knob.name: value})
    assert sp.value(applied, knob) == value
    if knob.name != "max_num_batched_tokens":
        assert sp.value(applied, KNOBS["max_num_batched_tokens"]) == 1024
    restored = sp.apply(applied, {knob.name: sp.value(start, knob)})
    assert restored.id == start.id


def test_batched_tokens_below_max_seqs_is_refused_before_booting() -> None:
    sp = space(H100)
    base = sp.baseline(MODEL)
    sp.check_combination(sp.apply(base, {"max_num_batched_tokens": 1024,
                                         "max_num_seqs": 512}))
    with pytest.raises(KnobError, match="must be >= max_num_seqs"):
        sp.check_combination(sp.apply(base, {"max_num_batched_tokens": 512}))  # seqs 1024


# -- the wider search space ------------------------------------------------------------------

def test_capture_sizes_on_the_grid_follow_the_workloads_concurrency() -> None:
    knob = KNOBS["max_cudagraph_capture_size"]
    assert KnobSpace(H100, PROFILE, concurrency=20).grid(knob) == [24, 32, 48, 64]
    assert KnobSpace(H100, PROFILE, concurrency=256).grid(knob) == [256, 512, 1024]
    assert KnobSpace(H100, PROFILE).grid(knob) == list(knob.grid)  # concurrency unknown


def test_suffix_decoding_is_offered_only_where_its_package_is_installed() -> None:
    knob = KNOBS["spec_method"]
    assert KnobSpace(CPU, PROFILE).choices(knob) == (None, "ngram", "suffix")  # not asked
    without = KnobSpace(CPU, PROFILE, packages={"arctic-inference": None})
    assert without.choices(knob) == (None, "ngram")
    assert KnobSpace(CPU, PROFILE, packages={"arctic-inference": "0.1.1"}).choices(knob) == (
        None, "ngram", "suffix")
    with pytest.raises(KnobError, match="spec_method must be one of None, ngram"):
        without.check("spec_method", "suffix")


def test_speculative_tokens_come_and_go_with_the_method() -> None:
    sp = space(H100)
    base = sp.baseline(MODEL)
    on = sp.apply(base, {"spec_method": "ngram"})
    assert on.config == {"spec_method": "ngram", "spec_tokens": 3}
    five = sp.apply(on, {"spec_tokens": 5})
    assert sp.apply(five, {"spec_method": "suffix"}).config == {
        "spec_method": "suffix", "spec_tokens": 5}  # a chosen count is kept
    assert sp.apply(five, {"spec_method": None}).id == base.id
    with pytest.raises(KnobError, match="spec_tokens applies only with spec_method set"):
        sp.check_combination(sp.apply(base, {"spec_tokens": 4}))


def test_replicas_times_tensor_parallelism_must_fit_the_gpus() -> None:
    two = KnobSpace(gpu_catalogue.gpu_spec("H100").hardware(count=2), PROFILE)
    base = two.baseline(MODEL)
    two.check_combination(two.apply(base, {"data_parallel_size": 2}))
    with pytest.raises(KnobError, match=r"data_parallel_size \(2\) x tensor_parallel_size "
                                        r"\(2\) needs more than the 2 GPUs"):
        two.check_combination(two.apply(base, {"data_parallel_size": 2,
                                               "tensor_parallel_size": 2}))
    assert "data_parallel_size" not in [k.name for k in space(H100).knobs()]


def test_a_draft_method_is_offered_only_with_its_known_draft() -> None:
    knob = KNOBS["spec_method"]
    assert "eagle3" not in space(H100).choices(knob)  # none known for this model
    sp = KnobSpace(H100, PROFILE, drafts={"eagle3": "org/eagle3-head"})
    assert sp.choices(knob) == (None, "ngram", "suffix", "eagle3")
    base = sp.baseline(MODEL)
    eagle = sp.apply(base, {"spec_method": "eagle3"})
    assert eagle.config == {"spec_method": "eagle3", "spec_model": "org/eagle3-head",
                            "spec_tokens": 3}
    sp.check_combination(eagle)
    assert sp.check_recipe(eagle).id == eagle.id
    assert sp.apply(eagle, {"spec_method": "ngram"}).config == {"spec_method": "ngram",
                                                                "spec_tokens": 3}
    assert sp.apply(eagle, {"spec_method": None}).id == base.id
    with pytest.raises(KnobError, match="spec_model must be the draft known for "
                                        "spec_method=ngram"):
        sp.check_combination(sp.apply(sp.apply(base, {"spec_method": "ngram"}),
                                      {"spec_model": "org/eagle3-head"}))
    with pytest.raises(KnobError, match="spec_method must be one of"):
        space(H100).check("spec_method", "eagle3")
