"""How fast is the dry run? The README promises the quick start finishes in under a
minute on a laptop. Prints wall time for the whole quick-start tune (in a subprocess, as a
user runs it) and the simulator's cost per experiment on each catalogued GPU.

    python benchmarks/dry_run_speed.py
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from aevyra_forge.core.values import LaunchFailure
from aevyra_forge.core.workload import load_workload
from aevyra_forge.engine.sim.engine import SimulatedEngine
from aevyra_forge.space.gpu_catalogue import GPU_CATALOG
from aevyra_forge.space.knob_space import KnobSpace
from aevyra_forge.space.model_profile import profile

ROOT = Path(__file__).resolve().parent.parent
WORKLOAD = ROOT / "examples" / "sample_workload.jsonl"
MODEL = "meta-llama/Llama-3.1-8B-Instruct"
GOAL_S = 60.0


def quick_start_seconds() -> float:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "aevyra_forge", "tune", "--dry-run",
                        "--model", MODEL, "--workload", str(WORKLOAD), "--llm", "builtin",
                        "--max-experiments", "20", "--run-dir", f"{tmp}/.forge"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return time.perf_counter() - start


def simulator_ms_per_experiment(passes: int = 3) -> dict[str, float]:
    workload = load_workload(WORKLOAD)
    out = {}
    for spec in GPU_CATALOG:
        hw = spec.hardware()
        space = KnobSpace(hw, profile(MODEL), simulated=True)
        recipe = space.apply(space.baseline(MODEL), {"max_model_len": 8192})
        sim = SimulatedEngine(hw, spec, space.model, space)
        times = []
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(3):
                start = time.perf_counter()
                server = sim.launch(recipe, Path(tmp) / f"{i}.log")
                if not isinstance(server, LaunchFailure):
                    sim.bench(server, workload, concurrency=8, passes=passes)
                times.append(time.perf_counter() - start)
        out[spec.name] = statistics.median(times) * 1000
    return out


def main() -> None:
    print(f"{'GPU':<12} simulator ms / experiment (3 passes, 50 requests, c=8)")
    for name, ms in simulator_ms_per_experiment().items():
        print(f"{name:<12} {ms:8.1f}")
    seconds = quick_start_seconds()
    verdict = "ok" if seconds < GOAL_S else "TOO SLOW"
    print(f"quick start (20 experiments, subprocess): {seconds:.1f} s "
          f"(goal < {GOAL_S:.0f} s: {verdict})")


if __name__ == "__main__":
    main()
