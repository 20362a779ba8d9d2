"""The dry-run stand-in for booting `vllm serve` and benchmarking it (SPEC §7): a seeded
performance model of the vLLM V1 engine (boot-time memory budget, continuous batching with
chunked prefill, KV blocks, preemption, prefix caching, quantization, CUDA graphs) that
produces the same metrics and failure statuses as the real launcher and bench."""

from __future__ import annotations

import hashlib
import heapq
import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from aevyra_forge import knobs
from aevyra_forge.bench import RequestResult, aggregate
from aevyra_forge.errors import UsageError
from aevyra_forge.hardware import GpuSpec
from aevyra_forge.knobs import KnobSpace
from aevyra_forge.modelinfo import ModelProfile
from aevyra_forge.models import (
    BenchMetrics,
    BenchOutcome,
    Hardware,
    LaunchFailure,
    Scalar,
    Status,
)
from aevyra_forge.recipe import Recipe
from aevyra_forge.workload import CHARS_PER_TOKEN, Workload

GIB = 1024**3  # bytes
MIB = 1024**2  # bytes

# -- memory at boot -------------------------------------------------------------------
NON_TORCH_GIB = 0.6  # CUDA context, cuBLAS / NCCL workspaces, per GPU
ACT_BYTES_PER_TOKEN_HIDDEN = 80.0  # profile-run activation peak per batched token per hidden unit
SAMPLER_BYTES_PER_SEQ = 0.5 * MIB  # fp32 logits + sampling buffers per max_num_seqs slot
GRAPH_GIB_BASE = 0.25  # CUDA-graph pool, fixed part (GiB)
GRAPH_GIB_PER_LAYER = 0.01  # CUDA-graph pool per decoder layer (GiB)
GRAPH_MEM_SHARE = {"FULL_AND_PIECEWISE": 1.0, "FULL": 0.7, "FULL_DECODE_ONLY": 0.6,
                   "PIECEWISE": 0.6, "NONE": 0.0}
LOAD_SLACK_GIB = 0.4  # allocations under load outside vLLM's budget (fragmentation, NCCL)
LOAD_BYTES_PER_SEQ = 1.0 * MIB  # per running sequence, outside the profiled budget
WARMUP_OOM_UTIL = 0.95  # from here sampler warm-up may OOM (vllm#15105)
# (bytes per parameter, linear-layer compute multiplier, accuracy vs bf16)
QUANT: dict[str, tuple[float, float, float]] = {
    "none": (2.0, 1.0, 1.0),
    "fp8": (1.0, 0.5, 0.996),  # compute x0.5 on FP8 tensor cores only
    "w8a8_int8": (1.0, 0.5, 0.993),
    "awq": (0.6, 1.4, 0.978),  # int4 + scales + bf16 embeddings; dequant costs compute
    "gptq": (0.6, 1.4, 0.972),
}
UNKNOWN_QUANT = (1.0, 1.2, 0.99)  # a method this table does not know
FP8_MARLIN_COMPUTE = 1.1  # weight-only FP8 through Marlin on GPUs without FP8 tensor cores
FP8_KV_ACCURACY = 0.997
DTYPE_ACCURACY = {"float16": 0.998, "float32": 0.999}  # numerics differ from bf16

# -- step time ------------------------------------------------------------------------
BW_EFFICIENCY = 0.7  # achieved / datasheet memory bandwidth
INT4_BW_EFFICIENCY = 0.55  # Marlin int4 GEMV reaches less of the bandwidth at small batch
MFU = 0.5  # achieved / datasheet tensor-core FLOP/s
FP32_FLOPS_SHARE = 0.25  # float32 runs without 16-bit tensor cores
STEP_BASE_S = 1.2e-3  # scheduler + sampler + output processing per engine step
PER_SEQ_S = 8e-6  # per scheduled sequence (bookkeeping, detokenize)
EAGER_LAYER_S = 0.12e-3  # kernel-launch overhead per layer per step without CUDA graphs
PIECEWISE_LAYER_S = 0.03e-3  # same, when only attention runs outside graphs
EAGER_KERNEL_PENALTY = 1.04  # no torch.compile fusions
MAX_CAPTURE_SEQS = 512  # larger decode batches run piecewise
# cudagraph mode -> (per-layer launch cost on decode-only steps, on mixed steps), seconds
GRAPH_LAUNCH = {"FULL_AND_PIECEWISE": (0.0, PIECEWISE_LAYER_S),
                "FULL": (0.0, 2 * PIECEWISE_LAYER_S), "FULL_DECODE_ONLY": (0.0, EAGER_LAYER_S),
                "PIECEWISE": (PIECEWISE_LAYER_S, PIECEWISE_LAYER_S),
                "NONE": (EAGER_LAYER_S, EAGER_LAYER_S)}
# attention backend -> (KV-read / attention time factor, extra seconds per step)
BACKENDS = {"FLASH_ATTN": (1.0, 0.0), "FLASHINFER": (0.95, 60e-6),
            "TRITON_ATTN": (1.12, 0.0), "FLEX_ATTENTION": (1.3, 0.0),
            "ROCM_ATTN": (1.0, 0.0), "ROCM_AITER_FA": (0.92, 0.0)}
FP8_KV_SOFT_FACTOR = 1.25  # fp8 KV dequantised in software without FP8 hardware
ALLREDUCE_LATENCY_S = 10e-6  # per all-reduce (two per layer under TP)
INTERCONNECT_BPS = 150e9  # effective all-reduce bus bandwidth, bytes/s
CLIENT_LATENCY_S = 0.8e-3  # HTTP + streaming round trip added to TTFT and E2E

# -- boot time (seconds) --------------------------------------------------------------
BOOT_BASE_S = 22.0  # imports, engine and API-server start
LOAD_BPS = 2.5e9  # weight loading from a warm page cache, bytes/s
COMPILE_S = 28.0  # torch.compile with a warm cache
CAPTURE_S = {"FULL_AND_PIECEWISE": 20.0, "FULL": 12.0, "FULL_DECODE_ONLY": 10.0,
             "PIECEWISE": 12.0, "NONE": 0.0}
PER_WORKER_S = 6.0  # each extra tensor-parallel worker


@dataclass(frozen=True)
class _Settings:
    """The recipe's effective engine settings (defaults filled in by the knob space)."""

    tp: int
    seqs: int
    batched: int
    util: float
    max_len: int
    block: int
    dtype: str
    act_dtype: str  # what actually runs: "auto" means float16 on GPUs without bf16
    method: str
    kv_dtype: str
    eager: bool
    mode: str  # cudagraph mode, NONE under enforce_eager
    backend: str
    caching: bool


@dataclass(frozen=True)
class _Plan:
    """What the step model needs, derived once at boot (seconds, tokens, blocks)."""

    max_num_seqs: int
    max_batched: int
    block_size: int
    num_blocks: int
    max_model_len: int
    prefix_caching: bool
    weight_s: float  # streaming the weights once
    kv_s_per_token: float  # reading one context token's KV
    flop_s_per_token: float  # linear layers for one token
    attn_s_per_pair: float  # prefill attention per (query token, context token)
    comm_fixed_s: float
    comm_s_per_token: float
    decode_launch_s: float
    mixed_launch_s: float
    headroom_bytes: float  # GPU memory outside vLLM's budget


@dataclass(frozen=True)
class SimServer:
    """A booted simulated server."""

    recipe: Recipe
    url: str
    boot_s: float
    kv_capacity_tokens: int
    plan: _Plan = field(repr=False)


def _rng(*parts: object) -> np.random.Generator:
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


class SimulatedEngine:
    """Launcher + benchmarker for --dry-run. Results depend only on (seed, recipe,
    workload, concurrency, pass index), never on call order."""

    def __init__(self, hw: Hardware, spec: GpuSpec, model: ModelProfile, space: KnobSpace,
                 seed: int = 0, noise_cv: float = 0.03) -> None:
        self.hw, self.spec, self.model, self.space = hw, spec, model, space
        self.seed = seed
        self.noise_cv = noise_cv

    # -- boot --------------------------------------------------------------------------
    def launch(self, recipe: Recipe, log_path: Path) -> SimServer | LaunchFailure:
        lines: list[str] = []
        result = self._boot(recipe, lines)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text("\n".join(lines) + "\n")
        return result

    def _settings(self, recipe: Recipe) -> _Settings:
        def k(name: str) -> Scalar:
            return self.space.value(recipe, knobs.get(name))

        dtype = str(k("dtype"))
        eager = bool(k("enforce_eager"))
        return _Settings(
            tp=int(k("tensor_parallel_size") or 1), seqs=int(k("max_num_seqs") or 1),
            batched=int(k("max_num_batched_tokens") or 1),
            util=float(k("gpu_memory_utilization") or 0.9),
            max_len=int(k("max_model_len") or 1), block=int(k("block_size") or 16),
            dtype=dtype, act_dtype="float16" if dtype == "auto" and not self.spec.bf16
            else dtype, method=_quant_method(recipe), kv_dtype=str(k("kv_cache_dtype")),
            eager=eager, mode="NONE" if eager else str(k("cudagraph_mode")),
            backend=str(k("attention_backend") or _default_backend(self.spec)),
            caching=bool(k("enable_prefix_caching")))

    def _boot(self, recipe: Recipe, log: list[str]) -> SimServer | LaunchFailure:
        spec, model, s = self.spec, self.model, self._settings(recipe)
        jitter = float(_rng(self.seed, recipe.id, "boot").lognormal(0.0, 0.05))
        log.append(f"INFO [sim] vLLM V1 engine (simulated) on {spec.name}: model="
                   f"{recipe.serve_model}, dtype={s.act_dtype}, max_seq_len={s.max_len}, "
                   f"tensor_parallel_size={s.tp}, quantization={s.method}, kv_cache_dtype="
                   f"{s.kv_dtype}, enforce_eager={s.eager}, cudagraph_mode={s.mode}, "
                   f"attention_backend={s.backend}")

        def fail(status: Status, msg: str, at_s: float, n: int | None = None
                 ) -> LaunchFailure:
            log.append(f"ERROR [sim] {msg}")
            return LaunchFailure(status=status, reason=msg, boot_s=round(at_s * jitter, 2),
                                 suggested_max_model_len=n)

        gpus = max(1, self.hw.gpu_count)
        if s.tp > gpus:
            return fail("boot_failed", f"ValueError: tensor_parallel_size ({s.tp}) is larger "
                        f"than the number of available GPUs ({gpus}) on this node", 12.0)
        if s.dtype == "bfloat16" and not spec.bf16:
            return fail("boot_failed", f"ValueError: Bfloat16 needs compute capability 8.0 or "
                        f"higher; {spec.name} has {spec.compute_capability}. Use --dtype "
                        "float16", 12.0)
        if not _backend_ok(s.backend, spec):
            return fail("boot_failed", f"ValueError: attention backend {s.backend} is not "
                        f"supported on {spec.name} (compute capability "
                        f"{spec.compute_capability})", 14.0)
        if s.batched < s.seqs:
            return fail("boot_failed", f"ValueError: max_num_batched_tokens ({s.batched}) "
                        f"must be greater than or equal to max_num_seqs ({s.seqs})", 10.0)
        if s.max_len > model.max_context:
            return fail("boot_failed", f"ValueError: max_model_len ({s.max_len}) is greater "
                        f"than the model's context length ({model.max_context})", 10.0)

        elem = 4.0 if s.act_dtype == "float32" else 2.0  # bytes per activation element
        bpp = elem if s.method == "none" else QUANT.get(s.method, UNKNOWN_QUANT)[0]
        weight_bytes = model.params_b * 1e9 * bpp / s.tp
        kv_token_bytes = model.kv_bytes_per_token(
            1.0 if s.kv_dtype.startswith("fp8") else elem) / s.tp
        gpu_bytes = (self.hw.gpu_memory_gib or spec.memory_gib) * GIB
        act = (s.batched * model.hidden_size * ACT_BYTES_PER_TOKEN_HIDDEN * elem / 2
               + s.seqs * SAMPLER_BYTES_PER_SEQ)
        graphs = (GRAPH_GIB_BASE + GRAPH_GIB_PER_LAYER * model.num_layers) * GIB \
            * GRAPH_MEM_SHARE.get(s.mode, 1.0)
        budget = gpu_bytes * s.util - weight_bytes - act - graphs - NON_TORCH_GIB * GIB
        load_s = BOOT_BASE_S + PER_WORKER_S * (s.tp - 1) + weight_bytes * s.tp / LOAD_BPS
        log.append(f"INFO [sim] Model loading took {weight_bytes / GIB:.2f} GiB per GPU and "
                   f"{load_s - BOOT_BASE_S:.1f} seconds")
        log.append(f"INFO [sim] Memory profiling: activation peak {act / GIB:.2f} GiB, CUDA "
                   f"graphs {graphs / GIB:.2f} GiB; available KV cache memory "
                   f"{budget / GIB:.2f} GiB")
        if budget <= 0:
            return fail("oom", "ValueError: No available memory for the cache blocks. Try "
                        "increasing `gpu_memory_utilization` when initializing the engine.",
                        load_s)
        num_blocks = int(budget // (kv_token_bytes * s.block))
        capacity = num_blocks * s.block
        if capacity < s.max_len:
            need_gib = s.max_len * kv_token_bytes / GIB
            return fail("boot_failed", f"ValueError: To serve at least one request with the "
                        f"model's max seq len ({s.max_len}), {need_gib:.2f} GiB KV cache is "
                        f"needed, which is larger than the available KV cache memory "
                        f"({budget / GIB:.2f} GiB). Based on the available memory, the "
                        f"estimated maximum model length is {capacity}. Try increasing "
                        "`gpu_memory_utilization` or decreasing `max_model_len` when "
                        "initializing the engine.", load_s, capacity)
        log.append(f"INFO [sim] GPU KV cache size: {capacity:,} tokens")
        log.append(f"INFO [sim] Maximum concurrency for {s.max_len:,} tokens per request: "
                   f"{capacity / s.max_len:.2f}x")
        boot_s = load_s + (0.0 if s.eager else COMPILE_S) + CAPTURE_S.get(s.mode, 0.0) * (
            0.5 + model.num_layers / 64)
        if s.util >= WARMUP_OOM_UTIL:
            p_oom = 0.25 + (s.util - WARMUP_OOM_UTIL) * 10
            if _rng(self.seed, recipe.id, "warmup").random() < p_oom:
                return fail("oom", f"torch.OutOfMemoryError: CUDA out of memory during "
                            f"sampler warm-up with {s.seqs} dummy requests "
                            f"(gpu_memory_utilization={s.util}); lower "
                            "gpu_memory_utilization or max_num_seqs", boot_s)
        log.append(f"INFO [sim] Graph capturing ({s.mode}) finished; engine ready")
        log.append("INFO [sim] Application startup complete.")
        plan = self._plan(s, num_blocks, weight_bytes, kv_token_bytes,
                          gpu_bytes * (1 - s.util))
        return SimServer(recipe=recipe, url=f"sim://{recipe.id}",
                         boot_s=round(boot_s * jitter, 2), kv_capacity_tokens=capacity,
                         plan=plan)

    def _plan(self, s: _Settings, num_blocks: int, weight_bytes: float,
              kv_token_bytes: float, headroom: float) -> _Plan:
        spec, model = self.spec, self.model
        penalty = EAGER_KERNEL_PENALTY if s.mode == "NONE" else 1.0
        int4 = s.method in ("awq", "gptq")
        bw = spec.bandwidth_gbs * 1e9 * (INT4_BW_EFFICIENCY if int4 else BW_EFFICIENCY)
        flops = spec.bf16_tflops * 1e12 * MFU * (
            FP32_FLOPS_SHARE if s.act_dtype == "float32" else 1.0)
        qcompute = QUANT.get(s.method, UNKNOWN_QUANT)[1]
        if s.method == "fp8" and not spec.fp8:
            qcompute = FP8_MARLIN_COMPUTE
        attn_factor, backend_s = BACKENDS.get(s.backend, (1.0, 0.0))
        if s.kv_dtype.startswith("fp8") and not spec.fp8:
            attn_factor *= FP8_KV_SOFT_FACTOR
        decode_layer_s, mixed_layer_s = GRAPH_LAUNCH.get(s.mode, GRAPH_LAUNCH["NONE"])
        tp_share = (s.tp - 1) / s.tp  # ring all-reduce traffic share
        return _Plan(
            max_num_seqs=s.seqs, max_batched=s.batched, block_size=s.block,
            num_blocks=num_blocks, max_model_len=s.max_len, prefix_caching=s.caching,
            weight_s=weight_bytes / bw * penalty,
            kv_s_per_token=kv_token_bytes / bw * attn_factor * penalty,
            flop_s_per_token=2 * model.params_b * 1e9 / s.tp * qcompute / flops * penalty,
            attn_s_per_pair=4 * model.num_layers * model.hidden_size / s.tp / flops
            * attn_factor * penalty,
            comm_fixed_s=2 * model.num_layers * ALLREDUCE_LATENCY_S if s.tp > 1 else 0.0,
            comm_s_per_token=2 * model.num_layers * model.hidden_size * 2.0 * 2 * tp_share
            / INTERCONNECT_BPS,
            decode_launch_s=STEP_BASE_S + backend_s + decode_layer_s * model.num_layers,
            mixed_launch_s=STEP_BASE_S + backend_s + mixed_layer_s * model.num_layers,
            headroom_bytes=headroom,
        )

    def stop(self, server: SimServer) -> None:
        """Nothing to tear down: a simulated server holds no process or GPU memory."""

    # -- bench -------------------------------------------------------------------------
    def bench(self, server: SimServer, workload: Workload, concurrency: int,
              passes: int = 1) -> BenchOutcome:
        if concurrency < 1 or passes < 1:
            raise UsageError("concurrency and passes must be at least 1")
        trace = _Trace.of(workload, server.plan.block_size)
        done: list[BenchMetrics] = []
        spent = 0.0
        for index in range(passes):
            rng = _rng(self.seed, server.recipe.id, workload.sha256, concurrency, index)
            sim = _Pass(server.plan, trace, concurrency, rng, self.noise_cv)
            metrics, peak_running = sim.run()
            need = LOAD_SLACK_GIB * GIB + peak_running * LOAD_BYTES_PER_SEQ
            if need > server.plan.headroom_bytes:
                spent += metrics.duration_s / 2
                return BenchOutcome(
                    status="oom", passes=tuple(done), bench_s=round(spent, 3),
                    reason=f"torch.OutOfMemoryError: CUDA out of memory under load with "
                    f"{peak_running} running sequences: gpu_memory_utilization leaves only "
                    f"{server.plan.headroom_bytes / GIB:.2f} GiB outside vLLM's budget; "
                    "lower gpu_memory_utilization")
            spent += metrics.duration_s
            done.append(metrics)
        median = sorted(done, key=lambda m: m.output_throughput)[(len(done) - 1) // 2]
        return BenchOutcome(status="ok", metrics=median, passes=tuple(done),
                            bench_s=round(spent, 3))

    # -- accuracy ----------------------------------------------------------------------
    def accuracy(self, server: SimServer) -> float:
        """Teacher-forced agreement with the baseline's greedy outputs (1.0 = identical)."""
        recipe, s = server.recipe, self._settings(server.recipe)
        if recipe.settings() == Recipe(model=recipe.model).settings():
            return 1.0  # the baseline itself
        score = QUANT.get(s.method, UNKNOWN_QUANT)[2] * DTYPE_ACCURACY.get(s.dtype, 1.0)
        if s.kv_dtype.startswith("fp8"):
            score *= FP8_KV_ACCURACY
        rng = _rng(self.seed, recipe.id, "accuracy")
        if score < 1.0:
            value = score * (1.0 + float(rng.normal(0.0, 0.001)))
        else:  # batch shapes and kernels perturb greedy outputs a little, never above 1
            value = 1.0 - min(abs(float(rng.normal(0.0, 0.0003))), 0.001)
        return round(min(1.0, max(0.0, value)), 5)


def _quant_method(recipe: Recipe) -> str:
    method = recipe.quant.method
    if method != "none" or recipe.quant.checkpoint is None:
        return method
    name = recipe.quant.checkpoint.lower()  # the checkpoint's config names the method
    for key in ("awq", "gptq", "fp8", "w8a8"):
        if key in name:
            return "w8a8_int8" if key == "w8a8" else key
    return "none"


def _default_backend(spec: GpuSpec) -> str:
    if spec.vendor == "amd":
        return "ROCM_ATTN"
    return "FLASH_ATTN" if _cc(spec) >= 8.0 else "TRITON_ATTN"


def _cc(spec: GpuSpec) -> float:
    try:
        return float(spec.compute_capability)
    except ValueError:
        return 0.0


def _backend_ok(backend: str, spec: GpuSpec) -> bool:
    if backend.startswith("ROCM"):
        return spec.vendor == "amd" and (backend != "ROCM_AITER_FA"
                                         or spec.compute_capability == "gfx942")
    if backend in ("FLASH_ATTN", "FLASHINFER"):
        return spec.vendor == "nvidia" and _cc(spec) >= 8.0
    if backend == "FLEX_ATTENTION":
        return spec.vendor == "nvidia"
    return backend in BACKENDS


@dataclass(frozen=True)
class _Trace:
    """The workload in the shape the step loop wants: tokens, arrivals, prompt blocks."""

    n_in: list[int]
    n_out: list[int]
    arrival: list[float]
    order: list[int]
    blocks: list[list[int]]  # prompt's full KV blocks as chain ids (equal prefix, equal id)

    @staticmethod
    def of(workload: Workload, block_size: int) -> _Trace:
        reqs = workload.requests
        open_loop = any(r.arrival_offset_s is not None for r in reqs)
        arrival = [float(r.arrival_offset_s or 0.0) if open_loop else 0.0 for r in reqs]
        ids: dict[tuple[int, str], int] = {}
        chars = int(block_size * CHARS_PER_TOKEN)
        blocks: list[list[int]] = []
        for r in reqs:
            text, parent, chain = r.text, -1, []
            for j in range(min(r.input_tokens, len(text) // int(CHARS_PER_TOKEN)) // block_size):
                parent = ids.setdefault((parent, text[j * chars:(j + 1) * chars]), len(ids))
                chain.append(parent)
            blocks.append(chain)
        return _Trace(n_in=[r.input_tokens for r in reqs],
                      n_out=[r.expected_output_tokens for r in reqs], arrival=arrival,
                      order=sorted(range(len(reqs)), key=lambda i: (arrival[i], i)),
                      blocks=blocks)


class _Pass:
    """One bench pass: a discrete-time simulation of the V1 scheduler (running requests
    first, then waiting ones FCFS, within the token budget, sequence cap and free KV
    blocks; newest request preempted and recomputed when blocks run out). Runs of
    decode-only steps with an unchanging batch are advanced together with numpy."""

    def __init__(self, plan: _Plan, trace: _Trace, concurrency: int,
                 rng: np.random.Generator, noise_cv: float) -> None:
        self.p, self.tr, self.conc, self.rng, self.cv = plan, trace, concurrency, rng, noise_cv
        n = len(trace.n_in)
        self.kv, self.gen, self.alloc = [0] * n, [0] * n, [0] * n
        self.send = [0.0] * n
        self.times: list[list[np.ndarray]] = [[] for _ in range(n)]
        self.results: list[RequestResult | None] = [None] * n
        self.running: list[int] = []
        self.waiting: deque[int] = deque()
        self.cache: OrderedDict[int, None] = OrderedDict()
        self.used = self.peak_used = self.peak_running = 0
        self.preemptions, self.hits, self.queries = 0, 0, 0
        self.factor = float(rng.lognormal(0.0, noise_cv)) if noise_cv > 0 else 1.0
        self.latency = (CLIENT_LATENCY_S * rng.lognormal(0.0, 0.3, n) if noise_cv > 0
                        else np.full(n, CLIENT_LATENCY_S))

    def _jitter(self, k: int) -> np.ndarray:
        if self.cv <= 0:
            return np.ones(k)
        return self.rng.lognormal(0.0, self.cv, k)

    def _fixed_s(self, n_seqs: int, tokens: int, decode_only: bool) -> float:
        p = self.p
        launch = p.decode_launch_s if decode_only and n_seqs <= MAX_CAPTURE_SEQS \
            else p.mixed_launch_s
        return launch + PER_SEQ_S * n_seqs + p.comm_fixed_s + p.comm_s_per_token * tokens

    def run(self) -> tuple[BenchMetrics, int]:
        p, tr = self.p, self.tr
        n = len(tr.n_in)
        slots = [0.0] * min(self.conc, n)  # client-side times each in-flight slot frees
        nxt = finished = 0
        t = 0.0
        while finished < n:
            while nxt < n and slots and tr.arrival[tr.order[nxt]] <= t:
                i = tr.order[nxt]
                nxt += 1
                self.send[i] = max(tr.arrival[i], heapq.heappop(slots))
                if tr.n_in[i] + tr.n_out[i] > p.max_model_len:  # vLLM answers HTTP 400
                    self._fail(i, "HTTP 400: prompt + max_tokens exceeds max_model_len")
                    heapq.heappush(slots, self.send[i])
                    finished += 1
                else:
                    self.waiting.append(i)
            if not self.running and not self.waiting:
                if nxt < n:
                    t = max(t, tr.arrival[tr.order[nxt]], slots[0])
                continue
            sched, chunkable = self._schedule()
            if not sched:  # cannot happen when KV >= max_model_len; never spin
                i = self.waiting.popleft()
                self._fail(i, "request does not fit in the KV cache")
                heapq.heappush(slots, t)
                finished += 1
                continue
            next_send = tr.arrival[tr.order[nxt]] if nxt < n and slots else math.inf
            t, ended = (self._decode_run(t, next_send) if chunkable
                        else self._step(t, sched))
            self.peak_used = max(self.peak_used, self.used)
            for i in ended:
                self.running.remove(i)
                self.used -= self.alloc[i]
                self.alloc[i] = 0
                self._finish(i)
                heapq.heappush(slots, t)
                finished += 1
        duration = max([t, *(r.start_s + r.latency_s for r in self.results if r)])
        counters = {"num_preemptions": float(self.preemptions),
                    "prefix_cache_hit_rate": self.hits / self.queries if self.queries else 0.0,
                    "kv_cache_usage_peak": self.peak_used / max(1, p.num_blocks)}
        done = [r for r in self.results if r is not None]
        return aggregate(done, duration, server=counters), self.peak_running

    def _schedule(self) -> tuple[list[tuple[int, int]], bool]:
        """One scheduler step: (request, tokens) pairs, and whether the step is a pure
        decode of every running request with nothing admitted or preempted."""
        p, tr = self.p, self.tr
        budget, sched, preempted = p.max_batched, [], False
        idx = 0
        while idx < len(self.running) and budget > 0:
            i = self.running[idx]
            c = min(tr.n_in[i] + self.gen[i] - self.kv[i], budget)
            want = -(-(self.kv[i] + c) // p.block_size) - self.alloc[i]
            victim = -1
            while want > p.num_blocks - self.used and victim != i:
                victim = self.running.pop()  # newest first, recomputed later (V1 default)
                self.used -= self.alloc[victim]
                self.alloc[victim] = self.kv[victim] = 0
                self.waiting.appendleft(victim)
                self.preemptions += 1
                preempted = True
            if victim == i:
                break
            self.alloc[i] += want
            self.used += want
            sched.append((i, c))
            budget -= c
            idx += 1
        admitted = False
        while (not preempted and self.waiting and budget > 0
               and len(self.running) < p.max_num_seqs):
            i = self.waiting[0]
            total = tr.n_in[i] + self.gen[i]
            hit = self._lookup(i, total)
            c = min(total - hit, budget)
            want = -(-(hit + c) // p.block_size)
            if want > p.num_blocks - self.used:
                break
            self.waiting.popleft()
            self.queries += total
            self.hits += hit
            self.kv[i], self.alloc[i] = hit, want
            self.used += want
            self.running.append(i)
            sched.append((i, c))
            budget -= c
            admitted = True
        self.peak_running = max(self.peak_running, len(self.running))
        chunkable = (not admitted and not preempted and len(sched) == len(self.running)
                     and all(c == 1 for _, c in sched))
        return sched, chunkable

    def _lookup(self, i: int, total: int) -> int:
        """Prompt tokens served from the prefix cache (whole blocks, never the last token)."""
        if not self.p.prefix_caching:
            return 0
        cap = (total - 1) // self.p.block_size
        matched = 0
        for b in self.tr.blocks[i][:cap]:
            if b not in self.cache:
                break
            self.cache.move_to_end(b)
            matched += 1
        return matched * self.p.block_size

    def _remember(self, i: int) -> None:
        """Cache a finished prefill's blocks; keep only what fits in the free KV blocks."""
        if not self.p.prefix_caching:
            return
        for b in self.tr.blocks[i]:
            self.cache[b] = None
            self.cache.move_to_end(b)
        room = max(len(self.tr.blocks[i]), self.p.num_blocks - self.used)
        while len(self.cache) > room:
            self.cache.popitem(last=False)

    def _step(self, t: float, sched: list[tuple[int, int]]) -> tuple[float, list[int]]:
        p, tr = self.p, self.tr
        tokens = sum(c for _, c in sched)
        ctx = sum(self.kv[i] + c for i, c in sched)
        pairs = sum(c * (self.kv[i] + c / 2) for i, c in sched if c > 1)
        work = max(p.weight_s + p.kv_s_per_token * ctx,
                   p.flop_s_per_token * tokens + p.attn_s_per_pair * pairs)
        dt = (work + self._fixed_s(len(sched), tokens, tokens == len(sched)))
        t += dt * self.factor * float(self._jitter(1)[0])
        stamp = np.array([t])
        ended = []
        for i, c in sched:
            self.kv[i] += c
            if self.kv[i] == tr.n_in[i] + self.gen[i]:
                if c > 1 or self.gen[i] == 0:
                    self._remember(i)
                self.gen[i] += 1
                self.times[i].append(stamp)
                if self.gen[i] == tr.n_out[i]:
                    ended.append(i)
        return t, ended

    def _decode_run(self, t: float, next_send: float) -> tuple[float, list[int]]:
        """Advance k decode steps at once: until the first request finishes, the free KV
        blocks run out, or the next arrival is due. Blocks for the first step are held."""
        p, tr, run = self.p, self.tr, self.running
        kv = np.array([self.kv[i] for i in run])
        alloc = np.array([self.alloc[i] for i in run])
        free = p.num_blocks - self.used
        lo, hi = 1, min(tr.n_out[i] - self.gen[i] for i in run)
        while lo < hi:  # largest k whose extra blocks still fit
            mid = (lo + hi + 1) // 2
            if int(np.maximum(0, -(-(kv + mid) // p.block_size) - alloc).sum()) <= free:
                lo = mid
            else:
                hi = mid - 1
        n = len(run)
        ctx = kv.sum() + n + n * np.arange(lo)
        work = np.maximum(p.weight_s + p.kv_s_per_token * ctx, p.flop_s_per_token * n)
        dts = (work + self._fixed_s(n, n, True)) * self.factor * self._jitter(lo)
        stamps = t + np.cumsum(dts)
        k = min(lo, int(np.searchsorted(stamps, next_send)) + 1)
        stamps = stamps[:k]
        ended = []
        for j, i in enumerate(run):
            self.kv[i] += k
            self.gen[i] += k
            grown = max(int(alloc[j]), -(-self.kv[i] // p.block_size))
            self.used += grown - self.alloc[i]
            self.alloc[i] = grown
            self.times[i].append(stamps)
            if self.gen[i] == tr.n_out[i]:
                ended.append(i)
        return float(stamps[-1]), ended

    def _fail(self, i: int, error: str) -> None:
        self.results[i] = RequestResult(success=False, error=error,
                                        prompt_tokens=self.tr.n_in[i], start_s=self.send[i])

    def _finish(self, i: int) -> None:
        stamps = np.concatenate(self.times[i])
        lat = float(self.latency[i])
        self.results[i] = RequestResult(
            success=True, prompt_tokens=self.tr.n_in[i], output_tokens=self.tr.n_out[i],
            start_s=self.send[i], ttft_s=float(stamps[0]) - self.send[i] + lat,
            latency_s=float(stamps[-1]) - self.send[i] + lat,
            itl_s=np.diff(stamps).tolist())
