"""Tests for aevyra_forge.space.drafts: the lookup of EAGLE / EAGLE-3 heads and draft
models against a fake Hub on 127.0.0.1 (tests/fake_hub.py) that checks the exact
requests huggingface_hub sends, telling the methods apart from config.json, the
vocabulary check, every way the lookup declines with one line, and what it found reaching
the knob space (spec_method=eagle3 with its spec_model) and vLLM's argv."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aevyra_forge.core.errors import KnobError
from aevyra_forge.core.values import Hardware
from aevyra_forge.space import drafts
from aevyra_forge.space.hub import DraftLookup, HubLookup
from aevyra_forge.space.knob_space import KnobSpace
from aevyra_forge.space.model_profile import profile
from aevyra_forge.space.rendering import render
from tests.conftest import MODEL_8B
from tests.fake_hub import FakeHub, FakeRepo, model_files, online, speculator_config

pytest.importorskip("huggingface_hub")

BASE = "fake/tiny-llama"
TAG = f"base_model:{BASE}"
VOCAB = 32000
LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
         "num_hidden_layers": 22, "vocab_size": VOCAB}
EXPAND = ("downloads", "gated", "private", "safetensors", "sha", "tags")
CPU = Hardware(device="cpu", cpu_cores=2, memory_gib=8)


def llama(**kw: Any) -> dict[str, bytes]:
    return model_files({**LLAMA, **kw})


def repos() -> dict[str, FakeRepo]:
    return {
        BASE: FakeRepo(llama(), downloads=1000),
        # EAGLE-3 as its authors publish it: Eagle3 architecture, a smaller draft vocab
        "yuhuili/EAGLE3-tiny-llama": FakeRepo(llama(
            architectures=["LlamaForCausalLMEagle3"], num_hidden_layers=1,
            draft_vocab_size=8192), downloads=500, tags=(TAG, "eagle3")),
        # the speculators format, found by its name only (no base_model tag)
        "RedHatAI/tiny-llama-speculator.eagle3": FakeRepo(model_files(
            speculator_config(BASE, VOCAB)), downloads=300, tags=("speculators", "eagle3")),
        # EAGLE-1: a one-layer Llama config, told by its name (as vLLM tells it)
        "fake/EAGLE-tiny-llama": FakeRepo(llama(num_hidden_layers=1), downloads=200,
                                          tags=(TAG,)),
        "fake/tiny-llama-draft-68m": FakeRepo(llama(num_hidden_layers=2), downloads=150,
                                              tags=(TAG,)),
        "other/tiny-llama-eagle3-big-vocab": FakeRepo(llama(
            architectures=["LlamaForCausalLMEagle3"], vocab_size=128256), downloads=100,
            tags=(TAG,)),
        "RedHatAI/tiny-llama-2-speculator.eagle3": FakeRepo(model_files(
            speculator_config("fake/tiny-llama-2", VOCAB)), downloads=90),
        "fake/tiny-llama-eagle3-gated": FakeRepo(llama(), downloads=80, tags=(TAG,),
                                                 gated=True),
        # derivatives that are no heads: never read
        "fake/tiny-llama-W8A8": FakeRepo(llama(), downloads=5000,
                                         tags=(TAG, f"base_model:quantized:{BASE}")),
        "someone/tiny-llama-finetune": FakeRepo(llama(), downloads=4000, tags=(TAG,)),
    }


@pytest.fixture(autouse=True)
def no_token(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No token from the developer's environment or login reaches the fake."""
    online(monkeypatch, tmp_path)


@pytest.fixture
def fake() -> Iterator[FakeHub]:
    with FakeHub(repos(), token="hf_fake_token_for_tests") as server:
        yield server


def listing(query: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    return {**query, "sort": ("downloads",), "limit": ("50",), "expand": EXPAND}


def test_lookup_sends_the_hubs_own_requests_and_keeps_heads_with_the_base_vocabulary(
        fake: FakeHub) -> None:
    found = drafts.lookup(BASE, endpoint=fake.url, env={})
    sha = {rid: r.sha for rid, r in repos().items()}
    assert fake.unexpected == []
    assert [(r.method, r.path, dict(r.query)) for r in fake.requests[:4]] == [
        ("GET", f"/api/models/{BASE}", {"expand": ("sha",)}),
        ("GET", f"/{BASE}/resolve/{sha[BASE]}/config.json", {}),
        ("GET", "/api/models", listing({"filter": (TAG,)})),
        ("GET", "/api/models", listing({"search": ("tiny-llama",)})),
    ]
    reads = ["yuhuili/EAGLE3-tiny-llama", "RedHatAI/tiny-llama-speculator.eagle3",
             "fake/EAGLE-tiny-llama", "fake/tiny-llama-draft-68m",
             "other/tiny-llama-eagle3-big-vocab", "RedHatAI/tiny-llama-2-speculator.eagle3",
             "fake/tiny-llama-eagle3-gated"]
    assert fake.paths()[4:] == [f"/{rid}/resolve/{sha[rid]}/config.json" for rid in reads]
    assert [(d.repo, d.method, d.vocab_size, d.found_by) for d in found.drafts] == [
        ("yuhuili/EAGLE3-tiny-llama", "eagle3", VOCAB, "tag"),
        ("RedHatAI/tiny-llama-speculator.eagle3", "eagle3", VOCAB, "name"),
        ("fake/EAGLE-tiny-llama", "eagle", VOCAB, "tag"),
        ("fake/tiny-llama-draft-68m", "draft_model", VOCAB, "tag"),
    ]
    assert found.drafts[0].revision == sha["yuhuili/EAGLE3-tiny-llama"]
    assert found.skipped == (
        f"other/tiny-llama-eagle3-big-vocab: vocabulary of 128256 tokens, the base model "
        f"has {VOCAB}",
        f"RedHatAI/tiny-llama-2-speculator.eagle3: made for fake/tiny-llama-2, not {BASE}",
        "fake/tiny-llama-eagle3-gated: gated: accept its terms on the Hub and set HF_TOKEN "
        "to use it")
    # the most downloaded head per method is the one offered
    assert found.table() == {"eagle3": "yuhuili/EAGLE3-tiny-llama",
                             "eagle": "fake/EAGLE-tiny-llama",
                             "draft_model": "fake/tiny-llama-draft-68m"}
    assert found.note == "" and found.lines(BASE)[0] == (
        f"speculative-decoding heads for {BASE} on the Hub: yuhuili/EAGLE3-tiny-llama "
        "(eagle3), RedHatAI/tiny-llama-speculator.eagle3 (eagle3), fake/EAGLE-tiny-llama "
        "(eagle), fake/tiny-llama-draft-68m (draft_model)")


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_HUB_OFFLINE": "yes"}])
def test_offline_sends_nothing(fake: FakeHub, env: dict[str, str]) -> None:
    found = drafts.lookup(BASE, endpoint=fake.url, env=env)
    assert fake.requests == [] and found.drafts == () and found.table() == {}
    assert found.lines(BASE) == [
        "HF_HUB_OFFLINE is set: no Hub lookup for draft models or EAGLE heads (n-gram and "
        "suffix decoding are still offered)"]


def test_offline_mode_read_by_huggingface_hub_at_import_is_one_line(
        fake: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    found = drafts.lookup(BASE, endpoint=fake.url, env={})
    assert fake.requests == [] and found.note.startswith(
        "HF_HUB_OFFLINE is set: no Hub lookup for draft models or EAGLE heads; going on")


def test_a_local_model_path_and_a_non_hub_id_are_not_looked_up(fake: FakeHub,
                                                                tmp_path: Path) -> None:
    assert "is a local folder" in drafts.lookup(str(tmp_path), endpoint=fake.url,
                                                env={}).note
    assert "is not a Hub id" in drafts.lookup("just-a-name", endpoint=fake.url, env={}).note
    assert fake.requests == []


def test_a_private_base_without_token_is_one_line(fake: FakeHub) -> None:
    fake.repos[BASE].private = True
    found = drafts.lookup(BASE, endpoint=fake.url, env={})
    assert fake.paths() == [f"/api/models/{BASE}"] and found.drafts == ()
    assert found.note == (f"{BASE} was not found on {fake.url} (a private repository needs "
                          "HF_TOKEN); going on without them (n-gram and suffix decoding "
                          "are still offered)")


def test_a_token_opens_a_gated_head(fake: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    assert fake.token is not None
    monkeypatch.setenv("HF_TOKEN", fake.token)
    found = drafts.lookup(BASE, endpoint=fake.url, env={})
    assert "fake/tiny-llama-eagle3-gated" in [d.repo for d in found.drafts]
    assert all(r.authorized for r in fake.requests)


def test_no_network_is_one_line() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    found = drafts.lookup(BASE, endpoint=f"http://127.0.0.1:{port}", env={})
    assert found.drafts == () and found.note.startswith(
        f"cannot reach the Hub at http://127.0.0.1:{port} for EAGLE heads (")


def test_the_lookup_is_cached_with_the_hub_result(fake: FakeHub) -> None:
    """What a run writes to hub.json reads back equal, and an older hub.json (no drafts)
    still loads."""
    found = HubLookup(base=BASE, drafts=drafts.lookup(BASE, endpoint=fake.url, env={}))
    assert HubLookup.model_validate_json(found.model_dump_json()) == found
    assert HubLookup.model_validate_json(f'{{"base": "{BASE}"}}').drafts is None


def test_found_heads_reach_spec_method_and_vllms_argv(fake: FakeHub) -> None:
    """Without a head spec_method offers n-gram and suffix only and spec_model is not a
    knob; with the lookup's table, eagle3 brings its head as spec_model and renders as
    vLLM 0.32's --spec-method / --spec-model / --spec-tokens."""
    space = KnobSpace(CPU, profile(MODEL_8B))
    assert space.choices(space.get("spec_method")) == (None, "ngram", "suffix")
    assert not space.available(space.get("spec_model"))
    with pytest.raises(KnobError, match="spec_method must be one of"):
        space.check("spec_method", "eagle3")
    space.offer_drafts(drafts.lookup(BASE, endpoint=fake.url, env={}).table())
    assert space.choices(space.get("spec_method")) == (
        None, "ngram", "suffix", "eagle3", "eagle", "draft_model")
    base = space.baseline(MODEL_8B)
    eagle = space.apply(base, {"spec_method": "eagle3"})
    space.check_combination(eagle)
    assert render(eagle) == ([MODEL_8B, "--spec-method", "eagle3", "--spec-model",
                              "yuhuili/EAGLE3-tiny-llama", "--spec-tokens", "3"], {})
    assert render(space.apply(eagle, {"spec_method": "ngram"})) == (
        [MODEL_8B, "--spec-method", "ngram", "--spec-tokens", "3"], {})
    assert render(space.apply(eagle, {"spec_method": None})) == ([MODEL_8B], {})
    wrong = space.apply(eagle, {"spec_model": "fake/EAGLE-tiny-llama"})
    with pytest.raises(KnobError, match="spec_model must be the draft known"):
        space.check_combination(wrong)


TARGET = {"vocab_size": VOCAB, "num_hidden_layers": 22}
_json = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.sampled_from(
                         ["architectures", "vocab_size", "num_hidden_layers", "verifier",
                          "name_or_path", "speculators_config", "speculators_model_type",
                          "transformer_layer_config", "text_config", "draft_vocab_size"]),
                         inner, max_size=4), max_leaves=12)


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)  # 2 shared cores
@given(st.dictionaries(st.sampled_from(
    ["architectures", "vocab_size", "num_hidden_layers", "speculators_model_type",
     "speculators_config", "transformer_layer_config", "text_config",
     "draft_vocab_size"]), _json, max_size=4),
    st.sampled_from(["org/head", "org/EAGLE-x", "org/x-eagle3", "org/x-draft"]))
def test_classify_never_raises_and_keeps_only_the_base_vocabulary(
        config: dict[str, Any], repo: str) -> None:
    """Any config.json a stranger publishes gives a method vLLM runs with the base model's
    vocabulary, or a reason."""
    found = drafts.classify(config, repo, BASE, TARGET)
    assert isinstance(found, str) or (
        found[0] in ("eagle", "eagle3", "draft_model") and found[1] == VOCAB)


def test_an_empty_lookup_offers_nothing() -> None:
    assert DraftLookup().table() == {} and DraftLookup().lines(BASE) == [
        f"speculative-decoding heads for {BASE} on the Hub: none"]
