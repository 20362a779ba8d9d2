"""Tests for aevyra_forge.core.trace_formats: one line of each trace format read into
forge's request fields (loading whole files is tested in test_workload.py)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from aevyra_forge.core.trace_formats import (
    Message,
    RequestLine,
    estimate_tokens,
    from_conversation,
)


def test_message_joins_text_parts_and_sends_a_name_only_when_given() -> None:
    msg = Message.model_validate({"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "name": "n"})
    assert msg.model_dump() == {"role": "user", "content": "a\nb", "name": "n"}
    assert Message(role="user", content="x").model_dump() == {"role": "user", "content": "x"}
    with pytest.raises(ValidationError, match="'input_audio' cannot be replayed"):
        Message.model_validate({"role": "user", "content": [{"type": "input_audio"}]})


def test_output_tokens_precedence() -> None:
    line = RequestLine.model_validate({"prompt": "p", "max_tokens": 9, "output_tokens": 3,
                                       "max_completion_tokens": 7})
    assert line.output_tokens_given() == 7
    assert RequestLine.model_validate({"prompt": "p"}).output_tokens_given() is None


def test_conversation_to_messages_and_estimated_output() -> None:
    fields, estimated = from_conversation({"conversations": [
        {"from": "human", "value": "a"}, {"from": "gpt", "value": "b" * 40},
        {"from": "human", "value": "c"}, {"from": "gpt", "value": "d" * 81}], "id": 1})
    assert estimated
    assert fields["messages"] == [{"role": "user", "content": "a"},
                                  {"role": "assistant", "content": "b" * 40},
                                  {"role": "user", "content": "c"}]
    assert fields["expected_output_tokens"] == estimate_tokens("d" * 81) == 21
    assert fields["id"] == 1
    fields, estimated = from_conversation({"conversations": [
        {"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}], "max_tokens": 5})
    assert not estimated and "expected_output_tokens" not in fields
