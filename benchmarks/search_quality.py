"""How close does the builtin strategy get to the best config, and how fast? Runs the real
tuning loop (Tuner + BuiltinStrategy + the sequential test) on the dry-run simulator
(3 % pass noise) over several scenarios (GPUs, models, workloads, concurrencies) and
prints, per scenario, the fraction of the simulator's grid optimum that the incumbent
reaches after 3, 5, 10 and 15 experiments, the GPU time spent (boot + bench seconds of
the simulated engine), and the same for random search over the same knob space (random
one-shot configs, each measured the same way, best measured kept), median over seeds.

The optimum: the best noise-free throughput of any config whose accuracy clears the floor,
found by descent over every knob's grid (all layers at once) from the best configs either
search tried, the context that fits and RANDOM_STARTS random configs: single-knob moves,
then every two-knob move from the best point, until neither improves. The grid (~10^10
configs) is too large to enumerate, so this is a local optimum under every one- and
two-knob change: the fractions are upper bounds, honest unless a three-knob move pays.
Fractions are noise-free throughput of the incumbent (what a user deploys) over it.

TUNING scenarios were used while writing the strategy; REPORTED ones were not tuned on
(the output says which is which); the closing note cites the REPORTED ones.

    python benchmarks/search_quality.py [--seeds 3] [--tuning | --all] [--scenario NAME]

What it showed (3 seeds, builtin median / random median of the fraction of the optimum
after 3, 5, 10, 15 experiments; layer 2 offers the dry run's simulated candidates, whose
preparation counts as GPU time), REPORTED scenarios, 691 s on 2 cores:

    KV-bound long context, H100, 8B, c=32       0.98 0.98 0.98 0.98 / 0.00 0.80 0.80 0.80
    prefix-heavy chat, A100-80GB, Qwen 7B, c=32 1.00 1.00 1.00 1.00 / 0.45 0.45 0.68 0.68
    bursty open loop, H100, 8B, c=64            0.96 0.96 0.96 0.96 / 0.00 0.99 0.98 0.98
    small GPU (context does not fit), L4, c=16  0.38 0.97 0.97 0.97 / 0.00 0.76 0.76 0.76
    RAG prompts, A10G, 1B, c=24                 0.96 0.96 0.96 0.96 / 0.90 0.90 0.92 0.93

The builtin strategy reaches 0.99 within 5 experiments in one REPORTED scenario; it is
above random search's median at every budget in four and below it in the bursty open
loop from 5 experiments on. Where it falls short is the keep rule, not the search: in the
long context, bursty, small-GPU and RAG scenarios it boots a config at >= 0.99 of the
optimum within its first five experiments in 11 of 12 runs (the twelfth: its sixth), and
the keep rule reverts it, because the gain left over the incumbent (1.7 - 3.7 %) is below
what the sequential test confirms at 3 % pass noise and 1 % between-boot noise (the
interval's half-width cannot fall below ~2.8 % however many passes run; decision_rates.py:
a true +5 % is kept about 37 % of the time). Random search keeps its best measured config
with no confirmation, so such small differences do not stop it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aevyra_forge.agent.builtin import BuiltinStrategy
from aevyra_forge.core.recipe import Recipe, recipe_from_dict
from aevyra_forge.core.settings import TuneSettings
from aevyra_forge.core.values import ExperimentRecord, LaunchFailure, best_record
from aevyra_forge.core.workload import Workload, load_workload
from aevyra_forge.decide.verdict import should_stop
from aevyra_forge.engine.executor import LocalExecutor
from aevyra_forge.engine.sim import layer2 as sim_layer2
from aevyra_forge.engine.sim.engine import SimulatedEngine
from aevyra_forge.loop.events import Silent
from aevyra_forge.loop.tuner import Tuner
from aevyra_forge.space.gpu_catalogue import gpu_spec
from aevyra_forge.space.knob_space import KNOBS, Knob, KnobSpace
from aevyra_forge.space.model_profile import profile
from aevyra_forge.space.playbook import load_playbook
from aevyra_forge.store.run_store import RunStore

CHECKPOINTS = (3, 5, 10, 15)
STARTS = 6  # best configs the searches tried that the optimum's descent starts from
RANDOM_STARTS = 12  # and random configs it starts from
ACCURACY_FLOOR = 0.99  # --accuracy-floor's default: a config below it is not a candidate
WORDS = ("router", "invoice", "printer", "kernel", "budget", "tenant", "cluster", "ledger",
         "harbor", "meadow", "granite", "juniper")


@dataclass(frozen=True)
class Scenario:
    name: str
    gpu: str
    model: str
    concurrency: int
    rows: Callable[[], list[dict[str, Any]]]


def _text(i: int, words: int) -> str:
    return " ".join(WORDS[(i * 7 + j * 3 + j // 5) % len(WORDS)] for j in range(words))


def _long_context() -> list[dict[str, Any]]:
    return [{"prompt": f"Document {i}: {_text(i, 5000)}", "expected_output_tokens": 256}
            for i in range(48)]


def _prefix_chat() -> list[dict[str, Any]]:
    system = "You answer questions about the Orbit data platform. " * 150
    return [{"messages": [{"role": "system", "content": system},
                          {"role": "user", "content": f"Question {i}: {_text(i, 30)}"}],
             "expected_output_tokens": 128} for i in range(96)]


def _bursty() -> list[dict[str, Any]]:
    rows = []
    for i in range(96):  # bursts of 24 every 6 s
        rows.append({"prompt": f"Ticket {i}: {_text(i, 200)}", "expected_output_tokens": 192,
                     "arrival_offset_s": (i // 24) * 6.0 + (i % 24) * 0.01})
    return rows


def _short_chat() -> list[dict[str, Any]]:
    return [{"prompt": f"Question {i}: {_text(i, 80)}", "expected_output_tokens": 256}
            for i in range(96)]


def _steady() -> list[dict[str, Any]]:
    return [{"prompt": f"Mail {i}: {_text(i, 300)}", "expected_output_tokens": 160,
             "arrival_offset_s": i * 0.08} for i in range(96)]


def _rag() -> list[dict[str, Any]]:
    return [{"prompt": f"Context {i}: {_text(i, 1500)}", "expected_output_tokens": 64}
            for i in range(64)]


LLAMA_8B, LLAMA_1B = "meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.2-1B-Instruct"
QWEN_7B = "Qwen/Qwen2.5-7B-Instruct"
TUNING = (
    Scenario("tune: short chat, A100-80GB, 8B, c=32", "A100-80GB", LLAMA_8B, 32, _short_chat),
    Scenario("tune: long context, A100-40GB, 8B, c=16", "A100-40GB", LLAMA_8B, 16,
             _long_context),
    Scenario("tune: prefix-heavy chat, H100, 8B, c=16", "H100", LLAMA_8B, 16, _prefix_chat),
    Scenario("tune: steady open loop, A100-80GB, 8B, c=32", "A100-80GB", LLAMA_8B, 32,
             _steady),
    Scenario("tune: RAG prompts, L4, 1B, c=8", "L4", LLAMA_1B, 8, _rag),
)
REPORTED = (
    Scenario("KV-bound long context, H100, 8B, c=32", "H100", LLAMA_8B, 32, _long_context),
    Scenario("prefix-heavy chat, A100-80GB, Qwen 7B, c=32", "A100-80GB", QWEN_7B, 32,
             _prefix_chat),
    Scenario("bursty open loop, H100, 8B, c=64", "H100", LLAMA_8B, 64, _bursty),
    Scenario("small GPU, default context does not fit, L4, 8B, c=16", "L4", LLAMA_8B, 16,
             _short_chat),
    Scenario("RAG prompts, A10G, 1B, c=24", "A10G", LLAMA_1B, 24, _rag),
)


class Truth:
    """Noise-free throughput of a recipe in one scenario (0 when it fails or loses
    accuracy), memoised: the yardstick every search is measured against."""

    def __init__(self, sc: Scenario, workload: Workload, tmp: Path) -> None:
        spec = gpu_spec(sc.gpu)
        self.space = KnobSpace(spec.hardware(), profile(sc.model), simulated=True)
        # layer 2's candidates as a dry run offers them; their preparation is charged once
        self.prepare = sim_layer2.offer(sc.model, self.space, lambda _: None)
        self.sim = SimulatedEngine(spec.hardware(), spec, self.space.model, self.space,
                                   noise_cv=0.0)
        self.sc, self.workload, self.tmp = sc, workload, tmp
        self.seen: dict[str, float] = {}
        self.cost_s: dict[str, float] = {}  # boot + five passes, as an experiment spends
        self.recipes: dict[str, Recipe] = {}

    def __call__(self, recipe: Recipe) -> float:
        if recipe.id not in self.seen:
            self.recipes[recipe.id] = recipe
            server = self.sim.launch(recipe, self.tmp / "truth.log")
            prepared = self.prepare(recipe, self.tmp / "truth.prepare.log")
            value, cost = 0.0, server.boot_s + (prepared.seconds if prepared else 0.0)
            if not isinstance(server, LaunchFailure):
                out = self.sim.bench(server, self.workload, self.sc.concurrency)
                cost += 5 * out.bench_s
                if out.status == "ok" and out.metrics is not None and \
                        self.sim.agreement(server) >= ACCURACY_FLOOR:
                    value = out.metrics.output_throughput
            self.seen[recipe.id], self.cost_s[recipe.id] = value, cost
        return self.seen[recipe.id]

    def optimum(self, starts: Sequence[Recipe], seed: int = 0) -> float:
        """Descent over every knob's grid (all layers at once) from the best STARTS of
        `starts` (the configs either search tried, and the context that fits) and from
        RANDOM_STARTS random valid configs: single-knob moves until none improves, then
        every two-knob move from the best point found, repeated until neither does. The
        best value of any config evaluated: a local optimum under every one- and
        two-knob change (the grid, ~10^10 configs, is too large to enumerate)."""
        space, rng = self.space, np.random.default_rng(seed)
        knobs = [k for k in space.knobs() if k.name != "VLLM_CPU_OMP_THREADS_BIND"]
        queue = sorted(starts, key=self)[-STARTS:]
        base = space.baseline(self.sc.model)
        while len(queue) < STARTS + RANDOM_STARTS:
            random = _valid(space, base, {k.name: space.grid(k)[int(rng.integers(
                len(space.grid(k))))] for k in knobs})
            if random is not None:
                queue.append(random)
        tried: set[str] = set()
        for point in queue:
            if point.id not in tried:
                tried.add(self._descend(point, knobs, pairs=False).id)
        point = max((self.recipes[i] for i in self.seen), key=self)
        return self(self._descend(point, knobs, pairs=True))

    def _descend(self, point: Recipe, knobs: list[Knob], pairs: bool) -> Recipe:
        """Greedy moves (one knob, then two when `pairs`) until none improves by 0.05 %."""
        moves = [{k.name: v} for k in knobs for v in self.space.grid(k)]
        if pairs:
            moves += [{a.name: va, b.name: vb} for i, a in enumerate(knobs)
                      for b in knobs[i + 1:] for va in self.space.grid(a)
                      for vb in self.space.grid(b)]
        improved = True
        while improved:
            improved = False
            for move in moves:
                candidate = _valid(self.space, point, move)
                if candidate is not None and self(candidate) > self(point) * 1.0005:
                    point, improved = candidate, True
        return point


def _valid(space: KnobSpace, point: Recipe, changes: dict[str, Any]) -> Recipe | None:
    try:
        candidate = space.apply(point, changes)
        space.check_combination(candidate)
    except Exception:  # an invalid combination: not a config
        return None
    return candidate


def tune(sc: Scenario, workload: Workload, seed: int, tmp: Path, budget: int
         ) -> list[ExperimentRecord]:
    """The real loop on the noisy simulator; its records."""
    spec = gpu_spec(sc.gpu)
    hw = spec.hardware()
    settings = TuneSettings(model=sc.model, workload=workload.path, llm="builtin",
                            dry_run=True, run_dir=str(tmp / f"forge-{seed}"),
                            concurrency=sc.concurrency, max_experiments=budget, seed=seed,
                            gpu=sc.gpu)
    space = KnobSpace(hw, profile(sc.model), simulated=True)
    prepare = sim_layer2.offer(sc.model, space, lambda _: None)  # as a dry run's session
    sim = SimulatedEngine(hw, spec, space.model, space, seed=seed)
    run = RunStore(tmp / f"forge-{seed}").create_run({"model": sc.model, "hardware": sc.gpu})
    executor = LocalExecutor(sim, sim, sim, workload, concurrency=sc.concurrency,
                             repeats=settings.repeats, slo=None, log_path=run.log_path,
                             log_root=run.path, stopper=should_stop, prepare=prepare)
    Tuner(settings, hw, workload, space, load_playbook(), BuiltinStrategy(seed=seed),
          executor, run, space.baseline(sc.model), Silent()).run()
    records = run.records()
    run.close()
    return records


def random_search(truth: Truth, seed: int, budget: int
                  ) -> tuple[list[float], list[float], list[Recipe]]:
    """`budget` random configs (each knob uniform over its grid, valid combinations only),
    each measured with 3 % noise; after each, the true value of the best measured so far
    and the GPU seconds spent (boots + five bench passes, the simulator's timings)."""
    space, rng = truth.space, np.random.default_rng(seed)
    knobs = [k for k in space.knobs() if k.name != "VLLM_CPU_OMP_THREADS_BIND"]
    base = space.baseline(truth.sc.model)
    best_seen, best_true = -1.0, 0.0
    out: list[float] = []
    spent: list[float] = []
    picked: list[Recipe] = []
    while len(out) < budget:
        changes = {k.name: space.grid(k)[int(rng.integers(len(space.grid(k))))]
                   for k in knobs}
        try:
            recipe = space.apply(base, changes)
            space.check_combination(recipe)
        except Exception:
            continue
        picked.append(recipe)
        value = truth(recipe)
        measured = value * float(rng.lognormal(0.0, 0.03)) if value else 0.0
        if measured > best_seen:
            best_seen, best_true = measured, value
        out.append(best_true)
        spent.append((spent[-1] if spent else 0.0) + truth.cost_s[recipe.id])
    return out, spent, picked


def _fractions(records: Sequence[ExperimentRecord], truth: Truth, optimum: float
               ) -> list[float]:
    out = []
    for k in CHECKPOINTS:
        lead = best_record([r for r in records if r.exp < k])
        recipe = recipe_from_dict(lead.recipe) if lead is not None else None
        out.append(truth(recipe) / optimum if recipe is not None and optimum else 0.0)
    return out


def _gpu_s(records: Sequence[ExperimentRecord], k: int) -> float:
    return sum((r.prepare_s or 0.0) + (r.boot_s or 0.0) + (r.bench_s or 0.0)
               for r in records if r.exp < k)


def run_scenario(sc: Scenario, seeds: int, budget: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        path = tmp / "workload.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in sc.rows()) + "\n")
        workload = load_workload(path)
        truth = Truth(sc, workload, tmp)
        runs = [tune(sc, workload, seed, tmp, budget) for seed in range(seeds)]
        randoms = [random_search(truth, 1000 + seed, budget) for seed in range(seeds)]
        starts = [recipe_from_dict(r.recipe) for rs in runs for r in rs]
        starts += [r for _, _, picked in randoms for r in picked]
        need = workload.stats.input_tokens.max + workload.stats.output_tokens.max
        fit = min((v for v in truth.space.grid(KNOBS["max_model_len"])
                   if isinstance(v, int) and v >= need), default=None)
        if fit is not None:
            starts.append(truth.space.apply(truth.space.baseline(sc.model),
                                            {"max_model_len": fit}))
        optimum = truth.optimum(starts)
        builtin = [_fractions(rs, truth, optimum) for rs in runs]
        rand = [[r[k - 1] / optimum for k in CHECKPOINTS] for r, _, _ in randoms]
        return {"name": sc.name, "optimum": optimum,
                "builtin": [statistics.median(f[i] for f in builtin)
                            for i in range(len(CHECKPOINTS))],
                "builtin_min": [min(f[i] for f in builtin) for i in range(len(CHECKPOINTS))],
                "random": [statistics.median(f[i] for f in rand)
                           for i in range(len(CHECKPOINTS))],
                "gpu_h": [statistics.median(_gpu_s(rs, k) for rs in runs) / 3600
                          for k in CHECKPOINTS],
                "random_gpu_h": [statistics.median(s[k - 1] for _, s, _ in randoms) / 3600
                                 for k in CHECKPOINTS],
                "evaluated": len(truth.seen)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budget", type=int, default=max(CHECKPOINTS))
    parser.add_argument("--tuning", action="store_true", help="the tuning scenarios only")
    parser.add_argument("--all", action="store_true", help="tuning, then reported ones")
    parser.add_argument("--scenario", default=None, help="only scenarios containing this")
    args = parser.parse_args()
    sets = ((TUNING, REPORTED) if args.all else (TUNING,) if args.tuning else (REPORTED,))
    chosen = [(sc, "TUNING (the strategy was tuned on it)" if group is TUNING else
               "REPORTED (never used for tuning)") for group in sets for sc in group
              if args.scenario is None or args.scenario in sc.name]
    start = time.perf_counter()
    head = "  ".join(f"@{k:<2}" for k in CHECKPOINTS)
    print(f"fraction of the grid optimum (noise-free tok/s) reached by the incumbent after "
          f"k experiments; builtin median (min) over {args.seeds} seeds, random median")
    for sc, role in chosen:
        r = run_scenario(sc, args.seeds, args.budget)
        print(f"\n{role}: {r['name']}  (optimum {r['optimum']:.0f} tok/s, best of "
              f"{r['evaluated']} configs evaluated for it)")
        print(f"  {'':<8} {head}")
        print("  builtin  " + "  ".join(f"{v:.3f}" for v in r["builtin"])
              + "   min " + " ".join(f"{v:.2f}" for v in r["builtin_min"]))
        print("  random   " + "  ".join(f"{v:.3f}" for v in r["random"]))
        print("  GPU hours: builtin " + "  ".join(f"{v:.2f}" for v in r["gpu_h"])
              + "   random " + "  ".join(f"{v:.2f}" for v in r["random_gpu_h"]))
    print(f"\n({time.perf_counter() - start:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
