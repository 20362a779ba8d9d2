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
    rocm_arch,
    usable,
    vllm_refusal,
)
from aevyra_forge.space.registry import KNOBS
from aevyra_forge.space.vllm_flags import VllmArgs, parse_help

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


@pytest.mark.parametrize("simulated", [False, True])
@pytest.mark.parametrize(("hw", "methods"), [
    ("H100", ["none", "fp8"]),
    ("MI300X", ["none", "fp8"]),
    ("A100-80GB", ["none"]),
    ("CPU", ["none"]),
])
def test_methods_usable_here(hw: str, simulated: bool, methods: list[str]) -> None:
    """By name, only what vLLM applies while loading: fp8 on FP8 hardware, never on the
    CPU build. A pre-quantized method is served from a checkpoint, a layer-2 candidate
    (test_knob_space), in a dry run as in a real one: no simulated best recipe names a
    method no checkpoint backs."""
    hardware = CPU if hw == "CPU" else GPUS[hw]
    assert [m for m in QUANT_METHODS if method_usable(m, hardware, simulated)] == methods
    assert not any(method_usable(name, hardware, simulated)
                   for name, m in QUANT_METHODS.items() if m.prequantized)
    assert not method_usable("bitsandbytes", hardware, simulated)


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


def test_layer_two_offers_an_fp8_kv_cache_on_an_avx512_cpu_only() -> None:
    """The CPU build serves an fp8 KV cache with AVX-512 (measured), so layer 2 on such a
    host has the knob; on an AVX2-only CPU its only value is auto, and it is not offered."""
    from aevyra_forge.space.knob_space import KnobSpace
    from aevyra_forge.space.model_profile import profile

    model = profile("meta-llama/Llama-3.2-1B")
    avx512, avx2 = KnobSpace(AVX512, model), KnobSpace(AVX2, model)
    knob = KNOBS["kv_cache_dtype"]
    assert avx512.choices(knob) == ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")
    assert "kv_cache_dtype" in [k.name for k in avx512.knobs(2)]
    assert avx2.choices(knob) == ("auto",)
    assert "kv_cache_dtype" not in [k.name for k in avx2.knobs(2)]


def test_probe_cpu_isa_keeps_the_flags_that_matter(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 ht\n\n"
                       "processor\t: 1\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 ht\n")
    assert probe_cpu_isa(cpuinfo) == ("avx2", "avx512f", "avx512_bf16")
    assert probe_cpu_isa(tmp_path / "missing") == ()


# -- AMD: what vLLM's ROCm build serves (quant.py cites its sources) ------------------
def _amd(name: str, arch: str | None) -> Hardware:
    return Hardware(device="rocm", gpus=(GpuInfo(index=0, name=name, memory_mib=131072,
                                                 compute_capability=arch),))


MI250 = _amd("AMD Instinct MI250X", "gfx90a")


def test_mi300_class_serves_every_checkpoint_and_an_older_amd_gpu_no_fp8() -> None:
    everything = ["none", "awq", "gptq", "fp8", "w8a8_int8", "w4a16"]
    for hw in (GPUS["MI300X"], _amd("AMD Instinct MI300X", None),
               _amd("AMD Instinct MI355X", "gfx950")):
        assert usable([*QUANT_METHODS, *CHECKPOINT_ONLY], hw) == everything
        assert has_fp8(hw) and kv_cache_dtype_usable("fp8", hw, False)
        assert method_usable("fp8", hw, False)  # applied while loading on MI300
    assert usable([*QUANT_METHODS, *CHECKPOINT_ONLY], MI250) == [
        "none", "awq", "gptq", "w8a8_int8", "w4a16"]
    assert checkpoint_refusal("fp8", MI250) == (
        "needs an MI300-class GPU (gfx942/gfx950), this one is gfx90a: fp8 Marlin needs "
        "compute capability >= 8.0; on AMD FP8 needs an MI300-class GPU")
    assert not kv_cache_dtype_usable("fp8", MI250, False)
    assert not method_usable("fp8", MI250, False)
    unknown = _amd("AMD Radeon PRO W7900", None)
    assert "of an unknown architecture" in str(checkpoint_refusal("fp8", unknown))


@pytest.mark.parametrize(("name", "arch", "expected"), [
    ("AMD Instinct MI300X", "gfx942", "gfx942"),
    ("AMD Instinct MI300X", None, "gfx942"),  # rocm-smi without a GFX Version
    ("AMD Instinct MI325X", "", "gfx942"),
    ("AMD Instinct MI355X", None, "gfx950"),
    ("AMD Instinct MI250X", "GFX90A", "gfx90a"),
    ("AMD Radeon PRO W7900", None, ""),
])
def test_rocm_arch(name: str, arch: str | None, expected: str) -> None:
    assert rocm_arch(_amd(name, arch)) == expected


# -- the installed vLLM: a method its parser does not list is refused ------------------
HELP = Path(__file__).parents[1] / "data" / "vllm" / "serve_help_all_0.32.0+cpu.txt"


def _vllm(listed: str | None) -> VllmArgs:
    """vLLM 0.32's recorded --help=all, its --quantization listing `listed` choices (vLLM
    0.32 itself lists none, as older and some later versions do)."""
    text = HELP.read_text()
    if listed is not None:
        old = "  --quantization QUANTIZATION, -q QUANTIZATION"
        assert old in text
        text = text.replace(old, f"  --quantization {{{listed}}}, -q {{{listed}}}")
    return VllmArgs(version="0.32.0+cpu", args=parse_help(text))


def test_a_method_this_vllm_does_not_list_is_refused_with_that_reason() -> None:
    assert _vllm(None).choices("quantization") is None
    assert vllm_refusal("w8a8_int8", None, "0.32.0") is None  # it cannot tell: no gate
    listed = _vllm("awq,fp8,gptq").choices("quantization")
    assert listed == ("awq", "fp8", "gptq")
    assert vllm_refusal("awq", listed, "0.9") is None
    assert vllm_refusal("none", listed, "0.9") is None
    assert vllm_refusal("w4a16", listed, "0.9") == (
        "vLLM 0.9 does not list 'compressed-tensors' among its --quantization choices; "
        "upgrade vLLM to serve it")


def test_the_knob_space_leaves_out_candidates_its_vllm_cannot_load() -> None:
    from aevyra_forge.space.knob_space import KnobSpace
    from aevyra_forge.space.layer2 import QuantCandidate
    from aevyra_forge.space.model_profile import profile
    candidates = [QuantCandidate(name="hub:org/m-AWQ", kind="hub", method="awq", bits=4,
                                 checkpoint="org/m-AWQ"),
                  QuantCandidate(name="rtn-w8a8", kind="rtn", method="w8a8_int8", bits=8,
                                 checkpoint="/q/w8a8")]
    for listed, offered in ((None, ("none", "hub:org/m-AWQ", "rtn-w8a8")),
                            ("awq,gptq", ("none", "hub:org/m-AWQ"))):
        space = KnobSpace(AVX512, profile("meta-llama/Llama-3.1-8B-Instruct"),
                          vllm=_vllm(listed))
        space.offer_quant(candidates)
        assert space.choices(space.get("quant_candidate")) == offered
        assert set(space.quant_unserved) == ({"rtn-w8a8"} if listed else set())
    assert space.quant_unserved["rtn-w8a8"].startswith("vLLM 0.32.0+cpu does not list "
                                                       "'compressed-tensors'")
    # a boot failure learned later does not bring the unserved candidate back
    base = space.baseline("meta-llama/Llama-3.1-8B-Instruct")
    space.refuse_quant(space.apply(base, {"quant_candidate": "hub:org/m-AWQ"}), "x")
    assert space.choices(space.get("quant_candidate")) == ("none",)
    assert "rtn-w8a8" in space.quant_unserved


def test_the_prompt_says_why_an_unserved_candidate_is_not_offered(tmp_path: Path) -> None:
    from aevyra_forge.agent import AgentContext, Budget
    from aevyra_forge.agent.prompt import build_prompt
    from aevyra_forge.core.workload import load_workload
    from aevyra_forge.space.knob_space import KnobSpace
    from aevyra_forge.space.layer2 import QuantCandidate
    from aevyra_forge.space.model_profile import profile
    from aevyra_forge.space.playbook import load_playbook
    model = "meta-llama/Llama-3.1-8B-Instruct"
    space = KnobSpace(AVX512, profile(model), vllm=_vllm("awq,gptq"))
    space.offer_quant([QuantCandidate(name="rtn-w8a8", kind="rtn", method="w8a8_int8",
                                      bits=8, checkpoint="/q/w8a8")])
    workload = tmp_path / "w.jsonl"
    workload.write_text('{"prompt": "hi"}\n')
    ctx = AgentContext(hardware=AVX512, workload=load_workload(workload).stats, layer=2,
                       space=space, best=space.baseline(model), best_score=1.0,
                       history=(), playbook=load_playbook(), budget=Budget(5, 1.0, None),
                       tried_ids=frozenset())
    refused = build_prompt(ctx).user.split("Not possible on this hardware (do not propose): ")
    assert "rtn-w8a8: vLLM 0.32.0+cpu does not list 'compressed-tensors'" in refused[1]
