"""Tests for aevyra_forge.measure.client: the streaming client (send_request, run_pass,
bench_passes) against the fake vLLM server in tests/fake_vllm.py."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator, Sequence

import httpx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aevyra_forge.core.values import BenchMetrics
from aevyra_forge.core.workload import Message, Request, Workload
from aevyra_forge.measure.client import (
    WARMUP_OUTPUT_TOKENS,
    BenchConfig,
    auth_headers,
    bench_passes,
    request_payload,
    run_pass,
    send_request,
    warmup_requests,
)
from aevyra_forge.measure.metrics import RequestResult, aggregate, parse_metrics
from tests.fake_vllm import FakeConfig, FakeVllm, count_words

MODEL = "fake-model"


class ScriptedClock:
    """Returns the scripted times in order, as the bench's injected clock would, and counts
    how often it was read."""

    def __init__(self, times: list[float]) -> None:
        self._times = list(times)
        self.calls = 0

    def __call__(self) -> float:
        value = self._times[min(self.calls, len(self._times) - 1)]
        self.calls += 1
        return value


@pytest.fixture
def fake() -> Iterator[FakeVllm]:
    with FakeVllm(FakeConfig(model=MODEL, max_model_len=512)) as server:
        yield server


@pytest.fixture(scope="module")
def shared_fake() -> Iterator[FakeVllm]:
    """One server for the hypothesis test (function-scoped fixtures do not reset per
    example)."""
    with FakeVllm(FakeConfig(model=MODEL)) as server:
        yield server


def completion(line: int, words: int, out: int, offset: float | None = None,
               stem: str = "tell") -> Request:
    prompt = " ".join(f"{stem}{line}x{i}" for i in range(words))
    return Request(line=line, prompt=prompt, expected_output_tokens=out,
                   arrival_offset_s=offset)


def chat(line: int, content: str, out: int) -> Request:
    return Request(line=line, messages=(Message(role="system", content="be brief"),
                                        Message(role="user", content=content)),
                   expected_output_tokens=out)


def workload(*requests: Request) -> Workload:
    return Workload(path="mem.jsonl", sha256="0" * 64, requests=tuple(requests))


async def send(fake: FakeVllm, req: Request, clock: ScriptedClock | None = None,
               timeout_s: float = 10.0, **extra: object) -> RequestResult:
    path, body = request_payload(req, MODEL, None)
    body.update(extra)
    async with httpx.AsyncHTTPTransport() as transport:
        return await send_request(transport, fake.url, path, body, timeout_s,
                                  clock or time.perf_counter)


def test_request_payload_shapes() -> None:
    path, body = request_payload(completion(1, 3, 17), MODEL, "salt-1")
    assert path == "/v1/completions"
    assert body == {"model": MODEL, "max_tokens": 17, "temperature": 0.0, "ignore_eos": True,
                    "stream": True, "stream_options": {"include_usage": True},
                    "cache_salt": "salt-1", "prompt": "tell1x0 tell1x1 tell1x2"}
    path, body = request_payload(chat(2, "hi", 5), MODEL, None)
    assert path == "/v1/chat/completions"
    assert "cache_salt" not in body and "prompt" not in body
    assert body["messages"] == [{"role": "system", "content": "be brief"},
                                {"role": "user", "content": "hi"}]


def test_completions_and_chat_exact_counts(fake: FakeVllm) -> None:
    fake.config.token_delay_s = 0.001
    reqs = [completion(i, 5 + i, 8 + i) for i in range(1, 6)]
    reqs += [chat(i, f"question {i} about the platform", 12) for i in range(6, 9)]
    [m] = asyncio.run(bench_passes(fake.url, MODEL, workload(*reqs),
                                   BenchConfig(concurrency=4, warmup_requests=0)))
    assert (m.completed, m.failed) == (8, 0)
    assert m.output_tokens == sum(r.expected_output_tokens for r in reqs)
    # the fake counts words, plus 4 per chat message
    assert m.input_tokens == sum(5 + i for i in range(1, 6)) + 3 * (2 + 5 + 8)
    assert 0 < m.ttft_ms.mean < m.e2e_ms.mean
    assert m.e2e_ms.p99 >= m.e2e_ms.p50
    assert m.output_throughput == pytest.approx(m.output_tokens / m.duration_s)
    posts = [r for r in fake.requests if r.method == "POST"]
    assert sorted(r.path for r in posts) == ["/v1/chat/completions"] * 3 + \
        ["/v1/completions"] * 5
    for rec in posts:
        assert rec.body is not None
        assert rec.body["ignore_eos"] is True and rec.body["temperature"] == 0.0


def test_chat_role_chunk_is_not_the_first_token(fake: FakeVllm) -> None:
    # Scripted: sent at 10.0, tokens at 11.0, 11.5, 12.5. Had the role-only chunk been
    # timed, TTFT would be 1.0 s early by one reading and the clock read five times.
    clock = ScriptedClock([10.0, 11.0, 11.5, 12.5])
    result = asyncio.run(send(fake, chat(1, "hello", 3), clock))
    assert result.success, result.error
    assert clock.calls == 4
    assert result.ttft_s == pytest.approx(1.0)
    assert result.latency_s == pytest.approx(2.5)
    assert result.itl_s == pytest.approx([0.5, 1.0])
    assert result.output_tokens == 3
    # Real time: the role chunk comes at once, the first token after the "prefill".
    fake.config.first_token_delay_s = 0.15
    timed = asyncio.run(send(fake, chat(2, "hello", 2)))
    assert timed.success and timed.ttft_s >= 0.15


@given(st.data())
@settings(max_examples=40, deadline=None)
def test_e2e_minus_ttft_is_sum_of_itl(shared_fake: FakeVllm, data: st.DataObject) -> None:
    tokens = data.draw(st.integers(min_value=1, max_value=30), label="tokens")
    per_chunk = data.draw(st.integers(min_value=1, max_value=4), label="per_chunk")
    is_chat = data.draw(st.booleans(), label="chat")
    chunks = -(-tokens // per_chunk)
    gaps = data.draw(st.lists(st.floats(min_value=0.0, max_value=2.0), min_size=chunks,
                              max_size=chunks), label="gaps")
    t0 = data.draw(st.floats(min_value=0.0, max_value=1e5), label="t0")
    times = [float(t) for t in np.cumsum([t0, *gaps])]
    clock = ScriptedClock(times)
    req = chat(1, "say it", tokens) if is_chat else completion(1, 4, tokens)
    result = asyncio.run(send(shared_fake, req, clock, stream_interval=per_chunk))
    assert result.success, result.error
    assert clock.calls == chunks + 1  # the send, then one reading per token chunk
    assert result.output_tokens == tokens
    assert result.ttft_s == pytest.approx(times[1] - times[0], abs=1e-6)
    assert result.latency_s == pytest.approx(times[-1] - times[0], abs=1e-6)
    assert len(result.itl_s) == chunks - 1
    assert result.latency_s - result.ttft_s == pytest.approx(sum(result.itl_s), abs=1e-6)
    m = aggregate([result], duration_s=1.0)
    assert m.e2e_ms.mean - m.ttft_ms.mean == pytest.approx(sum(result.itl_s) * 1000,
                                                           abs=1e-3)
    if tokens > 1:
        assert result.tpot_s == pytest.approx(sum(result.itl_s) / (tokens - 1), abs=1e-9)


def test_failures_are_counted_with_reasons(fake: FakeVllm) -> None:
    reqs = [completion(1, 10, 16), completion(2, 10, 600),  # 10 + 600 > 512
            Request(line=3, prompt="a POISON-PILL prompt", expected_output_tokens=4),
            completion(4, 10, 16)]
    [m] = asyncio.run(bench_passes(fake.url, MODEL, workload(*reqs),
                                   BenchConfig(concurrency=2, warmup_requests=0)))
    assert (m.completed, m.failed) == (2, 2)
    assert m.output_tokens == 32
    assert m.failure_reasons == {
        "HTTP 400: This model's maximum context length is 512 tokens. However, you "
        "requested 610 tokens (10 in the messages, 600 in the completion). Please reduce "
        "the length of the messages or completion.": 1,
        "HTTP 400: The prompt is poisoned (fake server).": 1}


def test_silently_shortened_output_is_a_failure(fake: FakeVllm) -> None:
    # vLLM 0.32 cuts max_tokens to fit max_model_len instead of refusing.
    fake.config.length_policy = "clamp"
    short = asyncio.run(send(fake, completion(1, 12, 510)))
    assert not short.success
    assert short.error == ("short output: 500 of 510 tokens (prompt + max_tokens over "
                           "max_model_len?)")
    too_long = asyncio.run(send(fake, completion(2, 513, 1)))
    assert too_long.error.startswith("HTTP 400: This model's maximum context length is 512")
    assert asyncio.run(send(fake, completion(3, 12, 500))).success


def test_per_request_timeout_bounds_a_steady_stream(fake: FakeVllm) -> None:
    # 200 tokens 20 ms apart: every read is quick, the whole request is not.
    fake.config.token_delay_s = 0.02
    start = time.perf_counter()
    result = asyncio.run(send(fake, completion(1, 3, 200), timeout_s=0.3))
    assert time.perf_counter() - start < 2.0
    assert not result.success
    assert result.error == "timeout after 0.3 s"


def test_whole_bench_timeout(fake: FakeVllm) -> None:
    fake.config.token_delay_s = 0.02
    config = BenchConfig(concurrency=2, warmup_requests=0, bench_timeout_s=0.3)
    start = time.perf_counter()
    with pytest.raises(TimeoutError):
        asyncio.run(bench_passes(fake.url, MODEL,
                                 workload(*(completion(i, 3, 200) for i in range(4))),
                                 config))
    assert time.perf_counter() - start < 2.0


def test_connection_refused_is_a_failed_request() -> None:
    server = FakeVllm()
    url = server.start_in_thread()
    server.stop()
    with httpx.Client() as probe, pytest.raises(httpx.ConnectError):
        probe.get(url + "/health")
    [m] = asyncio.run(bench_passes(url, MODEL, workload(completion(1, 3, 4)),
                                   BenchConfig(concurrency=1, warmup_requests=0)))
    assert (m.completed, m.failed) == (0, 1)
    assert m.failure_reasons == {"connection error: ConnectError": 1}


@pytest.mark.parametrize(("stream", "reason"), [
    (b"data: {not json\n\ndata: [DONE]\n\n", "malformed stream chunk"),
    (b"data: [1, 2]\n\n", "malformed stream chunk"),
    (b'data: {"error": {"message": "engine dead", "code": 500}}\n\n',
     "stream error: engine dead"),
    (b'data: {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}\n\n'
     b"data: [DONE]\n\n", "no tokens received"),
])
def test_broken_streams_are_failed_requests(stream: bytes, reason: str) -> None:
    # A server that is not the fake: httpx's MockTransport answers every request.
    transport = httpx.MockTransport(lambda request: httpx.Response(
        200, content=stream, headers={"content-type": "text/event-stream"}))
    [m] = asyncio.run(bench_passes("http://mock", MODEL, workload(chat(1, "hi", 4)),
                                   BenchConfig(concurrency=1, warmup_requests=0),
                                   transport=transport))
    assert m.failure_reasons == {reason: 1}


def test_held_back_text_still_marks_the_last_token(fake: FakeVllm) -> None:
    # vLLM sends the finishing chat chunk with an empty delta when the last token's text
    # is an incomplete UTF-8 sequence; that chunk is still the last token's arrival.
    events = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
        {"choices": [{"index": 0, "delta": {"content": "a"}, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]},
        {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}},
    ]
    body = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=body))
    clock = ScriptedClock([0.0, 0.5, 0.9])

    path, payload = request_payload(chat(1, "hi", 2), MODEL, None)
    result = asyncio.run(send_request(transport, "http://mock", path, payload, 5.0, clock))
    assert result.success, result.error
    assert (result.ttft_s, result.latency_s, result.itl_s) == (0.5, 0.9, [0.4])
    assert result.output_tokens == 2 and result.prompt_tokens == 3


def test_closed_loop_never_exceeds_concurrency(fake: FakeVllm) -> None:
    fake.config.token_delay_s = 0.002
    reqs = workload(*(completion(i, 4, 6) for i in range(24)))
    [m] = asyncio.run(bench_passes(fake.url, MODEL, reqs,
                                   BenchConfig(concurrency=3, warmup_requests=0)))
    assert m.completed == 24
    assert fake.max_in_flight == 3


def test_open_loop_honours_arrival_offsets(fake: FakeVllm) -> None:
    offsets = [0.0, 0.2, 0.2, 0.45, 0.6]
    reqs = [completion(i, 4, 3, offset) for i, offset in enumerate(offsets)]
    start = time.perf_counter()
    results, duration = asyncio.run(_one_pass(fake, reqs, concurrency=8))
    assert all(r.success for r in results)
    assert 0.6 <= duration < 1.6  # about the last arrival, not a back-to-back flood
    arrived = sorted(r.arrived_s - start for r in fake.requests if r.method == "POST")
    for seen, offset in zip(arrived, sorted(offsets), strict=True):
        assert seen >= offset  # nothing is sent before its time
    for result, offset in zip(results, offsets, strict=True):
        assert offset <= result.start_s < offset + 0.5


def test_open_loop_is_capped_by_concurrency(fake: FakeVllm) -> None:
    fake.config.token_delay_s = 0.005
    reqs = [completion(i, 4, 10, 0.0) for i in range(8)]  # a burst at t=0
    results, _ = asyncio.run(_one_pass(fake, reqs, concurrency=2))
    assert all(r.success for r in results)
    assert fake.max_in_flight == 2


async def _one_pass(fake: FakeVllm, reqs: list[Request], concurrency: int
                    ) -> tuple[list[RequestResult], float]:
    transports = [httpx.AsyncHTTPTransport() for _ in range(concurrency)]
    try:
        return await run_pass(transports, fake.url, MODEL, reqs, 10.0, time.perf_counter,
                              None)
    finally:
        for transport in transports:
            await transport.aclose()


def test_warmup_is_not_timed_and_is_salted_apart(fake: FakeVllm) -> None:
    reqs = [completion(i, 6, 5) for i in range(5)]
    passes = asyncio.run(bench_passes(fake.url, MODEL, workload(*reqs),
                                      BenchConfig(concurrency=2, warmup_requests=3,
                                                  passes=2, isolation_fallback=False)))
    assert [m.completed for m in passes] == [5, 5]
    assert all(m.output_tokens == 25 for m in passes)
    bodies = [r.body for r in fake.requests if r.method == "POST"]
    assert len(bodies) == 3 + 2 * 5
    salts = [b["cache_salt"] for b in bodies if b is not None]
    warm, first, second = set(salts[:3]), set(salts[3:8]), set(salts[8:])
    assert len(warm) == len(first) == len(second) == 1
    assert len(warm | first | second) == 3  # warm-up and each pass: their own salt
    assert all(b is not None and b["max_tokens"] == WARMUP_OUTPUT_TOKENS for b in bodies[:3])
    workload_words = {w for r in reqs for w in (r.prompt or "").split()}
    for b in bodies[:3]:
        assert b is not None
        assert not workload_words & set(b["prompt"].split())  # shares no prompt text


def test_a_stop_predicate_ends_the_bench_after_the_pass_it_accepts(fake: FakeVllm) -> None:
    """Asked after each timed pass with the passes so far; True ends the bench there, and
    no later pass is sent. Never asked after the last pass."""
    reqs = [completion(i, 6, 5) for i in range(3)]
    seen: list[int] = []

    def stop(passes: Sequence[BenchMetrics]) -> bool:
        seen.append(len(passes))
        return len(passes) == 2

    passes = asyncio.run(bench_passes(fake.url, MODEL, workload(*reqs), BenchConfig(
        concurrency=1, warmup_requests=0, passes=5, isolation_fallback=False, stop=stop)))
    assert len(passes) == 2 and seen == [1, 2]
    assert len([r for r in fake.requests if r.method == "POST"]) == 2 * 3
    seen.clear()

    def never(passes: Sequence[BenchMetrics]) -> bool:
        seen.append(len(passes))
        return False

    every = asyncio.run(bench_passes(fake.url, MODEL, workload(*reqs), BenchConfig(
        concurrency=1, warmup_requests=0, passes=2, isolation_fallback=False, stop=never)))
    assert len(every) == 2 and seen == [1]


def test_each_pass_sees_a_cold_prefix_cache(fake: FakeVllm) -> None:
    # Every prompt opens with the same 32 words: within a pass later requests hit the
    # prefix cache; a second pass under the same salt would hit on everything.
    shared = " ".join(f"rule{i}" for i in range(32))
    reqs = [Request(line=i, prompt=f"{shared} question {i}", expected_output_tokens=4)
            for i in range(6)]

    async def scrape() -> dict[str, float]:
        async with httpx.AsyncClient() as client:
            return parse_metrics((await client.get(fake.url + "/metrics")).text)

    passes = asyncio.run(bench_passes(fake.url, MODEL, workload(*reqs),
                                      BenchConfig(concurrency=1, warmup_requests=1,
                                                  passes=2), scrape=scrape))
    for m in passes:
        assert m.server["prefix_cache_queries"] == 6 * 34
        assert m.server["prefix_cache_hits"] == 5 * 32  # all but the first request
        assert m.server["prefix_cache_hit_rate"] == pytest.approx(160 / 204)
        assert m.server["generation_tokens"] == 24
        assert m.server["prompt_tokens"] == 6 * 34
        assert m.server["requests_succeeded"] == 6
        assert m.server["kv_cache_usage"] == 0.0


def test_warmup_requests_are_deterministic() -> None:
    a, b = warmup_requests(3, 0), warmup_requests(3, 0)
    assert [r.prompt for r in a] == [r.prompt for r in b]
    assert len({r.prompt for r in a}) == 3
    assert all(count_words(r.prompt or "") == 25 for r in a)


_TEXT = st.text(max_size=12)
_DELTA = st.fixed_dictionaries({}, optional={"role": st.just("assistant"),
                                             "content": st.one_of(st.none(), _TEXT),
                                             "reasoning_content": _TEXT})
_CHOICE = st.one_of(
    st.fixed_dictionaries({"index": st.just(0), "text": _TEXT},
                          optional={"finish_reason": st.sampled_from([None, "length"])}),
    st.fixed_dictionaries({"index": st.just(0), "delta": _DELTA},
                          optional={"finish_reason": st.sampled_from([None, "length"])}))
_CHUNK = st.fixed_dictionaries(
    {"id": st.just("cmpl-1"), "choices": st.lists(_CHOICE, max_size=1)},
    optional={"usage": st.one_of(st.none(), st.just({"prompt_tokens": 3,
                                                     "completion_tokens": 2})),
              "error": st.just({"message": "boom"})})


@given(_CHUNK)
def test_the_fast_path_only_skips_chunks_the_parser_would_count(
        chunk: dict[str, object]) -> None:
    from aevyra_forge.measure.client import _quick_token, _token_bearing

    compact = json.dumps(chunk, separators=(",", ":")).encode()
    if _quick_token(compact):
        assert _token_bearing(chunk)
        assert "error" not in chunk and not chunk.get("usage")
    assert not _quick_token(json.dumps(chunk).encode())  # spaced JSON: the full parser


def test_a_server_with_an_api_key_gets_it_on_every_request() -> None:
    reqs = workload(completion(1, 5, 3), chat(2, "hello there", 3))
    config = BenchConfig(concurrency=2, warmup_requests=1)
    with FakeVllm(FakeConfig(model=MODEL, api_key="k-123")) as server:
        [without] = asyncio.run(bench_passes(server.url, MODEL, reqs, config))
        asked = len(server.requests)
        [with_key] = asyncio.run(bench_passes(server.url, MODEL, reqs, config,
                                              api_key="k-123"))
        sent = {r.headers.get("authorization") for r in server.requests[asked:]}
    assert (without.completed, without.failed) == (0, 2)
    assert set(without.failure_reasons) == {"HTTP 401: Unauthorized"}
    assert (with_key.completed, with_key.failed) == (2, 0)
    assert sent == {"Bearer k-123"}  # warm-up included
    assert auth_headers(None) == {} and auth_headers("") == {}
