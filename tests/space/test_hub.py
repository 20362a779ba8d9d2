"""Tests for aevyra_forge.space.hub: the lookup of pre-quantized siblings against a fake
Hub on 127.0.0.1 (tests/fake_hub.py) that checks the exact requests huggingface_hub sends,
every way the lookup declines with one line, and reading quantization_config."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aevyra_forge.core.values import GpuInfo, Hardware
from aevyra_forge.space import hub
from aevyra_forge.space.quant import facts
from tests.fake_hub import FakeHub, FakeRepo, model_files, online, quantization_config

pytest.importorskip("huggingface_hub")

BASE = "fake/tiny-llama"
TAG = f"base_model:quantized:{BASE}"
AVX512 = Hardware(device="cpu", cpu_cores=2, memory_gib=8,
                  cpu_isa=("avx2", "avx512f", "avx512_bf16"))
AVX2 = Hardware(device="cpu", cpu_cores=2, memory_gib=8, cpu_isa=("avx2",))
EXPAND = ("downloads", "gated", "private", "safetensors", "sha", "tags")
LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256}


def gpu(cc: str) -> Hardware:
    return Hardware(device="cuda", gpus=(GpuInfo(index=0, name="NVIDIA X", memory_mib=24576,
                                                 compute_capability=cc),))


def quantized(scheme: str) -> dict[str, bytes]:
    return model_files({**LLAMA, "quantization_config": quantization_config(scheme)})


def repos() -> dict[str, FakeRepo]:
    return {
        BASE: FakeRepo(model_files(LLAMA), downloads=1000, safetensors={"BF16": 2_200_000}),
        "fake/tiny-llama-W8A8": FakeRepo(quantized("W8A8"), downloads=300, tags=(TAG,),
                                         safetensors={"I8": 1_000_000, "BF16": 600_000,
                                                      "F32": 10_000}),
        "fake/tiny-llama-W4A16": FakeRepo(quantized("W4A16"), downloads=200, tags=(TAG,),
                                          safetensors={"I32": 125_000, "BF16": 600_000}),
        "fake/tiny-llama-AWQ-gated": FakeRepo(model_files({**LLAMA, "quantization_config": {
            "quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm"}}),
            downloads=150, tags=(TAG,), gated=True),
        "fake/tiny-llama-bnb-4bit": FakeRepo(model_files({**LLAMA, "quantization_config": {
            "quant_method": "bitsandbytes", "load_in_4bit": True}}), downloads=90,
            tags=(TAG,)),
        "RedHatAI/tiny-llama-FP8-dynamic": FakeRepo(quantized("FP8_DYNAMIC"), downloads=80),
        "someone/tiny-llama-finetune": FakeRepo(model_files(LLAMA), downloads=5000),
        "other/unrelated-AWQ": FakeRepo(quantized("W4A16"), downloads=10),
    }


@pytest.fixture(autouse=True)
def no_token(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No token from the developer's environment or login reaches the fake."""
    online(monkeypatch, tmp_path)


@pytest.fixture
def fake() -> Iterator[FakeHub]:
    with FakeHub(repos(), token="hf_fake_token_for_tests") as server:
        yield server


def expect_list(query: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    return {**query, "sort": ("downloads",), "limit": ("50",), "expand": EXPAND}


def test_lookup_sends_the_hubs_own_requests_and_keeps_what_this_cpu_serves(
        fake: FakeHub) -> None:
    found = hub.lookup(BASE, AVX512, endpoint=fake.url, env={})
    assert fake.unexpected == []
    assert [(r.method, r.path, dict(r.query)) for r in fake.requests[:3]] == [
        ("GET", f"/api/models/{BASE}", {"expand": ("sha",)}),
        ("GET", "/api/models", expect_list({"filter": (TAG,)})),
        ("GET", "/api/models", expect_list({"search": ("tiny-llama",)})),
    ]
    sha = {rid: r.sha for rid, r in repos().items()}
    reads = ["fake/tiny-llama-W8A8", "fake/tiny-llama-W4A16", "fake/tiny-llama-AWQ-gated",
             "fake/tiny-llama-bnb-4bit", "RedHatAI/tiny-llama-FP8-dynamic"]
    assert fake.paths()[3:] == [f"/{rid}/resolve/{sha[rid]}/config.json" for rid in reads]
    assert [(s.repo, s.method, s.bits, s.found_by) for s in found.siblings] == [
        ("fake/tiny-llama-W8A8", "w8a8_int8", 8, "tag"),
        ("fake/tiny-llama-W4A16", "w4a16", 4, "tag"),
        ("RedHatAI/tiny-llama-FP8-dynamic", "fp8", 8, "name"),
    ]
    w8a8, w4a16 = found.siblings[:2]
    assert w8a8.size_bytes == 1_000_000 + 2 * 600_000 + 4 * 10_000
    assert w8a8.format == "int-quantized" and w8a8.revision == sha["fake/tiny-llama-W8A8"]
    assert (w4a16.group_size, w4a16.format) == (128, "pack-quantized")
    assert found.skipped == (
        "fake/tiny-llama-AWQ-gated: gated: accept its terms on the Hub and set HF_TOKEN "
        "to use it",
        "fake/tiny-llama-bnb-4bit: quant_method 'bitsandbytes' is not one forge serves")
    assert found.note == "" and found.lines()[0].startswith(f"Hub siblings of {BASE}: ")


def test_an_avx2_cpu_drops_the_4bit_sibling_with_the_reason(fake: FakeHub) -> None:
    found = hub.lookup(BASE, AVX2, endpoint=fake.url, env={})
    assert [s.method for s in found.siblings] == ["w8a8_int8", "fp8"]
    assert any(line.startswith("fake/tiny-llama-W4A16: w4a16 is not served here: this CPU "
                               "lacks avx512_bf16 + avx512f") for line in found.skipped)


@pytest.mark.parametrize(("cc", "methods"), [
    ("9.0", ["w8a8_int8", "w4a16", "fp8"]),
    ("7.5", ["w8a8_int8", "w4a16"]),  # Turing: no fp8 Marlin; 4-bit on the slower kernel
    ("7.0", []),
])
def test_gpu_compute_capability_gates_siblings(fake: FakeHub, cc: str,
                                               methods: list[str]) -> None:
    assert [s.method for s in hub.lookup(BASE, gpu(cc), endpoint=fake.url,
                                         env={}).siblings] == methods


def test_a_token_opens_a_gated_sibling(fake: FakeHub, monkeypatch: pytest.MonkeyPatch
                                       ) -> None:
    assert fake.token is not None
    monkeypatch.setenv("HF_TOKEN", fake.token)
    found = hub.lookup(BASE, gpu("9.0"), endpoint=fake.url, env={})
    assert "fake/tiny-llama-AWQ-gated" in [s.repo for s in found.siblings]
    assert all(r.authorized for r in fake.requests)
    assert fake.token not in json.dumps(found.model_dump())  # never in the cached result


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_HUB_OFFLINE": "true"}])
def test_offline_sends_nothing(fake: FakeHub, env: dict[str, str]) -> None:
    found = hub.lookup(BASE, AVX512, endpoint=fake.url, env=env)
    assert fake.requests == [] and found.siblings == ()
    assert found.note.startswith("HF_HUB_OFFLINE is set: no Hub lookup") and found.lines() == [
        found.note]


def test_offline_mode_read_by_huggingface_hub_at_import_is_one_line(
        fake: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub reads HF_HUB_OFFLINE once, at import: forge's own environment may
    no longer say so, and the library still blocks the request before it is sent."""
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    found = hub.lookup(BASE, AVX512, endpoint=fake.url, env={})
    assert fake.requests == []
    assert found.note == ("HF_HUB_OFFLINE is set: no Hub lookup for pre-quantized siblings; "
                          "going on without Hub siblings")


def test_a_local_model_path_is_not_looked_up(fake: FakeHub, tmp_path: Path) -> None:
    found = hub.lookup(str(tmp_path), AVX512, endpoint=fake.url, env={})
    assert fake.requests == [] and "is a local folder" in found.note


def test_not_a_hub_id(fake: FakeHub) -> None:
    found = hub.lookup("just-a-name", AVX512, endpoint=fake.url, env={})
    assert fake.requests == [] and "is not a Hub id" in found.note


def test_a_private_base_without_token_is_one_line(fake: FakeHub) -> None:
    fake.repos[BASE].private = True
    found = hub.lookup(BASE, AVX512, endpoint=fake.url, env={})
    assert fake.paths() == [f"/api/models/{BASE}"]
    assert found.note == (f"{BASE} was not found on {fake.url} (a private repository needs "
                          "HF_TOKEN); going on without Hub siblings")


def test_no_network_is_one_line() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    found = hub.lookup(BASE, AVX512, endpoint=f"http://127.0.0.1:{port}", env={})
    assert found.siblings == ()
    assert found.note.startswith(f"cannot reach the Hub at http://127.0.0.1:{port} (")
    assert found.note.endswith("; going on without Hub siblings")


def test_endpoint_comes_from_hf_endpoint(fake: FakeHub) -> None:
    found = hub.lookup(BASE, AVX512, env={"HF_ENDPOINT": fake.url + "/"})
    assert found.endpoint == fake.url and len(found.siblings) == 3


def test_the_result_round_trips_as_json(fake: FakeHub) -> None:
    found = hub.lookup(BASE, AVX512, endpoint=fake.url, env={})
    assert hub.HubLookup.model_validate_json(found.model_dump_json()) == found


@pytest.mark.parametrize(("qc", "expected"), [
    (quantization_config("W8A8"), ("w8a8_int8", 8, None)),
    (quantization_config("W4A16"), ("w4a16", 4, 128)),
    (quantization_config("FP8_DYNAMIC"), ("fp8", 8, None)),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128}, ("gptq", 4, 128)),
    ({"quant_method": "fp8", "activation_scheme": "dynamic"}, ("fp8", 8, None)),
])
def test_parse_quantization(qc: dict[str, Any], expected: tuple[Any, ...]) -> None:
    parsed = hub.parse_quantization({"quantization_config": qc})
    assert isinstance(parsed, dict)
    assert (parsed["method"], parsed["bits"], parsed["group_size"]) == expected


@pytest.mark.parametrize(("config", "why"), [
    ({}, "no quantization_config in config.json"),
    ({"quantization_config": {"quant_method": "gptq", "bits": 8}},
     "gptq with 8 bits (forge knows 4-bit gptq)"),
    ({"quantization_config": {"quant_method": "compressed-tensors", "config_groups": {
        "g": {"weights": {"num_bits": 4, "type": "int"},
              "input_activations": {"num_bits": 8}}}}},
     "compressed-tensors int4 weights with activations (not a scheme forge knows)"),
])
def test_parse_quantization_says_why_not(config: dict[str, Any], why: str) -> None:
    assert hub.parse_quantization(config) == why


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.sampled_from(
                         ["quant_method", "bits", "group_size", "config_groups", "weights",
                          "input_activations", "num_bits", "type", "format", "g"]),
                         inner, max_size=4), max_leaves=12)


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)  # 2 shared cores
@given(st.dictionaries(st.sampled_from(["quantization_config", "compression_config"]),
                       _json, max_size=2))
def test_parse_quantization_never_raises(config: dict[str, Any]) -> None:
    """Any config.json a stranger publishes gives a method forge knows, or a reason."""
    parsed = hub.parse_quantization(config)
    assert isinstance(parsed, str) or facts(parsed["method"]).name == parsed["method"]
