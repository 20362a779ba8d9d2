"""The dry-run stand-in for booting `vllm serve` and benchmarking it (SPEC §7): a seeded
performance model of the vLLM V1 engine (boot-time memory budget, continuous batching with
chunked prefill, KV blocks, preemption, prefix caching, quantization, CUDA graphs) that
yields the same metrics and failure statuses as the real launcher and bench."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from threading import Lock

from aevyra_forge.core.errors import UsageError
from aevyra_forge.core.recipe import Recipe
from aevyra_forge.core.settings import TuneSettings
from aevyra_forge.core.slo import Slo
from aevyra_forge.core.values import (
    BenchMetrics,
    BenchOutcome,
    ExperimentRecord,
    Hardware,
    LaunchFailure,
    QualityScore,
    Scalar,
    Status,
)
from aevyra_forge.core.workload import Workload
from aevyra_forge.engine.failures import request_failures
from aevyra_forge.engine.sim.scheduler import (
    BACKENDS,
    GIB,
    GRAPHS,
    MAX_CAPTURE_SEQS,
    MIB,
    SimPass,
    SimServer,
    SimSettings,
    sim_rng,
)
from aevyra_forge.measure.metrics import median_pass
from aevyra_forge.space.gpu_catalogue import GpuSpec
from aevyra_forge.space.knob_space import KNOBS, KnobSpace
from aevyra_forge.space.layer2 import CandidateSlot
from aevyra_forge.space.model_profile import ModelProfile
from aevyra_forge.space.plugins import KernelCandidate
from aevyra_forge.space.quant import facts, is_fp8_kv, method_of_checkpoint
from aevyra_forge.space.registry import auto_attention_backend, auto_capture_size

# -- memory at boot ----------------------------------------------------------------------
NON_TORCH_GIB = 0.6  # CUDA context, cuBLAS / NCCL workspaces, per GPU
ACT_BYTES = 80.0  # profile-run activation peak, bytes per batched token per hidden unit (16-bit)
SAMPLER_BYTES_PER_SEQ = 0.5 * MIB  # fp32 logits + sampling buffers per max_num_seqs slot
GRAPH_GIB = (0.25, 0.01)  # CUDA-graph pool: fixed, plus per decoder layer (GiB)
# allocations under load outside vLLM's budget (fragmentation, NCCL): GiB, + bytes per sequence
LOAD_SLACK_GIB, LOAD_BYTES_PER_SEQ = 0.4, 1.0 * MIB
WARMUP_OOM_UTIL = 0.95  # from here sampler warm-up may OOM (vllm#15105)
FP8_KV_ACCURACY, DTYPE_ACCURACY = 0.997, 0.998  # fp8 KV cache; a non-native activation dtype
# -- boot time ---------------------------------------------------------------------------
# seconds: imports + engine + API server, torch.compile (warm cache), each extra TP worker
BOOT_BASE_S, COMPILE_S, PER_WORKER_S = 22.0, 28.0, 6.0
LOAD_BPS = 2.5e9  # weight loading from a warm page cache, bytes/s
PASS_NOISE_CV = 0.03  # pass-to-pass CV of throughput, by default


class SimulatedEngine:
    """Launcher + benchmarker for --dry-run. Results depend only on (seed, recipe, which
    boot of that recipe this is, workload, concurrency, pass index), never on the order
    of other calls.

    `noise_cv` is the pass-to-pass CV of throughput; `boot_cv` the between-boot CV: each
    boot of a recipe draws one throughput factor that scales all of its passes, as a real
    server's boot offsets every pass it serves (0: two boots of a recipe measure alike).
    Its default is 0 so that a model of vLLM (agent/engine_model.py) and tests see one
    surface; a dry run's (`dry_run`) is the run's assumption (TuneSettings.boot_cv)."""

    def __init__(self, hw: Hardware, spec: GpuSpec, model: ModelProfile, space: KnobSpace,
                 seed: int = 0, noise_cv: float = PASS_NOISE_CV, boot_cv: float = 0.0
                 ) -> None:
        if noise_cv < 0 or boot_cv < 0:
            raise UsageError(f"noise CVs cannot be negative (noise_cv={noise_cv}, "
                             f"boot_cv={boot_cv}); pass 0 for none")
        self.hw, self.spec, self.model, self.space = hw, spec, model, space
        self.seed, self.noise_cv, self.boot_cv = seed, noise_cv, boot_cv
        self.native = "bfloat16" if spec.bf16 else "float16"
        self.cc = float(spec.compute_capability) if spec.vendor == "nvidia" else 0.0
        self.default_backend = auto_attention_backend(spec.hardware()) or "TRITON_ATTN"
        # boots so far per recipe id: the k-th boot of a recipe draws its own factor,
        # whatever else was booted in between (worker threads may share one engine)
        self._boots: dict[str, int] = {}
        self._boots_lock = Lock()

    @classmethod
    def dry_run(cls, hw: Hardware, spec: GpuSpec, space: KnobSpace, settings: TuneSettings
                ) -> SimulatedEngine:
        """The simulator a --dry-run measures with: the run's seed, and boots that differ
        as much as its keep rule assumes (--boot-noise, else the GPU default), so that the
        rule pays for the noise there is."""
        return cls(hw, spec, space.model, space, seed=settings.seed, boot_cv=settings.boot_cv())

    def launch(self, recipe: Recipe, log_path: Path) -> SimServer | LaunchFailure:
        lines: list[str] = []
        with self._boots_lock:
            nth = self._boots.get(recipe.id, 0)
            self._boots[recipe.id] = nth + 1
        result = self._boot(recipe, lines)
        if isinstance(result, SimServer) and self.boot_cv > 0:
            result = replace(result, boot_factor=self.boot_factor(recipe, nth))
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text("\n".join(lines) + "\n")
        return result

    def remember(self, records: Iterable[ExperimentRecord]) -> None:
        """Count the boots a resumed run's log records (each experiment that reached a
        launch has a boot time), so that its next boot of a recipe draws the factor that
        boot would have drawn had the run not been interrupted."""
        with self._boots_lock:
            for rec in records:
                if rec.boot_s is not None:
                    self._boots[rec.recipe_id] = self._boots.get(rec.recipe_id, 0) + 1

    def boot_factor(self, recipe: Recipe, nth: int) -> float:
        """The throughput factor of the `nth` boot (from 0) of `recipe`: lognormal with
        CV `boot_cv` and median 1."""
        if self.boot_cv <= 0:
            return 1.0
        sigma = math.sqrt(math.log1p(self.boot_cv ** 2))  # the log-scale sigma of that CV
        return float(sim_rng(self.seed, recipe.id, "boot noise", nth).lognormal(0.0, sigma))

    def stop(self, server: SimServer) -> None:
        """Nothing to tear down: a simulated server holds no process or GPU memory."""

    def settings(self, recipe: Recipe) -> SimSettings:
        """What the simulator reads of `recipe`: two recipes with equal settings are one
        config to it, so a move between them is one it does not model."""
        return self._settings(recipe)

    def _settings(self, recipe: Recipe) -> SimSettings:
        def k(name: str) -> Scalar:
            return self.space.value(recipe, KNOBS[name])

        dtype, eager, method = str(k("dtype")), bool(k("enforce_eager")), str(k("quant_method"))
        # vLLM reads a checkpoint's method from its config.json; the simulator, from the
        # layer-2 candidate that serves it (a dry run's are simulated), else from its name
        slot = self.space.get("quant_candidate").placement
        candidate = slot.chosen(recipe) if isinstance(slot, CandidateSlot) else None
        if candidate is not None:
            method = candidate.method
        elif method == "none" and recipe.quant.checkpoint:
            method = method_of_checkpoint(recipe.quant.checkpoint) or method
        level = k("optimization_level")  # -O0: no compilation, no graphs; -O1: piecewise
        eager = eager or level == 0
        mode = "NONE" if eager else str(k("cudagraph_mode"))
        mode = "PIECEWISE" if level == 1 and mode == "FULL_AND_PIECEWISE" else mode
        capture, spec = k("max_cudagraph_capture_size"), k("spec_method")
        plugin = self.space.plugins.chosen(recipe)
        return SimSettings(
            tp=int(k("tensor_parallel_size") or 1), seqs=int(k("max_num_seqs") or 1),
            batched=int(k("max_num_batched_tokens") or 1),
            util=float(k("gpu_memory_utilization") or 0.9), max_len=int(k("max_model_len") or 1),
            block=int(k("block_size") or 16), dtype=self.native if dtype == "auto" else dtype,
            method=method, kv_dtype=str(k("kv_cache_dtype")), eager=eager, mode=mode,
            backend=str(k("attention_backend") or self.default_backend),
            caching=bool(k("enable_prefix_caching")), dp=int(k("data_parallel_size") or 1),
            capture=int(capture) if isinstance(capture, int) else auto_capture_size(
                int(k("max_num_seqs") or 1)),
            long_prefill=int(k("long_prefill_token_threshold") or 0),
            spec=str(spec) if spec else None, spec_tokens=int(k("spec_tokens") or 0),
            kernel_speed=(plugin.speedup or 1.0) if plugin else 1.0)

    def _boot(self, recipe: Recipe, log: list[str]) -> SimServer | LaunchFailure:
        spec, model, s = self.spec, self.model, self._settings(recipe)
        jitter = float(sim_rng(self.seed, recipe.id, "boot").lognormal(0.0, 0.05))
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
            (s.tp * s.dp > gpus, f"data_parallel_size ({s.dp}) x tensor_parallel_size "
             f"({s.tp}) needs more than the {gpus} GPUs on this node"),
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
        bpp = elem if s.method == "none" else facts(s.method).bytes_per_param
        weight_bytes = model.params_b * 1e9 * bpp / s.tp
        kv_bytes = model.kv_bytes_per_token(1.0 if is_fp8_kv(s.kv_dtype) else elem) / s.tp
        gpu_bytes = (self.hw.gpu_memory_gib or spec.memory_gib) * GIB
        act = s.batched * model.hidden_size * ACT_BYTES * elem / 2 + s.seqs * SAMPLER_BYTES_PER_SEQ
        graphs = (GRAPH_GIB[0] + GRAPH_GIB[1] * model.num_layers) * GIB * GRAPHS[s.mode][2]
        budget = gpu_bytes * s.util - weight_bytes - act - graphs - NON_TORCH_GIB * GIB
        load_s = (BOOT_BASE_S + PER_WORKER_S * (s.tp * s.dp - 1)
                  + weight_bytes * s.tp / LOAD_BPS)
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
            0.5 + model.num_layers / 64) * capture_sizes(s.capture) / capture_sizes(
            MAX_CAPTURE_SEQS)  # capture time grows with the sizes captured
        plugin = self.space.plugins.chosen(recipe)
        if plugin is not None:
            log.append(f"INFO [sim] kernel plug-in {plugin.name}: " + _plugin_note(plugin))
        draw = sim_rng(self.seed, recipe.id, "warmup").random()
        if s.util >= WARMUP_OOM_UTIL and draw < 0.25 + (s.util - WARMUP_OOM_UTIL) * 10:
            return fail("oom", f"torch.OutOfMemoryError: CUDA out of memory during sampler "
                        f"warm-up with {s.seqs} dummy requests (gpu_memory_utilization="
                        f"{s.util}); lower gpu_memory_utilization or max_num_seqs", boot_s)
        log.append("INFO [sim] Graph capturing finished. Application startup complete.")
        return SimServer(recipe=recipe, url=f"sim://{recipe.id}", boot_s=round(boot_s * jitter, 2),
                         kv_capacity_tokens=capacity, settings=s, memory=(
                             num_blocks, weight_bytes, kv_bytes, gpu_bytes * (1 - s.util)))

    def bench(self, server: SimServer, workload: Workload, concurrency: int,
              passes: int = 1, slo: Slo | None = None,
              stop: Callable[[Sequence[BenchMetrics]], bool] | None = None
              ) -> BenchOutcome:
        """Replay `workload` `passes` times at `concurrency` (closed loop, or open loop at
        the arrival offsets). Each pass starts on an empty prefix cache, so passes differ
        only by noise; the outcome carries the median-throughput pass. `stop`, asked after
        each pass, ends the bench early as the real bench client does."""
        if concurrency < 1 or passes < 1:
            raise UsageError("concurrency and passes must be at least 1")
        done: list[BenchMetrics] = []
        headroom = server.memory[3]  # bytes outside vLLM's budget
        for index in range(passes):
            rng = sim_rng(self.seed, server.recipe.id, workload.sha256, concurrency, index)
            metrics, peak = SimPass(self.spec, self.model, self.noise_cv, server, workload,
                                    concurrency, rng, slo).run()
            if LOAD_SLACK_GIB * GIB + peak * LOAD_BYTES_PER_SEQ > headroom:
                return BenchOutcome(
                    status="oom", passes=tuple(done), bench_s=round(
                        sum(m.duration_s for m in done) + metrics.duration_s / 2, 3),
                    reason=f"torch.OutOfMemoryError: CUDA out of memory under load with {peak}"
                    f" running sequences: gpu_memory_utilization={server.settings.util} leaves "
                    f"{headroom / GIB:.2f} GiB outside vLLM's budget; lower it")
            done.append(metrics)
            if stop is not None and len(done) < passes and stop(tuple(done)):
                break
        # Failed requests are classified as for a real server (engine.failures).
        status, reason = request_failures(done) or ("ok", "")
        plugin = self.space.plugins.chosen(server.recipe)
        if plugin is not None:  # the record says what was simulated, not measured
            reason = "; ".join(filter(None, (reason, f"kernel plug-in {plugin.name} "
                                             + _plugin_note(plugin))))
        return BenchOutcome(status=status, reason=reason, metrics=median_pass(done),
                            passes=tuple(done),
                            bench_s=round(sum(m.duration_s for m in done), 3))

    def reference(self, server: SimServer) -> dict[str, object]:
        """The baseline's outputs, as the quality probe would keep them (simulated)."""
        return {"simulated": True, "recipe": server.recipe.id}

    def accuracy(self, server: SimServer, reference: object = None) -> QualityScore:
        """Teacher-forced agreement with the baseline's greedy outputs (1.0 = identical)."""
        return QualityScore(agreement=self.agreement(server))

    def agreement(self, server: SimServer) -> float:
        recipe, s = server.recipe, self._settings(server.recipe)
        if recipe.settings() == Recipe(model=recipe.model).settings():
            return 1.0  # the baseline itself
        score = facts(s.method).accuracy * (
            DTYPE_ACCURACY if s.dtype != self.native else 1.0) * (
            FP8_KV_ACCURACY if is_fp8_kv(s.kv_dtype) else 1.0)
        wobble = float(sim_rng(self.seed, recipe.id, "accuracy").normal(0.0, 1.0))
        if score < 1.0:
            return round(min(1.0, score * (1.0 + 0.001 * wobble)), 5)
        # batch shapes and kernels perturb greedy outputs a little, never above 1
        return round(1.0 - min(abs(0.0003 * wobble), 0.001), 5)


def capture_sizes(largest: int) -> int:
    """How many batch sizes vLLM captures as CUDA graphs up to `largest` (its default
    list: 1, 2, 4, then steps of 8 to 256, then of 16)."""
    sizes = [1, 2, 4, *range(8, 256, 8), *range(256, max(256, largest) + 1, 16)]
    return sum(size <= largest for size in sizes)


def _plugin_note(plugin: KernelCandidate) -> str:
    if plugin.speedup is None:
        return "simulated as neutral (the simulator cannot model a plug-in's kernel)"
    return f"simulated with the plug-in's own estimate (x{plugin.speedup:g} speed)"
