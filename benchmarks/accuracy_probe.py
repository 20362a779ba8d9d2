"""Does the accuracy probe tell a pure serving change from a numerics change on real vLLM?
Boots the baseline, captures the reference on a fixed sample of the workload, then boots
each variant in turn (one server at a time) and prints its agreement (share of reference
tokens still top-1 under teacher forcing) and mean log-probability shift.

    FORGE_VLLM_BIN=/work/vllm-venv/bin/vllm python benchmarks/accuracy_probe.py \\
        --model /tmp/tiny-llama [--workload examples/sample_workload.jsonl] [--samples 8]

Variants: the same config rebooted, --max-num-seqs 4 (serving only), --dtype float32
(numerics). On CPU it sets VLLM_CPU_KVCACHE_SPACE=1 and boots with --enforce-eager.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from aevyra_forge.core.recipe import Recipe
from aevyra_forge.core.values import LaunchFailure
from aevyra_forge.core.workload import load_workload
from aevyra_forge.engine.launcher import VllmLauncher, VllmServer
from aevyra_forge.measure.accuracy import (
    Reference,
    capture_reference,
    sample_requests,
    score_against,
)

ROOT = Path(__file__).resolve().parent.parent
CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
VARIANTS: dict[str, dict[str, object]] = {
    "same config, rebooted": {},
    "max_num_seqs=4": {"max_num_seqs": 4},
    "dtype float32": {"dtype": "float32"},
}


def boot(launcher: VllmLauncher, model: str, logs: Path, name: str,
         config: dict[str, object]) -> VllmServer:
    recipe = Recipe(model=model, config={"max_model_len": 1024, "enforce_eager": True,
                                         **config})
    server = launcher.launch(recipe, logs / f"{name.replace(' ', '_')}.log")
    if isinstance(server, LaunchFailure):
        sys.exit(f"{name}: {server.status}: {server.reason}")
    return server


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--workload", type=Path, default=ROOT / "examples/sample_workload.jsonl")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    a = ap.parse_args()
    vllm_bin = os.environ.get("FORGE_VLLM_BIN") or shutil.which("vllm")
    if not vllm_bin:
        sys.exit("set FORGE_VLLM_BIN to a vllm executable")
    requests = sample_requests(load_workload(a.workload), a.samples)
    launcher = VllmLauncher(vllm_bin, boot_timeout_s=600, env={**os.environ, **CPU_ENV})
    logs = Path(tempfile.mkdtemp(prefix="accuracy-probe-"))
    print(f"{len(requests)} samples (lines {[r.line for r in requests]}), logs in {logs}")

    server = boot(launcher, a.model, logs, "baseline", {})
    try:
        start = time.perf_counter()
        ref: Reference = capture_reference(server.url, server.served_model, requests,
                                           max_tokens=a.max_tokens)
        took = time.perf_counter() - start
    finally:
        launcher.stop(server)
    print(f"baseline: {ref.positions} reference tokens in {len(ref.prompts)} samples, "
          f"captured in {took:.1f} s, self-agreement {ref.self_agreement:.4f}, "
          f"{len(ref.model_dump_json())} bytes as JSON")
    for note in ref.notes:
        print(f"  note: {note}")

    print(f"{'variant':<24} {'agreement':>9} {'shift':>9} {'positions':>9} {'seconds':>8}")
    for name, config in VARIANTS.items():
        server = boot(launcher, a.model, logs, name, config)
        try:
            start = time.perf_counter()
            acc = score_against(server.url, server.served_model, ref)
            took = time.perf_counter() - start
        finally:
            launcher.stop(server)
        if not acc.ok:
            print(f"{name:<24} failed: {acc.error}")
            continue
        print(f"{name:<24} {acc.agreement:>9.4f} {acc.logprob_shift:>+9.4f} "
              f"{acc.positions:>9} {took:>8.1f}")


if __name__ == "__main__":
    main()
