"""Tests for aevyra_forge.measure.accuracy: the reference capture and teacher-forced scoring against
the fake vLLM server's toy model (tests/fake_vllm.py), whose `logit_noise` stands in for
a lossy config, and whose `refuse_prompt_logprobs` forces the greedy-match fallback;
malformed answers through httpx.MockTransport; and one engine test against real vLLM on
CPU (`pytest -m engine`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aevyra_forge.core.values import QualityScore
from aevyra_forge.core.workload import Message, Request, Workload
from aevyra_forge.measure.accuracy import (
    Accuracy,
    QualityError,
    Reference,
    VllmQualityProbe,
    capture_reference,
    matched_prefix,
    reference_quality,
    sample_requests,
    score_against,
)
from tests.fake_vllm import FakeConfig, FakeLm, FakeVllm

MODEL = "fake-model"
ROOT = Path(__file__).resolve().parents[2]


def completion(line: int, words: int, out: int = 40) -> Request:
    text = " ".join(f"tale{line}-{i}" for i in range(words))
    return Request(line=line, prompt=text, expected_output_tokens=out)


def chat(line: int, content: str, out: int = 40) -> Request:
    return Request(line=line, messages=(Message(role="system", content="Be brief."),
                                        Message(role="user", content=content)),
                   expected_output_tokens=out)


REQUESTS = [completion(1, 8), chat(2, "where is my parcel"), completion(3, 5),
            chat(4, "reset my password please"), completion(5, 12)]


@pytest.fixture
def fake() -> Iterator[FakeVllm]:
    with FakeVllm(FakeConfig(length_policy="clamp")) as server:
        yield server


@pytest.fixture
def reference(fake: FakeVllm) -> Reference:
    return capture_reference(fake.url, MODEL, REQUESTS)


def candidate(noise: float, **config: object) -> FakeVllm:
    return FakeVllm(FakeConfig(logit_noise=noise, **config))  # type: ignore[arg-type]


# -- capture ----------------------------------------------------------------------------------

def test_reference_is_the_greedy_continuation_of_the_tokenized_prompt(
        fake: FakeVllm, reference: Reference) -> None:
    lm = FakeLm()
    assert reference.lines == [1, 2, 3, 4, 5]
    assert reference.prompts[0] == lm.encode(REQUESTS[0].prompt or "")
    for ids, cont in zip(reference.prompts, reference.continuations, strict=True):
        assert cont == lm.greedy(ids, len(cont), ignore_eos=False)
        assert 1 <= len(cont) <= 32  # DEFAULT_MAX_TOKENS caps the expected 40
    assert reference.positions == sum(len(c) for c in reference.continuations) > 100
    assert reference.self_agreement == 1.0
    assert reference.top_tokens == reference.continuations
    assert reference.notes == []
    # The baseline's own teacher-forced log-probabilities, from the same model.
    ids, cont = reference.prompts[2], reference.continuations[2]
    assert reference.logprobs[2][0] == pytest.approx(lm.logprobs(ids)[cont[0]])
    assert all(lp < 0 for row in reference.logprobs for lp in row)


def test_chat_samples_go_through_the_chat_template(fake: FakeVllm,
                                                   reference: Reference) -> None:
    tokenized = [r.body for r in fake.requests if r.path == "/tokenize"]
    assert len(tokenized) == len(REQUESTS)
    chat_body = tokenized[1]
    assert chat_body == {"model": MODEL, "add_generation_prompt": True, "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "where is my parcel"}]}
    ids = reference.prompts[1]
    assert ids == FakeLm().chat(chat_body["messages"], add_generation_prompt=True)
    assert ids[-3:] == [FakeLm.HEADER_START, FakeLm.ROLES["assistant"], FakeLm.HEADER_END]


def test_requests_are_greedy_token_id_completions(fake: FakeVllm,
                                                  reference: Reference) -> None:
    bodies = [r.body for r in fake.requests if r.path == "/v1/completions"]
    assert bodies is not None and len(bodies) == 2 * len(REQUESTS)
    generate, force = bodies[0], bodies[1]
    assert generate is not None and force is not None
    neutral = {"temperature": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0,
               "frequency_penalty": 0.0}
    assert generate == {"model": MODEL, **neutral, "prompt": reference.prompts[0],
                        "max_tokens": 32, "return_token_ids": True}
    assert force == {"model": MODEL, **neutral, "max_tokens": 1, "prompt_logprobs": 1,
                     "prompt": reference.prompts[0] + reference.continuations[0]}


def test_continuation_follows_the_requests_expected_length(fake: FakeVllm) -> None:
    ref = capture_reference(fake.url, MODEL, [completion(1, 4, out=5)], max_tokens=32)
    assert [len(c) for c in ref.continuations] == [5]
    ref = capture_reference(fake.url, MODEL, [completion(1, 4, out=50)], max_tokens=7)
    assert [len(c) for c in ref.continuations] == [7]


# -- scoring ----------------------------------------------------------------------------------

def test_the_same_model_agrees_fully(reference: Reference) -> None:
    with candidate(0.0) as other:
        acc = score_against(other.url, MODEL, reference)
    assert acc.ok
    assert (acc.agreement, acc.logprob_shift) == (1.0, 0.0)
    assert (acc.positions, acc.samples) == (reference.positions, len(REQUESTS))


def test_decode_and_prefill_differences_do_not_count_against_the_baseline() -> None:
    # The baseline's greedy tokens come from decode kernels, the teacher-forced ranks from
    # a prefill; where they disagree the baseline's own prefill top-1 is the reference.
    with candidate(0.0, decode_noise=0.3) as base:
        ref = capture_reference(base.url, MODEL, REQUESTS)
    assert 0.5 < ref.self_agreement < 0.95
    assert ref.top_tokens != ref.continuations
    with candidate(0.0, decode_noise=0.3) as same:
        acc = score_against(same.url, MODEL, ref)
    assert (acc.agreement, acc.logprob_shift) == (1.0, 0.0)
    with candidate(1.0, decode_noise=0.3) as lossy:
        assert score_against(lossy.url, MODEL, ref).agreement < 0.5


def test_harmless_float_noise_still_agrees(reference: Reference) -> None:
    # Free-running outputs would diverge for good after a near-tie flips; teacher forcing
    # puts the reference back after it, so one flip costs one position.
    for noise in (1e-5, 1e-3):
        with candidate(noise) as other:
            acc = score_against(other.url, MODEL, reference)
        assert acc.agreement >= 0.99
        assert abs(acc.logprob_shift) < 1e-3


def test_a_lossy_model_scores_clearly_lower(reference: Reference) -> None:
    scores = {}
    for noise in (0.1, 1.0):
        with candidate(noise) as other:
            scores[noise] = score_against(other.url, MODEL, reference)
    mild, lossy = scores[0.1], scores[1.0]
    assert 0.6 < mild.agreement < 0.97 and mild.logprob_shift < 0
    assert lossy.agreement < 0.4 and lossy.logprob_shift < -0.5
    assert lossy.positions == reference.positions


# -- greedy match, where teacher forcing is refused -------------------------------------------

@pytest.fixture
def greedy_reference() -> Reference:
    with FakeVllm(FakeConfig(length_policy="clamp", refuse_prompt_logprobs=True)) as base:
        return capture_reference(base.url, MODEL, REQUESTS)


def test_a_server_refusing_prompt_logprobs_gives_a_greedy_match_reference(
        greedy_reference: Reference) -> None:
    ref, lm = greedy_reference, FakeLm()
    assert ref.method == "greedy_match" and ref.lines == [1, 2, 3, 4, 5]
    assert ref.fallback.startswith("teacher forcing refused: /v1/completions answered "
                                   "HTTP 400: prompt_logprobs is not supported")
    assert ref.logprobs == [] and ref.top_tokens == []
    for ids, cont in zip(ref.prompts, ref.continuations, strict=True):
        assert cont == lm.greedy(ids, len(cont), ignore_eos=False)
    assert ref.self_agreement == 1.0  # the baseline asked again answers the same
    assert Reference.model_validate_json(ref.model_dump_json()) == ref


def test_greedy_match_scores_the_tokens_before_the_first_divergence(
        greedy_reference: Reference) -> None:
    with candidate(0.0, refuse_prompt_logprobs=True) as same:
        acc = score_against(same.url, MODEL, greedy_reference)
    assert acc.ok and acc.method == "greedy_match"
    assert (acc.agreement, acc.logprob_shift) == (1.0, None)
    assert acc.positions == greedy_reference.positions
    with candidate(1.0, refuse_prompt_logprobs=True) as lossy:
        acc = score_against(lossy.url, MODEL, greedy_reference)
        outputs = [FakeLm(noise=1.0).greedy(ids, len(cont), ignore_eos=False)
                   for ids, cont in zip(greedy_reference.prompts,
                                        greedy_reference.continuations, strict=True)]
    expected = sum(matched_prefix(out, cont) for out, cont in zip(
        outputs, greedy_reference.continuations, strict=True))
    assert acc.agreement == expected / greedy_reference.positions < 0.5
    # positionwise, later coincidences would count as well; before divergence they do not
    assert acc.agreement <= sum(a == b for out, cont in zip(
        outputs, greedy_reference.continuations, strict=True)
        for a, b in zip(out, cont, strict=True)) / greedy_reference.positions


@given(st.lists(st.integers(0, 3), max_size=12), st.lists(st.integers(0, 3), max_size=12))
def test_matched_prefix_counts_up_to_the_first_difference(a: list[int], b: list[int]) -> None:
    n = matched_prefix(a, b)
    assert a[:n] == b[:n] and n <= min(len(a), len(b))
    assert n == min(len(a), len(b)) or a[n] != b[n]


def test_the_probe_says_which_method_and_raises_when_nothing_can_be_captured(
        greedy_reference: Reference) -> None:
    wl = Workload(path="w.jsonl", sha256="0" * 64, requests=tuple(REQUESTS))
    probe = VllmQualityProbe(wl, samples=len(REQUESTS))
    with FakeVllm(FakeConfig(length_policy="clamp", refuse_prompt_logprobs=True)) as base:
        server = _Served(base.url)
        captured = probe.reference(server)
        score = probe.accuracy(server, captured)
    assert captured["method"] == "greedy_match"
    assert score == QualityScore(agreement=1.0, positions=greedy_reference.positions,
                                 method="greedy_match")
    own, warning = reference_quality(captured)
    assert own.method == "greedy_match" and own.agreement == 1.0
    assert warning.startswith("accuracy by greedy token match (teacher forcing refused: ")
    assert reference_quality({"prompts": []}) == (
        QualityScore(agreement=1.0, logprob_shift=0.0), "")
    down = FakeVllm()
    url = down.start_in_thread()
    down.stop()
    with pytest.raises(QualityError, match="connection error"):
        probe.reference(_Served(url))


class _Served:
    """A live server as the probe sees it."""

    def __init__(self, url: str) -> None:
        self.url, self.served_model = url, MODEL


# -- lengths ----------------------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["clamp", "reject"])
def test_too_long_prompts_keep_their_last_tokens(policy: str) -> None:
    # max_model_len 64 holds 31 prompt tokens + 32 continuation tokens + the teacher-forced
    # request's own token; a request expecting 60 tokens leaves room for 3.
    with FakeVllm(FakeConfig(max_model_len=64, length_policy=policy)) as server:  # type: ignore[arg-type]
        ref = capture_reference(server.url, MODEL, [
            completion(1, 50, out=32), completion(2, 3, out=32), completion(3, 20, out=60)],
            max_tokens=60)
    lm = FakeLm()
    assert ref.lines == [1, 2, 3]
    assert ref.prompts[0] == lm.encode(completion(1, 50).prompt or "")[-31:]
    assert [len(p) for p in ref.prompts] == [31, 4, 3]
    assert [len(c) for c in ref.continuations] == [32, 32, 60]
    assert ref.notes == ["line 1: prompt cut to its last 31 of 51 tokens",
                         "line 3: prompt cut to its last 3 of 21 tokens"]
    assert ref.self_agreement == 1.0


def test_requests_longer_than_the_context_are_skipped() -> None:
    with FakeVllm(FakeConfig(max_model_len=40)) as server:
        ref = capture_reference(server.url, MODEL, [completion(1, 3, out=39),
                                                    completion(2, 3, out=20)], max_tokens=64)
    assert ref.lines == [2]
    assert ref.notes == ["line 1: skipped, max_model_len 40 leaves no room for a prompt "
                         "and 39 tokens"]


def test_long_prompts_keep_their_last_tokens(fake: FakeVllm) -> None:
    req = completion(7, 30)
    ref = capture_reference(fake.url, MODEL, [req], max_prompt_tokens=10)
    assert ref.prompts == [FakeLm().encode(req.prompt or "")[-10:]]
    assert ref.notes == ["line 7: prompt cut to its last 10 of 31 tokens"]


def test_a_shorter_candidate_context_scores_what_fits(fake: FakeVllm) -> None:
    ref = capture_reference(fake.url, MODEL, [completion(1, 40), completion(2, 60),
                                              completion(3, 3)])
    with FakeVllm(FakeConfig(max_model_len=64)) as short:
        acc = score_against(short.url, MODEL, ref)
    # 41 prompt tokens leave 22 of 32; 61 leave 2; 4 leave all 32
    assert (acc.agreement, acc.positions, acc.samples) == (1.0, 22 + 2 + 32, 3)
    assert acc.notes == ["line 1: scored on 22 of 32 tokens (max_model_len 64)",
                         "line 2: scored on 2 of 32 tokens (max_model_len 64)"]
    with FakeVllm(FakeConfig(max_model_len=30)) as tiny:
        acc = score_against(tiny.url, MODEL, ref)
    assert acc.positions == 25 and acc.samples == 1
    assert acc.notes == [
        "line 1: skipped, its prompt of 41 tokens leaves no room under max_model_len 30",
        "line 2: skipped, its prompt of 61 tokens leaves no room under max_model_len 30",
        "line 3: scored on 25 of 32 tokens (max_model_len 30)"]
    with FakeVllm(FakeConfig(max_model_len=4)) as none_fit:
        acc = score_against(none_fit.url, MODEL, ref)
    assert not acc.ok and (acc.agreement, acc.positions) == (0.0, 0)
    assert "no reference sample fits" in acc.error


def test_nothing_fitting_the_baseline_is_an_error() -> None:
    with FakeVllm(FakeConfig(max_model_len=16)) as server, \
            pytest.raises(QualityError, match="no sampled workload prompt fits"):
        capture_reference(server.url, MODEL, [completion(1, 20, out=20)])
    with pytest.raises(QualityError, match="no requests given"):
        capture_reference("http://127.0.0.1:9", MODEL, [], transport=_answer({}))


# -- failures -------------------------------------------------------------------------------

def test_a_failing_baseline_raises_a_quality_error(fake: FakeVllm) -> None:
    with pytest.raises(QualityError, match=r"/tokenize answered HTTP 400: The prompt is "
                                           r"poisoned \(fake server\)"):
        capture_reference(fake.url, MODEL, [Request(line=1, prompt="a POISON-PILL b")])
    with pytest.raises(QualityError, match="HTTP 404: The model `other` does not exist"):
        capture_reference(fake.url, "other", REQUESTS)


def test_a_failing_candidate_is_an_accuracy_with_an_error(reference: Reference) -> None:
    down = FakeVllm()
    url = down.start_in_thread()
    down.stop()
    acc = score_against(url, MODEL, reference)
    assert acc == Accuracy(error="/v1/models: connection error: ConnectError")
    with candidate(0.0, vocab_size=64) as small_vocab:
        acc = score_against(small_vocab.url, MODEL, reference)
    assert not acc.ok and acc.positions == 0
    assert "HTTP 400: Token id" in acc.error and "out of vocabulary" in acc.error


MODELS = {"data": [{"id": MODEL, "max_model_len": 4096}]}


def _answer(completions: dict[str, object], models: object = MODELS
            ) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json=models)
        if request.url.path == "/tokenize":
            return httpx.Response(200, json={"tokens": [0, 20, 21]})
        return httpx.Response(200, json=completions)
    return httpx.MockTransport(handle)


def _raising(exc: Exception) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        raise exc
    return httpx.MockTransport(handle)


ONE = Reference(prompts=[[0, 20, 21]], continuations=[[30, 31]], logprobs=[[-1.0, -2.0]])


@pytest.mark.parametrize(("transport", "error"), [
    (_answer({"choices": []}), "/v1/completions answered no choices"),
    (_answer({"choices": [{"prompt_logprobs": None}]}), "no prompt_logprobs"),
    (_answer({"choices": [{"prompt_logprobs": [None, {}, {}, {}, {}]}]}),
     "prompt_logprobs lack token 30"),
    (_answer({"choices": [{"prompt_logprobs": [None, {}, {}, {"30": {"rank": "x"}},
                                               {}]}]}), "prompt_logprobs lack token 30"),
    (_answer({}, models=[1, 2]), "/v1/models answered something other than a JSON object"),
    (_raising(httpx.ReadTimeout("slow")), "timeout after 120 s"),
    (_raising(httpx.RemoteProtocolError("eh")), "connection error: RemoteProtocolError"),
])
def test_malformed_answers_are_errors(transport: httpx.MockTransport, error: str) -> None:
    acc = score_against("http://fake", MODEL, ONE, transport=transport)
    assert error in acc.error and acc.positions == 0


def test_a_baseline_without_token_ids_is_refused() -> None:
    transport = _answer({"choices": [{"text": "hi", "token_ids": None}]})
    with pytest.raises(QualityError, match=r"no token_ids \(does this vLLM accept "):
        capture_reference("http://fake", MODEL, REQUESTS[:1], transport=transport)


def test_minus_infinity_is_floored() -> None:
    entry = {"30": {"logprob": float("-inf"), "rank": 400},
             "31": {"logprob": float("nan"), "rank": 1}}
    body = json.dumps({"choices": [{"prompt_logprobs": [None, {}, {}, entry, entry]}]})
    transport = httpx.MockTransport(lambda r: httpx.Response(
        200, content=body.encode() if r.url.path != "/v1/models"
        else json.dumps(MODELS).encode()))
    acc = score_against("http://fake", MODEL, ONE, transport=transport)
    assert acc.agreement == 0.5
    assert acc.logprob_shift == pytest.approx((-1e4 + 1.0 - 1e4 + 2.0) / 2)
    assert json.loads(acc.model_dump_json())["logprob_shift"] < -9000


# -- sample selection and persistence -------------------------------------------------------

def _workload(texts: list[str]) -> Workload:
    return Workload(path="w.jsonl", sha256="0" * 64, requests=tuple(
        Request(line=i + 1, prompt=t) for i, t in enumerate(texts)))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from("abcdefghijklmnop"), min_size=1, max_size=40),
       st.integers(1, 12), st.integers(0, 2**32))
def test_sample_is_deterministic_distinct_and_in_trace_order(texts: list[str], n: int,
                                                             seed: int) -> None:
    wl = _workload(texts)
    picked = sample_requests(wl, n, seed)
    assert picked == sample_requests(wl, n, seed)
    assert len(picked) == min(n, len(set(texts)))
    lines = [r.line for r in picked]
    assert lines == sorted(lines)
    assert len({r.prompt for r in picked}) == len(picked)
    # a repeated prompt is represented by its first occurrence
    assert all(texts.index(r.prompt or "") == r.line - 1 for r in picked)


def test_sample_depends_on_the_seed_only() -> None:
    wl = _workload([f"prompt {i}" for i in range(100)])
    first = [r.line for r in sample_requests(wl, 8, seed=0)]
    assert first == [r.line for r in sample_requests(wl, 8)]
    assert first != [r.line for r in sample_requests(wl, 8, seed=1)]
    with pytest.raises(ValueError, match="at least 1"):
        sample_requests(wl, 0)


def test_reference_json_round_trip(reference: Reference) -> None:
    text = reference.model_dump_json()
    assert Reference.model_validate_json(text) == reference
    assert Reference.model_validate(json.loads(text)) == reference
    assert len(text) < 8000  # small enough to ride in the baseline's record


@pytest.mark.parametrize("bad", [
    {"prompts": [[1]], "continuations": [], "logprobs": []},
    {"prompts": [[1]], "continuations": [[2, 3]], "logprobs": [[-1.0]]},
    {"prompts": [[]], "continuations": [[2]], "logprobs": [[-1.0]]},
    {"prompts": [[1]], "continuations": [[2]], "logprobs": [[-1.0]], "lines": [1, 2]},
    {"prompts": [[1]], "continuations": [[2]], "logprobs": [[-1.0]], "extra": 1},
    {"method": "greedy_match", "prompts": [[1]], "continuations": [[2]],
     "logprobs": [[-1.0]]},
    {"method": "greedy_match", "prompts": [[1]], "continuations": [[]]},
    {"method": "sampled", "prompts": [[1]], "continuations": [[2]]},
])
def test_reference_rejects_misaligned_samples(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Reference.model_validate(bad)


# -- real vLLM ----------------------------------------------------------------------------------

ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
              "VLLM_NO_USAGE_STATS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.mark.engine
def test_serving_changes_agree_on_real_vllm(tmp_path: Path) -> None:
    """The baseline rebooted and a pure serving change (max_num_seqs=4) both keep the
    reference tokens top-1 on real vLLM (the CPU build, a tiny random Llama)."""
    from aevyra_forge.core.recipe import Recipe
    from aevyra_forge.core.values import LaunchFailure
    from aevyra_forge.engine.launcher import VllmLauncher

    vllm_bin = os.environ.get("FORGE_VLLM_BIN") or shutil.which("vllm")
    if not vllm_bin:
        pytest.fail("engine tests need vLLM: run `bash scripts/setup_vllm_cpu.sh` and set "
                    "FORGE_VLLM_BIN=.venv-vllm/bin/vllm")
    model = tmp_path / "tiny-llama"
    subprocess.run([str(Path(vllm_bin).with_name("python")), "-m", "aevyra_forge.testing.tinymodel",
                    str(model)], check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    launcher = VllmLauncher(vllm_bin, boot_timeout_s=300, env={**os.environ, **ENGINE_ENV})
    requests = sample_requests(_engine_workload(), 6)

    def on(config: Mapping[str, object], name: str, probe: Callable[[str, str], object]
           ) -> object:
        recipe = Recipe(model=str(model), config={"max_model_len": 1024,
                                                  "enforce_eager": True, **config})
        server = launcher.launch(recipe, tmp_path / f"{name}.log")
        assert not isinstance(server, LaunchFailure), server
        try:
            return probe(server.url, server.served_model)
        finally:
            launcher.stop(server)

    ref = on({}, "baseline", lambda url, name: capture_reference(url, name, requests))
    assert isinstance(ref, Reference) and ref.positions > 100
    figures: dict[str, object] = {"self_agreement": ref.self_agreement}
    for name, config in (("rebooted", {}), ("max_num_seqs_4", {"max_num_seqs": 4})):
        acc = on(config, name, lambda url, served: score_against(url, served, ref))
        assert isinstance(acc, Accuracy) and acc.ok, acc
        figures[name] = (round(acc.agreement, 4), round(acc.logprob_shift, 5))
        assert acc.positions == ref.positions
        assert acc.agreement >= 0.97, figures
    sys.stderr.write(f"\naccuracy figures: {json.dumps(figures)}\n")  # shown with -s


def _engine_workload() -> Workload:
    system = "You are the support assistant for the Orbit storage service. " * 6
    reqs = []
    for i in range(10):
        if i % 2:
            reqs.append(Request(line=i + 1, messages=(
                Message(role="system", content=system),
                Message(role="user", content=f"Question {i}: why is my upload slow?")),
                expected_output_tokens=32))
        else:
            reqs.append(Request(line=i + 1, prompt=f"Story {i}: once upon a time, a "
                                "scheduler measured every token", expected_output_tokens=32))
    return Workload(path="engine.jsonl", sha256="0" * 64, requests=tuple(reqs))


def test_a_server_with_an_api_key_is_probed_with_it() -> None:
    with FakeVllm(FakeConfig(length_policy="clamp", api_key="k-9")) as server:
        with pytest.raises(QualityError, match="HTTP 401"):
            capture_reference(server.url, MODEL, REQUESTS[:2])
        ref = capture_reference(server.url, MODEL, REQUESTS[:2], api_key="k-9")
        assert score_against(server.url, MODEL, ref).error.endswith(
            "answered HTTP 401: Unauthorized")
        asked = len(server.requests)
        assert score_against(server.url, MODEL, ref, api_key="k-9").agreement == 1.0
        assert {r.headers.get("authorization") for r in server.requests[asked:]} == {
            "Bearer k-9"}
