"""One simulated bench pass of the dry-run performance model (simulate.py): the V1
scheduler's continuous batching over KV blocks, with step times from a roofline of the GPU
and the recipe's settings. Split from simulate.py, which boots the simulated server."""

from __future__ import annotations

import hashlib
import heapq
import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np

from aevyra_forge.core.recipe import Recipe
from aevyra_forge.core.slo import Slo
from aevyra_forge.core.values import BenchMetrics
from aevyra_forge.core.workload import CHARS_PER_TOKEN, Workload
from aevyra_forge.measure.metrics import RequestResult, aggregate
from aevyra_forge.space.gpu_catalogue import GpuSpec
from aevyra_forge.space.model_profile import ModelProfile
from aevyra_forge.space.quant import facts, is_fp8_kv

GIB, MIB = 1024**3, 1024**2  # bytes
# compute multiplier of an FP8 method on GPUs without FP8 tensor cores, where vLLM runs it
# weight-only (Marlin); elsewhere the method's own (space/quant.py)
FP8_MARLIN_COMPUTE = 1.1
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
# speculative decoding: per-token acceptance = base + slope x the trace's prompt n-gram
# repetition (suffix decoding also matches earlier outputs), capped; CPU seconds per
# sequence per step to propose. Chat with little repetition accepts almost nothing (vLLM's
# n-gram lookup needs a 5-token match by default).
SPEC_ACCEPT: dict[str, tuple[float, float]] = {"ngram": (0.02, 0.9), "suffix": (0.05, 0.9),
                                               "eagle": (0.6, 0.0), "eagle3": (0.7, 0.0),
                                               "draft_model": (0.6, 0.0)}
# a draft's own forward per proposed token, as a share of the target's step (its weights'
# memory is not modelled)
DRAFT_COST: dict[str, float] = {"eagle": 0.05, "eagle3": 0.05, "draft_model": 0.15}
MAX_ACCEPT, PROPOSE_S = 0.9, 5e-6
CLIENT_LATENCY_S = 0.8e-3  # HTTP + streaming round trip added to TTFT and E2E

@dataclass(frozen=True)
class SimSettings:
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
    dp: int = 1  # data-parallel replicas, modelled as one engine with dp x the resources
    capture: int = MAX_CAPTURE_SEQS  # largest decode batch run as a CUDA graph
    long_prefill: int = 0  # long_prefill_token_threshold: prefill tokens per step (0: no cap)
    spec: str | None = None  # speculative method (ngram, suffix), None: off
    spec_tokens: int = 0
    kernel_speed: float = 1.0  # a kernel plug-in's own estimate; 1.0 (neutral) when none


@dataclass(frozen=True)
class SimServer:
    """A booted simulated server. `memory` is (KV blocks, weight bytes per GPU, KV bytes
    per token per GPU, GPU bytes left outside vLLM's budget); `boot_factor` this boot's
    throughput factor (between-boot noise), which scales every pass it serves."""

    recipe: Recipe
    url: str
    boot_s: float
    kv_capacity_tokens: int
    settings: SimSettings = field(repr=False)
    memory: tuple[int, float, float, float] = field(repr=False)
    boot_factor: float = 1.0


def sim_rng(*parts: object) -> np.random.Generator:
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


class SimPass:
    """One bench pass simulating the V1 scheduler: running requests first, then waiting ones
    FCFS, within the token budget, sequence cap and free KV blocks; the newest is preempted
    and recomputed when blocks run out. Decode-only runs of one batch advance in numpy."""

    def __init__(self, spec: GpuSpec, model: ModelProfile, noise_cv: float,
                 server: SimServer, workload: Workload, concurrency: int,
                 rng: np.random.Generator, slo: Slo | None = None) -> None:
        s = server.settings
        self.s, self.rng, self.cv, self.slo = s, rng, noise_cv, slo
        self.num_blocks, weight_bytes, kv_bytes, _ = server.memory
        self.num_blocks *= s.dp  # every replica has its own KV cache
        # -- step-time coefficients (seconds) --
        penalty, quant = EAGER_KERNEL_PENALTY if s.eager else 1.0, facts(s.method)
        bw = spec.bandwidth_gbs * 1e9 * (
            INT4_BW_EFFICIENCY if quant.weight_bits == 4 else BW_EFFICIENCY) / penalty
        flops = spec.bf16_tflops * 1e12 * MFU / penalty * (
            FP32_FLOPS_SHARE if s.dtype == "float32" else 1.0)
        qcompute = (FP8_MARLIN_COMPUTE if quant.fp8_hardware and not spec.fp8
                    else quant.compute)
        attn = BACKENDS[s.backend][0] * (
            FP8_KV_SOFT_FACTOR if is_fp8_kv(s.kv_dtype) and not spec.fp8 else 1.0)
        base, layers, hidden = STEP_BASE_S + BACKENDS[s.backend][1], model.num_layers, \
            model.hidden_size
        self.weight_s, self.kv_s = weight_bytes / bw, kv_bytes / bw * attn  # per token read
        self.flop_s = 2 * model.params_b * 1e9 / s.tp * qcompute / flops  # per token
        self.attn_s = 4 * layers * hidden / s.tp / flops * attn  # per (query, context) pair
        self.comm_s = (2 * layers * ALLREDUCE_LATENCY_S if s.tp > 1 else 0.0,  # ring all-reduce
                       2 * layers * hidden * 2.0 * 2 * (s.tp - 1) / s.tp / INTERCONNECT_BPS)
        self.launch_s = (base + GRAPHS[s.mode][0] * layers, base + GRAPHS[s.mode][1] * layers)
        # replicas split the batch: each reads its own weights at once, the rest divides
        self.kv_s, self.flop_s, self.attn_s = (x / s.dp for x in (self.kv_s, self.flop_s,
                                                                   self.attn_s))
        # speculative decoding: k proposed tokens verified in one step yield E tokens
        accept = 0.0
        if s.spec in SPEC_ACCEPT and s.spec_tokens > 0:
            low, slope = SPEC_ACCEPT[s.spec]
            accept = min(MAX_ACCEPT, low + slope * workload.stats.ngram_repetition)
        self.spec_width = 1 + (s.spec_tokens if accept else 0)
        self.draft_cost = 1 + DRAFT_COST.get(s.spec or "", 0.0) * (self.spec_width - 1)
        self.spec_yield = (1 - accept ** self.spec_width) / (1 - accept) if accept else 1.0
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
        # what vLLM's /metrics shows about where time went (decide.diagnosis reads it)
        self.now, self.admitted = 0.0, [math.nan] * n  # first scheduled, per request
        self.peak_waiting = self.peak_tokens = 0
        self.phase_s = [0.0, 0.0, 0.0]  # summed queue, prefill and decode seconds
        # this pass's throughput factor, this boot's (which every pass of it shares), and a
        # plug-in's speed-up all divide step times
        self.factor = (float(rng.lognormal(0.0, self.cv)) if self.cv > 0 else 1.0
                       ) / s.kernel_speed / server.boot_factor
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
            self.now = t
            sched, chunkable = self._schedule()
            self.peak_tokens = max(self.peak_tokens, sum(c for _, c in sched))
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
                    "kv_cache_usage_peak": self.peak_used / max(1, self.num_blocks),
                    "kv_cache_capacity_tokens": float(self.num_blocks * self.s.block),
                    "num_requests_running_peak": float(self.peak_running),
                    "num_requests_waiting_peak": float(self.peak_waiting),
                    "batch_tokens_peak": float(self.peak_tokens),
                    "queue_time_s": self.phase_s[0], "prefill_time_s": self.phase_s[1],
                    "decode_time_s": self.phase_s[2]}
        return aggregate([r for r in self.results if r], duration, server=counters,
                         slo=self.slo), \
            self.peak_running

    def _fixed_s(self, n_seqs: int, tokens: int) -> float:
        graphed = tokens == n_seqs and n_seqs <= self.s.capture  # decode-only step
        return (self.launch_s[0 if graphed else 1] + PER_SEQ_S * n_seqs / self.s.dp
                + self.comm_s[0]
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
                          self.flop_s * n * self.spec_width)  # verifying k+1 per sequence
        per_token = (work * self.draft_cost + self._fixed_s(n, n)
                     + PROPOSE_S * n * (self.spec_width > 1)) / self.spec_yield
        stamps = t + np.cumsum(per_token * self._noise(lo))
        return stamps[:int(np.searchsorted(stamps, next_send)) + 1]

    def _chunk(self, remaining: int, budget: int) -> int:
        """Tokens one request gets this step: within the budget and, for a prompt among
        other requests, at most long_prefill_token_threshold (vLLM lifts the cap when the
        request is alone)."""
        c = min(remaining, budget)
        if self.s.long_prefill and remaining > 1 and len(self.running) + len(self.waiting) > 1:
            c = min(c, self.s.long_prefill)
        return c

    def _schedule(self) -> tuple[list[tuple[int, int]], bool]:
        """One scheduler step: (request, tokens) pairs, and whether it is a pure decode of
        every running request with nothing admitted or preempted."""
        s, free = self.s, self.num_blocks - self.used
        budget, sched, idx, preempted, admitted = s.batched * s.dp, [], 0, False, False
        while idx < len(self.running) and budget > 0:
            i = self.running[idx]
            c = self._chunk(self.n_in[i] + self.gen[i] - self.kv[i], budget)
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
        while (not preempted and self.waiting and budget > 0
               and len(self.running) < s.seqs * s.dp):
            i = self.waiting[0]
            total, hit = self.n_in[i] + self.gen[i], 0
            for b in self.blocks[i][:(total - 1) // s.block] if s.caching else ():
                if b not in self.cache:  # whole blocks, never the last prompt token
                    break
                self.cache.move_to_end(b)
                hit += s.block
            c = self._chunk(total - hit, budget)
            want = -(-(hit + c) // s.block)
            if want > free:
                break
            self.waiting.popleft()
            if math.isnan(self.admitted[i]):
                self.admitted[i] = self.now
            self.queries, self.hits = self.queries + total, self.hits + hit
            self.kv[i], self.alloc[i], self.used, free = hit, want, self.used + want, free - want
            self.running.append(i)
            sched.append((i, c))
            budget, admitted = budget - c, True
        self.peak_running = max(self.peak_running, len(self.running))
        self.peak_waiting = max(self.peak_waiting, len(self.waiting))
        chunkable = (not admitted and not preempted and len(sched) == len(self.running)
                     and all(self.n_in[i] + self.gen[i] - self.kv[i] == 1 for i, _ in sched))
        return sched, chunkable

    def _done(self, i: int, t: float, error: str = "") -> None:
        """Record request i (finished, or failed with `error`) and free its client slot."""
        stamps = np.concatenate(self.times[i]) if not error else np.zeros(1)
        if not error:
            admitted = self.admitted[i]
            for k, span in enumerate((admitted - self.send[i], stamps[0] - admitted,
                                      stamps[-1] - stamps[0])):
                self.phase_s[k] += float(span)
        since = float(self.latency[i]) - self.send[i] if not error else 0.0
        self.results[i] = RequestResult(
            success=not error, error=error, prompt_tokens=self.n_in[i], start_s=self.send[i],
            output_tokens=0 if error else self.n_out[i], ttft_s=float(stamps[0]) + since,
            latency_s=float(stamps[-1]) + since, itl_s=np.diff(stamps).tolist())
        heapq.heappush(self.slots, t)
        self.finished += 1
