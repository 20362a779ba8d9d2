"""Does running several experiments at once pay, and never cost search quality? Runs the
same dry-run tuning (the simulator, builtin strategy, same seed and experiment budget)
with 1, 2, 4 and 8 workers and prints, per seed and worker count, the simulated
wall-clock time to reach --fraction of the best score any of them reached (a trial is
known when it finishes, the next round starts when the round's longest trial has; the
simulator's boot and bench seconds are the clock), the time the whole run took, the
experiments it ran, its best score, and whether that is the sequential run's best recipe
or better. Exit status 1 when any parallel run ended below
the sequential run's best at the same budget (the issue's "same best recipe, or better").

    python benchmarks/scale_out.py [--budget 24] [--seeds 0 1 2 3 4 5] [--fraction 0.99]
    python benchmarks/scale_out.py --engine fake --budget 9 --seeds 0

With --engine fake the clock is the wall clock of real runs on a fake host: a fake
nvidia-smi showing eight GPUs and the repository's fake vLLM (tests/data/fake_vllm), one
server per GPU. The fake serves every config at the same speed and refuses flags it does
not know (quick boot failures), so there the figure that matters is the total time for
the same budget, and its best is noise (so it is not checked against the sequential one).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
WORKERS = (1, 2, 4, 8)
FAKE_BOOT_S = 2.0  # the fake server's "model loading", seconds
FAKE_TOKEN_S = 0.002  # between streamed tokens, seconds


def tune(workload: Path, run_dir: Path, workers: int, seed: int, budget: int,
         fake: Path | None, gpu: str = "A100-80GB") -> list[dict[str, Any]]:
    """One run's records: simulated (--dry-run), or on the fake engine's host (`fake`:
    a folder with a fake nvidia-smi and vllm, one server per fake GPU)."""
    common = ["--model", MODEL, "--workload", str(workload), "--llm", "builtin",
              "--run-dir", str(run_dir), "--max-experiments", str(budget), "--patience",
              "6", "--seed", str(seed)]
    env = dict(os.environ)
    if fake is None:
        where = ["--dry-run", "--gpu", gpu, "--parallel", str(workers)]
    else:
        where = ["--device", "cuda", "--vllm-bin", str(fake / "vllm"), "--repeats", "2"]
        where += ["--gpus", ",".join(str(i) for i in range(workers))] if workers > 1 else []
        (fake / "runtime").mkdir(exist_ok=True)
        env.update(PATH=f"{fake}{os.pathsep}{env['PATH']}", XDG_CACHE_HOME=str(fake / "c"),
                   XDG_RUNTIME_DIR=str(fake / "runtime"))
    subprocess.run([sys.executable, "-m", "aevyra_forge", "tune", *where, *common],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    (log,) = run_dir.glob("runs/*/experiments.jsonl")
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def fake_host(folder: Path, gpus: int) -> Path:
    """A fake nvidia-smi with `gpus` idle A100s and a `vllm` that execs the repository's
    fake server after FAKE_BOOT_S of "loading" (tests/data/fake_vllm/vllm)."""
    root = Path(__file__).resolve().parents[1]
    info = "\\n".join(f"{i}, NVIDIA A100-SXM4-80GB, 81920, 8.0, 535.129.03, GPU-{i}"
                       for i in range(gpus))
    mem = "\\n".join(f"{i}, GPU-{i}, 0" for i in range(gpus))
    (folder / "nvidia-smi").write_text(
        f"#!/bin/sh\ncase \"$*\" in *memory.used*) printf '{mem}\\n' ;; "
        f"*) printf '{info}\\n' ;; esac\n")
    help_text = root / "tests" / "data" / "vllm" / "serve_help_all_0.32.0+cpu.txt"
    (folder / "vllm").write_text(f"""#!/bin/bash
if [ "$1" = "--version" ]; then echo "0.32.0"; exit 0; fi
if [ "$1 $2" = "serve --help=all" ]; then cat "{help_text}"; exit 0; fi
export FAKE_VLLM_BOOT_S={FAKE_BOOT_S} FAKE_VLLM_TOKEN_DELAY_S={FAKE_TOKEN_S}
exec "{sys.executable}" "{root / "tests" / "data" / "fake_vllm" / "vllm"}" "$@"
""")
    for name in ("nvidia-smi", "vllm"):
        (folder / name).chmod(0o755)
    return folder


def wall(records: list[dict[str, Any]]) -> list[tuple[float, dict[str, Any]]]:
    """(seconds since the run's first start at which each record was known, record)."""
    def at(stamp: str) -> float:
        return datetime.fromisoformat(stamp).timestamp()

    start = min(at(r["started_at"]) for r in records)
    return sorted(((at(r["finished_at"]) - start, r) for r in records),
                  key=lambda pair: pair[0])


def clock(records: list[dict[str, Any]]) -> list[tuple[float, dict[str, Any]]]:
    """(simulated time at which each record was known, record), in that order. The
    trials of a round start together and each is recorded when it finishes (the pool
    hands them back as they do); the next round starts once its longest one has."""
    def took(r: dict[str, Any]) -> float:
        return sum(r.get(k) or 0.0 for k in ("prepare_s", "boot_s", "bench_s"))

    out: list[tuple[float, dict[str, Any]]] = []
    now = 0.0
    rounds: dict[int, list[dict[str, Any]]] = {}
    for r in records:
        if r.get("round") is not None:
            rounds.setdefault(r["round"], []).append(r)
    for r in sorted(records, key=lambda r: r["exp"]):
        if r.get("round") is None:
            now += took(r)
            out.append((now, r))
        elif r is rounds[r["round"]][0]:  # the round's first trial: the whole round
            trials = rounds[r["round"]]
            out.extend((now + took(x), x) for x in trials)
            now += max(took(x) for x in trials)
    return sorted(out, key=lambda pair: pair[0])


def lead(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    kept = [r for r in records if r["kept"] and r["status"] == "ok"]
    return max(kept, key=lambda r: r["score"]) if kept else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=int, default=24)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    parser.add_argument("--fraction", type=float, default=0.99)
    parser.add_argument("--gpu", default="A100-80GB", help="the simulated GPU (--engine sim)")
    parser.add_argument("--engine", choices=["sim", "fake"], default="sim",
                        help="the simulator's clock, or wall-clock on the fake engine "
                             "with one fake GPU per worker")
    parser.add_argument("--workload", type=Path,
                        default=Path(__file__).resolve().parents[1] / "examples" /
                        "sample_workload.jsonl")
    args = parser.parse_args()
    what = "simulated clock" if args.engine == "sim" else "wall clock, fake engine"
    print(f"budget {args.budget} experiments; time to {args.fraction:.0%} of the best score "
          f"({what})")
    print(f"{'seed':>4} {'workers':>7} {'to target':>10} {'speed-up':>8} {'total':>9} "
          f"{'(speed-up)':>10} {'exps':>4} {'best':>6} {'vs 1 worker':>11}")
    worse: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            fake = None
            if args.engine == "fake":
                (Path(tmp) / "host").mkdir(exist_ok=True)
                fake = fake_host(Path(tmp) / "host", max(WORKERS))
            runs = {n: tune(args.workload, Path(tmp) / f"s{seed}w{n}", n, seed, args.budget,
                            fake, args.gpu) for n in WORKERS}
            top = max((lead(r) or {"score": 0.0})["score"] for r in runs.values())
            base_time = base_total = None
            sequential = lead(runs[1])
            for n, records in runs.items():
                timeline = clock(records) if fake is None else wall(records)
                reach = next((t for t, r in timeline if r["kept"] and r["status"] == "ok"
                              and r["score"] >= args.fraction * top), None)
                base_time = base_time if n != 1 else reach
                total = timeline[-1][0]
                base_total = base_total if n != 1 else total
                best = lead(records)
                verdict = versus(best, sequential)
                if verdict == "WORSE" and fake is None:  # the fake: every config alike
                    worse.append(f"seed {seed}, {n} workers")
                speed = (f"{base_time / reach:.2f}x" if reach and base_time else "-")
                unit, per = ("min", 60.0) if fake is None else ("s", 1.0)
                shown = f"{reach / per:.1f} {unit}" if reach is not None else "never"
                print(f"{seed:>4} {n:>7} {shown:>10} {speed:>8} "
                      f"{total / per:>5.1f} {unit:<3} {(base_total or total) / total:>5.2f}x "
                      f"{experiments(records):>4} {best['score'] if best else 0:>6.3f} "
                      f"{verdict:>11}")
    if worse:
        print(f"parallel ended below the sequential run's best: {'; '.join(worse)}")
        sys.exit(1)
    if args.engine == "sim":
        print("every parallel run reached the sequential run's best recipe, or better")


def versus(best: dict[str, Any] | None, sequential: dict[str, Any] | None) -> str:
    """How a run's best compares with the sequential run's at the same budget: the same
    recipe, a better score, or WORSE."""
    if sequential is None:
        return "same" if best is None else "better"
    if best is None:
        return "WORSE"
    if best["recipe_id"] == sequential["recipe_id"]:
        return "same"
    return "better" if best["score"] > sequential["score"] else "WORSE"


def experiments(records: list[dict[str, Any]]) -> int:
    """Experiments run (refusal rows spent no GPU time and no budget)."""
    return sum(1 for r in records if r["status"] not in ("invalid", "duplicate"))


if __name__ == "__main__":
    main()
