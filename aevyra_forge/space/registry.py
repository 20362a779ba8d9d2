"""The knob registry: every setting forge may tune, per layer, with its type, range or
choices, default per hardware class, gate, the place it lives in a recipe (which decides
how it reaches vLLM) and a one-line note. Recipe validation and rendering, the builtin
strategy, the simulator, the playbook check and the agent's prompt all read it (through
knob_space.KnobSpace, which narrows it to one run). A new knob is one entry in REGISTRY;
a third-party package adds its own through the `aevyra_forge.knobs` entry-point group
(space/plugins.py), and both go through `register`.

Based on vLLM's V1 engine: chunked prefill is always on and prefix caching is on by
default, so neither is offered as a win (prefix caching can only be turned off)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from aevyra_forge.core.errors import KnobError
from aevyra_forge.core.values import Device, Hardware, Layer, Scalar
from aevyra_forge.space import layer2, quant
from aevyra_forge.space.placement import (
    CompilationField,
    EngineArg,
    EnvVar,
    Placement,
    PluginSlot,
    RecipeField,
    layout_position,
)

KnobKind = Literal["int", "float", "bool", "choice"]
HwClass = Literal["cpu", "gpu", "gpu_large", "gpu_huge"]
# (choice, hardware, simulated) -> whether the choice may be tried there
ChoiceGate = Callable[[Scalar, Hardware, bool], bool]
ALL_DEVICES: frozenset[Device] = frozenset({"cuda", "rocm", "cpu"})
GPU_DEVICES: frozenset[Device] = frozenset({"cuda", "rocm"})
ANY = "*"


@dataclass(frozen=True)
class Knob:
    """One tunable setting, declared once: what it takes, where it lives in a recipe and
    which hardware may touch it."""

    name: str
    layer: Layer
    kind: KnobKind
    placement: Placement  # where it lives in a recipe, and so how vLLM receives it
    note: str
    default: Mapping[str, Scalar]  # hardware class (or "*") -> default
    devices: frozenset[Device] = ALL_DEVICES
    low: float | None = None
    high: float | None = None
    choices: Mapping[str, tuple[Scalar, ...]] = field(default_factory=dict)  # device|"*"
    grid: tuple[Scalar, ...] = ()  # values worth trying, inside the safe range
    gate: ChoiceGate | None = None  # drops the choices this hardware cannot take
    # knobs set alongside this one when it leaves its default and the recipe leaves them
    # unset (dropped again when it returns): --spec-method needs --spec-tokens
    companions: Mapping[str, Scalar] = field(default_factory=dict)
    needs: str | None = None  # a knob that must be off its default for this one to apply
    # choice -> the distribution it needs in the vLLM environment (never installed by us)
    choice_packages: Mapping[str, str] = field(default_factory=dict)

    def default_for(self, hw: Hardware) -> Scalar:
        return self.default.get(hw_class(hw), self.default.get(ANY))

    def choices_for(self, hw: Hardware, simulated: bool = False) -> tuple[Scalar, ...]:
        base = self.choices.get(hw.device, self.choices.get(ANY, ()))
        if self.gate is not None:
            base = tuple(c for c in base if self.gate(c, hw, simulated))
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


def auto_dtype(hw: Hardware) -> str:
    """What dtype=auto resolves to here for a bf16 checkpoint: float16 on GPUs without
    bf16 support (compute capability < 8.0, e.g. T4), bfloat16 elsewhere (the CPU build
    included)."""
    gpu = hw.gpu
    if hw.device == "cuda" and gpu is not None:
        try:
            if float(gpu.compute_capability or 8.0) < 8.0:
                return "float16"
        except ValueError:
            pass
    return "bfloat16"


def auto_attention_backend(hw: Hardware) -> str | None:
    """The attention backend vLLM picks when none is named: FLASH_ATTN on NVIDIA from
    compute capability 8.0, TRITON_ATTN below it, ROCM_ATTN on AMD (None: no GPU)."""
    gpu = hw.gpu
    if hw.device == "rocm":
        return "ROCM_ATTN"
    if hw.device != "cuda" or gpu is None:
        return None
    try:
        return "FLASH_ATTN" if float(gpu.compute_capability or 8.0) >= 8.0 else "TRITON_ATTN"
    except ValueError:
        return "FLASH_ATTN"


def auto_capture_size(max_num_seqs: int) -> int:
    """vLLM's max_cudagraph_capture_size when unset: min(512, 2 x max_num_seqs)."""
    return min(2 * max_num_seqs, 512)


def _dtype_usable(choice: Scalar, hw: Hardware, simulated: bool) -> bool:
    """"auto" already is one dtype here, so that one is not a separate choice; GPUs
    without bf16 (auto is float16 there) reject bfloat16 at boot."""
    auto = auto_dtype(hw)
    return choice != auto and not (auto == "float16" and choice == "bfloat16")


def _within_gpu_count(choice: Scalar, hw: Hardware, simulated: bool) -> bool:
    return isinstance(choice, int) and choice <= max(1, hw.gpu_count)


def _replicas_fit(choice: Scalar, hw: Hardware, simulated: bool) -> bool:
    """Data-parallel replicas each need a GPU of their own (times tensor parallelism,
    which check_combination enforces)."""
    return choice == 1 or (isinstance(choice, int) and choice <= hw.gpu_count)


# -- places in a recipe ----------------------------------------------------------------
CONFIG, COMPILATION, ENV = EngineArg(), CompilationField(), EnvVar()
# A checkpoint carries its own quantization config; forcing --quantization on it can pick
# a slower kernel than vLLM's detection (vllm#21376), so only on-the-fly methods pass it.
QUANT_METHOD = RecipeField(("quant", "method"), "--quantization", ("none",),
                           with_checkpoint=False)
KV_CACHE_DTYPE = RecipeField(("quant", "kv_cache_dtype"), "--kv-cache-dtype", ("auto",))
ATTENTION_BACKEND = RecipeField(("kernel", "attention_backend"), "--attention-backend",
                                (None, ""))
PLUGIN = PluginSlot()  # KnobSpace gives it this run's kernel plug-in candidates

REGISTRY: tuple[Knob, ...] = (
    # -- layer 1: serving config -------------------------------------------------------
    Knob("max_num_seqs", 1, "int", CONFIG,
         "Most sequences batched per step; raise for throughput under high concurrency, "
         "lower to cut TTFT contention. Bounded by KV-cache capacity.",
         {"gpu_huge": 1024, "gpu_large": 1024, "gpu": 256, "cpu": 128}, low=1, high=4096,
         grid=(8, 16, 32, 64, 128, 256, 512, 1024, 2048)),
    Knob("max_num_batched_tokens", 1, "int", CONFIG,
         "Token budget per scheduler step (chunked prefill is always on in V1); small "
         "favours inter-token latency, above 8192 favours throughput and TTFT.",
         {"gpu_huge": 16384, "gpu_large": 8192, "gpu": 2048, "cpu": 2048}, low=64,
         high=131072,
         grid=(512, 1024, 2048, 4096, 8192, 16384, 32768)),
    Knob("gpu_memory_utilization", 1, "float", CONFIG,
         "Fraction of GPU memory vLLM may use (weights + activations + KV cache); higher "
         "means more KV blocks. 0.95+ risks OOM in sampler warm-up.",
         {ANY: 0.9}, devices=GPU_DEVICES, low=0.5, high=0.98,
         grid=(0.8, 0.85, 0.9, 0.92, 0.95)),
    Knob("max_model_len", 1, "int", CONFIG,
         "Context limit; defaults to the model's. Cut it to what the workload needs when "
         "the KV cache cannot hold the full context (vLLM names the largest that fits).",
         {ANY: None}, low=128, high=1048576,
         grid=(2048, 4096, 8192, 16384, 32768)),
    Knob("block_size", 1, "choice", CONFIG,
         "Tokens per KV-cache block. GPU default 16; the CPU backend needs a multiple of "
         "32 and defaults to 128.",
         {"cpu": 128, ANY: 16},
         choices={"cpu": (32, 64, 128), ANY: (16, 32)}),
    Knob("enable_prefix_caching", 1, "bool", CONFIG,
         "On by default in V1 with negligible overhead; turning it off only helps "
         "workloads with no shared prefixes.",
         {ANY: True}),
    Knob("tensor_parallel_size", 1, "choice", CONFIG,
         "Shard the model over GPUs; for a model that fits one GPU, replicas usually beat "
         "TP (vllm#1873).",
         {ANY: 1}, devices=GPU_DEVICES, choices={ANY: (1, 2, 4, 8)},
         gate=_within_gpu_count),
    Knob("dtype", 1, "choice", CONFIG,
         "Activation/weight dtype. On CPUs without AVX-512 BF16, float32 is about twice "
         "as fast as bfloat16; on GPUs keep auto (bf16, or fp16 on T4).",
         {ANY: "auto"}, choices={"cpu": ("auto", "bfloat16", "float32"),
                                 ANY: ("auto", "bfloat16", "float16")},
         gate=_dtype_usable),
    Knob("VLLM_CPU_KVCACHE_SPACE", 1, "int", ENV,
         "KV-cache size in GiB on the CPU backend (GPU memory utilization does not apply "
         "there).",
         {ANY: 4}, devices=frozenset({"cpu"}), low=1, high=512, grid=(1, 2, 4, 8, 16)),
    Knob("data_parallel_size", 1, "choice", CONFIG,
         "Independent replicas of the model behind one API server, one per GPU (times "
         "tensor_parallel_size): for a model that fits one GPU, the throughput lever on a "
         "multi-GPU host; latency per request is unchanged.",
         {ANY: 1}, devices=GPU_DEVICES, choices={ANY: (1, 2, 4, 8)}, gate=_replicas_fit),
    Knob("long_prefill_token_threshold", 1, "int", CONFIG,
         "A prompt longer than this is prefilled in chunks of at most this many tokens per "
         "step, so short requests are not stuck behind it (0 = no cap). Pays on traces that "
         "mix long prompts with short ones; costs the long ones' TTFT.",
         {ANY: 0}, low=0, high=131072, grid=(0, 256, 512, 1024, 2048, 4096)),
    Knob("spec_method", 1, "choice", CONFIG,
         "Speculative decoding with no draft model: 'ngram' proposes tokens copied from the "
         "prompt, 'suffix' from earlier outputs (needs arctic-inference). Lossless; pays when "
         "outputs repeat their input (summaries, code edits, RAG) at low concurrency, costs "
         "at high concurrency. A draft model / EAGLE head only where one is known.",
         {ANY: None}, choices={ANY: (None, "ngram", "suffix")},
         companions={"spec_tokens": 3}, choice_packages={"suffix": "arctic-inference"}),
    Knob("spec_tokens", 1, "int", CONFIG,
         "Tokens proposed per speculative step (with spec_method): more pays only with high "
         "acceptance (highly repetitive output).",
         {ANY: None}, low=1, high=16, grid=(1, 2, 3, 4, 5, 8), needs="spec_method"),
    Knob("spec_model", 1, "choice", CONFIG,
         "The draft model or EAGLE head a draft spec_method runs; set by forge with the "
         "method, offered only where a Hub lookup found one for this model (space/drafts.py, "
         "KnobSpace.offer_drafts).",
         {ANY: None}, choices={ANY: (None,)}, needs="spec_method"),
    # -- layer 2: quantization ---------------------------------------------------------
    Knob("quant_method", 2, "choice", QUANT_METHOD,
         "Weight quantization. A pre-quantized checkpoint is preferred; fp8 can also be "
         "applied on the fly. vLLM picks the fast kernel from the checkpoint itself.",
         {ANY: "none"},
         choices={ANY: tuple(quant.QUANT_METHODS)}, gate=quant.method_usable),
    Knob("kv_cache_dtype", 2, "choice", KV_CACHE_DTYPE,
         "fp8 KV cache doubles KV capacity; it needs FP8 hardware to be fast (it hurt "
         "throughput on Ampere), AVX-512 on the CPU build, and costs a little accuracy.",
         {ANY: "auto"},
         choices={ANY: ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")},
         gate=quant.kv_cache_dtype_usable),
    Knob("quant_candidate", 2, "choice", layer2.SLOT,
         "A quantized checkpoint forge lists for this run (a pre-quantized Hub sibling, or "
         "one forge writes here), chosen by name; vLLM reads the method from it. 'none' "
         "serves the model's own weights. Accuracy is checked against the baseline.",
         {ANY: layer2.NO_CANDIDATE}, choices={ANY: (layer2.NO_CANDIDATE,)}),
    # -- layer 3: kernels --------------------------------------------------------------
    Knob("attention_backend", 3, "choice", ATTENTION_BACKEND,
         "Attention kernel via --attention-backend (the VLLM_ATTENTION_BACKEND variable "
         "is ignored by recent vLLM). Unset lets vLLM choose.",
         {ANY: None}, devices=GPU_DEVICES,
         choices={"cuda": ("FLASH_ATTN", "FLASHINFER", "TRITON_ATTN", "FLEX_ATTENTION"),
                  "rocm": ("ROCM_ATTN", "ROCM_AITER_FA", "TRITON_ATTN")}),
    Knob("cudagraph_mode", 3, "choice", COMPILATION,
         "CUDA-graph capture mode in compilation_config; FULL_AND_PIECEWISE is the "
         "default. Capturing less speeds start-up and usually slows decode.",
         {ANY: "FULL_AND_PIECEWISE"}, devices=GPU_DEVICES,
         choices={ANY: ("FULL_AND_PIECEWISE", "PIECEWISE", "FULL", "FULL_DECODE_ONLY",
                        "NONE")}),
    Knob("enforce_eager", 3, "bool", CONFIG,
         "Skip CUDA graphs / compilation: faster boot, slower steady state (10-17% on the "
         "CPU build).",
         {ANY: False}),
    Knob("VLLM_CPU_OMP_THREADS_BIND", 3, "choice", ENV,
         "OpenMP thread binding for the CPU backend: 'auto' binds one thread per "
         "physical core of a NUMA node; 'nobind' leaves placement to the OS.",
         {ANY: "auto"}, devices=frozenset({"cpu"}), choices={ANY: ("auto", "nobind")}),
    Knob("optimization_level", 3, "choice", CONFIG,
         "vLLM's -O level: 0 no compilation or CUDA graphs (fastest boot), 1 compiled with "
         "piecewise graphs, 2 (default) full and piecewise graphs, 3 currently as 2. Lower "
         "boots faster and decodes slower.",
         {ANY: 2}, choices={ANY: (0, 1, 2, 3)}),
    Knob("max_cudagraph_capture_size", 3, "int", CONFIG,
         "Largest decode batch captured as a CUDA graph (default min(512, 2 x max_num_seqs)); "
         "larger batches run without graphs. Match it to the concurrency the workload "
         "reaches: capturing fewer sizes boots faster and frees graph memory.",
         {ANY: None}, devices=GPU_DEVICES, low=1, high=4096,
         grid=(8, 16, 32, 64, 128, 256, 512, 1024)),
    Knob("kernel_plugin", 3, "choice", PLUGIN,
         "A kernel from an installed plug-in (an `aevyra_forge.kernel_generators` entry "
         "point), enabled through VLLM_PLUGINS for this experiment only; 'none' is vLLM's "
         "own. Proven to have loaded from the server log, or the boot counts as failed.",
         {ANY: "none"}, choices={ANY: ("none",)}),
)

KNOBS: dict[str, Knob] = {}


def register(knob: Knob) -> Knob:
    """Add a knob to the registry: the built-in ones below, and those third-party packages
    declare through the `aevyra_forge.knobs` entry-point group (plugins.load_knobs).
    Registering the same knob again is a no-op; another knob under a taken name, or in a
    place it cannot live, is refused."""
    known = KNOBS.get(knob.name)
    if known is not None:
        if known == knob:
            return known
        raise KnobError(f"knob '{knob.name}' is already registered")
    if knob.name in NOT_TUNABLE:
        raise KnobError(f"'{knob.name}' is not tunable: {NOT_TUNABLE[knob.name]}")
    layout_position(knob.placement.path)  # a place a recipe has, or ValueError
    KNOBS[knob.name] = knob
    return knob

NOT_TUNABLE: dict[str, str] = {
    "enable_chunked_prefill": "always on in the V1 engine",
    "async_scheduling": "on by default in recent vLLM",
    "VLLM_ATTENTION_BACKEND": "ignored by recent vLLM; use attention_backend",
    "VLLM_PLUGINS": "forge sets it on every boot; a plug-in is chosen with kernel_plugin",
}

for _knob in REGISTRY:
    register(_knob)


def places(knobs: Iterable[Knob]) -> list[list[Knob]]:
    """The knobs grouped by the place they live in a recipe, in recipe.yaml's key order
    (which vLLM's argv follows)."""
    groups: dict[tuple[str, ...], list[Knob]] = {}
    for knob in knobs:
        groups.setdefault(knob.placement.path, []).append(knob)
    return [groups[path] for path in sorted(groups, key=layout_position)]


def get(name: str) -> Knob:
    knob = KNOBS.get(name)
    if knob is None:
        raise KnobError(f"unknown knob '{name}'; known knobs: {', '.join(KNOBS)}")
    return knob
