"""The environment a vLLM process we start inherits from ours: an allow-list of what
vLLM, CUDA / ROCm, PyTorch and the Hugging Face libraries read, so that our own secrets
(the LLM provider's key above all) never reach `vllm serve` or its plug-ins."""

from __future__ import annotations

from collections.abc import Mapping

# What a vLLM process may inherit from ours, and why; a name ending in "*" is a prefix.
# Everything else stays with us: above all the LLM provider's key (ANTHROPIC_API_KEY,
# OPENAI_API_KEY, ...), which vLLM never needs. The recipe's own environment
# (allow-listed by the knob registry) is added on top by the launcher.
CHILD_ENV: tuple[tuple[str, str], ...] = (
    ("PATH", "finding compilers (Triton, torch.compile) and tools"),
    ("CC", "the C compiler Triton and torch.compile build with"),
    ("CXX", "the C++ compiler torch.compile builds with"),
    ("HOME", "default cache and config locations"),
    ("USER", "libraries that name per-user temporary folders"),
    ("LOGNAME", "the same, where USER is unset"),
    ("LANG", "text encoding of the log"),
    ("LC_*", "text encoding of the log"),
    ("TZ", "timestamps in the log"),
    ("TMPDIR", "where temporary files go"),
    ("XDG_CACHE_HOME", "the Hugging Face and vLLM caches"),
    ("PYTHON*", "the interpreter's own settings (PYTHONPATH, PYTHONHASHSEED, ...)"),
    ("VIRTUAL_ENV", "the environment vLLM is installed in"),
    ("LD_LIBRARY_PATH", "CUDA / ROCm libraries outside the default search path"),
    ("CUDA_*", "device selection and the CUDA runtime (CUDA_VISIBLE_DEVICES, ...)"),
    ("NVIDIA_*", "the NVIDIA container runtime"),
    ("NCCL_*", "multi-GPU communication"),
    ("GLOO_*", "the CPU communication backend"),
    ("HIP_*", "device selection on ROCm"),
    ("ROCR_*", "device selection on ROCm"),
    ("ROCM_*", "the ROCm install"),
    ("HF_*", "the model: hub token for gated models, cache, offline mode"),
    ("HUGGING_FACE_*", "older names of the same"),
    ("TRANSFORMERS_*", "the tokenizer and config loading"),
    ("TOKENIZERS_*", "the tokenizers library's threads (TOKENIZERS_PARALLELISM)"),
    ("TRITON_*", "the Triton kernel cache and compiler"),
    ("TORCH*", "PyTorch, torch.compile and the inductor cache"),
    ("VLLM_*", "vLLM's own settings, VLLM_API_KEY included"),
    ("OMP_*", "CPU threads (the CPU build)"),
    ("MKL_*", "CPU math library threads"),
    ("KMP_*", "Intel OpenMP settings"),
    ("HTTP_PROXY", "downloading the model through a proxy"),
    ("HTTPS_PROXY", "downloading the model through a proxy"),
    ("NO_PROXY", "downloading the model through a proxy"),
    ("http_proxy", "the same, lower case"),
    ("https_proxy", "the same, lower case"),
    ("no_proxy", "the same, lower case"),
    ("SSL_CERT_FILE", "a private CA for the hub or a proxy"),
    ("REQUESTS_CA_BUNDLE", "the same, for the requests library"),
    ("CURL_CA_BUNDLE", "the same, for curl-based downloads"),
)


def child_env_allowed(name: str) -> bool:
    """Whether `vllm serve` may inherit the variable `name` (CHILD_ENV)."""
    return any(name.startswith(entry[:-1]) if entry.endswith("*") else name == entry
               for entry, _ in CHILD_ENV)


def child_env(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` narrowed to CHILD_ENV."""
    return {k: v for k, v in environ.items() if child_env_allowed(k)}


# What selects a process's GPUs, per device: the variable a worker's server is pinned by,
# and those that would renumber or override it if inherited.
PIN_VARIABLE = {"cuda": "CUDA_VISIBLE_DEVICES", "rocm": "HIP_VISIBLE_DEVICES"}
_RENUMBERING = ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES")


def pinned(env: Mapping[str, str], device: str, gpus: tuple[int, ...]) -> dict[str, str]:
    """`env` for a server that may use only `gpus` (the host's own indices, as
    nvidia-smi / rocm-smi list them): the device's selection variable set to them and the
    others dropped (an inherited ROCR_VISIBLE_DEVICES would renumber them first)."""
    out = {k: v for k, v in env.items() if k not in _RENUMBERING}
    if gpus and device in PIN_VARIABLE:
        out[PIN_VARIABLE[device]] = ",".join(str(g) for g in gpus)
    return out
