"""Whether a recipe's weights can fit its GPUs at all, checked before the baseline boots:
a 70B model on a 15 GiB GPU otherwise boots and fails every experiment of the night. Only
the impossible is refused (weights alone over the memory of the GPUs that hold them);
what fits with too little room for the KV cache is left to vLLM and the tuner."""

from __future__ import annotations

from aevyra_forge.core.errors import HardwareError
from aevyra_forge.core.recipe import Recipe
from aevyra_forge.core.values import Hardware
from aevyra_forge.space.model_profile import ModelProfile
from aevyra_forge.space.quant import QUANT_METHODS, facts

GIB = 1024**3
TP_SIZES = (2, 4, 8)  # tensor-parallel sizes vLLM serves a dense model with
FOUR_BIT = QUANT_METHODS["awq"]  # what a 4-bit checkpoint weighs per parameter
_FP32 = ("float32", "float")


def weight_bytes(recipe: Recipe, model: ModelProfile) -> float:
    """The weights vLLM loads for `recipe`: the quantized size when it serves a
    quantized checkpoint (or fp8 at load), 4 bytes a parameter in float32, else 2."""
    method = recipe.quant.method
    if method != "none":
        return model.params_b * 1e9 * facts(method).bytes_per_param
    per_param = 4.0 if str(recipe.config.get("dtype", "")).lower() in _FP32 else 2.0
    return model.params_b * 1e9 * per_param


def _int(value: object, default: int = 1) -> int:
    try:
        return max(int(str(value)), 1) if value is not None else default
    except ValueError:
        return default


def check_weights_fit(recipe: Recipe, model: ModelProfile, hw: Hardware) -> None:
    """HardwareError, one line naming the fixes, when the weights split over the recipe's
    tensor- and pipeline-parallel GPUs exceed one GPU's memory. Nothing to check on CPU."""
    if not hw.gpus:
        return
    tp = _int(recipe.config.get("tensor_parallel_size"))
    pp = _int(recipe.config.get("pipeline_parallel_size"))
    used = hw.gpus[:tp * pp] if tp * pp <= len(hw.gpus) else hw.gpus
    gpu = min(used, key=lambda g: g.memory_mib)
    memory = gpu.memory_mib * 1024**2
    total = weight_bytes(recipe, model)
    if total / (tp * pp) <= memory:
        return
    split = f", ~{total / (tp * pp) / GIB:.0f} GiB a GPU over {tp * pp}" if tp * pp > 1 else ""
    fixes = []
    if recipe.quant.method == "none":
        fixes.append(f"a quantized checkpoint (4-bit: ~"
                     f"{model.params_b * 1e9 * FOUR_BIT.bytes_per_param / GIB:.0f} GiB; "
                     "quant.checkpoint in a --recipe)")
    need = next((n for n in TP_SIZES if n > tp * pp and total / n <= memory), None)
    if need is not None and need <= hw.gpu_count:
        fixes.append(f"tensor parallelism over {need} GPUs (tensor_parallel_size: {need} "
                     "in a --recipe)")
    elif need is not None:
        fixes.append(f"tensor parallelism over {need} GPUs (this host has "
                     f"{hw.gpu_count})")
    fixes.append("a bigger GPU")
    fix = fixes[0] if len(fixes) == 1 else ", ".join(fixes[:-1]) + f" or {fixes[-1]}"
    raise HardwareError(f"{model.name}: its weights (~{total / GIB:.0f} GiB{split}) do not "
                        f"fit in {gpu.name}'s {memory / GIB:.0f} GiB; nothing would boot: "
                        f"use {fix}")
