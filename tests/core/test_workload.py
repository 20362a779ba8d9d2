"""Tests for aevyra_forge.core.workload: parsing, bad-line errors, statistics and the
shared-prefix measure."""

from __future__ import annotations

import hashlib
import json
import re
import string
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aevyra_forge.core.errors import WorkloadError
from aevyra_forge.core.workload import (
    CHAT_TOKENS_PER_MESSAGE,
    DEFAULT_OUTPUT_TOKENS,
    estimate_tokens,
    load_workload,
    longest_seen_prefix,
    seen_prefix_lengths,
    shared_prefix_fraction,
)

SAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sample_workload.jsonl"
GOOD = json.dumps({"prompt": "hello there"})


def write(tmp_path: Path, lines: list[str], name: str = "w.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_objs(tmp_path: Path, objs: list[dict[str, Any]]) -> Path:
    return write(tmp_path, [json.dumps(o) for o in objs])


# -- parsing ------------------------------------------------------------------------------

def test_prompt_line(tmp_path: Path) -> None:
    path = write_objs(tmp_path, [{"prompt": "Say hi", "expected_output_tokens": 32,
                                  "arrival_offset_s": 1.5}])
    (req,) = load_workload(path).requests
    assert req.kind == "completion"
    assert req.prompt == "Say hi"
    assert req.messages is None
    assert req.text == "Say hi"
    assert req.expected_output_tokens == 32
    assert req.arrival_offset_s == 1.5
    assert req.line == 1
    assert req.metadata == {}


def test_messages_line_defaults_and_text(tmp_path: Path) -> None:
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Why is the sky blue?"},
            {"role": "assistant", "content": "Scattering."},
            {"role": "user", "content": "More detail?"}]
    (req,) = load_workload(write_objs(tmp_path, [{"messages": msgs}])).requests
    assert req.kind == "chat"
    assert req.prompt is None
    assert req.messages is not None
    assert [m.role for m in req.messages] == ["system", "user", "assistant", "user"]
    assert req.messages[1].content == "Why is the sky blue?"
    assert req.expected_output_tokens == DEFAULT_OUTPUT_TOKENS
    assert req.arrival_offset_s is None
    assert req.text == ("<system>Be brief.\n<user>Why is the sky blue?\n"
                        "<assistant>Scattering.\n<user>More detail?\n")
    assert req.input_tokens == estimate_tokens(req.text) + 4 * CHAT_TOKENS_PER_MESSAGE


def test_blank_lines_skipped_and_line_numbers_kept(tmp_path: Path) -> None:
    path = write(tmp_path, ["", GOOD, "   ", "\t", json.dumps({"prompt": "second"}), ""])
    wl = load_workload(path)
    assert [r.line for r in wl.requests] == [2, 5]
    assert [r.prompt for r in wl.requests] == ["hello there", "second"]


def test_crlf_line_endings(tmp_path: Path) -> None:
    path = tmp_path / "w.jsonl"
    path.write_bytes(f"{GOOD}\r\n\r\n{GOOD}\r\n".encode())
    assert [r.line for r in load_workload(path).requests] == [1, 3]


def test_utf8_bom_is_tolerated(tmp_path: Path) -> None:
    path = tmp_path / "w.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD.encode() + b"\n")
    assert load_workload(path).requests[0].prompt == "hello there"


def test_unicode_line_separators_inside_strings(tmp_path: Path) -> None:
    # json.dumps(ensure_ascii=False) leaves U+2028 / U+0085 raw; they are not line ends.
    text = "first\u2028second\x85third"
    path = write(tmp_path, [json.dumps({"prompt": text}, ensure_ascii=False)])
    (req,) = load_workload(path).requests
    assert req.prompt == text


def test_metadata_kept(tmp_path: Path) -> None:
    path = write_objs(tmp_path, [{"prompt": "x", "category": "rag", "tenant": "acme",
                                  "tags": ["a", "b"], "line": 99}])
    (req,) = load_workload(path).requests
    assert req.metadata == {"category": "rag", "tenant": "acme", "tags": ["a", "b"],
                            "line": 99}
    assert req.line == 1


def test_sha256_and_path(tmp_path: Path) -> None:
    path = write(tmp_path, [GOOD])
    wl = load_workload(path)
    assert wl.path == str(path)
    assert wl.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


# -- bad input ------------------------------------------------------------------------------

MSG_OK = [{"role": "user", "content": "hi"}]

BAD_LINES: list[tuple[str, str]] = [
    ("{not json", "not valid JSON"),
    ('{"prompt": "x"', "not valid JSON"),
    ("[1, 2, 3]", "expected a JSON object"),
    ('"just a string"', "expected a JSON object"),
    ("42", "expected a JSON object"),
    (json.dumps({"expected_output_tokens": 5}), "exactly one of 'prompt'"),
    (json.dumps({"prompt": "x", "messages": MSG_OK}), "exactly one of 'prompt'"),
    (json.dumps({"messages": [{"role": "wizard", "content": "x"}]}), "messages.0.role"),
    (json.dumps({"messages": [{"role": "user"}]}), "messages.0.content"),
    (json.dumps({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}),
     "messages.0.tool_calls"),
    (json.dumps({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}),
     "content part of type 'image_url' cannot be replayed"),
    (json.dumps({"messages": [{"role": "user", "content": ["plain"]}]}),
     "content part of type None"),
    (json.dumps({"prompt": "x", "max_tokens": 0}), "max_tokens: Value error, must be at least 1"),
    (json.dumps({"prompt": "x", "max_completion_tokens": 2.5}), "whole number"),
    (json.dumps({"prompt": "x", "output_tokens": "10"}), "output_tokens: Value error"),
    (json.dumps({"prompt": ["a", "b"]}), "a list of several prompts"),
    (json.dumps({"prompt": [1, 2, 3]}), "token ids"),
    (json.dumps({"conversations": []}), "conversations: give a list"),
    (json.dumps({"conversations": [{"from": "gpt", "value": "hi"}]}), "no human turn"),
    (json.dumps({"conversations": [{"from": "alien", "value": "hi"}]}),
     "conversations.0.from: 'alien' is not one of"),
    (json.dumps({"conversations": [{"from": "human", "value": 3}]}),
     "conversations.0.value: expected text"),
    (json.dumps({"conversations": ["hi"]}), "conversations.0: expected an object"),
    (json.dumps({"conversations": [{"from": "human", "value": "x"}], "prompt": "y"}),
     "exactly one of 'prompt'"),
    (json.dumps({"text": "hello"}), "or 'conversations'"),
    (json.dumps({"messages": "hello"}), "messages"),
    (json.dumps({"messages": []}), "messages is empty"),
    (json.dumps({"prompt": 7}), "prompt"),
    (json.dumps({"prompt": "x", "expected_output_tokens": 12.5}),
     "expected_output_tokens: Value error, must be a whole number"),
    (json.dumps({"prompt": "x", "expected_output_tokens": 12.0}), "whole number"),
    (json.dumps({"prompt": "x", "expected_output_tokens": "12"}), "whole number"),
    (json.dumps({"prompt": "x", "expected_output_tokens": True}), "whole number"),
    (json.dumps({"prompt": "x", "expected_output_tokens": -3}), "at least 1"),
    (json.dumps({"prompt": "x", "expected_output_tokens": 0}), "at least 1"),
    (json.dumps({"prompt": "x", "arrival_offset_s": -0.5}),
     "arrival_offset_s: Value error, must not be negative"),
    (json.dumps({"prompt": "x", "arrival_offset_s": "soon"}), "number of seconds"),
    ('{"prompt": "x", "arrival_offset_s": NaN}', "number of seconds"),
    (json.dumps({"prompt": ""}), "prompt is empty"),
    (json.dumps({"prompt": "  \n\t "}), "prompt is empty"),
    ("[" * 100_000, "nested too deeply"),
]


@pytest.mark.parametrize(("line", "reason"), BAD_LINES,
                         ids=[f"bad{i}" for i in range(len(BAD_LINES))])
def test_bad_line_reports_file_line_reason(tmp_path: Path, line: str, reason: str) -> None:
    path = write(tmp_path, [GOOD, "", line, GOOD])
    with pytest.raises(WorkloadError) as info:
        load_workload(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}:3: "), msg
    assert reason in msg
    assert "\n" not in msg


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.jsonl"
    with pytest.raises(WorkloadError, match=r"nope\.jsonl: workload file not found.*--workload"):
        load_workload(path)


def test_directory_is_not_a_workload(tmp_path: Path) -> None:
    with pytest.raises(WorkloadError, match="not found"):
        load_workload(tmp_path)


def test_empty_file(tmp_path: Path) -> None:
    path = write(tmp_path, ["", "  "])
    with pytest.raises(WorkloadError, match="no requests"):
        load_workload(path)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "w.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + b'{"prompt": "\xff"}\n')
    with pytest.raises(WorkloadError, match=r"not UTF-8 text \(byte \d+\)"):
        load_workload(path)


# -- statistics ----------------------------------------------------------------------------

def test_stats_count_chat_fraction_and_tokens(tmp_path: Path) -> None:
    objs: list[dict[str, Any]] = [
        {"prompt": "a" * 40, "expected_output_tokens": 10},   # 10 input tokens
        {"prompt": "b" * 80, "expected_output_tokens": 20},   # 20
        {"prompt": "c" * 120, "expected_output_tokens": 30},  # 30
        {"messages": [{"role": "user", "content": "d" * 153}],  # "<user>" + 153 + "\n"
         "expected_output_tokens": 40},
    ]
    stats = load_workload(write_objs(tmp_path, objs)).stats
    assert stats.count == 4
    assert stats.chat_fraction == 0.25
    chat_tokens = 40 + CHAT_TOKENS_PER_MESSAGE  # 160 chars / 4 + role markers
    assert stats.input_tokens.total == 10 + 20 + 30 + chat_tokens
    assert stats.input_tokens.max == chat_tokens
    assert stats.input_tokens.p50 == pytest.approx(25.0)
    assert stats.output_tokens.mean == pytest.approx(25.0)
    assert stats.output_tokens.p50 == pytest.approx(25.0)
    # linear interpolation: 30 + 0.97 * (40 - 30)
    assert stats.output_tokens.p99 == pytest.approx(39.7)
    assert stats.output_tokens.max == 40
    assert stats.output_tokens.total == 100
    assert not stats.open_loop
    assert stats.duration_s is None and stats.offered_rps is None
    assert "closed loop" in stats.summary()
    assert stats.summary().startswith("4 requests (25% chat)")


def test_stats_shared_prefix_of_known_trace(tmp_path: Path) -> None:
    system = "S" * 100
    objs = [
        {"prompt": system + "a" * 100},  # 200 chars, nothing seen before
        {"prompt": system + "b" * 100},  # 200, shares the 100-char system prompt
        {"prompt": "z" * 100},           # 100, shares nothing
        {"prompt": system + "a" * 50},   # 150, fully a prefix of the first
    ]
    stats = load_workload(write_objs(tmp_path, objs)).stats
    assert stats.shared_prefix_fraction == pytest.approx((100 + 150) / 650)
    assert "shared prefix 38%" in stats.summary()


def test_stats_open_loop(tmp_path: Path) -> None:
    objs = [{"prompt": "x", "arrival_offset_s": t} for t in (0.0, 0.5, 2.0, 4.0)]
    objs.append({"prompt": "no offset"})  # any offset makes the replay open loop
    stats = load_workload(write_objs(tmp_path, objs)).stats
    assert stats.open_loop
    assert stats.duration_s == 4.0
    assert stats.offered_rps == pytest.approx(5 / 4.0)
    assert "open loop, 1.25 req/s offered over 4.0 s" in stats.summary()


def test_stats_closed_loop_when_no_offsets(tmp_path: Path) -> None:
    stats = load_workload(write(tmp_path, [GOOD, GOOD])).stats
    assert not stats.open_loop
    assert stats.offered_rps is None
    assert stats.shared_prefix_fraction == 1 / 2  # the second repeats the first


# -- shared prefix ---------------------------------------------------------------------------

def test_prefix_credit_only_from_earlier_texts() -> None:
    assert seen_prefix_lengths(["abc", "abd", "abc", "x", ""]) == [0, 2, 3, 0, 0]
    assert [longest_seen_prefix(["abc", "abd", "abc"], i) for i in range(3)] == [0, 2, 3]
    assert shared_prefix_fraction([]) == 0.0
    assert shared_prefix_fraction(["", ""]) == 0.0
    assert shared_prefix_fraction(["hello", "hello"]) == 0.5


def test_prefix_longer_than_first_chunk() -> None:
    base = "p" * 1000
    texts = [base + "A" + "q" * 10, base + "B", base[:777] + "C", base]
    assert seen_prefix_lengths(texts) == [0, 1000, 777, 1000]


def _lcp(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _brute(texts: list[str]) -> list[int]:
    return [max((_lcp(t, p) for p in texts[:i]), default=0) for i, t in enumerate(texts)]


short_text = st.text(alphabet="ab\u00e9", max_size=10)
long_text = st.builds(lambda k, tail: "x" * k + tail,
                      st.integers(min_value=0, max_value=300), short_text)


@given(st.lists(st.one_of(short_text, long_text), max_size=25))
@settings(max_examples=200, deadline=None)
def test_seen_prefix_lengths_match_brute_force(texts: list[str]) -> None:
    expected = _brute(texts)
    assert seen_prefix_lengths(texts) == expected
    assert [longest_seen_prefix(texts, i) for i in range(len(texts))] == expected
    total = sum(map(len, texts))
    assert shared_prefix_fraction(texts) == (sum(expected) / total if total else 0.0)


def test_shared_prefix_fraction_scales_to_10k_long_prompts() -> None:
    # 20 "system prompts" of 2000-2950 chars, each followed by a unique ~1750-char tail.
    systems = [((string.ascii_letters[i] * 7 + string.digits) * 200)[: 2000 + 50 * i]
               for i in range(20)]
    texts = [systems[i % 20] + f"{i:06d}|" * 250 for i in range(10_000)]
    # Every request after the first 20 repeats its system prompt, plus at most the first
    # few digits of its counter; texts with different systems differ at the first char.
    expected_hits = sum(len(systems[i % 20]) for i in range(20, 10_000))
    start = time.perf_counter()
    fraction = shared_prefix_fraction(texts)
    elapsed = time.perf_counter() - start
    total = sum(map(len, texts))
    # A request shares at most its system slice plus a few digits of its counter.
    assert expected_hits / total <= fraction <= (expected_hits + 6 * 10_000) / total
    # The O(n^2) scan takes minutes here; the sorted-neighbour version well under 1 s.
    assert elapsed < 10.0


# -- the shipped sample -----------------------------------------------------------------------

def test_sample_workload() -> None:
    wl = load_workload(SAMPLE)
    stats = wl.stats
    assert stats.count == 50
    assert stats.shared_prefix_fraction > 0.2
    assert not stats.open_loop
    assert 0.3 < stats.chat_fraction < 0.9
    tokens = [r.expected_output_tokens for r in wl.requests]
    assert all(16 <= t <= 1024 for t in tokens)
    assert sum(512 <= t <= 1024 for t in tokens) >= 3
    systems = [r.messages[0].content for r in wl.requests
               if r.messages and r.messages[0].role == "system"]
    rag_prompt = max(set(systems), key=systems.count)
    assert systems.count(rag_prompt) >= 10
    assert 2500 <= len(rag_prompt) <= 3500
    assert any(r.messages and any(m.role == "assistant" for m in r.messages)
               for r in wl.requests)
    assert any(r.metadata for r in wl.requests)
    assert any(not r.metadata for r in wl.requests)
    assert sum(r.prompt is not None for r in wl.requests) >= 10
    longest_words = max(len(r.text.split()) for r in wl.requests if r.prompt)
    assert longest_words >= 300


# -- properties ----------------------------------------------------------------------------

nonblank = st.text(min_size=1, max_size=40).filter(lambda s: s.strip() != "")
message = st.fixed_dictionaries({
    "role": st.sampled_from(["system", "user", "assistant", "tool", "developer"]),
    "content": st.text(max_size=30)})
prompt_req = st.fixed_dictionaries(
    {"prompt": nonblank},
    optional={"expected_output_tokens": st.integers(min_value=1, max_value=4096),
              "arrival_offset_s": st.floats(min_value=0, max_value=1e6),
              "tenant": st.text(max_size=8)})
chat_req = st.fixed_dictionaries(
    {"messages": st.lists(message, min_size=1, max_size=4)},
    optional={"expected_output_tokens": st.integers(min_value=1, max_value=4096),
              "category": st.sampled_from(["qa", "rag"])})


@given(st.lists(st.one_of(prompt_req, chat_req), min_size=1, max_size=15), st.booleans())
@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_valid_requests_round_trip(tmp_path: Path, objs: list[dict[str, Any]],
                                   ascii_only: bool) -> None:
    path = write(tmp_path, [json.dumps(o, ensure_ascii=ascii_only) for o in objs])
    reqs = load_workload(path).requests
    assert len(reqs) == len(objs)
    for obj, req in zip(objs, reqs, strict=True):
        assert req.prompt == obj.get("prompt")
        if "messages" in obj:
            assert req.messages is not None
            assert [m.model_dump() for m in req.messages] == obj["messages"]
        assert req.expected_output_tokens == obj.get("expected_output_tokens",
                                                     DEFAULT_OUTPUT_TOKENS)
        assert req.arrival_offset_s == obj.get("arrival_offset_s")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["prompt", "messages", "role", "content",
                         "expected_output_tokens", "arrival_offset_s", "x"]),
        inner, max_size=4),
    max_leaves=8)
any_line = st.one_of(st.text(max_size=40), json_values.map(json.dumps))


@given(st.lists(any_line, max_size=6))
@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_arbitrary_lines_load_or_raise_workload_error(tmp_path: Path,
                                                      lines: list[str]) -> None:
    path = tmp_path / "w.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8", errors="surrogatepass")
    try:
        wl = load_workload(path)
    except WorkloadError as exc:
        assert re.match(re.escape(str(path)) + r"(:\d+)?: ", str(exc)), str(exc)
    else:
        assert 1 <= len(wl.requests) <= len(lines)


# -- real trace formats ----------------------------------------------------------------------

def test_openai_chat_body(tmp_path: Path) -> None:
    body = {"model": "gpt-4o", "stream": True, "temperature": 0.2,
            "max_completion_tokens": 300, "max_tokens": 999,  # the newer name wins
            "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "auto",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "name": "alice", "content": [
                    {"type": "text", "text": "first part"},
                    {"type": "text", "text": "second part"}]}]}
    wl = load_workload(write_objs(tmp_path, [body, {"prompt": "plain"}]))
    req = wl.requests[0]
    assert req.kind == "chat" and req.expected_output_tokens == 300
    assert req.messages is not None
    assert req.messages[1].content == "first part\nsecond part"  # as vLLM joins them
    assert req.messages[1].name == "alice"
    # sent as given: a name only where the trace had one
    assert req.messages[1].model_dump() == {"role": "user", "name": "alice",
                                            "content": "first part\nsecond part"}
    assert req.messages[0].model_dump() == {"role": "system", "content": "Be brief."}
    assert req.metadata == {"model": "gpt-4o", "stream": True, "temperature": 0.2,
                            "tools": body["tools"], "tool_choice": "auto"}
    (note,) = wl.notes
    assert note.startswith(f"{tmp_path / 'w.jsonl'}: 1 requests carry tools/tool_choice")


def test_openai_completions_body_and_vllm_custom(tmp_path: Path) -> None:
    objs: list[dict[str, Any]] = [
        {"model": "m", "prompt": "Once upon", "max_tokens": 42},
        {"prompt": ["one prompt in a list"], "max_tokens": 7},
        {"prompt": "What is the capital of India?", "output_tokens": 10},  # vLLM custom
        {"prompt": "forge's own wins", "expected_output_tokens": 5, "max_tokens": 50},
    ]
    wl = load_workload(write_objs(tmp_path, objs))
    assert [r.expected_output_tokens for r in wl.requests] == [42, 7, 10, 5]
    assert [r.prompt for r in wl.requests][1] == "one prompt in a list"
    assert all(r.kind == "completion" for r in wl.requests)
    assert wl.requests[0].metadata == {"model": "m"}
    assert wl.notes == ()


def test_sharegpt_conversation(tmp_path: Path) -> None:
    objs: list[dict[str, Any]] = [
        {"id": "a1", "conversations": [
            {"from": "system", "value": "You are kind."},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello!"},
            {"from": "human", "value": "Tell me a story."},
            {"from": "gpt", "value": "x" * 400}]},  # 400 chars: about 100 tokens
        {"conversations": [{"role": "user", "content": "role/content turns"},
                           {"role": "assistant", "content": "ok"}],
         "output_tokens": 9},  # an explicit count wins over the reply's length
        {"conversations": [{"from": "human", "value": "unanswered"}]},
    ]
    wl = load_workload(write_objs(tmp_path, objs))
    first, second, third = wl.requests
    assert first.messages is not None
    assert [(m.role, m.content) for m in first.messages] == [
        ("system", "You are kind."), ("user", "Hi"), ("assistant", "Hello!"),
        ("user", "Tell me a story.")]
    assert first.expected_output_tokens == estimate_tokens("x" * 400) == 100
    assert first.metadata == {"id": "a1"}
    assert second.messages is not None and second.expected_output_tokens == 9
    assert [m.role for m in second.messages] == ["user"]
    assert third.expected_output_tokens == DEFAULT_OUTPUT_TOKENS
    (note,) = wl.notes
    assert "1 conversations take their output length from the recorded reply" in note


text_part = st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=20)})
other_part = st.fixed_dictionaries({"type": st.sampled_from(["image_url", "input_audio",
                                                             "file", "refusal"])})
body_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool", "developer"]),
     "content": st.one_of(st.text(max_size=20), st.lists(text_part, min_size=1, max_size=3))},
    optional={"name": st.text(min_size=1, max_size=8)})
token_key = st.sampled_from(["max_tokens", "max_completion_tokens", "output_tokens",
                             "expected_output_tokens"])
chat_body = st.builds(
    lambda msgs, counts, extra: {"messages": msgs, **counts, **extra},
    st.lists(body_message, min_size=1, max_size=4),
    st.dictionaries(token_key, st.integers(min_value=1, max_value=8192), max_size=2),
    st.fixed_dictionaries({}, optional={"model": st.just("m"), "stream": st.booleans(),
                                        "tool_choice": st.just("auto"),
                                        "temperature": st.floats(0, 2)}))


def _expected_tokens(body: dict[str, Any]) -> int:
    for key in ("expected_output_tokens", "max_completion_tokens", "max_tokens",
                "output_tokens"):
        if key in body:
            return int(body[key])
    return DEFAULT_OUTPUT_TOKENS


def _content(content: str | list[dict[str, str]]) -> str:
    return content if isinstance(content, str) else "\n".join(p["text"] for p in content)


@given(st.lists(chat_body, min_size=1, max_size=8))
@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_generated_request_bodies_load(tmp_path: Path, bodies: list[dict[str, Any]]) -> None:
    reqs = load_workload(write_objs(tmp_path, bodies)).requests
    for body, req in zip(bodies, reqs, strict=True):
        assert req.messages is not None
        assert [(m.role, m.content, m.name) for m in req.messages] == [
            (m["role"], _content(m["content"]), m.get("name")) for m in body["messages"]]
        assert req.expected_output_tokens == _expected_tokens(body)


def _spoil(body: dict[str, Any], how: int, value: Any) -> dict[str, Any]:
    """One defect a request body can have, each of which must fail the load."""
    spoilt: dict[str, Any] = json.loads(json.dumps(body))
    if how == 0:
        spoilt["messages"][0]["content"] = [value]  # a non-text part
    elif how == 1:
        spoilt["max_tokens"] = value if value is not None else 0
        spoilt.pop("max_completion_tokens", None)
        spoilt.pop("expected_output_tokens", None)
    elif how == 2:
        spoilt["messages"][0]["role"] = "wizard"
    else:
        spoilt["messages"] = []
    return spoilt


@given(chat_body, st.integers(min_value=0, max_value=3),
       st.one_of(st.none(), other_part, st.integers(max_value=0), st.just(2.5),
                 st.just("12")),
       st.integers(min_value=0, max_value=3))
@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_spoilt_request_bodies_fail_with_file_and_line(
        tmp_path: Path, body: dict[str, Any], how: int, value: Any, before: int) -> None:
    bad = _spoil(body, how, value)
    if how == 0 and not isinstance(value, dict):
        bad["messages"][0]["content"] = [{"type": "image_url"}]
    path = write_objs(tmp_path, [*[{"prompt": "fine"}] * before, bad])
    with pytest.raises(WorkloadError) as info:
        load_workload(path)
    assert str(info.value).startswith(f"{path}:{before + 1}: "), str(info.value)
    assert "\n" not in str(info.value)


# -- a representative sample ----------------------------------------------------------------

def _mixed(tmp_path: Path, n: int) -> Path:
    """`n` requests: a quarter share a long system prompt, output lengths vary by 16x."""
    system = "You answer questions about the Orbit data platform. " * 20
    objs: list[dict[str, Any]] = []
    for i in range(n):
        out = 32 * (1 + i % 16)
        if i % 4 == 0:
            objs.append({"messages": [{"role": "system", "content": system},
                                      {"role": "user", "content": f"Question {i}?"}],
                         "expected_output_tokens": out})
        else:
            objs.append({"prompt": f"Item {i}: " + "word " * (i % 37),
                         "expected_output_tokens": out})
    return write_objs(tmp_path, objs)


def test_sample_is_deterministic_ordered_and_of_the_size_asked(tmp_path: Path) -> None:
    wl = load_workload(_mixed(tmp_path, 400))
    a, b, other = wl.sample(40, seed=3), wl.sample(40, seed=3), wl.sample(40, seed=4)
    assert a.requests == b.requests and a.requests != other.requests
    lines = [r.line for r in a.requests]
    assert len(lines) == 40 and lines == sorted(set(lines))
    assert a.stats.count == 40 and wl.stats.count == 400  # no stats cached from the trace
    assert a.sha256 == wl.sha256 and any("sample of 40 of its 400" in n for n in a.notes)
    assert wl.sample(400, seed=0) is wl and wl.sample(1000, seed=0) is wl


def test_sample_keeps_the_traces_shape(tmp_path: Path) -> None:
    wl = load_workload(_mixed(tmp_path, 800))
    part = wl.sample(80, seed=0)
    assert sum(r.kind == "chat" for r in part.requests) == 20  # the shared-prefix group: 1/4
    full, sub = wl.stats.output_tokens, part.stats.output_tokens
    assert abs(sub.mean - full.mean) / full.mean < 0.1
    assert sub.max >= 0.75 * full.max  # the long tail is represented


@given(n=st.integers(1, 60), seed=st.integers(0, 2**32 - 1))
@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_sample_is_a_subset_of_exactly_n(tmp_path: Path, n: int, seed: int) -> None:
    wl = load_workload(SAMPLE)
    part = wl.sample(n, seed)
    assert len(part.requests) == min(n, 50)
    by_line = {r.line: r for r in wl.requests}
    assert all(by_line[r.line] == r for r in part.requests)


# -- repetition (what n-gram speculative decoding could copy) --------------------------------

def test_ngram_repetition_of_known_prompts() -> None:
    from aevyra_forge.core.workload import ngram_repetition

    assert ngram_repetition(["a b c d e f"]) == 0.0  # nothing repeats
    # "x y z" three times: 7 trigrams, of which the last 4 were seen before in the prompt
    assert ngram_repetition(["x y z x y z x y z"]) == pytest.approx(4 / 7)
    # repetition across prompts does not count (that is the prefix cache's business)
    assert ngram_repetition(["p q r s", "p q r s"]) == 0.0
    assert ngram_repetition(["", "one two"]) == 0.0


@settings(max_examples=80, deadline=None)
@given(st.lists(st.lists(st.sampled_from("abcde"), max_size=30).map(" ".join), max_size=6))
def test_ngram_repetition_is_a_share(texts: list[str]) -> None:
    from aevyra_forge.core.workload import ngram_repetition

    share = ngram_repetition(texts)
    assert 0.0 <= share <= 1.0
    for text in texts:  # a prompt quoting itself: every trigram of the copy was seen
        grams = max(0, len(text.split()) - 2)
        assert ngram_repetition([f"{text} {text}"]) >= grams / (2 * grams + 2)
