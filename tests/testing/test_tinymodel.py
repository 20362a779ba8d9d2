"""The tiny test model: its config, tokenizer, chat template and size, generated once per
module (needs torch, transformers and tokenizers; skipped where they are missing)."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aevyra_forge.core.errors import MissingExtraError
from aevyra_forge.testing import tinymodel

MAX_TOTAL_BYTES = 10 * 1024 * 1024


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    pytest.importorskip("torch")
    out = tmp_path_factory.mktemp("tiny") / "model"
    assert tinymodel.write_tiny_llama(out, seed=0) == out
    return out


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(model_dir))


def _safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file: little-endian u64 length, then JSON."""
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header: dict[str, Any] = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header


def test_missing_libraries_name_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # None in sys.modules makes `import torch` raise ImportError, as on a machine without it.
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(MissingExtraError, match=r"aevyra-forge\[vllm\]"):
        tinymodel.write_tiny_llama(tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_config_is_the_tiny_llama(model_dir: Path) -> None:
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["model_type"] == "llama"
    expected = {"hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "intermediate_size": 512, "vocab_size": 2048,
                "max_position_embeddings": 2048, "tie_word_embeddings": False}
    assert {k: cfg[k] for k in expected} == expected
    # transformers 5 writes "dtype" where 4.x wrote "torch_dtype".
    assert cfg.get("torch_dtype", cfg.get("dtype")) == "bfloat16"
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (0, 1)


def test_weights_are_bf16_safetensors_with_untied_head(model_dir: Path) -> None:
    assert not list(model_dir.glob("*.bin"))
    header = _safetensors_header(model_dir / "model.safetensors")
    assert {t["dtype"] for t in header.values()} == {"BF16"}
    assert header["lm_head.weight"]["shape"] == [2048, 256]
    assert header["model.embed_tokens.weight"]["shape"] == [2048, 256]
    assert header["model.layers.1.self_attn.k_proj.weight"]["shape"] == [128, 256]


def test_generation_config_stops_on_both_end_tokens(model_dir: Path) -> None:
    gen = json.loads((model_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [1, 4]
    assert gen["bos_token_id"] == 0


def test_total_size_is_small(model_dir: Path) -> None:
    total = sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file())
    assert 1_000_000 < total < MAX_TOTAL_BYTES


def test_tokenizer_fills_the_vocabulary_with_whole_characters(tokenizer: Any) -> None:
    assert len(tokenizer) == 2048
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|begin_of_text|>", "<|end_of_text|>")
    # Sentencepiece-style, not byte-level: no token is a fragment of a UTF-8 character.
    assert "▁the" in tokenizer.get_vocab()
    assert not any(t.startswith("Ġ") for t in tokenizer.get_vocab())


def test_tokenizer_adds_bos_and_round_trips(tokenizer: Any) -> None:
    text = "The scheduler measures every token.\ndef f(x):\n    return x * 2\n"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert len(ids) < len(text)  # merges were learned
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


TEXT = st.text(alphabet=st.sampled_from(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 \n\t.,;:!?'\"()[]{}=+-*/_#$"),
    max_size=80)


@settings(max_examples=60, deadline=None)
@given(text=TEXT)
def test_tokenizer_round_trips_any_ascii_text(tokenizer: Any, text: str) -> None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text


def test_chat_template_renders_llama3_layout(tokenizer: Any) -> None:
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": " Hello there! "}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHello there!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert ids.count(tokenizer.convert_tokens_to_ids("<|eot_id|>")) == 2
    assert ids[0] == tokenizer.bos_token_id


def test_main_prints_the_path_and_is_deterministic(
        model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "again"
    tinymodel.main([str(out), "--seed", "0"])
    assert capsys.readouterr().out.strip() == str(out)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (out / name).read_bytes() == (model_dir / name).read_bytes(), name
