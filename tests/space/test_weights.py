"""Tests for aevyra_forge.space.weights: weights that no GPU of the host holds are refused
before anything boots, with the fixes that would work here; everything that fits (split
over tensor- or pipeline-parallel GPUs, quantized, on CPU) passes."""

from __future__ import annotations

import pytest

from aevyra_forge.core.errors import HardwareError
from aevyra_forge.core.recipe import QuantSettings, Recipe
from aevyra_forge.core.values import GpuInfo, Hardware
from aevyra_forge.space.model_profile import profile
from aevyra_forge.space.weights import check_weights_fit, weight_bytes

MODEL_70B = "meta-llama/Llama-3.3-70B-Instruct"  # 70.6 B parameters: ~132 GiB in bf16
MODEL_8B = "meta-llama/Llama-3.1-8B-Instruct"  # 8.03 B: ~15 GiB


def gpus(count: int, gib: float, name: str = "GPU") -> Hardware:
    return Hardware(device="cuda", gpus=tuple(
        GpuInfo(index=i, name=name, memory_mib=int(gib * 1024)) for i in range(count)))


def refusal(recipe: Recipe, hw: Hardware) -> str:
    with pytest.raises(HardwareError) as exc:
        check_weights_fit(recipe, profile(recipe.model), hw)
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_a_70b_model_on_one_t4_names_every_fix_that_could_work() -> None:
    message = refusal(Recipe(model=MODEL_70B), gpus(1, 15.0, "Tesla T4"))
    assert message.startswith(f"{MODEL_70B}: its weights (~132 GiB) do not fit in Tesla "
                              "T4's 15 GiB; nothing would boot: use a quantized checkpoint "
                              "(4-bit: ~39 GiB; quant.checkpoint in a --recipe)")
    assert "tensor parallelism over" not in message  # not even 8 T4s would hold it
    assert message.endswith(" or a bigger GPU")


def test_tensor_parallelism_is_offered_with_the_gpus_it_needs() -> None:
    on_four = refusal(Recipe(model=MODEL_70B), gpus(4, 80.0, "H100"))
    assert "tensor parallelism over 2 GPUs (tensor_parallel_size: 2 in a --recipe)" \
        in on_four
    on_one = refusal(Recipe(model=MODEL_70B), gpus(1, 80.0, "H100"))
    assert "tensor parallelism over 2 GPUs (this host has 1)" in on_one


def test_weights_split_over_parallel_gpus_or_quantized_fit() -> None:
    tp2 = Recipe(model=MODEL_70B, config={"tensor_parallel_size": 2})
    check_weights_fit(tp2, profile(MODEL_70B), gpus(2, 80.0))
    pp2 = Recipe(model=MODEL_70B, config={"pipeline_parallel_size": 2})
    check_weights_fit(pp2, profile(MODEL_70B), gpus(2, 80.0))
    awq = Recipe(model=MODEL_70B, quant=QuantSettings(method="awq", checkpoint="x/70b-awq"))
    check_weights_fit(awq, profile(MODEL_70B), gpus(1, 80.0))
    check_weights_fit(Recipe(model=MODEL_70B), profile(MODEL_70B),
                      Hardware(device="cpu", cpu_cores=2, memory_gib=8.0))


def test_the_smallest_gpu_of_the_parallel_group_bounds_it() -> None:
    mixed = Hardware(device="cuda", gpus=(GpuInfo(index=0, name="H100", memory_mib=81920),
                                          GpuInfo(index=1, name="T4", memory_mib=15360)))
    message = refusal(Recipe(model=MODEL_70B, config={"tensor_parallel_size": 2}), mixed)
    assert "(~132 GiB, ~66 GiB a GPU over 2) do not fit in T4's 15 GiB" in message


def test_float32_doubles_the_weights_and_fits_no_more() -> None:
    bf16 = Recipe(model=MODEL_8B)
    fp32 = Recipe(model=MODEL_8B, config={"dtype": "float32"})
    assert weight_bytes(fp32, profile(MODEL_8B)) == 2 * weight_bytes(bf16, profile(MODEL_8B))
    check_weights_fit(bf16, profile(MODEL_8B), gpus(1, 22.5))
    assert "(~30 GiB) do not fit" in refusal(fp32, gpus(1, 22.5))
