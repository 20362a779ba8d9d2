"""A model of vLLM for the builtin strategy: the dry-run simulator (engine/sim), run on a
workload shaped like the run's (its token lengths, shared prefixes, arrivals, the
concurrency the diagnosis recorded) and calibrated on the baseline's measured throughput
(one scale on the GPU's bandwidth and FLOP/s fixes what the simulator cannot know about
this host and model), predicts each candidate move's effect. The strategy ranks moves by
that prediction plus an uncertainty learned from how far past predictions missed.

Only where the simulator knows the hardware (a catalogued GPU); elsewhere (the CPU build,
an unknown GPU) the strategy falls back to its kernel-regression search."""

from __future__ import annotations

import hashlib
import math
import tempfile
from dataclasses import replace
from pathlib import Path

from aevyra_forge.agent.base import AgentContext
from aevyra_forge.core.errors import UsageError
from aevyra_forge.core.recipe import Recipe, recipe_from_dict
from aevyra_forge.core.values import LaunchFailure, Scalar
from aevyra_forge.core.workload import CHARS_PER_TOKEN, Request, Workload
from aevyra_forge.engine.sim.engine import SimulatedEngine
from aevyra_forge.space.gpu_catalogue import find_gpu_spec
from aevyra_forge.space.knob_space import KNOBS

REQUESTS = 48  # requests in the model's workload: enough for batching, fast to simulate
# a prediction's sd is scale x (FLOOR + |predicted log gain|); the scale's prior is worth
# PRIOR_N measured misses
FLOOR, PRIOR_SCALE, PRIOR_N = 0.01, 0.5, 2.0
CALIBRATION_STEPS = 3  # scale refits against the baseline's measured throughput


class EngineModel:
    """Predicted noise-free output throughput of recipes in this run (0.0: it would not
    boot or serve), and the accuracy the simulator expects of them."""

    def __init__(self, ctx: AgentContext, concurrency: int, measured: float | None) -> None:
        hw = ctx.hardware
        spec = find_gpu_spec(hw.gpu.name) if hw.gpu is not None else None
        if spec is None or hw.device == "cpu":
            raise UsageError("no simulator for this hardware")
        self.ctx, self.concurrency = ctx, concurrency
        self.workload = _workload(ctx)
        self._dir = tempfile.TemporaryDirectory(prefix="forge-model-")  # the sim's logs
        self.tmp = Path(self._dir.name)
        self.base = ctx.space.baseline(ctx.best.model)
        self.spec = spec
        self.sim = self._engine(1.0)
        self.cache: dict[str, tuple[float, float]] = {}
        self.reads: dict[str, bool] = {}  # knob -> whether the simulator reads it
        if measured:
            self._calibrate(measured)

    def _engine(self, scale: float) -> SimulatedEngine:
        spec = replace(self.spec, bandwidth_gbs=self.spec.bandwidth_gbs * scale,
                       bf16_tflops=self.spec.bf16_tflops * scale)
        return SimulatedEngine(self.ctx.hardware, spec, self.ctx.space.model, self.ctx.space,
                               noise_cv=0.0)

    def _calibrate(self, measured: float) -> None:
        """Scale the GPU until the first served config (the reference) predicts what it
        measured: throughput is close to proportional to the scale."""
        reference = _reference(self.ctx)
        if reference is None:
            return
        scale = 1.0
        for _ in range(CALIBRATION_STEPS):
            self.cache.clear()
            predicted = self.throughput(reference)
            if predicted <= 0:
                return
            scale *= measured / predicted
            self.sim = self._engine(scale)
        self.cache.clear()

    def models(self, incumbent: Recipe, changes: dict[str, Scalar]) -> bool:
        """Whether the simulator can predict the move `changes` from `incumbent`: not when
        it sets a knob the simulator does not read (no value of it changes what the
        simulator runs) or picks a kernel plug-in with no estimate of its own (simulated
        as neutral), so the model's "no change" there is ignorance, not a prediction."""
        space = self.ctx.space
        plugin = space.plugins.chosen(space.apply(incumbent, changes))
        if plugin is not None and plugin.speedup is None \
                and plugin != space.plugins.chosen(incumbent):
            return False
        return all(self._reads(name) for name in changes)

    def _reads(self, name: str) -> bool:
        if name not in self.reads:
            space, knob = self.ctx.space, KNOBS[name]
            plain = self.sim.settings(self.base)
            self.reads[name] = any(
                self.sim.settings(space.apply(self.base, {name: v})) != plain
                for v in space.grid(knob))
        return self.reads[name]

    def throughput(self, recipe: Recipe) -> float:
        return self._run(recipe)[0]

    def agreement(self, recipe: Recipe) -> float:
        return self._run(recipe)[1]

    def _run(self, recipe: Recipe) -> tuple[float, float]:
        if recipe.id not in self.cache:
            server = self.sim.launch(recipe, self.tmp / "model.log")
            if isinstance(server, LaunchFailure):
                self.cache[recipe.id] = (0.0, 1.0)
            else:
                out = self.sim.bench(server, self.workload, self.concurrency)
                ok = out.status == "ok" and out.metrics is not None
                value = out.metrics.output_throughput if ok and out.metrics else 0.0
                self.cache[recipe.id] = (value, self.sim.agreement(server))
        return self.cache[recipe.id]

    def uncertainty(self, gain: float) -> float:
        """The sd of a predicted log gain: its size plus a floor (a large predicted effect
        misses by more in absolute terms), times how far past predictions missed on that
        scale, pooled with a prior: small while the model has been right, larger once it
        has missed, so nil-looking moves are tried only when the model proved unreliable."""
        squares, n = PRIOR_SCALE ** 2 * PRIOR_N, PRIOR_N
        scores = {r.recipe_id: r.score for r in self.ctx.history if r.status == "ok" and r.score}
        for rec in self.ctx.history:
            parent = scores.get(rec.parent_id or "")
            if rec.proposal is None or not rec.score or rec.status != "ok" or not parent:
                continue
            before = self.throughput(_parent(self.ctx, rec.parent_id))
            after = self.throughput(recipe_from_dict(rec.recipe))
            if before > 0 and after > 0:
                predicted = math.log(after / before)
                miss = (math.log(rec.score / parent) - predicted) / (FLOOR + abs(predicted))
                squares, n = squares + miss * miss, n + 1
        return math.sqrt(squares / n) * (FLOOR + abs(gain))


def _reference(ctx: AgentContext) -> Recipe | None:
    first = next((r for r in ctx.history if r.status == "ok" and r.kept), None)
    return recipe_from_dict(first.recipe) if first is not None else None


def _parent(ctx: AgentContext, parent_id: str | None) -> Recipe:
    found = next((r for r in ctx.history if r.recipe_id == parent_id), None)
    return recipe_from_dict(found.recipe) if found is not None else ctx.best


def _workload(ctx: AgentContext) -> Workload:
    """REQUESTS requests with the run's mean prompt and output lengths, the shared-prefix
    share of their prompts identical across them, the n-gram repetition speculative
    decoding feeds on, and the arrival rate when open loop."""
    stats = ctx.workload
    n = max(1, min(REQUESTS, stats.count))
    tokens = max(1, round(stats.input_tokens.mean))
    shared = round(tokens * stats.shared_prefix_fraction)
    prefix = _words("s", 0, shared, stats.ngram_repetition)  # every part repeats alike
    rate = stats.offered_rps if stats.open_loop and stats.offered_rps else None
    requests = [Request(line=i + 1, prompt=prefix + _words("r", i, tokens - shared,
                                                           stats.ngram_repetition),
                        expected_output_tokens=max(1, round(stats.output_tokens.mean)),
                        arrival_offset_s=i / rate if rate else None) for i in range(n)]
    digest = hashlib.sha256(repr((n, tokens, shared, rate, stats.ngram_repetition)).encode())
    return Workload(path="<model>", sha256=digest.hexdigest(), requests=tuple(requests))


def _words(tag: str, i: int, tokens: int, repetition: float) -> str:
    """About `tokens` tokens of distinct words, of which a block repeats earlier ones so
    that `repetition` of the word trigrams recur (core.workload.ngram_repetition)."""
    word = len(f"{tag}{i}x0000 ")
    count = max(0, int(tokens * CHARS_PER_TOKEN / word))
    fresh = max(min(count, 3), count - int(repetition * max(0, count - 2)))
    words = [f"{tag}{i}x{j:04d}" for j in range(fresh)]
    while len(words) < count:  # repeat the fresh block: its trigrams recur
        words += words[:min(fresh, count - len(words))]
    return " ".join(words) + " " if words else ""
