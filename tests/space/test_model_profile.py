"""Tests for aevyra_forge.space.model_profile: model shapes from known hub ids, a local
config.json, or the size in the name."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from aevyra_forge.core.errors import UsageError
from aevyra_forge.space.model_profile import ModelProfile, profile


@pytest.mark.parametrize(("model", "params_b", "layers", "kv_heads", "head_dim", "ctx"), [
    ("meta-llama/Llama-3.1-8B-Instruct", 8.03, 32, 8, 128, 131072),
    ("meta-llama/Meta-Llama-3-8B-Instruct", 8.03, 32, 8, 128, 8192),
    ("meta-llama/Llama-3.2-1B-Instruct", 1.24, 16, 8, 64, 131072),
    ("meta-llama/Llama-3.3-70B-Instruct", 70.6, 80, 8, 128, 131072),
    ("mistralai/Mistral-7B-Instruct-v0.3", 7.25, 32, 8, 128, 32768),
    ("Qwen/Qwen2.5-0.5B-Instruct", 0.49, 24, 2, 64, 32768),
    ("Qwen/Qwen2.5-72B-Instruct", 72.7, 80, 8, 128, 32768),
    ("Qwen/Qwen2.5-7B-Instruct-AWQ", 7.62, 28, 4, 128, 32768),
])
def test_known_hub_ids(model: str, params_b: float, layers: int, kv_heads: int,
                       head_dim: int, ctx: int) -> None:
    p = profile(model)
    assert p.known
    assert p.name == model
    assert (p.params_b, p.num_layers, p.num_kv_heads, p.head_dim, p.max_context) == (
        params_b, layers, kv_heads, head_dim, ctx)


def test_kv_and_weight_bytes() -> None:
    p = profile("meta-llama/Llama-3.1-8B-Instruct")
    # K and V, 32 layers, 8 KV heads of 128 dims, 2 bytes each
    assert p.kv_bytes_per_token() == 2 * 32 * 8 * 128 * 2 == 131072
    assert p.kv_bytes_per_token(dtype_bytes=1.0) == 65536
    assert p.weight_bytes_bf16 == pytest.approx(8.03e9 * 2)


TINY: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 256, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 2048,
    "intermediate_size": 512, "max_position_embeddings": 2048, "tie_word_embeddings": True,
}


def write_config(folder: Path, cfg: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_local_config(tmp_path: Path) -> None:
    folder = write_config(tmp_path / "tiny-70B-lookalike", TINY)  # config beats the name
    p = profile(str(folder))
    assert p.known
    assert (p.num_layers, p.hidden_size, p.num_kv_heads, p.head_dim, p.max_context) == (
        2, 256, 2, 64, 2048)
    # per layer: q,o 2*256*256 + k,v 2*256*2*64 + MLP 3*256*512; tied embedding 2048*256
    per_layer = 131072 + 65536 + 393216
    assert p.params_b == pytest.approx((2 * per_layer + 2048 * 256) / 1e9)


def test_local_config_untied_nested_and_defaults(tmp_path: Path) -> None:
    inner = {k: v for k, v in TINY.items()
             if k not in ("num_key_value_heads", "tie_word_embeddings",
                          "max_position_embeddings")}
    inner["head_dim"] = 32
    p = profile(str(write_config(tmp_path / "vlm", {"text_config": inner})))
    assert p.num_kv_heads == 4  # defaults to the attention heads
    assert p.head_dim == 32
    assert p.max_context == 4096
    per_layer = 2 * 256 * 256 + 2 * 256 * 4 * 32 + 3 * 256 * 512
    assert p.params_b == pytest.approx((2 * per_layer + 2 * 2048 * 256) / 1e9)


def test_local_config_missing_keys(tmp_path: Path) -> None:
    folder = write_config(tmp_path / "m", {"hidden_size": 256})
    with pytest.raises(UsageError, match="lacks hidden_size / num_hidden_layers"):
        profile(str(folder))


def test_local_config_not_json(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    with pytest.raises(UsageError, match="cannot read the model config"):
        profile(str(folder))


@pytest.mark.parametrize(("model", "params_b"), [
    ("acme/SuperChat-13B-v2", 13.0),
    ("acme/tiny_2.5b_chat", 2.5),
    ("org/Falcon3-10B-Base", 10.0),
    ("someone/model-34b", 34.0),
])
def test_size_from_unknown_name(model: str, params_b: float) -> None:
    p = profile(model)
    assert not p.known
    assert p.params_b == params_b
    assert p.hidden_size % 128 == 0 and p.hidden_size >= 128
    assert p.num_layers >= 8
    assert p.max_context == 32768
    # the invented shape has about the right number of parameters (12 * L * h^2)
    assert 0.5 < 12 * p.num_layers * p.hidden_size**2 / (params_b * 1e9) < 2.0


@pytest.mark.parametrize("model", ["gpt2", "bert-base-uncased", "acme/mystery-model",
                                   "/nonexistent/folder/model"])
def test_unsizable_name(model: str) -> None:
    pattern = re.escape(f"cannot tell the size of model '{model}'") + r".*config\.json"
    with pytest.raises(UsageError, match=pattern):
        profile(model)


def test_profile_is_frozen() -> None:
    p = profile("Qwen/Qwen2.5-1.5B-Instruct")
    assert isinstance(p, ModelProfile)
    with pytest.raises(ValueError):
        p.params_b = 3.0  # type: ignore[misc]


def test_a_hub_id_without_a_size_is_read_from_the_hubs_config(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A name that names no size: the shape comes from the model's config.json on the Hub
    (HF_ENDPOINT, here the fake on 127.0.0.1), and nothing else is asked."""
    from tests.fake_hub import FakeHub, FakeRepo, model_files, online

    online(monkeypatch, tmp_path)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "cache"))
    config = {"hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
              "num_key_value_heads": 3, "vocab_size": 49152, "intermediate_size": 1536,
              "tie_word_embeddings": True, "max_position_embeddings": 8192}
    with FakeHub({"acme/mystery-model": FakeRepo(model_files(config))}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        p = profile("acme/mystery-model")
        assert hub.unexpected == []
        assert all(path.endswith("/config.json") for path in hub.paths())
    assert (p.num_layers, p.num_kv_heads, p.head_dim, p.max_context) == (30, 3, 64, 8192)
    assert p.known and 0.13 < p.params_b < 0.14  # SmolLM2-135M's shape
    with pytest.raises(UsageError, match="cannot tell the size"):  # the Hub gone: as before
        profile("acme/other-model")
