"""Tests for aevyra_forge.measure.probe_server: the probe's calls to one server, against
the fake vLLM (tests/fake_vllm.py): vLLM's error bodies as one line, the shared deadline,
and the room a max_model_len leaves."""

from __future__ import annotations

import pytest

from aevyra_forge.core.workload import Request
from aevyra_forge.measure.probe_server import ProbeFailure, connect, error_message, room
from tests.fake_vllm import FakeConfig, FakeLm, FakeVllm


def test_tokenize_generate_and_teacher_force_against_the_toy_model() -> None:
    lm = FakeLm()
    with FakeVllm(FakeConfig()) as fake, connect(fake.url, "fake-model", 60.0, None) as server:
        assert server.max_model_len() == 4096
        ids = server.tokenize(Request(line=1, prompt="a b c"))
        assert ids == lm.encode("a b c")
        out = server.generate(ids, 5)
        assert out == lm.greedy(ids, 5, ignore_eos=False)
        forced = server.teacher_force(ids, out)
        assert [top for top, _ in forced] == out


def test_a_refusal_is_one_line_with_vllms_message() -> None:
    with FakeVllm(FakeConfig(refuse_prompt_logprobs=True)) as fake, \
            connect(fake.url, "fake-model", 60.0, None) as server, \
            pytest.raises(ProbeFailure, match=r"^/v1/completions answered HTTP 400: "
                                              r"prompt_logprobs is not supported"):
        server.teacher_force([0, 20], [21])


def test_a_spent_deadline_fails_before_sending() -> None:
    with FakeVllm(FakeConfig()) as fake, connect(fake.url, "fake-model", 0.0, None) as server:
        with pytest.raises(ProbeFailure, match="timeout after 0 s"):
            server.max_model_len()
        assert fake.requests == []


def test_error_message_and_room() -> None:
    assert error_message('{"error": {"message": "too\\n long"}}') == "too long"
    assert error_message("plain text") == "plain text"
    assert error_message("") == "no message"
    assert len(error_message("x" * 1000)) == 200
    assert room(64, 32) == 31 and room(None, 10) > 10**6
