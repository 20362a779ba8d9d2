"""The one table of quantization facts: per method its weight size, whether it needs a
pre-quantized checkpoint, the hardware that serves it (as data: NVIDIA compute capability,
AMD GPU architecture, the CPU build's instruction set), the name vLLM loads it by, its
speed in the simulator and its expected accuracy cost. The registry's gates, the Hub
lookup, the layer-2 candidates, the simulator and the prompt all read it."""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

from aevyra_forge.core.values import Hardware, Scalar

# The flags of /proc/cpuinfo that decide what vLLM's CPU build serves (VLLM_NOTES.md,
# "What depends on the CPU's instruction set"); the rest of the list is not recorded.
CPU_ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")
AVX512_BF16 = frozenset({"avx512f", "avx512_bf16"})
# AMD's MI300-class GPUs by architecture: MI300X/MI325X are gfx942, MI350/MI355 gfx950.
# vLLM's ROCm build serves FP8 GEMMs there (vllm/platforms/rocm.py `supports_fp8`, and
# ROCmFP8ScaledMMLinearKernel "requires CDNA3+ (gfx942/gfx950)").
MI300_ARCH = frozenset({"gfx942", "gfx950"})


@dataclass(frozen=True)
class Serving:
    """Where vLLM serves a method one way (from a checkpoint, or applied while loading):
    the NVIDIA compute capability its kernel needs, whether it needs FP8 tensor cores, on
    AMD GPUs the architectures vLLM's ROCm build serves it on (empty: every one; None:
    none), and on the CPU build the instruction-set flags it needs (None: refused)."""

    min_cc: float = 0.0
    fast_cc: float = 0.0  # below this compute capability a slower kernel serves it
    fp8_cores: bool = False  # NVIDIA >= 8.9 or MI300-class (has_fp8)
    rocm_arch: frozenset[str] | None = frozenset()
    cpu_isa: frozenset[str] | None = frozenset()
    why: str = ""  # the measured reason behind the gate, for the refusal line


ANYWHERE = Serving()
NOWHERE_ON_CPU = "vLLM's CPU build has no kernel for it"


@dataclass(frozen=True)
class QuantMethod:
    """What forge knows of one weight-quantization method (`quant.method` in a recipe)."""

    name: str
    weight_bits: int  # bits per quantized weight, before scales
    bytes_per_param: float  # weight memory per parameter, scales and 16-bit layers included
    prequantized: bool  # needs a pre-quantized checkpoint: vLLM cannot quantize it at load
    fp8_hardware: bool  # offered only with FP8 tensor cores (has_fp8); else weight-only
    compute: float  # simulator: linear-layer compute time relative to bf16
    accuracy: float  # expected teacher-forced agreement with the bf16 baseline's outputs
    name_tag: str | None  # how a checkpoint's name shows the method (the simulator's guess)
    vllm_name: str | None  # vLLM's quantization method that loads it (--quantization name)
    checkpoint: Serving = ANYWHERE  # serving a checkpoint quantized this way
    on_the_fly: Serving | None = None  # vLLM quantizing a bf16 checkpoint while loading

    @property
    def on_cpu(self) -> bool:
        """vLLM's CPU build serves it on some CPU, one way or the other."""
        return any(s is not None and s.cpu_isa is not None
                   for s in (self.checkpoint, self.on_the_fly))


# On AMD GPUs vLLM 0.32's ROCm build lists awq, gptq and compressed-tensors among its
# supported quantizations (vllm/platforms/rocm.py `supported_quantization`) and has
# W4A16 (Triton, Exllama, Conch) and INT8 W8A8 (AITER, Triton) kernels for ROCm
# (vllm/model_executor/kernels/linear/__init__.py `_POSSIBLE_KERNELS`,
# `_POSSIBLE_INT8_KERNELS`); its documentation's hardware table (docs.vllm.ai,
# features/quantization, "Supported Hardware") still marks AWQ, GPTQ and INT8 unsupported
# on AMD and FP8 W8A8 supported. We follow the code; none of it was run on an AMD GPU here.
_MARLIN_4BIT = Serving(min_cc=7.5, fast_cc=8.0, cpu_isa=AVX512_BF16,
                       why="4-bit kernels: Marlin needs compute capability >= 8.0 (older "
                           "GPUs fall back to slower ones); on the CPU build "
                           "cpu_gemm_wna16 exists only with AVX-512 + BF16")

# Order matters: it is the order of the quant_method knob's choices and the order in which
# a checkpoint's name is matched (the first tag found wins).
QUANT_METHODS: dict[str, QuantMethod] = {m.name: m for m in (
    QuantMethod("none", 16, 2.0, prequantized=False, fp8_hardware=False,
                compute=1.0, accuracy=1.0, name_tag=None, vllm_name=None,
                on_the_fly=ANYWHERE),
    # 4-bit weights carry group scales and zero points (~0.52 B/param at group size 128),
    # the embeddings and lm_head stay 16-bit, and dequantisation costs compute. The prompt
    # used to estimate 0.56 B/param and the simulator 0.6. Neither fits every size: a 70B
    # AWQ checkpoint comes to about 0.56, an 8B one to about 0.7 (its 16-bit embeddings
    # weigh more). The simulator's 0.6 is kept, so dry runs stay identical.
    QuantMethod("awq", 4, 0.6, prequantized=True, fp8_hardware=False,
                compute=1.4, accuracy=0.978, name_tag="awq", vllm_name="awq",
                checkpoint=_MARLIN_4BIT),
    QuantMethod("gptq", 4, 0.6, prequantized=True, fp8_hardware=False,
                compute=1.4, accuracy=0.972, name_tag="gptq", vllm_name="gptq",
                checkpoint=_MARLIN_4BIT),
    # fp8 is the one method vLLM can apply while loading a bf16 checkpoint; an FP8
    # checkpoint also serves weight-only (fp8 Marlin) on Ampere and through a slow torch
    # fallback on the CPU build, where quantizing at load fails on every CPU; on AMD only
    # MI300-class GPUs have FP8 (docs.vllm.ai FP8 W8A8: "GPUs such as Nvidia H100 and AMD
    # MI300x")
    QuantMethod("fp8", 8, 1.0, prequantized=False, fp8_hardware=True,
                compute=0.5, accuracy=0.996, name_tag="fp8", vllm_name="fp8",
                checkpoint=Serving(min_cc=8.0, rocm_arch=MI300_ARCH,
                                   why="fp8 Marlin needs compute capability >= 8.0; on AMD "
                                       "FP8 needs an MI300-class GPU"),
                on_the_fly=Serving(fp8_cores=True, cpu_isa=None,
                                   why="--quantization fp8 fails on every CPU "
                                       "(static_scaled_fp8_quant)")),
    # W8A8 INT8 checkpoints serve on every CPU (CPUInt8ScaledMMLinearKernel) and on GPUs
    # from Turing on (cutlass int8)
    QuantMethod("w8a8_int8", 8, 1.0, prequantized=True, fp8_hardware=False,
                compute=0.5, accuracy=0.993, name_tag="w8a8", vllm_name="compressed-tensors",
                checkpoint=Serving(min_cc=7.5, why="int8 GEMMs need compute capability "
                                                   ">= 7.5")),
)}
# Methods a checkpoint found or written by forge may carry that the quant_method knob does
# not offer by name (layer-2 candidates name their checkpoint): compressed-tensors 4-bit
# weight-only (llm-compressor's GPTQ/AWQ output, or round-to-nearest) uses awq's kernels.
CHECKPOINT_ONLY: dict[str, QuantMethod] = {m.name: m for m in (
    QuantMethod("w4a16", 4, 0.6, prequantized=True, fp8_hardware=False,
                compute=1.4, accuracy=0.97, name_tag="w4a16", vllm_name="compressed-tensors",
                checkpoint=_MARLIN_4BIT),
)}
# A method this table does not know (a checkpoint may name any): middling guesses.
UNKNOWN = QuantMethod("unknown", 8, 1.0, prequantized=True, fp8_hardware=False,
                      compute=1.2, accuracy=0.99, name_tag=None, vllm_name=None,
                      checkpoint=Serving(cpu_isa=None))
# An fp8 KV cache: AVX-512 on the CPU build (refused on AVX2-only CPUs); on GPUs it needs
# FP8 hardware to pay off (it hurt throughput on Ampere; on AMD, MI300-class).
FP8_KV = Serving(fp8_cores=True, rocm_arch=MI300_ARCH, cpu_isa=frozenset({"avx512f"}),
                 why="an fp8 KV cache needs FP8 tensor cores on GPUs (slower on Ampere) "
                     "and AVX-512 on the CPU build")


def facts(method: str) -> QuantMethod:
    """The table's row for `method`, or UNKNOWN."""
    return QUANT_METHODS.get(method) or CHECKPOINT_ONLY.get(method, UNKNOWN)


def method_of_checkpoint(checkpoint: str) -> str | None:
    """The method a checkpoint's name suggests (e.g. '...-AWQ' -> 'awq'), or None."""
    name = checkpoint.lower()
    return next((m.name for m in QUANT_METHODS.values()
                 if m.name_tag is not None and m.name_tag in name), None)


def probe_cpu_isa(cpuinfo: Path = Path("/proc/cpuinfo")) -> tuple[str, ...]:
    """The flags of CPU_ISA_FLAGS this CPU has (empty when /proc/cpuinfo is unreadable)."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return ()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return tuple(f for f in CPU_ISA_FLAGS if f in flags)


def has_fp8(hw: Hardware) -> bool:
    """FP8 tensor cores: NVIDIA compute capability >= 8.9 (Ada, Hopper and later) or an
    MI300-class AMD GPU (gfx942)."""
    gpu = hw.gpu
    if gpu is None:
        return False
    if hw.device == "rocm":
        return rocm_arch(hw) in MI300_ARCH
    return _nvidia_cc(hw) >= 8.9


def rocm_arch(hw: Hardware) -> str:
    """An AMD GPU's architecture (gfx942, ...): as rocm-smi reported it, else from an
    MI300-class name; empty when unknown."""
    gpu = hw.gpu
    if gpu is None:
        return ""
    arch = (gpu.compute_capability or "").lower()
    if arch.startswith("gfx"):
        return arch
    name = gpu.name.lower()
    return "gfx950" if ("mi350" in name or "mi355" in name) else (
        "gfx942" if ("mi300" in name or "mi325" in name) else "")


def _nvidia_cc(hw: Hardware) -> float:
    try:
        return float(hw.gpu.compute_capability or 0) if hw.gpu is not None else 0.0
    except ValueError:
        return 0.0


def refusal(serving: Serving | None, hw: Hardware) -> str | None:
    """Why `serving` cannot work on `hw`, or None when the table says it can."""
    if serving is None:
        return "vLLM cannot apply it while loading: it needs a quantized checkpoint"
    if hw.device == "cpu":
        if serving.cpu_isa is None:
            return serving.why or NOWHERE_ON_CPU
        missing = sorted(serving.cpu_isa - set(hw.cpu_isa))
        if missing:
            return f"this CPU lacks {' + '.join(missing)}: {serving.why}"
        return None
    if hw.device == "rocm":
        if serving.rocm_arch is None:
            return serving.why or "vLLM's ROCm build has no kernel for it"
        arch = rocm_arch(hw)
        if serving.rocm_arch and arch not in serving.rocm_arch:
            return (f"needs an MI300-class GPU ({'/'.join(sorted(serving.rocm_arch))}), "
                    f"this one is {arch or 'of an unknown architecture'}: {serving.why}")
    if serving.fp8_cores and not has_fp8(hw):
        return serving.why or "needs FP8 tensor cores (compute capability >= 8.9 or MI300)"
    if hw.device == "cuda" and serving.min_cc and _nvidia_cc(hw) < serving.min_cc:
        return serving.why or f"needs compute capability >= {serving.min_cc}"
    return None


def checkpoint_refusal(method: str, hw: Hardware) -> str | None:
    """Why a checkpoint quantized with `method` cannot be served on `hw`, or None."""
    row = facts(method)
    return "forge does not know it" if row is UNKNOWN else refusal(row.checkpoint, hw)


def vllm_refusal(method: str, listed: Collection[str] | None, version: str) -> str | None:
    """Why the installed vLLM cannot load a checkpoint quantized with `method`, where it
    can tell: `listed` is its `--quantization` choices as `vllm serve --help=all` prints
    them (None when it prints none, as vLLM 0.32 does: then nothing is refused here)."""
    name = facts(method).vllm_name
    if listed is None or name is None or name in listed:
        return None
    return (f"vLLM {version} does not list '{name}' among its --quantization choices; "
            "upgrade vLLM to serve it")


def is_fp8_kv(kv_cache_dtype: str) -> bool:
    """An fp8 KV cache (fp8, fp8_e4m3, fp8_e5m2): one byte per element."""
    return kv_cache_dtype.startswith("fp8")


def method_usable(choice: Scalar, hw: Hardware, simulated: bool) -> bool:
    """Whether quantization method `choice` may be tried here by name: only what vLLM
    applies while loading. A pre-quantized checkpoint is a layer-2 candidate
    (`quant_candidate`), in a dry run as in a real one, so a simulated best recipe names
    a checkpoint that can be deployed instead of a method no checkpoint backs."""
    method = QUANT_METHODS.get(str(choice))
    return method is not None and refusal(method.on_the_fly, hw) is None


def kv_cache_dtype_usable(choice: Scalar, hw: Hardware, simulated: bool) -> bool:
    """An fp8 KV cache needs FP8 hardware to pay off (it hurt throughput on Ampere), and
    AVX-512 (or AMX, which comes with it) on the CPU build, whose attention kernels
    refuse it otherwise (vLLM 0.32 cpu_attn: "requires x86 with AVX-512 or AMX")."""
    return not is_fp8_kv(str(choice)) or refusal(FP8_KV, hw) is None


def usable(methods: Iterable[str], hw: Hardware) -> list[str]:
    """The methods whose checkpoints `hw` serves, in table order."""
    return [m for m in methods if checkpoint_refusal(m, hw) is None]
