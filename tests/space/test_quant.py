"""Tests for aevyra_forge.space.quant: the table of quantization facts, the hardware gates
read from it, and guessing a checkpoint's method from its name."""

from __future__ import annotations

from pathlib import Path

import pytest

from aevyra_forge.core.values import GpuInfo, Hardware
from aevyra_forge.space import gpu_catalogue
from aevyra_forge.space.quant import (
    CHECKPOINT_ONLY,
    QUANT_METHODS,
    UNKNOWN,
    checkpoint_refusal,
    facts,
    has_fp8,
    is_fp8_kv,
    kv_cache_dtype_usable,
    method_of_checkpoint,
    method_usable,
    probe_cpu_isa,
    refusal,
    usable,
)
from aevyra_forge.space.registry import KNOBS

GPUS = {name: gpu_catalogue.gpu_spec(name).hardware()
        for name in ("A100-80GB", "H100", "T4", "L4", "A10G", "MI300X")}
CPU = Hardware(device="cpu", cpu_cores=2, memory_gib=24)


@pytest.mark.parametrize("name", list(QUANT_METHODS))
def test_table_row_is_sane(name: str) -> None:
    method = QUANT_METHODS[name]
    assert method.name == name
    # scales and 16-bit layers only add to the quantized weights, never past bf16
    assert method.weight_bits / 8 <= method.bytes_per_param <= 2.0
    assert 0.9 < method.accuracy <= 1.0 and method.compute > 0
    assert (method.accuracy == 1.0) == (name == "none")


def test_unknown_methods_get_middling_guesses() -> None:
    assert facts("bitsandbytes") is UNKNOWN
    assert facts("awq") is QUANT_METHODS["awq"]
    assert QUANT_METHODS["awq"].accuracy < UNKNOWN.accuracy < QUANT_METHODS["none"].accuracy


def test_the_quant_method_knob_offers_the_table() -> None:
    knob = KNOBS["quant_method"]
    assert {c for options in knob.choices.values() for c in options} == set(QUANT_METHODS)


def test_fp8_hardware() -> None:
    assert {n for n, hw in GPUS.items() if has_fp8(hw)} == {"H100", "L4", "MI300X"}
    assert not has_fp8(CPU)

    def nvidia(cc: str) -> Hardware:
        gpu = GpuInfo(index=0, name="NVIDIA X", memory_mib=24576, compute_capability=cc)
        return Hardware(device="cuda", gpus=(gpu,))
    assert has_fp8(nvidia("8.9")) and has_fp8(nvidia("9.0"))
    assert not has_fp8(nvidia("8.6")) and not has_fp8(nvidia("not a number"))


@pytest.mark.parametrize(("hw", "simulated", "methods"), [
    ("H100", False, ["none", "fp8"]),
    ("H100", True, ["none", "awq", "gptq", "fp8", "w8a8_int8"]),
    ("MI300X", False, ["none", "fp8"]),
    ("A100-80GB", False, ["none"]),
    ("A100-80GB", True, ["none", "awq", "gptq", "w8a8_int8"]),
    ("CPU", False, ["none"]),
    ("CPU", True, ["none", "w8a8_int8"]),
])
def test_methods_usable_here(hw: str, simulated: bool, methods: list[str]) -> None:
    """FP8 needs FP8 hardware, the CPU build serves W8A8 only, and a real run has no
    pre-quantized checkpoint to serve (the simulator needs none)."""
    hardware = CPU if hw == "CPU" else GPUS[hw]
    assert [m for m in QUANT_METHODS if method_usable(m, hardware, simulated)] == methods
    assert not method_usable("bitsandbytes", hardware, True)


def test_fp8_kv_cache_needs_fp8_hardware() -> None:
    assert is_fp8_kv("fp8_e5m2") and not is_fp8_kv("auto")
    for name, hw in GPUS.items():
        assert kv_cache_dtype_usable("auto", hw, False)
        assert kv_cache_dtype_usable("fp8_e4m3", hw, False) == (name in ("H100", "L4", "MI300X"))


@pytest.mark.parametrize(("checkpoint", "method"), [
    ("hugging-quants/Meta-Llama-3.1-8B-Instruct-AWQ-INT4", "awq"),
    ("org/Llama-3.1-8B-GPTQ", "gptq"),
    ("neuralmagic/Llama-3.1-8B-Instruct-FP8-dynamic", "fp8"),
    ("RedHatAI/Llama-3.1-8B-Instruct-quantized.w8a8", "w8a8_int8"),
    ("org/awq-of-an-fp8", "awq"),  # the table's order decides
    ("/models/llama-8b", None),
])
def test_method_of_checkpoint(checkpoint: str, method: str | None) -> None:
    assert method_of_checkpoint(checkpoint) == method


AVX512 = Hardware(device="cpu", cpu_cores=2, memory_gib=24,
                  cpu_isa=("avx2", "avx512f", "avx512_bf16"))
AVX2 = Hardware(device="cpu", cpu_cores=2, memory_gib=24, cpu_isa=("avx2",))


@pytest.mark.parametrize(("hw", "served"), [
    (AVX512, ["none", "awq", "gptq", "fp8", "w8a8_int8", "w4a16"]),
    (AVX2, ["none", "fp8", "w8a8_int8"]),  # no cpu_gemm_wna16 without AVX-512 + BF16
    (CPU, ["none", "fp8", "w8a8_int8"]),  # an unknown instruction set: the safe side
    (GPUS["H100"], ["none", "awq", "gptq", "fp8", "w8a8_int8", "w4a16"]),
    (GPUS["T4"], ["none", "awq", "gptq", "w8a8_int8", "w4a16"]),  # no fp8 Marlin on 7.5
])
def test_checkpoints_served_here(hw: Hardware, served: list[str]) -> None:
    """The measured CPU-build table (VLLM_NOTES.md) and the GPU kernels' capabilities."""
    assert usable([*QUANT_METHODS, *CHECKPOINT_ONLY], hw) == served


def test_refusals_name_the_missing_instruction_set() -> None:
    assert checkpoint_refusal("w4a16", AVX2) == (
        "this CPU lacks avx512_bf16 + avx512f: 4-bit kernels: Marlin needs compute "
        "capability >= 8.0 (older GPUs fall back to slower ones); on the CPU build "
        "cpu_gemm_wna16 exists only with AVX-512 + BF16")
    assert checkpoint_refusal("bitsandbytes", GPUS["H100"]) == "forge does not know it"
    assert refusal(None, AVX512) is not None  # nothing to apply while loading


def test_fp8_on_the_fly_fails_on_every_cpu_and_fp8_kv_needs_avx512() -> None:
    for cpu in (AVX512, AVX2, CPU):
        assert not method_usable("fp8", cpu, False)
        assert refusal(QUANT_METHODS["fp8"].on_the_fly, cpu) == (
            "--quantization fp8 fails on every CPU (static_scaled_fp8_quant)")
    assert kv_cache_dtype_usable("fp8", AVX512, False)
    assert not kv_cache_dtype_usable("fp8_e5m2", AVX2, False)
    assert not kv_cache_dtype_usable("fp8", CPU, False)


def test_probe_cpu_isa_keeps_the_flags_that_matter(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 ht\n\n"
                       "processor\t: 1\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 ht\n")
    assert probe_cpu_isa(cpuinfo) == ("avx2", "avx512f", "avx512_bf16")
    assert probe_cpu_isa(tmp_path / "missing") == ()
