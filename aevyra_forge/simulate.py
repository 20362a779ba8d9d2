"""The dry-run stand-in for booting `vllm serve` and benchmarking it (SPEC §7): a seeded
performance model of the vLLM V1 engine (boot-time memory budget, continuous batching with
chunked prefill, KV blocks, preemption, prefix caching, quantization, CUDA graphs) that
yields the same metrics and failure statuses as the real launcher and bench."""

from __future__ import annotations

import hashlib
import heapq
import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from aevyra_forge.bench import RequestResult, aggregate
from aevyra_forge.errors import UsageError
from aevyra_forge.hardware import GpuSpec
from aevyra_forge.knobs import KNOBS, KnobSpace
from aevyra_forge.modelinfo import ModelProfile
from aevyra_forge.models import BenchMetrics, BenchOutcome, Hardware, LaunchFailure, Scalar, Status
from aevyra_forge.recipe import Recipe
from aevyra_forge.workload import CHARS_PER_TOKEN, Workload

GIB, MIB = 1024**3, 1024**2  # bytes
# -- memory at boot ----------------------------------------------------------------------
NON_TORCH_GIB = 0.6  # CUDA context, cuBLAS / NCCL workspaces, per GPU
ACT_BYTES = 80.0  # profile-run activation peak, bytes per batched token per hidden unit (16-bit)
SAMPLER_BYTES_PER_SEQ = 0.5 * MIB  # fp32 logits + sampling buffers per max_num_seqs slot
GRAPH_GIB = (0.25, 0.01)  # CUDA-graph pool: fixed, plus per decoder layer (GiB)
# allocations under load outside vLLM's budget (fragmentation, NCCL): GiB, + bytes per sequence
LOAD_SLACK_GIB, LOAD_BYTES_PER_SEQ = 0.4, 1.0 * MIB
WARMUP_OOM_UTIL = 0.95  # from here sampler warm-up may OOM (vllm#15105)
# method -> (bytes per parameter, linear-layer compute multiplier, accuracy vs bf16); int4
# carries scales and bf16 embeddings and pays for dequantisation in compute
QUANT: dict[str, tuple[float, float, float]] = {
    "none": (2.0, 1.0, 1.0), "fp8": (1.0, 0.5, 0.996), "w8a8_int8": (1.0, 0.5, 0.993),
    "awq": (0.6, 1.4, 0.978), "gptq": (0.6, 1.4, 0.972)}
UNKNOWN_QUANT = (1.0, 1.2, 0.99)  # a method this table does not know
FP8_MARLIN_COMPUTE = 1.1  # weight-only FP8 (Marlin) on GPUs without FP8 tensor cores
FP8_KV_ACCURACY, DTYPE_ACCURACY = 0.997, 0.998  # fp8 KV cache; a non-native activation dtype
# -- step time ---------------------------------------------------------------------------
# achieved / datasheet memory bandwidth; Marlin int4 GEMV reaches less of it at small batch
BW_EFFICIENCY, INT4_BW_EFFICIENCY = 0.7, 0.55
MFU = 0.5  # achieved / datasheet tensor-core FLOP/s
FP32_FLOPS_SHARE = 0.25  # float32 runs without 16-bit tensor cores
# CPU seconds per engine step (scheduler, sampler, outputs) and per scheduled sequence
STEP_BASE_S, PER_SEQ_S = 1.2e-3, 8e-6
# kernel-launch seconds per layer per step outside CUDA graphs: every op, only attention
EAGER_LAYER_S, PIECE_LAYER_S = 0.12e-3, 0.03e-3
EAGER_KERNEL_PENALTY = 1.04  # no torch.compile fusions under enforce_eager
MAX_CAPTURE_SEQS = 512  # larger decode batches run piecewise
# cudagraph mode -> (launch s/layer on decode-only steps, on mixed steps, graph-memory share,
# capture seconds at 32 layers)
GRAPHS: dict[str, tuple[float, float, float, float]] = {
    "FULL_AND_PIECEWISE": (0.0, PIECE_LAYER_S, 1.0, 20.0),
    "FULL": (0.0, 2 * PIECE_LAYER_S, 0.7, 12.0),
    "FULL_DECODE_ONLY": (0.0, EAGER_LAYER_S, 0.6, 10.0),
    "PIECEWISE": (PIECE_LAYER_S, PIECE_LAYER_S, 0.6, 12.0),
    "NONE": (EAGER_LAYER_S, EAGER_LAYER_S, 0.0, 0.0)}
# backend -> (KV-read / attention time factor, extra s per step, vendor, min compute capability)
BACKENDS: dict[str, tuple[float, float, str, float]] = {
    "FLASH_ATTN": (1.0, 0.0, "nvidia", 8.0), "FLASHINFER": (0.95, 60e-6, "nvidia", 8.0),
    "TRITON_ATTN": (1.12, 0.0, "any", 0.0), "FLEX_ATTENTION": (1.3, 0.0, "nvidia", 0.0),
    "ROCM_ATTN": (1.0, 0.0, "amd", 0.0), "ROCM_AITER_FA": (0.92, 0.0, "amd", 0.0)}
FP8_KV_SOFT_FACTOR = 1.25  # fp8 KV dequantised in software without FP8 hardware
# tensor parallelism: seconds per all-reduce (two per layer), bus bandwidth in bytes/s
ALLREDUCE_LATENCY_S, INTERCONNECT_BPS = 10e-6, 150e9
CLIENT_LATENCY_S = 0.8e-3  # HTTP + streaming round trip added to TTFT and E2E
# -- boot time ---------------------------------------------------------------------------
# seconds: imports + engine + API server, torch.compile (warm cache), each extra TP worker
BOOT_BASE_S, COMPILE_S, PER_WORKER_S = 22.0, 28.0, 6.0
LOAD_BPS = 2.5e9  # weight loading from a warm page cache, bytes/s


@dataclass(frozen=True)
class _Settings:
    """A recipe's effective engine settings (defaults filled in by the knob space)."""

    tp: int
    seqs: int
    batched: int
    util: float
    max_len: int
    block: int
    dtype: str  # what runs: "auto" resolved to bfloat16, or float16 without bf16 support
    method: str
    kv_dtype: str
    eager: bool
    mode: str  # cudagraph mode, NONE under enforce_eager
    backend: str
    caching: bool


@dataclass(frozen=True)
class SimServer:
    """A booted simulated server. `memory` is (KV blocks, weight bytes per GPU, KV bytes
    per token per GPU, GPU bytes left outside vLLM's budget)."""

    recipe: Recipe
    url: str
    boot_s: float
    kv_capacity_tokens: int
    settings: _Settings = field(repr=False)
    memory: tuple[int, float, float, float] = field(repr=False)


def _rng(*parts: object) -> np.random.Generator:
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


class SimulatedEngine:
    """Launcher + benchmarker for --dry-run. Results depend only on (seed, recipe,
    workload, concurrency, pass index), never on call order."""

    def __init__(self, hw: Hardware, spec: GpuSpec, model: ModelProfile, space: KnobSpace,
                 seed: int = 0, noise_cv: float = 0.03) -> None:
        self.hw, self.spec, self.model, self.space = hw, spec, model, space
        self.seed, self.noise_cv = seed, noise_cv
        self.native = "bfloat16" if spec.bf16 else "float16"
        self.cc = float(spec.compute_capability) if spec.vendor == "nvidia" else 0.0

    def launch(self, recipe: Recipe, log_path: Path) -> SimServer | LaunchFailure:
        lines: list[str] = []
        result = self._boot(recipe, lines)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text("\n".join(lines) + "\n")
        return result

    def stop(self, server: SimServer) -> None:
        """Nothing to tear down: a simulated server holds no process or GPU memory."""

    def _settings(self, recipe: Recipe) -> _Settings:
        def k(name: str) -> Scalar:
            return self.space.value(recipe, KNOBS[name])

        dtype, eager = str(k("dtype")), bool(k("enforce_eager"))
        name = (recipe.quant.checkpoint or "").lower()  # a checkpoint's config names its method
        found = [m for m in ("awq", "gptq", "fp8", "w8a8") if m in name]
        method = recipe.quant.method if recipe.quant.method != "none" or not found else (
            "w8a8_int8" if found[0] == "w8a8" else found[0])
        default_backend = ("ROCM_ATTN" if self.spec.vendor == "amd" else
                           "FLASH_ATTN" if self.cc >= 8.0 else "TRITON_ATTN")
        return _Settings(
            tp=int(k("tensor_parallel_size") or 1), seqs=int(k("max_num_seqs") or 1),
            batched=int(k("max_num_batched_tokens") or 1),
            util=float(k("gpu_memory_utilization") or 0.9), max_len=int(k("max_model_len") or 1),
            block=int(k("block_size") or 16), dtype=self.native if dtype == "auto" else dtype,
            method=method, kv_dtype=str(k("kv_cache_dtype")), eager=eager,
            mode="NONE" if eager else str(k("cudagraph_mode")),
            backend=str(k("attention_backend") or default_backend),
            caching=bool(k("enable_prefix_caching")))

    def _boot(self, recipe: Recipe, log: list[str]) -> SimServer | LaunchFailure:
        spec, model, s = self.spec, self.model, self._settings(recipe)
        jitter = float(_rng(self.seed, recipe.id, "boot").lognormal(0.0, 0.05))
        log.append(f"INFO [sim] V1 engine on {spec.name}: model={recipe.serve_model}, dtype="
                   f"{s.dtype}, max_seq_len={s.max_len}, tensor_parallel_size={s.tp}, quantization"
                   f"={s.method}, kv_cache_dtype={s.kv_dtype}, cudagraph_mode={s.mode}, "
                   f"attention_backend={s.backend}")

        def fail(status: Status, msg: str, at_s: float, n: int | None = None) -> LaunchFailure:
            log.append(f"ERROR [sim] {msg}")
            return LaunchFailure(status=status, reason=msg, boot_s=round(at_s * jitter, 2),
                                 suggested_max_model_len=n)
        gpus, cc = max(1, self.hw.gpu_count), spec.compute_capability
        vendor, min_cc = BACKENDS.get(s.backend, (0, 0, "none", 0.0))[2:]
        refusals = [
            (s.tp > gpus, f"tensor_parallel_size ({s.tp}) is larger than the number of "
             f"available GPUs ({gpus}) on this node"),
            (s.dtype == "bfloat16" and not spec.bf16, f"Bfloat16 needs compute capability "
             f"8.0 or higher; {spec.name} has {cc}. Use --dtype float16"),
            (vendor not in ("any", spec.vendor) or (self.cc < min_cc and spec.vendor != "amd"),
             f"attention backend {s.backend} is not supported on {spec.name} ({cc})"),
            (s.batched < s.seqs, f"max_num_batched_tokens ({s.batched}) must be greater "
             f"than or equal to max_num_seqs ({s.seqs})"),
            (s.max_len > model.max_context, f"max_model_len ({s.max_len}) is greater than "
             f"the model's context length ({model.max_context})")]
        refused = next((msg for bad, msg in refusals if bad), None)
        if refused:
            return fail("boot_failed", f"ValueError: {refused}", 12.0)
        elem = 4.0 if s.dtype == "float32" else 2.0  # bytes per activation element
        bpp = elem if s.method == "none" else QUANT.get(s.method, UNKNOWN_QUANT)[0]
        weight_bytes = model.params_b * 1e9 * bpp / s.tp
        kv_bytes = model.kv_bytes_per_token(1.0 if s.kv_dtype.startswith("fp8") else elem) / s.tp
        gpu_bytes = (self.hw.gpu_memory_gib or spec.memory_gib) * GIB
        act = s.batched * model.hidden_size * ACT_BYTES * elem / 2 + s.seqs * SAMPLER_BYTES_PER_SEQ
        graphs = (GRAPH_GIB[0] + GRAPH_GIB[1] * model.num_layers) * GIB * GRAPHS[s.mode][2]
        budget = gpu_bytes * s.util - weight_bytes - act - graphs - NON_TORCH_GIB * GIB
        load_s = BOOT_BASE_S + PER_WORKER_S * (s.tp - 1) + weight_bytes * s.tp / LOAD_BPS
        log.append(f"INFO [sim] Model loading took {weight_bytes / GIB:.2f} GiB per GPU; "
                   f"activation peak {act / GIB:.2f} GiB, CUDA graphs {graphs / GIB:.2f} GiB; "
                   f"available KV cache memory {budget / GIB:.2f} GiB")
        if budget <= 0:
            return fail("oom", "ValueError: No available memory for the cache blocks. Try "
                        "increasing `gpu_memory_utilization` when initializing the engine.",
                        load_s)
        num_blocks = int(budget // (kv_bytes * s.block))
        capacity = num_blocks * s.block
        if capacity < s.max_len:
            return fail("boot_failed", f"ValueError: To serve at least one request with the "
                        f"model's max seq len ({s.max_len}), {s.max_len * kv_bytes / GIB:.2f} GiB "
                        f"KV cache is needed, more than the available KV cache memory "
                        f"({budget / GIB:.2f} GiB). Based on the available memory, the estimated "
                        f"maximum model length is {capacity}. Try increasing `gpu_memory_"
                        "utilization` or decreasing `max_model_len`.", load_s, capacity)
        log.append(f"INFO [sim] GPU KV cache size: {capacity:,} tokens; maximum concurrency "
                   f"for {s.max_len:,} tokens per request: {capacity / s.max_len:.2f}x")
        boot_s = load_s + (0.0 if s.eager else COMPILE_S) + GRAPHS[s.mode][3] * (
            0.5 + model.num_layers / 64)
        draw = _rng(self.seed, recipe.id, "warmup").random()
        if s.util >= WARMUP_OOM_UTIL and draw < 0.25 + (s.util - WARMUP_OOM_UTIL) * 10:
            return fail("oom", f"torch.OutOfMemoryError: CUDA out of memory during sampler "
                        f"warm-up with {s.seqs} dummy requests (gpu_memory_utilization="
                        f"{s.util}); lower gpu_memory_utilization or max_num_seqs", boot_s)
        log.append("INFO [sim] Graph capturing finished. Application startup complete.")
        return SimServer(recipe=recipe, url=f"sim://{recipe.id}", boot_s=round(boot_s * jitter, 2),
                         kv_capacity_tokens=capacity, settings=s, memory=(
                             num_blocks, weight_bytes, kv_bytes, gpu_bytes * (1 - s.util)))

    def bench(self, server: SimServer, workload: Workload, concurrency: int,
              passes: int = 1) -> BenchOutcome:
        """Replay `workload` `passes` times at `concurrency` (closed loop, or open loop at
        the arrival offsets). Each pass starts on an empty prefix cache, so passes differ
        only by noise; the outcome carries the median-throughput pass."""
        if concurrency < 1 or passes < 1:
            raise UsageError("concurrency and passes must be at least 1")
        done: list[BenchMetrics] = []
        headroom = server.memory[3]  # bytes outside vLLM's budget
        for index in range(passes):
            rng = _rng(self.seed, server.recipe.id, workload.sha256, concurrency, index)
            metrics, peak = _Pass(self, server, workload, concurrency, rng).run()
            if LOAD_SLACK_GIB * GIB + peak * LOAD_BYTES_PER_SEQ > headroom:
                return BenchOutcome(
                    status="oom", passes=tuple(done), bench_s=round(
                        sum(m.duration_s for m in done) + metrics.duration_s / 2, 3),
                    reason=f"torch.OutOfMemoryError: CUDA out of memory under load with {peak}"
                    f" running sequences: gpu_memory_utilization={server.settings.util} leaves "
                    f"{headroom / GIB:.2f} GiB outside vLLM's budget; lower it")
            done.append(metrics)
        median = sorted(done, key=lambda m: m.output_throughput)[(len(done) - 1) // 2]
        return BenchOutcome(status="ok", metrics=median, passes=tuple(done),
                            bench_s=round(sum(m.duration_s for m in done), 3))

    def accuracy(self, server: SimServer) -> float:
        """Teacher-forced agreement with the baseline's greedy outputs (1.0 = identical)."""
        recipe, s = server.recipe, self._settings(server.recipe)
        if recipe.settings() == Recipe(model=recipe.model).settings():
            return 1.0  # the baseline itself
        score = QUANT.get(s.method, UNKNOWN_QUANT)[2] * (
            DTYPE_ACCURACY if s.dtype != self.native else 1.0) * (
            FP8_KV_ACCURACY if s.kv_dtype.startswith("fp8") else 1.0)
        wobble = float(_rng(self.seed, recipe.id, "accuracy").normal(0.0, 1.0))
        if score < 1.0:
            return round(min(1.0, score * (1.0 + 0.001 * wobble)), 5)
        # batch shapes and kernels perturb greedy outputs a little, never above 1
        return round(1.0 - min(abs(0.0003 * wobble), 0.001), 5)


class _Pass:
    """One bench pass simulating the V1 scheduler: running requests first, then waiting ones
    FCFS, within the token budget, sequence cap and free KV blocks; the newest is preempted
    and recomputed when blocks run out. Decode-only runs of one batch advance in numpy."""

    def __init__(self, engine: SimulatedEngine, server: SimServer, workload: Workload,
                 concurrency: int, rng: np.random.Generator) -> None:
        spec, model, s = engine.spec, engine.model, server.settings
        self.s, self.rng, self.cv = s, rng, engine.noise_cv
        self.num_blocks, weight_bytes, kv_bytes, _ = server.memory
        # -- step-time coefficients (seconds) --
        penalty = EAGER_KERNEL_PENALTY if s.eager else 1.0
        bw = spec.bandwidth_gbs * 1e9 * (
            INT4_BW_EFFICIENCY if s.method in ("awq", "gptq") else BW_EFFICIENCY) / penalty
        flops = spec.bf16_tflops * 1e12 * MFU / penalty * (
            FP32_FLOPS_SHARE if s.dtype == "float32" else 1.0)
        qcompute = (FP8_MARLIN_COMPUTE if s.method == "fp8" and not spec.fp8
                    else QUANT.get(s.method, UNKNOWN_QUANT)[1])
        attn = BACKENDS[s.backend][0] * (
            FP8_KV_SOFT_FACTOR if s.kv_dtype.startswith("fp8") and not spec.fp8 else 1.0)
        base, layers, hidden = STEP_BASE_S + BACKENDS[s.backend][1], model.num_layers, \
            model.hidden_size
        self.weight_s, self.kv_s = weight_bytes / bw, kv_bytes / bw * attn  # per token read
        self.flop_s = 2 * model.params_b * 1e9 / s.tp * qcompute / flops  # per token
        self.attn_s = 4 * layers * hidden / s.tp / flops * attn  # per (query, context) pair
        self.comm_s = (2 * layers * ALLREDUCE_LATENCY_S if s.tp > 1 else 0.0,  # ring all-reduce
                       2 * layers * hidden * 2.0 * 2 * (s.tp - 1) / s.tp / INTERCONNECT_BPS)
        self.launch_s = (base + GRAPHS[s.mode][0] * layers, base + GRAPHS[s.mode][1] * layers)
        # -- the trace; prompt blocks as chain ids: equal ids mean equal prefixes --
        reqs, ids = workload.requests, dict[tuple[int, str], int]()
        self.n_in = [r.input_tokens for r in reqs]
        self.n_out = [r.expected_output_tokens for r in reqs]
        self.arrival = [float(r.arrival_offset_s or 0.0) for r in reqs]  # all 0: closed loop
        self.order = sorted(range(len(reqs)), key=lambda i: (self.arrival[i], i))
        chars, per_token = int(s.block * CHARS_PER_TOKEN), int(CHARS_PER_TOKEN)
        self.blocks: list[list[int]] = []
        for r, n_in in zip(reqs, self.n_in, strict=True):
            chain, parent, text = [], -1, r.text
            for j in range(min(n_in, len(text) // per_token) // s.block):
                parent = ids.setdefault((parent, text[j * chars:(j + 1) * chars]), len(ids))
                chain.append(parent)
            self.blocks.append(chain)
        n = len(reqs)
        self.kv, self.gen, self.alloc, self.send = [0] * n, [0] * n, [0] * n, [0.0] * n
        self.times: list[list[np.ndarray]] = [[] for _ in range(n)]  # token timestamps
        self.results: list[RequestResult | None] = [None] * n
        self.slots = [0.0] * min(concurrency, n)  # client-side times in-flight slots free
        self.running: list[int] = []
        self.waiting: deque[int] = deque()
        self.cache: OrderedDict[int, None] = OrderedDict()  # prefix blocks, LRU first
        self.used = self.peak_used = self.peak_running = self.finished = 0
        self.preemptions = self.hits = self.queries = 0
        self.factor = float(rng.lognormal(0.0, self.cv)) if self.cv > 0 else 1.0
        self.latency = CLIENT_LATENCY_S * (rng.lognormal(0.0, 0.3, n) if self.cv > 0
                                           else np.ones(n))

    def run(self) -> tuple[BenchMetrics, int]:
        n, nxt, t = len(self.n_in), 0, 0.0
        while self.finished < n:
            while nxt < n and self.slots and self.arrival[self.order[nxt]] <= t:
                i, nxt = self.order[nxt], nxt + 1
                self.send[i] = max(self.arrival[i], heapq.heappop(self.slots))
                if self.n_in[i] + self.n_out[i] > self.s.max_len:  # vLLM answers HTTP 400
                    self._done(i, self.send[i], "HTTP 400: prompt + max_tokens > max_model_len")
                else:
                    self.waiting.append(i)
            if not self.running and not self.waiting:
                if nxt < n:
                    t = max(t, self.arrival[self.order[nxt]], self.slots[0])
                continue
            sched, chunkable = self._schedule()
            if not sched:  # the head cannot fit even in an empty cache: never spin
                self._done(self.waiting.popleft(), t, "request does not fit in the KV cache")
                continue
            next_send = self.arrival[self.order[nxt]] if nxt < n and self.slots else math.inf
            stamps = self._run_times(t, next_send) if chunkable else self._step_time(t, sched)
            k, t = len(stamps), float(stamps[-1])  # k steps, each scheduling `sched` again
            for i, c in sched:
                self.kv[i] += c + k - 1
                grown = max(self.alloc[i], -(-self.kv[i] // self.s.block))
                self.used, self.alloc[i] = self.used + grown - self.alloc[i], grown
                if self.kv[i] == self.n_in[i] + self.gen[i] + k - 1:  # all in: a token a step
                    if (c > 1 or self.gen[i] == 0) and self.s.caching:  # cache its prompt
                        for b in self.blocks[i]:
                            self.cache[b] = None
                            self.cache.move_to_end(b)
                        while len(self.cache) > max(len(self.blocks[i]),  # evict beyond free
                                                    self.num_blocks - self.used):
                            self.cache.popitem(last=False)
                    self.gen[i] += k
                    self.times[i].append(stamps)
            self.peak_used = max(self.peak_used, self.used)
            for i in [i for i, _ in sched if self.gen[i] == self.n_out[i]]:
                self.running.remove(i)
                self.used, self.alloc[i] = self.used - self.alloc[i], 0
                self._done(i, t)
        duration = max([t, *(r.start_s + r.latency_s for r in self.results if r)])
        counters = {"num_preemptions": float(self.preemptions),
                    "prefix_cache_hit_rate": self.hits / self.queries if self.queries else 0.0,
                    "kv_cache_usage_peak": self.peak_used / max(1, self.num_blocks)}
        return aggregate([r for r in self.results if r], duration, server=counters), \
            self.peak_running

    def _fixed_s(self, n_seqs: int, tokens: int) -> float:
        graphed = tokens == n_seqs and n_seqs <= MAX_CAPTURE_SEQS  # decode-only step
        return (self.launch_s[0 if graphed else 1] + PER_SEQ_S * n_seqs + self.comm_s[0]
                + self.comm_s[1] * tokens)

    def _noise(self, k: int) -> np.ndarray:
        return self.factor * (self.rng.lognormal(0.0, self.cv, k) if self.cv > 0 else np.ones(k))

    def _step_time(self, t: float, sched: list[tuple[int, int]]) -> np.ndarray:
        """The end of one mixed step: memory- or compute-bound, plus fixed costs."""
        tokens, ctx = sum(c for _, c in sched), sum(self.kv[i] + c for i, c in sched)
        pairs = sum(c * (self.kv[i] + c / 2) for i, c in sched if c > 1)
        work = max(self.weight_s + self.kv_s * ctx, self.flop_s * tokens + self.attn_s * pairs)
        return t + (work + self._fixed_s(len(sched), tokens)) * self._noise(1)

    def _run_times(self, t: float, next_send: float) -> np.ndarray:
        """Ends of k decode steps over the same batch: until a request finishes, the free KV
        blocks run out (the first step's are held), or the next arrival is due."""
        run, block = self.running, self.s.block
        kv, alloc = np.array([self.kv[i] for i in run]), np.array([self.alloc[i] for i in run])
        lo, hi = 1, min(self.n_out[i] - self.gen[i] for i in run)
        while lo < hi:  # the largest k whose extra blocks still fit
            mid = (lo + hi + 1) // 2
            extra = int(np.maximum(0, -(-(kv + mid) // block) - alloc).sum())
            lo, hi = (mid, hi) if extra <= self.num_blocks - self.used else (lo, mid - 1)
        n = len(run)
        work = np.maximum(self.weight_s + self.kv_s * (kv.sum() + n + n * np.arange(lo)),
                          self.flop_s * n)
        stamps = t + np.cumsum((work + self._fixed_s(n, n)) * self._noise(lo))
        return stamps[:int(np.searchsorted(stamps, next_send)) + 1]

    def _schedule(self) -> tuple[list[tuple[int, int]], bool]:
        """One scheduler step: (request, tokens) pairs, and whether it is a pure decode of
        every running request with nothing admitted or preempted."""
        s, free = self.s, self.num_blocks - self.used
        budget, sched, idx, preempted, admitted = s.batched, [], 0, False, False
        while idx < len(self.running) and budget > 0:
            i = self.running[idx]
            c = min(self.n_in[i] + self.gen[i] - self.kv[i], budget)
            want, victim = -(-(self.kv[i] + c) // s.block) - self.alloc[i], -1
            while want > free and victim != i:
                victim = self.running.pop()  # newest first, recomputed later (V1 default)
                free, self.used = free + self.alloc[victim], self.used - self.alloc[victim]
                self.alloc[victim] = self.kv[victim] = 0
                self.waiting.appendleft(victim)
                self.preemptions, preempted = self.preemptions + 1, True
            if victim == i:
                break
            self.alloc[i], self.used, free = self.alloc[i] + want, self.used + want, free - want
            sched.append((i, c))
            budget, idx = budget - c, idx + 1
        while not preempted and self.waiting and budget > 0 and len(self.running) < s.seqs:
            i = self.waiting[0]
            total, hit = self.n_in[i] + self.gen[i], 0
            for b in self.blocks[i][:(total - 1) // s.block] if s.caching else ():
                if b not in self.cache:  # whole blocks, never the last prompt token
                    break
                self.cache.move_to_end(b)
                hit += s.block
            c = min(total - hit, budget)
            want = -(-(hit + c) // s.block)
            if want > free:
                break
            self.waiting.popleft()
            self.queries, self.hits = self.queries + total, self.hits + hit
            self.kv[i], self.alloc[i], self.used, free = hit, want, self.used + want, free - want
            self.running.append(i)
            sched.append((i, c))
            budget, admitted = budget - c, True
        self.peak_running = max(self.peak_running, len(self.running))
        chunkable = (not admitted and not preempted and len(sched) == len(self.running)
                     and all(self.n_in[i] + self.gen[i] - self.kv[i] == 1 for i, _ in sched))
        return sched, chunkable

    def _done(self, i: int, t: float, error: str = "") -> None:
        """Record request i (finished, or failed with `error`) and free its client slot."""
        stamps = np.concatenate(self.times[i]) if not error else np.zeros(1)
        since = float(self.latency[i]) - self.send[i] if not error else 0.0
        self.results[i] = RequestResult(
            success=not error, error=error, prompt_tokens=self.n_in[i], start_s=self.send[i],
            output_tokens=0 if error else self.n_out[i], ttft_s=float(stamps[0]) + since,
            latency_s=float(stamps[-1]) + since, itl_s=np.diff(stamps).tolist())
        heapq.heappush(self.slots, t)
        self.finished += 1
