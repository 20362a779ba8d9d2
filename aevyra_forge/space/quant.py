"""The one table of quantization facts: per method its weight size, whether it needs a
pre-quantized checkpoint, the hardware that runs it, its speed in the simulator and its
expected accuracy cost. The registry's gates, the simulator and the prompt's memory
estimate all read it."""

from __future__ import annotations

from dataclasses import dataclass

from aevyra_forge.core.values import Hardware, Scalar


@dataclass(frozen=True)
class QuantMethod:
    """What forge knows of one weight-quantization method (`quant.method` in a recipe)."""

    name: str
    weight_bits: int  # bits per quantized weight, before scales
    bytes_per_param: float  # weight memory per parameter, scales and 16-bit layers included
    prequantized: bool  # needs a pre-quantized checkpoint: vLLM cannot quantize it at load
    fp8_hardware: bool  # offered only with FP8 tensor cores (has_fp8); else weight-only
    on_cpu: bool  # served by vLLM's CPU build (GPUs serve every method, fp8 gated)
    compute: float  # simulator: linear-layer compute time relative to bf16
    accuracy: float  # expected teacher-forced agreement with the bf16 baseline's outputs
    name_tag: str | None  # how a checkpoint's name shows the method (the simulator's guess)


# Order matters: it is the order of the quant_method knob's choices and the order in which
# a checkpoint's name is matched (the first tag found wins).
QUANT_METHODS: dict[str, QuantMethod] = {m.name: m for m in (
    QuantMethod("none", 16, 2.0, prequantized=False, fp8_hardware=False,
                on_cpu=True, compute=1.0, accuracy=1.0, name_tag=None),
    # 4-bit weights carry group scales and zero points (~0.52 B/param at group size 128),
    # the embeddings and lm_head stay 16-bit, and dequantisation costs compute. The prompt
    # used to estimate 0.56 B/param and the simulator 0.6. Neither fits every size: a 70B
    # AWQ checkpoint comes to about 0.56, an 8B one to about 0.7 (its 16-bit embeddings
    # weigh more). The simulator's 0.6 is kept, so dry runs stay identical.
    QuantMethod("awq", 4, 0.6, prequantized=True, fp8_hardware=False,
                on_cpu=False, compute=1.4, accuracy=0.978, name_tag="awq"),
    QuantMethod("gptq", 4, 0.6, prequantized=True, fp8_hardware=False,
                on_cpu=False, compute=1.4, accuracy=0.972, name_tag="gptq"),
    # fp8 is the one method vLLM can apply while loading a bf16 checkpoint
    QuantMethod("fp8", 8, 1.0, prequantized=False, fp8_hardware=True,
                on_cpu=False, compute=0.5, accuracy=0.996, name_tag="fp8"),
    # the CPU build serves W8A8 INT8 checkpoints and no other method (VLLM_NOTES.md)
    QuantMethod("w8a8_int8", 8, 1.0, prequantized=True, fp8_hardware=False,
                on_cpu=True, compute=0.5, accuracy=0.993, name_tag="w8a8"),
)}
# A method this table does not know (a checkpoint may name any): middling guesses.
UNKNOWN = QuantMethod("unknown", 8, 1.0, prequantized=True, fp8_hardware=False,
                      on_cpu=True, compute=1.2, accuracy=0.99, name_tag=None)


def facts(method: str) -> QuantMethod:
    """The table's row for `method`, or UNKNOWN."""
    return QUANT_METHODS.get(method, UNKNOWN)


def method_of_checkpoint(checkpoint: str) -> str | None:
    """The method a checkpoint's name suggests (e.g. '...-AWQ' -> 'awq'), or None."""
    name = checkpoint.lower()
    return next((m.name for m in QUANT_METHODS.values()
                 if m.name_tag is not None and m.name_tag in name), None)


def has_fp8(hw: Hardware) -> bool:
    """FP8 tensor cores: NVIDIA compute capability >= 8.9 (Ada, Hopper and later) or an
    MI300-class AMD GPU (gfx942)."""
    gpu = hw.gpu
    if gpu is None:
        return False
    if hw.device == "rocm":
        return "mi300" in gpu.name.lower() or (gpu.compute_capability or "") == "gfx942"
    try:
        return float(gpu.compute_capability or 0) >= 8.9
    except ValueError:
        return False


def is_fp8_kv(kv_cache_dtype: str) -> bool:
    """An fp8 KV cache (fp8, fp8_e4m3, fp8_e5m2): one byte per element."""
    return kv_cache_dtype.startswith("fp8")


def method_usable(choice: Scalar, hw: Hardware, simulated: bool) -> bool:
    """Whether quantization method `choice` may be tried here. A real run has no
    pre-quantized checkpoint to load yet; the simulator needs none."""
    method = QUANT_METHODS.get(str(choice))
    return (method is not None and (hw.device != "cpu" or method.on_cpu)
            and (simulated or not method.prequantized)
            and (not method.fp8_hardware or has_fp8(hw)))


def kv_cache_dtype_usable(choice: Scalar, hw: Hardware, simulated: bool) -> bool:
    """An fp8 KV cache needs FP8 hardware to pay off (it hurt throughput on Ampere)."""
    return not is_fp8_kv(str(choice)) or has_fp8(hw)
