"""The shape of the model being served: parameter count, KV-cache bytes per token and
context length. Read from a local config.json, a known hub id, estimated from the size in
the name, or else read from the Hub's config.json; the simulator and the memory-budget
estimate use it."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from aevyra_forge.core.errors import UsageError
from aevyra_forge.space.hub import _REPO_ID


class ModelProfile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    params_b: float  # billions of parameters
    num_layers: int
    hidden_size: int
    num_kv_heads: int
    head_dim: int
    max_context: int
    known: bool = True  # False when estimated from the name alone

    @property
    def weight_bytes_bf16(self) -> float:
        return self.params_b * 1e9 * 2

    def kv_bytes_per_token(self, dtype_bytes: float = 2.0) -> float:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes


# (params_b, layers, hidden, kv_heads, head_dim, max_context) for common hub models.
_KNOWN: dict[str, tuple[float, int, int, int, int, int]] = {
    "llama-3.2-1b": (1.24, 16, 2048, 8, 64, 131072),
    "llama-3.2-3b": (3.21, 28, 3072, 8, 128, 131072),
    "llama-3.1-8b": (8.03, 32, 4096, 8, 128, 131072),
    "llama-3-8b": (8.03, 32, 4096, 8, 128, 8192),
    "llama-3.1-70b": (70.6, 80, 8192, 8, 128, 131072),
    "llama-3.3-70b": (70.6, 80, 8192, 8, 128, 131072),
    "mistral-7b": (7.25, 32, 4096, 8, 128, 32768),
    "qwen2.5-0.5b": (0.49, 24, 896, 2, 64, 32768),
    "qwen2.5-1.5b": (1.54, 28, 1536, 2, 128, 32768),
    "qwen2.5-7b": (7.62, 28, 3584, 4, 128, 32768),
    "qwen2.5-14b": (14.8, 48, 5120, 8, 128, 32768),
    "qwen2.5-32b": (32.8, 64, 5120, 8, 128, 32768),
    "qwen2.5-72b": (72.7, 80, 8192, 8, 128, 32768),
}


def profile(model: str) -> ModelProfile:
    """The profile of `model` (a local folder with config.json, or a hub id)."""
    path = Path(model)
    if (path / "config.json").is_file():
        return _from_config(model, path / "config.json")
    low = model.lower()
    for key, (params, layers, hidden, kv, hd, ctx) in _KNOWN.items():
        if key in low:
            return ModelProfile(name=model, params_b=params, num_layers=layers,
                                hidden_size=hidden, num_kv_heads=kv, head_dim=hd,
                                max_context=ctx)
    match = re.search(r"(\d+(?:\.\d+)?)\s*b\b", low.replace("-", " ").replace("_", " "))
    if match is None and (found := _from_hub(model)) is not None:
        return found
    if match is None:
        raise UsageError(
            f"cannot tell the size of model '{model}': pass a local folder with a "
            "config.json, or a hub id that names its size (e.g. ...-8B-...)"
        )
    params = float(match.group(1))
    # Scale a Llama-like shape to the parameter count (params ~ 12 * layers * hidden^2).
    hidden = int(round((params * 1e9 / (12 * 32)) ** 0.5 / 128) * 128) or 128
    layers = max(8, int(params * 1e9 / (12 * hidden * hidden)))
    return ModelProfile(name=model, params_b=params, num_layers=layers, hidden_size=hidden,
                        num_kv_heads=8, head_dim=128, max_context=32768, known=False)


def _from_hub(model: str) -> ModelProfile | None:
    """The profile from `model`'s config.json on the Hub (HF_ENDPOINT; huggingface_hub's
    cache, HF_HUB_OFFLINE and token apply), or None when it cannot be read: a Hub model
    whose name names no size (SmolLM2-135M) is served as well as one that does."""
    if not _REPO_ID.match(model):
        return None
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(model, "config.json", endpoint=os.environ.get("HF_ENDPOINT"))
        return _from_config(model, Path(path))
    except Exception:  # no network, offline, gated, not a model: the caller says what to do
        return None


def _from_config(model: str, path: Path) -> ModelProfile:
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path}: cannot read the model config ({exc})") from None
    text_cfg = cfg.get("text_config", cfg)
    try:
        hidden = int(text_cfg["hidden_size"])
        layers = int(text_cfg["num_hidden_layers"])
        heads = int(text_cfg["num_attention_heads"])
    except (KeyError, TypeError, ValueError):
        raise UsageError(f"{path}: config.json lacks hidden_size / num_hidden_layers / "
                         "num_attention_heads") from None
    kv_heads = int(text_cfg.get("num_key_value_heads", heads))
    head_dim = int(text_cfg.get("head_dim") or hidden // heads)
    vocab = int(text_cfg.get("vocab_size", 32000))
    inter = int(text_cfg.get("intermediate_size", 4 * hidden))
    per_layer = 2 * hidden * hidden + 2 * hidden * kv_heads * head_dim + 3 * hidden * inter
    embed = vocab * hidden * (1 if text_cfg.get("tie_word_embeddings") else 2)
    params = (layers * per_layer + embed) / 1e9
    ctx = int(text_cfg.get("max_position_embeddings", 4096))
    return ModelProfile(name=model, params_b=params, num_layers=layers, hidden_size=hidden,
                        num_kv_heads=kv_heads, head_dim=head_dim, max_context=ctx)
