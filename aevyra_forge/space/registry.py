"""The knob registry: every setting forge may tune, per layer, with its type, range or
choices, default per hardware class and a one-line note. It drives recipe validation,
the builtin strategy, the simulator, the playbook check and the agent's prompt (through
knobs.KnobSpace, which narrows it to one run).

Based on vLLM's V1 engine: chunked prefill is always on and prefix caching is on by
default, so neither is offered as a win (prefix caching can only be turned off)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from aevyra_forge.core.errors import KnobError
from aevyra_forge.core.values import Device, Hardware, Layer, Scalar

KnobKind = Literal["int", "float", "bool", "choice"]
Target = Literal["config", "quant", "kernel", "compilation", "env"]
HwClass = Literal["cpu", "gpu", "gpu_large", "gpu_huge"]
ALL_DEVICES: frozenset[Device] = frozenset({"cuda", "rocm", "cpu"})
GPU_DEVICES: frozenset[Device] = frozenset({"cuda", "rocm"})
ANY = "*"


@dataclass(frozen=True)
class Knob:
    name: str
    layer: Layer
    kind: KnobKind
    target: Target
    note: str
    default: Mapping[str, Scalar]  # hardware class (or "*") -> default
    devices: frozenset[Device] = ALL_DEVICES
    low: float | None = None
    high: float | None = None
    choices: Mapping[str, tuple[Scalar, ...]] = field(default_factory=dict)  # device|"*"
    grid: tuple[Scalar, ...] = ()  # values worth trying, inside the safe range
    fp8_hardware: bool = False  # needs compute capability >= 8.9 or an MI300-class GPU
    dry_run_only_choices: tuple[Scalar, ...] = ()  # need a checkpoint a real run lacks

    def default_for(self, hw: Hardware) -> Scalar:
        return self.default.get(hw_class(hw), self.default.get(ANY))

    def choices_for(self, hw: Hardware, simulated: bool = False) -> tuple[Scalar, ...]:
        base = self.choices.get(hw.device, self.choices.get(ANY, ()))
        if not simulated:
            base = tuple(c for c in base if c not in self.dry_run_only_choices)
        if self.fp8_hardware and not has_fp8(hw):
            base = tuple(c for c in base if not str(c).startswith("fp8"))
        return base

    def allowed_on(self, hw: Hardware) -> bool:
        return hw.device in self.devices


def format_number(x: float | None) -> str:
    return "-" if x is None else (str(int(x)) if float(x).is_integer() else str(x))


def hw_class(hw: Hardware) -> HwClass:
    """vLLM's own split (EngineArgs.get_batch_defaults): GPUs with >= 160 GiB (MI300X,
    B200) get the largest batch defaults, other GPUs with >= 70 GiB that are not A100s
    (H100, H200) larger ones."""
    if hw.device == "cpu":
        return "cpu"
    gpu = hw.gpu
    if gpu is not None and hw.gpu_memory_gib >= 160:
        return "gpu_huge"
    if gpu is not None and hw.gpu_memory_gib >= 70 and "a100" not in gpu.name.lower():
        return "gpu_large"
    return "gpu"


def has_fp8(hw: Hardware) -> bool:
    gpu = hw.gpu
    if gpu is None:
        return False
    if hw.device == "rocm":
        return "mi300" in gpu.name.lower() or (gpu.compute_capability or "") == "gfx942"
    try:
        return float(gpu.compute_capability or 0) >= 8.9
    except ValueError:
        return False


REGISTRY: tuple[Knob, ...] = (
    # -- layer 1: serving config -------------------------------------------------------
    Knob("max_num_seqs", 1, "int", "config",
         "Most sequences batched per step; raise for throughput under high concurrency, "
         "lower to cut TTFT contention. Bounded by KV-cache capacity.",
         {"gpu_huge": 1024, "gpu_large": 1024, "gpu": 256, "cpu": 128}, low=1, high=4096,
         grid=(8, 16, 32, 64, 128, 256, 512, 1024, 2048)),
    Knob("max_num_batched_tokens", 1, "int", "config",
         "Token budget per scheduler step (chunked prefill is always on in V1); small "
         "favours inter-token latency, above 8192 favours throughput and TTFT.",
         {"gpu_huge": 16384, "gpu_large": 8192, "gpu": 2048, "cpu": 2048}, low=64,
         high=131072,
         grid=(512, 1024, 2048, 4096, 8192, 16384, 32768)),
    Knob("gpu_memory_utilization", 1, "float", "config",
         "Fraction of GPU memory vLLM may use (weights + activations + KV cache); higher "
         "means more KV blocks. 0.95+ risks OOM in sampler warm-up.",
         {ANY: 0.9}, devices=GPU_DEVICES, low=0.5, high=0.98,
         grid=(0.8, 0.85, 0.9, 0.92, 0.95)),
    Knob("max_model_len", 1, "int", "config",
         "Context limit; defaults to the model's. Cut it to what the workload needs when "
         "the KV cache cannot hold the full context (vLLM names the largest that fits).",
         {ANY: None}, low=128, high=1048576,
         grid=(2048, 4096, 8192, 16384, 32768)),
    Knob("block_size", 1, "choice", "config",
         "Tokens per KV-cache block. GPU default 16; the CPU backend needs a multiple of "
         "32 and defaults to 128.",
         {"cpu": 128, ANY: 16},
         choices={"cpu": (32, 64, 128), ANY: (16, 32)}),
    Knob("enable_prefix_caching", 1, "bool", "config",
         "On by default in V1 with negligible overhead; turning it off only helps "
         "workloads with no shared prefixes.",
         {ANY: True}),
    Knob("tensor_parallel_size", 1, "choice", "config",
         "Shard the model over GPUs; for a model that fits one GPU, replicas usually beat "
         "TP (vllm#1873).",
         {ANY: 1}, devices=GPU_DEVICES, choices={ANY: (1, 2, 4, 8)}),
    Knob("dtype", 1, "choice", "config",
         "Activation/weight dtype. On CPUs without AVX-512 BF16, float32 is about twice "
         "as fast as bfloat16; on GPUs keep auto (bf16, or fp16 on T4).",
         {ANY: "auto"}, choices={"cpu": ("auto", "bfloat16", "float32"),
                                 ANY: ("auto", "bfloat16", "float16")}),
    Knob("VLLM_CPU_KVCACHE_SPACE", 1, "int", "env",
         "KV-cache size in GiB on the CPU backend (GPU memory utilization does not apply "
         "there).",
         {ANY: 4}, devices=frozenset({"cpu"}), low=1, high=512, grid=(1, 2, 4, 8, 16)),
    # -- layer 2: quantization ---------------------------------------------------------
    Knob("quant_method", 2, "choice", "quant",
         "Weight quantization. A pre-quantized checkpoint is preferred; fp8 can also be "
         "applied on the fly. vLLM picks the fast kernel from the checkpoint itself.",
         {ANY: "none"},
         choices={"cpu": ("none", "w8a8_int8"),
                  ANY: ("none", "awq", "gptq", "fp8", "w8a8_int8")},
         fp8_hardware=True, dry_run_only_choices=("awq", "gptq", "w8a8_int8")),
    Knob("kv_cache_dtype", 2, "choice", "quant",
         "fp8 KV cache doubles KV capacity; it needs FP8 hardware to be fast (it hurt "
         "throughput on Ampere) and costs a little accuracy.",
         {ANY: "auto"}, devices=GPU_DEVICES,
         choices={ANY: ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")}, fp8_hardware=True),
    # -- layer 3: kernels --------------------------------------------------------------
    Knob("attention_backend", 3, "choice", "kernel",
         "Attention kernel via --attention-backend (the VLLM_ATTENTION_BACKEND variable "
         "is ignored by recent vLLM). Unset lets vLLM choose.",
         {ANY: None}, devices=GPU_DEVICES,
         choices={"cuda": ("FLASH_ATTN", "FLASHINFER", "TRITON_ATTN", "FLEX_ATTENTION"),
                  "rocm": ("ROCM_ATTN", "ROCM_AITER_FA", "TRITON_ATTN")}),
    Knob("cudagraph_mode", 3, "choice", "compilation",
         "CUDA-graph capture mode in compilation_config; FULL_AND_PIECEWISE is the "
         "default. Capturing less speeds start-up and usually slows decode.",
         {ANY: "FULL_AND_PIECEWISE"}, devices=GPU_DEVICES,
         choices={ANY: ("FULL_AND_PIECEWISE", "PIECEWISE", "FULL", "FULL_DECODE_ONLY",
                        "NONE")}),
    Knob("enforce_eager", 3, "bool", "config",
         "Skip CUDA graphs / compilation: faster boot, slower steady state (10-17% on the "
         "CPU build).",
         {ANY: False}),
    Knob("VLLM_CPU_OMP_THREADS_BIND", 3, "choice", "env",
         "OpenMP thread binding for the CPU backend: 'auto' binds one thread per "
         "physical core of a NUMA node; 'nobind' leaves placement to the OS.",
         {ANY: "auto"}, devices=frozenset({"cpu"}), choices={ANY: ("auto", "nobind")}),
)

KNOBS: dict[str, Knob] = {k.name: k for k in REGISTRY}

# Knobs whose vLLM flag differs from the knob name (config knobs are named as vLLM names
# them); None means vLLM has no flag for it (environment variables).
VLLM_FLAG: dict[str, str | None] = {
    "quant_method": "quantization",
    "kv_cache_dtype": "kv_cache_dtype",
    "attention_backend": "attention_backend",
    "cudagraph_mode": "compilation_config",
    "VLLM_CPU_KVCACHE_SPACE": None,
    "VLLM_CPU_OMP_THREADS_BIND": None,
}

NOT_TUNABLE: dict[str, str] = {
    "enable_chunked_prefill": "always on in the V1 engine",
    "async_scheduling": "on by default in recent vLLM",
    "VLLM_ATTENTION_BACKEND": "ignored by recent vLLM; use attention_backend",
}


def get(name: str) -> Knob:
    knob = KNOBS.get(name)
    if knob is None:
        raise KnobError(f"unknown knob '{name}'; known knobs: {', '.join(KNOBS)}")
    return knob
